"""The trace workload's assembly (bench/trace.py) and the profile's summaries (bench/profile.py),
on marks and stacks made here: which hops land in a run's timeline, how repeats are numbered,
what the table of medians keeps and in which order."""

from __future__ import annotations

import json
from pathlib import Path

from bench import profile
from bench.trace import ClientRun, Mark, breakdown, counts, critical_path, read_marks, summarize, timeline

RUN = "r1"


def _run(posted: float = 100.0) -> ClientRun:
    return ClientRun(
        RUN,
        posted=posted,
        created=posted + 0.010,
        frames=[(posted + 0.020, "running"), (posted + 0.021, "running"), (posted + 0.050, "succeeded")],
        done=posted + 0.050,
    )


def test_marks_are_read_with_the_process_name_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "marks.jsonl"
    line = {"t": 1.5, "p": "executor[123]", "hop": "woken", "run": RUN, "what": ""}
    path.write_text(json.dumps(line) + "\n" + '{"t": 2.0, "p": "rel')
    assert read_marks(path) == [Mark(1.5, "executor", "woken", RUN, "")]
    assert read_marks(tmp_path / "absent.jsonl") == []


def test_a_timeline_holds_the_runs_marks_and_the_unnamed_ones_within_it_in_ms_since_the_post() -> None:
    marks = [
        Mark(100.005, "api", "appended", RUN, "run_triggered"),
        Mark(100.006, "relay", "poked", None),  # no run, between the POST and `succeeded`: this run's
        Mark(100.030, "relay", "poked", None),
        Mark(99.0, "relay", "poked", None),  # before the POST: not this run's
        Mark(100.007, "executor", "woken", "another run"),
        Mark(100.040, "executor", "step exited", RUN),
    ]
    assert timeline(_run(), marks) == [
        ("client: POST sent", 0.0),
        ("api: appended run_triggered", 5.0),
        ("relay: poked", 6.0),
        ("client: 201 received", 10.0),
        ("client: frame running received", 20.0),  # the first frame of each status only
        ("relay: poked #2", 30.0),
        ("executor: step exited", 40.0),
        ("client: frame succeeded received", 50.0),
    ]


def test_the_table_is_the_median_of_each_hop_in_order_with_the_gap_from_the_row_above() -> None:
    runs = [
        [("client: POST sent", 0.0), ("executor: woken", 4.0), ("relay: read nothing", 5.0), ("done", 10.0)],
        [("client: POST sent", 0.0), ("executor: woken", 6.0), ("done", 14.0)],
        [("client: POST sent", 0.0), ("executor: woken", 5.0), ("done", 12.0)],
    ]
    rows = summarize(runs)
    # A hop seen in fewer than half of the runs is left out. The gap of the medians, and the
    # median of the gaps within each run (6, 8, 7).
    assert [(r["hop"], r["median_ms"], r["gap_ms"], r["step_ms"], r["runs"]) for r in rows] == [
        ("client: POST sent", 0.0, 0.0, 0.0, 3),
        ("executor: woken", 5.0, 5.0, 5.0, 3),
        ("done", 12.0, 7.0, 7.0, 3),
    ]
    assert rows[1]["p10_ms"] == 4.2 and rows[1]["p90_ms"] == 5.8


def test_the_per_run_gap_is_robust_where_the_gap_of_two_medians_is_not() -> None:
    runs = [[("a", 0.0), ("b", 10.0), ("c", 11.0)], [("a", 0.0), ("b", 30.0), ("c", 31.0)], [("a", 0.0), ("b", 20.0)]]
    rows = {r["hop"]: r for r in summarize(runs)}
    assert rows["c"]["gap_ms"] == 1.0 and rows["c"]["step_ms"] == 1.0
    runs[2].append(("c", 90.0))  # one slow run moves c's median: the gap of the medians follows it
    rows = {r["hop"]: r for r in summarize(runs)}
    assert rows["c"]["gap_ms"] == 11.0 and rows["c"]["step_ms"] == 1.0


