-- Organization and pipeline secrets (/api/v1/secrets), sealed with the secrets key (AES-256-GCM,
-- bound to the organization, the pipeline and the name: a value copied to another row does not
-- decrypt). `org` is '' for callers without an organization; `pipeline_id` is '' for a secret of
-- the whole organization. Values are never returned by the API nor written to events.
CREATE TABLE stored_secrets (
    org         text NOT NULL,
    pipeline_id text NOT NULL DEFAULT '',
    name        text NOT NULL,
    value       bytea NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org, pipeline_id, name)
);
