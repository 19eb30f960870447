-- Read models built by the projector. Each row is a document plus the columns lists filter
-- and sort on; the projector rewrites them and its checkpoint in one transaction.
CREATE TABLE rm_pipelines (
    id         text PRIMARY KEY,
    org        text,
    name       text NOT NULL,
    created_at timestamptz NOT NULL,
    doc        jsonb NOT NULL,
    state      json NOT NULL
);
CREATE INDEX rm_pipelines_org ON rm_pipelines (org, created_at, id);

CREATE TABLE rm_runs (
    id          text PRIMARY KEY,
    pipeline_id text NOT NULL,
    org         text,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL,
    doc         jsonb NOT NULL,
    state       json NOT NULL
);
CREATE INDEX rm_runs_pipeline ON rm_runs (pipeline_id, created_at DESC, id DESC);

-- Log chunks of a run, one row per stored LogAppended event, so a log line costs an insert
-- rather than a rewrite of the run's document.
CREATE TABLE rm_run_logs (
    run_id   text NOT NULL,
    position bigint NOT NULL,
    stage_id text,
    lines    jsonb NOT NULL,
    PRIMARY KEY (run_id, position)
);
