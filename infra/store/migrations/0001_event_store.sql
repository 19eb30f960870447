-- The event store. Positions come from an identity column, which commits out of order;
-- each row is also stamped with its writer's transaction id (xid8) so that a follower can
-- read only below the oldest transaction still running and never skip a late commit.
CREATE TABLE streams (
    stream_id text PRIMARY KEY,
    version   bigint NOT NULL
);

CREATE TABLE events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stream_id      text NOT NULL,
    stream_version bigint NOT NULL,
    event_id       uuid NOT NULL UNIQUE,
    event_type     text NOT NULL,
    org            text,
    pipeline_id    text,
    run_id         text,
    data           json NOT NULL,  -- kept byte for byte as written
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- The real guard against a lost race: two writers can never hold one version.
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX events_feed ON events (tx_id, position);
CREATE INDEX events_run ON events (run_id, tx_id, position) WHERE run_id IS NOT NULL;
CREATE INDEX events_pipeline ON events (pipeline_id, tx_id, position) WHERE pipeline_id IS NOT NULL;

-- Unique keys claimed in the same transaction as an append (pipeline names per organization).
CREATE TABLE unique_keys (
    scope  text NOT NULL,
    key    text NOT NULL,
    owner  text NOT NULL,
    PRIMARY KEY (scope, key)
);

-- Responses of POST commands sent with an Idempotency-Key.
CREATE TABLE idempotency_keys (
    scope        text NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    status_code  int,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Where each follower (relay, projector) stands in the feed.
CREATE TABLE checkpoints (
    name     text PRIMARY KEY,
    tx_id    xid8 NOT NULL,
    position bigint NOT NULL
);
