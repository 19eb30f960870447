-- Read-only broker credentials issued to downstream systems, one organization each
-- (POST /api/v1/broker-credentials). Only a bcrypt hash of the password is kept: the NATS
-- configuration names users by it. Revoked or expired rows are no longer users of the broker.
CREATE TABLE IF NOT EXISTS broker_credentials (
    id            text PRIMARY KEY,
    org           text,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    stream        text NOT NULL,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX IF NOT EXISTS broker_credentials_active ON broker_credentials (org) WHERE revoked_at IS NULL;
