-- Environments, components and notification channels of an organization (`org` NULL: none).
-- `doc` holds the public fields; `secret` (a webhook's HMAC key) is never returned by the API.
CREATE TABLE delivery_config (
    kind       text NOT NULL CHECK (kind IN ('environment', 'component', 'channel')),
    id         text NOT NULL,
    org        text,
    name       text NOT NULL,
    doc        jsonb NOT NULL,
    secret     text,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX delivery_config_name ON delivery_config (kind, coalesce(org, ''), name);

-- Read model of deployments, maintained by the projector from `deployment-<id>` streams.
CREATE TABLE rm_deployments (
    id             text PRIMARY KEY,
    org            text,
    environment_id text NOT NULL,
    component_id   text NOT NULL,
    status         text NOT NULL,
    queued_at      timestamptz NOT NULL,
    finished_at    timestamptz,
    doc            jsonb NOT NULL,
    state          jsonb NOT NULL
);
CREATE INDEX rm_deployments_env ON rm_deployments (org, environment_id, queued_at DESC);
CREATE INDEX rm_deployments_org ON rm_deployments (org, queued_at DESC);
