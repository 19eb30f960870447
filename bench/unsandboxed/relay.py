"""`python -m services.relay`, unchanged (see bench.unsandboxed)."""

from services.relay import main

if __name__ == "__main__":
    main()
