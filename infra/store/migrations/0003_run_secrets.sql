-- Values of a run's secrets (the trigger body's "secrets"), encrypted at rest with AES-256-GCM
-- (infra/secrets.py): `value` is version byte || nonce || ciphertext+tag, bound to (run_id, name).
-- Events and read models only ever hold the names. Rows are deleted when the run ends.
CREATE TABLE run_secrets (
    run_id     text NOT NULL,
    name       text NOT NULL,
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, name)
);
CREATE INDEX run_secrets_created ON run_secrets (created_at);
