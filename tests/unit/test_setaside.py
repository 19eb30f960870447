"""What counts as a poison event's own fault (set it aside) and what is the database's or the
network's (try again): a passing outage must never set events aside."""

from __future__ import annotations

import msgspec
import psycopg

from infra.setaside import describe, is_poison


def test_bad_data_is_poison_and_outages_are_not() -> None:
    assert is_poison(psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence"))
    assert is_poison(msgspec.ValidationError("Invalid value 'martian_landed'"))
    assert is_poison(ValueError("not enough values to unpack"))
    assert not is_poison(psycopg.OperationalError("connection lost"))
    assert not is_poison(psycopg.errors.UndefinedTable("relation rm_runs does not exist"))
    assert not is_poison(OSError("broken pipe"))
    assert not is_poison(TimeoutError())


def test_an_error_quoting_a_nul_can_be_stored() -> None:
    assert "\x00" not in describe(ValueError("before\x00after"))
