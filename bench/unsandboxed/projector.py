"""`python -m services.projector`, unchanged (see bench.unsandboxed)."""

from services.projector import main

if __name__ == "__main__":
    main()
