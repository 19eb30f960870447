"""Where and who: profiles in the user's config directory (mode 0600), overridden by the environment."""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cli.errors import USAGE, CliError

DEFAULT_API = "http://127.0.0.1:8080"
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class Profile:
    name: str
    api: str
    token: str | None


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pipelines"


def config_path() -> Path:
    """config.toml, unless only a config.json exists (either format is read; toml is written)."""
    folder = config_dir()
    toml, js = folder / "config.toml", folder / "config.json"
    return js if js.exists() and not toml.exists() else toml


def load() -> dict[str, Any]:
    """`{"current": name, "profiles": {name: {"api", "token"}}}` (empty when there is no file)."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"profiles": {}}
    try:
        data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: {exc}", USAGE) from exc
    if not isinstance(data.get("profiles", {}), dict):
        raise CliError(f"{path}: 'profiles' must be a table", USAGE)
    data.setdefault("profiles", {})
    return data


def _toml(data: dict[str, Any]) -> str:
    # Only strings are stored; a JSON string literal is a valid TOML basic string.
    lines = [f"current = {json.dumps(data['current'])}"] if data.get("current") else []
    for name, values in sorted(data["profiles"].items()):
        lines.append(f"\n[profiles.{json.dumps(name)}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items() if isinstance(value, str))
    return "\n".join(lines) + "\n"


def save(data: dict[str, Any]) -> Path:
    """Written whole to a 0600 temporary file, then renamed: the token is never readable by others."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else _toml(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remember(name: str | None, api: str, token: str) -> tuple[str, Path]:
    """Store a profile; the first one stored (or one named explicitly) becomes the current one."""
    data = load()
    chosen = name or data.get("current") or DEFAULT_PROFILE
    data["profiles"][chosen] = {"api": api, "token": token}
    if name is not None or not data.get("current"):
        data["current"] = chosen
    return chosen, save(data)


def resolve(name: str | None) -> Profile:
    """The profile `name` (or the current one), with PIPELINES_API_URL / PIPELINES_TOKEN on top."""
    data = load()
    chosen = name or os.environ.get("PIPELINES_PROFILE") or data.get("current") or DEFAULT_PROFILE
    stored = data["profiles"].get(chosen)
    if name is not None and stored is None:
        raise CliError(f"no profile {name!r} in {config_path()}: run `pipelines --profile {name} login`", USAGE)
    stored = stored if isinstance(stored, dict) else {}
    api = os.environ.get("PIPELINES_API_URL") or stored.get("api") or DEFAULT_API
    token = os.environ.get("PIPELINES_TOKEN") or stored.get("token") or None
    return Profile(name=chosen, api=str(api), token=token)
