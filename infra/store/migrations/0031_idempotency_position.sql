-- The store position a keyed command wrote, so that its replay answers the same
-- `Pipelines-Position` header as the first answer (read-your-writes). Null in the records kept
-- before this column existed, and for commands that wrote nothing: replayed without the header.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS position bigint;
