"""`python -m services.agent`, unchanged (see bench.unsandboxed)."""

from services.agent import main

if __name__ == "__main__":
    main()
