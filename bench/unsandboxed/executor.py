"""`python -m services.executor` with the script sandbox reported unavailable, so that scripts run
as they do on a host without it (see bench.unsandboxed): the run's uid through `setpriv`."""

from infra.executor import scripts
from services.executor import main


def _no_sandbox() -> str:
    return "the benchmark's e2e_unsandboxed workload runs scripts without the sandbox"


# The one place that decides (infra.executor.scripts.ScriptRun.run asks it before each script).
scripts.unavailable = _no_sandbox  # type: ignore[assignment]

if __name__ == "__main__":
    main()
