-- A pending Idempotency-Key is held by its first request only for a short lease: if that request's
-- process dies, a retry takes the key over instead of waiting for the 24-hour expiry. (Commands
-- that create something derive its id from the key, so a takeover cannot create it twice.)
ALTER TABLE idempotency_keys ADD COLUMN locked_until timestamptz NOT NULL DEFAULT now();
