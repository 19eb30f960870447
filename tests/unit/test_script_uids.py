"""A uid per run: claimed atomically on the host, stable for a run, released when it ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.config import parse_uid_range
from infra.executor.uids import NoFreeUid, ScriptUids


def test_a_run_keeps_its_uid_and_concurrent_runs_get_different_ones(tmp_path: Path) -> None:
    uids = ScriptUids(tmp_path / "uids", 300_000, 300_009)
    a = uids.acquire("run-a")
    assert uids.acquire("run-a") == a
    others = {uids.acquire(f"run-{i}") for i in range(9)}
    assert a not in others and len(others) == 9
    with pytest.raises(NoFreeUid):
        uids.acquire("one-too-many")
    uids.release("run-a")
    assert uids.acquire("one-too-many") == a
    assert ScriptUids(tmp_path / "uids", 300_000, 300_009).acquire("run-3") in others  # another process


def test_stale_claims_without_processes_are_found_and_dropped_by_their_holder(tmp_path: Path) -> None:
    uids = ScriptUids(tmp_path / "uids", 300_000, 300_001)
    uid = uids.acquire("gone")
    old = 1_000_000_000
    os.utime(tmp_path / "uids" / str(uid), (old, old))
    mine = ScriptUids(tmp_path / "uids", os.getuid(), os.getuid())
    mine.acquire("alive")  # a uid with live processes (ours) is never swept
    os.utime(tmp_path / "uids" / str(os.getuid()), (old, old))
    assert uids.stale(older_than=60) == [(uid, "gone")]
    uids.drop(uid, "someone-else")  # only its holder's claim is dropped
    assert (tmp_path / "uids" / str(uid)).exists()
    uids.drop(uid, "gone")
    assert not (tmp_path / "uids" / str(uid)).exists()
    assert (tmp_path / "uids" / str(os.getuid())).exists()


def test_the_uid_range_setting() -> None:
    assert parse_uid_range("200000-299999") == (200_000, 299_999)
    assert parse_uid_range("off") is None
    for bad in ("12", "5-2000", "2000-1000", "a-b"):
        with pytest.raises(ValueError, match="PIPELINES_SCRIPT_UIDS"):
            parse_uid_range(bad)


def test_concurrent_claims_for_one_run_agree_on_its_uid(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    uids = ScriptUids(tmp_path / "uids", 300_000, 300_099)
    for n in range(20):
        with ThreadPoolExecutor(8) as pool:
            got = set(pool.map(uids.acquire, [f"run-{n}"] * 8))
        assert len(got) == 1
