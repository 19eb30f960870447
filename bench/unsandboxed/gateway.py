"""`python -m services.gateway`, unchanged (see bench.unsandboxed)."""

from services.gateway import main

if __name__ == "__main__":
    main()
