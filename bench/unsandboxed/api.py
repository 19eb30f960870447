"""`python -m services.api`, unchanged (see bench.unsandboxed)."""

from services.api import main

if __name__ == "__main__":
    main()
