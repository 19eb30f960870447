"""The executor's run log: batched appends, the per-run cap and its marker."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from domain import pipeline as pl
from domain import run as rn
from domain.stages import Stage
from infra.app.commands import Commands
from infra.executor.runlog import RunLog
from infra.metrics import REGISTRY
from infra.store.memory import InMemoryEventStore
from tests.integration.executor_faults import FaultyStore, run_log


async def _run(commands: Commands) -> rn.RunState:
    stage = Stage(id="s", name="s", type="script", order=1, config={"command": "true"})
    state, _ = await commands.trigger(
        _pipeline(stage),
        by="u",
        variables={},
    )
    return state


def _pipeline(stage: Stage) -> pl.PipelineState:
    return pl.evolve(
        pl.initial_state,
        pl.PipelineCreated(
            pipeline_id="p",
            name="p",
            description=None,
            stages=(stage,),
            organization_id=None,
            created_by="u",
            at=datetime.now(UTC),
        ),
    )


async def test_lines_beyond_the_cap_are_dropped_after_one_marker() -> None:
    commands = Commands(InMemoryEventStore())
    state = await _run(commands)
    log = RunLog(commands, state, max_bytes=100, publish=None)
    log.start()
    for i in range(50):
        log.line("s", "stdout", f"line {i:02d}")  # 7 bytes and a newline each: 12 fit in 100
    await log.close()
    chunks = await commands.load_logs(state.run_id)
    lines = [ln for c in chunks for ln in c.lines]
    assert [ln.text for ln in lines[:12]] == [f"line {i:02d}" for i in range(12)]
    assert lines[12].stream == "system" and "truncated" in lines[12].text and "100 bytes" in lines[12].text
    assert len(lines) == 13


async def test_every_line_written_before_close_is_stored_in_order() -> None:
    commands = Commands(InMemoryEventStore())
    state = await _run(commands)
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=0.001, max_lines=7)
    log.start()
    for i in range(1000):
        log.line("s", "stderr" if i % 2 else "stdout", str(i))
    await log.close()
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert texts == [str(i) for i in range(1000)]


def test_log_chunks_stay_small_enough_for_a_nats_message() -> None:
    from infra.executor.runlog import MAX_CHUNK_BYTES, chunk_lines

    line = rn.LogLine("stdout", "x" * 1000)
    buffer = [("s", line)] * 5000 + [("t", line)] * 3  # about 5 MB of output
    chunks = chunk_lines(buffer, datetime.now(UTC))
    assert sum(len(c.lines) for c in chunks) == 5003
    assert all(sum(len(ln.text) for ln in c.lines) <= MAX_CHUNK_BYTES for c in chunks)
    assert [c.stage_id for c in chunks][-1] == "t" and len(chunks[-1].lines) == 3


def test_the_relay_publishes_an_oversized_event_as_a_stub() -> None:
    import json

    from infra.broker.relay import body_for
    from infra.store.records import RecordedEvent

    rec = RecordedEvent(
        position=7,
        tx_id=1,
        stream_id="runlog-r",
        stream_version=3,
        event_id="e",
        event_type="log_appended",
        data=b"{" + b" " * 2_000_000 + b"}",
        org=None,
        pipeline_id=None,
        run_id="r",
        recorded_at=datetime.now(UTC),
    )
    stub = json.loads(body_for(rec, 1_000_000))
    assert stub["truncated"] is True and stub["position"] == 7 and stub["size"] == 2_000_002
    assert body_for(dataclasses.replace(rec, data=b"{}"), 1_000_000) == b"{}"


async def test_lines_whose_appends_fail_for_a_while_all_reach_the_store_in_order() -> None:
    store = FaultyStore(InMemoryEventStore())
    commands = Commands(store)
    state = await _run(commands)
    failing = store.fail_appends(run_log(state.run_id), times=7)  # more than one flush's attempts
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=0.01, retry_delay=0.01)
    log.start()
    for i in range(100):
        log.line("s", "stdout", str(i))
        if i == 50:
            await failing.hit.wait()
    await log.close()
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert failing.hits == 7
    assert texts == [str(i) for i in range(100)]


async def test_lines_held_beyond_the_bound_leave_a_counted_gap_marker_in_their_place() -> None:
    store = FaultyStore(InMemoryEventStore())
    commands = Commands(store)
    state = await _run(commands)
    failing = store.fail_appends(run_log(state.run_id), times=10)  # two flushes' worth of attempts
    # Room for about five held lines of 4 characters (each counts 16 bytes more).
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=3600, retry_delay=0.001, max_held=100)
    for i in range(20):
        log.line("s", "stdout", f"{i:04d}")
    await log.flush()  # fails: the oldest lines beyond the bound are dropped
    for i in range(20, 25):
        log.line("s", "stdout", f"{i:04d}")
    await log.close()
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert failing.hits == 10
    assert texts[0].startswith(f"[log gap: {log.dropped} lines could not be stored")
    assert texts[1:] == [f"{i:04d}" for i in range(log.dropped, 25)]
    assert 0 < log.dropped < 25


async def test_dropped_log_lines_are_counted_in_the_metrics() -> None:
    def counted() -> float:
        return REGISTRY.get_sample_value("pipelines_log_lines_dropped_total") or 0.0

    store = FaultyStore(InMemoryEventStore())
    commands = Commands(store)
    state = await _run(commands)
    store.fail_appends(run_log(state.run_id), times=10**6)  # the store never takes them
    before = counted()
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=3600, retry_delay=0.0, max_held=100)
    for i in range(20):
        log.line("s", "stdout", f"{i:04d}")
    await log.flush()  # the oldest lines beyond the bound are dropped
    held = log.dropped
    assert 0 < held < 20 and counted() == before + held
    await log.close()  # what is still held is lost with the process: counted too
    assert log.dropped == 20 and counted() == before + 20


async def test_finish_hands_over_the_lines_left_instead_of_appending_them() -> None:
    commands = Commands(InMemoryEventStore())
    state = await _run(commands)
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    log = RunLog(commands, state, max_bytes=10**9, publish=publish, interval=3600)
    log.start()
    log.line("s", "stdout", "early")
    await log.flush()  # stored and published on its own
    log.line("s", "stdout", "last")
    last = await log.finish()
    assert last is not None
    assert [ln.text for c in last.chunks for ln in c.lines] == ["last"]
    assert [r.event for r in last.records] == last.chunks and last.stream == f"runlog-{state.run_id}"
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert texts == ["early"]  # the completion appends the rest
    assert len(published) == 1


async def test_finish_with_nothing_left_hands_over_nothing() -> None:
    commands = Commands(InMemoryEventStore())
    state = await _run(commands)
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=0.001)
    log.start()
    log.line("s", "stdout", "only")
    await log.flush()
    assert await log.finish() is None
    assert [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines] == ["only"]


async def test_finish_after_failed_appends_stores_the_lines_itself_behind_the_gap_marker() -> None:
    store = FaultyStore(InMemoryEventStore())
    commands = Commands(store)
    state = await _run(commands)
    store.fail_appends(run_log(state.run_id), times=5)  # one flush's attempts
    log = RunLog(commands, state, max_bytes=10**9, publish=None, interval=3600, retry_delay=0.001, max_held=60)
    for i in range(10):
        log.line("s", "stdout", f"{i:04d}")
    await log.flush()  # fails: held, the oldest dropped
    assert log.dropped
    assert await log.finish() is None
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert texts[0].startswith("[log gap:") and texts[-1] == "0009"


async def test_handed_over_lines_stored_on_their_own_are_stored_once_and_published() -> None:
    commands = Commands(InMemoryEventStore())
    state = await _run(commands)
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    log = RunLog(commands, state, max_bytes=10**9, publish=publish, interval=3600)
    log.line("s", "stdout", "last")
    last = await log.finish()
    assert last is not None
    await log.store(last)
    await log.store(last)  # again (a completion that did take them after all): not stored twice
    texts = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert texts == ["last"]
    assert len(published) == 1 and log.dropped == 0
