"""The benchmark suite: `make bench` (or `python -m bench`).

It measures the system against what a user would pick instead (DBOS, on the same PostgreSQL) and
against the physical floor (bare subprocess spawns, bare INSERT commits), in one run on one
machine, and prints a table of medians plus a JSON file. See docs/benchmarks.md.
"""
