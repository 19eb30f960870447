-- The runs list across an organization's pipelines (GET /api/v1/runs), newest first, with or
-- without a status filter, and each pipeline's latest run (GET /api/v1/runs/latest).
CREATE INDEX IF NOT EXISTS rm_runs_org ON rm_runs (org, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS rm_runs_org_status ON rm_runs (org, status, created_at DESC, id DESC);
