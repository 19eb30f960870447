"""The official AsyncAPI JSON Schemas (npm @asyncapi/specs, installed by `npm ci` in
tests/asyncapi_spec) and the validation of a message against the served document."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from infra.asyncapi import asyncapi_document

SPEC_DIR = Path(__file__).parent / "asyncapi_spec"
SCHEMA_FILE = SPEC_DIR / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0.json"


def official_schema() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 JSON Schema; skips (with the reason) when npm cannot install it."""
    if not SCHEMA_FILE.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: the official AsyncAPI 3 JSON Schema comes from npm @asyncapi/specs")
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                cwd=SPEC_DIR,
                capture_output=True,
                text=True,
                timeout=180,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci of @asyncapi/specs took over 180 s (is the npm registry reachable?)")
        if done.returncode != 0 or not SCHEMA_FILE.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"npm could not install @asyncapi/specs (the npm registry unreachable?): {' / '.join(tail)}")
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """A local `#/a/b` reference inside the document."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def check(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate `instance` against a schema of the document (its `#/components/...` refs resolved)."""
    rooted = {"allOf": [schema], "components": doc["components"]}
    jsonschema.Draft7Validator(rooted).validate(instance)


def channel_for(doc: dict[str, Any], subject: str) -> tuple[str, dict[str, Any]]:
    """The NATS channel whose address matches `subject`."""
    for key, channel in doc["channels"].items():
        address = channel["address"]
        if address.startswith("/"):
            continue
        pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^.]+", re.escape(address)) + "$"
        if re.match(pattern, subject):
            return key, channel
    raise AssertionError(f"no channel of the AsyncAPI document matches {subject}")


def check_nats_message(subject: str, headers: dict[str, str] | None, payload: bytes) -> str:
    """Check one NATS message against the document; returns its channel's key."""
    doc = asyncapi_document()
    key, channel = channel_for(doc, subject)
    (message_ref,) = channel["messages"].values()
    message = resolve(doc, message_ref["$ref"])
    check(doc, message["payload"], json.loads(payload))
    if "headers" in message:
        check(doc, message["headers"], dict(headers or {}))
    return key
