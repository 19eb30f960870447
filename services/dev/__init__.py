"""Development tooling: the `make up` supervisor (stack.py) and the embedded PostgreSQL and NATS servers."""
