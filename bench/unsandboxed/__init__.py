"""The services as `make up` runs them, except that the executor runs scripts without the sandbox
(as on a host where it is unavailable: the run's uid through `setpriv`, one spawn per step, no
namespaces, no runner): the `e2e_unsandboxed` workload, what the sandbox costs a whole run.

For measurement only: the product has no setting that turns the sandbox off when it can be had."""
