-- Idempotency keys past their retention are purged by age (infra/http/idempotency.py).
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
