-- Agents: processes on other hosts that run the steps the executor hands them (POST /api/v1/agents).
-- An agent is a broker user (named by its id) with a bcrypt hash of its password; a revoked one is
-- no longer a user of the broker. `org` NULL: a shared agent (runs units of every organization).
CREATE TABLE IF NOT EXISTS agents (
    id            text PRIMARY KEY,
    org           text,
    name          text NOT NULL,
    labels        text[] NOT NULL DEFAULT '{}',
    capacity      integer NOT NULL,
    password_hash text NOT NULL,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX IF NOT EXISTS agents_active ON agents (org) WHERE revoked_at IS NULL;
