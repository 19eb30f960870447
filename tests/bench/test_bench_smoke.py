"""The benchmark suite (`make bench`, bench/) still runs end to end: tiny counts, one repetition,
against the session's PostgreSQL server and an embedded NATS of its own (only one JetStream
stream may own `pipelines.v1.>` per server). Checks that it exits 0 and that its JSON carries
every key the report reads, not what the figures are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.suite import MEDIAN_KEYS, TARGET_NAMES

ROOT = Path(__file__).resolve().parents[2]


def test_bench_suite_runs_end_to_end(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--database-url", database_url, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # the agents and unsandboxed workloads each start a stack of their own
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert not result["errors"]
    for key in ("machine", "servers", "sizes", "repetitions", "medians", "targets", "notes"):
        assert key in result, key
    for key in ("date", "cpu", "cores", "load_avg_start", "load_avg_end"):
        assert key in result["machine"], key
    for section, keys in MEDIAN_KEYS.items():
        for key in keys:
            assert key in result["medians"][section], f"medians.{section}.{key}"
    assert [t["name"] for t in result["targets"]] == list(TARGET_NAMES)
    # Our own figures were measured (the peers' may be skipped when DBOS is not installed).
    m = result["medians"]
    assert m["e2e"]["throughput_per_s"] and m["e2e"]["latency_p50_ms"]
    assert m["e2e_unsandboxed"]["throughput_per_s"] and m["e2e_unsandboxed"]["latency_p50_ms"]
    # Who pays for a run: CPU per run of each service (the server given by URL is not ours to read).
    for name in ("api", "relay", "executor", "projector", "gateway", "nats", "client"):
        assert m["e2e"]["cpu_ms_per_run"][name] is not None, name
        assert m["e2e_unsandboxed"]["cpu_ms_per_run"][name] is not None, name
    assert m["spawn_floor"]["throughput_per_s"]
    assert all(m["event_store"][c]["appends_per_s"] for c in ("1", "8", "32"))
    assert m["projection"]["p99_ms"] is not None
    assert m["fanout"]["p99_ms"] is not None and m["fanout"]["missing_deliveries"] == 0
    assert m["log_delivery"]["p99_ms"] is not None
    assert m["memory"]["rss_waiting_mb"] and m["memory"]["rss_output_peak_mb"]
    agents = m["agents"]["by_agents"]
    assert agents["1"]["per_s"] and agents["2"]["per_s"] and m["agents"]["ratio_2_to_1"]
    # A trace of single runs (issue 17): the client's POST to its `succeeded` frame, through the
    # services' marks, the store's and JetStream's times.
    trace = result["repetitions"][0]["trace"]
    hops = [r["hop"] for r in trace["critical_path"]]
    assert hops[0] == "client: POST sent" and "client: frame succeeded received" in hops
    for hop in ("api: appended run_triggered", "executor: step exited", "nats: stored run_succeeded"):
        assert hop in hops, hop
    assert "## Trace of one run" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.md").read_text().count("|") > 20
