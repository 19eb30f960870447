-- Which executor runs which stage attempt, kept alive by heartbeats. A lease that is not renewed
-- means its executor was lost: another executor kills what is left of the script (same host)
-- and records the attempt as failed, so the run never hangs.
CREATE TABLE stage_leases (
    run_id      text NOT NULL,
    stage_id    text NOT NULL,
    attempt     int NOT NULL,
    executor_id text NOT NULL,
    host        text NOT NULL,
    pgid        int,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, stage_id, attempt)
);
CREATE INDEX stage_leases_expiry ON stage_leases (expires_at);

-- Work that is due later: a stage retry after its backoff, an approval gate's timeout. Durable,
-- so a restarted executor still does it; claimed with a short lease so two executors don't.
CREATE TABLE run_timers (
    run_id  text NOT NULL,
    kind    text NOT NULL,
    key     text NOT NULL,
    due_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, kind, key)
);
CREATE INDEX run_timers_due ON run_timers (due_at);
