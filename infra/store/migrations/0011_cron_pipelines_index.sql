-- Every executor's scheduler reads the pipelines with a cron trigger every tick: a partial index of
-- exactly those rows (its predicate is the scheduler's query's, infra/executor/scheduler.py), so
-- that a tick does not read and parse every pipeline's JSON.
CREATE INDEX rm_pipelines_cron ON rm_pipelines (id)
    WHERE state::jsonb -> 'triggers' @> '[{"type": "cron"}]';
