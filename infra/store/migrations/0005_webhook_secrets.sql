-- Per-pipeline webhook secrets, encrypted with the secrets key; set by an admin, never returned.
CREATE TABLE webhook_secrets (
    pipeline_id text PRIMARY KEY,
    value       bytea NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