def test_the_critical_path_leaves_out_the_fan_out_of_events_between_the_start_and_the_end() -> None:
    path = critical_path(
        [
            [
                ("client: POST sent", 0.0),
                ("relay: published run_triggered", 3.0),
                ("gateway: pushed stage_started", 8.0),
                ("store: now() of append stage_succeeded,stage_started", 9.0),
                ("executor: appended stage_succeeded,run_succeeded", 10.0),
                ("gateway: pushed run_succeeded", 12.0),
            ]
        ]
    )
    assert [r["hop"] for r in path] == [
        "client: POST sent",
        "relay: published run_triggered",
        "store: now() of append stage_succeeded,stage_started",
        "executor: appended stage_succeeded,run_succeeded",
        "gateway: pushed run_succeeded",
    ]
    assert [r["gap_ms"] for r in path] == [0.0, 3.0, 6.0, 1.0, 2.0]


def test_hops_are_counted_per_run_one_per_event_for_the_fan_out() -> None:
    runs = [
        [("relay: read run_triggered", 1.0), ("relay: read stage_started", 2.0), ("relay: read nothing", 3.0)],
        [
            ("relay: read run_triggered", 1.0),
            ("relay: read nothing", 2.0),
            ("relay: read run_started", 3.0),
            ("relay: read nothing #2", 4.0),
        ],
    ]
    assert counts(runs) == {"relay: read": 2.0, "relay: read nothing": 1.5}


def test_a_profile_counts_self_samples_at_the_innermost_frame_and_inclusive_ones_once_per_stack() -> None:
    text = "\n".join(
        [
            "<module> (services/relay.py:30);run_forever (asyncio/base_events.py:600);"
            "pump_once (infra/broker/relay.py:180);read_feed (infra/store/postgres.py:200) 6",
            "<module> (services/relay.py:30);pump_once (infra/broker/relay.py:181);"
            "pump_once (infra/broker/relay.py:190) 3",
            "<module> (services/relay.py:30);publish (/x/site-packages/nats/js/client.py:12) 1",
            "not a stack line",
        ]
    )
    stacks = profile.parse_collapsed(text)
    assert len(stacks) == 3
    s = profile.summary(stacks)
    assert s["samples"] == 10
    assert s["self"][0] == {"function": "read_feed (infra/store/postgres.py)", "samples": 6, "pct": 60.0}
    inclusive = {r["function"]: r["samples"] for r in s["inclusive"]}
    # Counted once in a stack where it appears twice; the entry point and the event loop left out.
    assert inclusive == {
        "pump_once (infra/broker/relay.py)": 9,
        "read_feed (infra/store/postgres.py)": 6,
        "publish (/x/site-packages/nats/js/client.py)": 1,
    }
    assert {r["function"]: r["pct"] for r in s["self_by_package"]} == {"infra": 90.0, "nats": 10.0}


def test_the_breakdown_charges_each_gap_of_the_causal_chain_to_what_ended_it() -> None:
    run = [
        ("client: POST sent", 0.0),
        ("api: trigger", 2.0),
        ("store: now() of append run_triggered", 3.0),
        ("client: 201 received", 5.0),  # a parallel branch: not charged
        ("api: appended run_triggered", 6.0),
        ("executor: woken", 7.0),
        ("executor: loaded", 8.0),
        ("store: now() of append run_started,stage_started", 10.0),
        ("executor: appended run_started,stage_started", 13.0),
        ("executor: unit s1", 13.5),
        ("executor: loaded #2", 14.0),  # a second read of the run while its step runs: not charged
        ("executor: step started", 20.0),
        ("executor: step exited", 22.0),
        ("store: now() of append stage_succeeded,run_succeeded", 23.0),
        ("relay: read run_succeeded", 25.0),
        ("executor: appended stage_succeeded,run_succeeded", 26.0),  # after the relay saw it committed
        ("nats: stored run_succeeded", 26.5),
        ("gateway: received run_succeeded", 27.0),
        ("client: frame succeeded received", 28.0),
    ]
    costs = {r["cost"]: r["median_ms"] for r in breakdown([run])}
    assert sum(costs.values()) == 28.0  # the run's POST to `succeeded`
    assert costs["commits (statement to return: WAL fsync)"] == 6.0  # 3 + 3; the last one ends at the relay's read
    assert costs["relay: woken and feed read of the last event"] == 2.0
    assert costs["executor/API Python between hops (decide, leases, log flush)"] == 1.0 + 2.0 + 0.5 + 1.0
    assert costs["runner: fork and exec of the step (first: sandbox ready)"] == 6.5
