"""Given-events / when-command / then-events tests for any Decider module.

A decider module exposes `decide(command, state) -> list[event]`, `evolve(state, event) -> state`
and `initial_state`. Usage:

    given = Spec(run).given
    given(triggered, started).when(Pause(...)).then(RunPaused(...))
    given(triggered).when(Approve(...)).refused(match="cannot approve")

`then` also folds the new events into the state and returns it, so that a test can go on to
assert facts that `evolve` derives (stage results, timestamps).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

from domain.errors import DomainError, Invalid, NotFound, Refused

S = TypeVar("S")


@dataclass(frozen=True)
class Decider(Generic[S]):
    decide: Callable[[Any, S], list[Any]]
    evolve: Callable[[S, Any], S]
    initial_state: S

    @classmethod
    def of(cls, module: Any) -> Decider[Any]:
        return cls(decide=module.decide, evolve=module.evolve, initial_state=module.initial_state)

    def fold(self, events: Sequence[Any], state: S | None = None) -> S:
        s = self.initial_state if state is None else state
        for e in events:
            s = self.evolve(s, e)
        return s


class Spec(Generic[S]):
    """Binds the DSL to one decider: `given = Spec(run_module).given`."""

    def __init__(self, module: Any) -> None:
        self.decider: Decider[Any] = Decider.of(module)

    def given(self, *events: Any) -> Given[Any]:
        return Given(self.decider, events)


@dataclass(frozen=True)
class Given(Generic[S]):
    decider: Decider[S]
    events: tuple[Any, ...]

    @property
    def state(self) -> S:
        return self.decider.fold(self.events)

    def when(self, command: Any) -> When[S]:
        return When(self.decider, self.state, command)


@dataclass(frozen=True)
class When(Generic[S]):
    decider: Decider[S]
    state: S
    command: Any

    def decide(self) -> list[Any]:
        return self.decider.decide(self.command, self.state)

    def then(self, *expected: Any) -> S:
        """Assert the exact events decided (in order); return the state with them folded in."""
        actual = self.decide()
        assert actual == list(expected), _diff(expected, actual)
        return self.decider.fold(actual, self.state)

    def then_nothing(self) -> S:
        return self.then()

    def _raises(self, kind: type[DomainError], match: str | None) -> DomainError:
        with pytest.raises(kind, match=re.escape(match) if match is not None else None) as info:
            events = self.decide()
            pytest.fail(f"expected {kind.__name__}, decided {events!r}")
        return info.value

    def refused(self, match: str | None = None) -> DomainError:
        """The command is refused; `match` is a literal substring of the message."""
        err = self._raises(Refused, match)
        assert type(err) is Refused
        return err

    def not_found(self, match: str | None = None) -> DomainError:
        return self._raises(NotFound, match)

    def invalid(self, match: str | None = None) -> DomainError:
        return self._raises(Invalid, match)


def _diff(expected: Sequence[Any], actual: Sequence[Any]) -> str:
    lines = ["decided events differ", "expected:"]
    lines += [f"  {e!r}" for e in expected] or ["  (nothing)"]
    lines.append("actual:")
    lines += [f"  {e!r}" for e in actual] or ["  (nothing)"]
    return "\n".join(lines)
