"""Pure folds from stored events to read-model rows.

The projector (infra) loads the affected rows, calls these, and writes the results with its
checkpoint in one transaction. A row keeps the folded domain state next to the rendered
document, so the next event folds onto the state rather than re-parsing the document.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from domain import pipeline as pl
from domain import run as rn
from domain.events import Event, is_pipeline_event, is_run_event

_state_encoder = msgspec.json.Encoder()
_pipeline_decoder = msgspec.json.Decoder(pl.PipelineState)
_run_decoder = msgspec.json.Decoder(rn.RunState)


def encode_state(state: pl.PipelineState | rn.RunState) -> bytes:
    return _state_encoder.encode(state)


def decode_pipeline_state(raw: bytes | str) -> pl.PipelineState:
    return _pipeline_decoder.decode(raw)


def decode_run_state(raw: bytes | str) -> rn.RunState:
    return _run_decoder.decode(raw)


@dataclass
class Folded:
    """States touched by a batch of events, keyed by aggregate id."""

    pipelines: dict[str, pl.PipelineState]
    runs: dict[str, rn.RunState]


def fold_pipeline(state: pl.PipelineState, event: Event) -> pl.PipelineState:
    return pl.evolve(state, event) if is_pipeline_event(event) else state


def fold_run(state: rn.RunState, event: Event) -> rn.RunState:
    return rn.evolve(state, event) if is_run_event(event) else state
