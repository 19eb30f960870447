"""Run secrets: the values of a trigger body's `secrets`, encrypted at rest.

Only the names of a run's secrets enter its events and read models. The values live in the
`run_secrets` table, each one encrypted with AES-256-GCM under a key derived from the configured
key material, with the run id and the secret's name as associated data (a value copied to another
row does not decrypt). The executor reads them when it starts a script stage and deletes them when
the run ends; `purge` removes what a crash left behind.

Key material: `PIPELINES_SECRETS_KEY` when set (at least 32 characters; set the same value on
every api and executor that share a database). Otherwise `<data_dir>/secrets.key` (mode 0600),
created with 32 random bytes by whichever service needs it first; every service of one `make up`
shares the data directory, so they share the key. Copying that file's content into
`PIPELINES_SECRETS_KEY` elsewhere gives the same key.

Two keys are derived from the material with HKDF-SHA256: one encrypts, the other keys an HMAC
that replaces the plain SHA-256 of a request body carrying secrets in `idempotency_keys` (a plain
hash of a body with a short secret in it can be brute-forced by whoever reads the table).

Format of a stored value: version (1 byte) || key id (4 bytes) || nonce (12 bytes) || ciphertext
and tag. The key id (from the encryption key) lets a decryption under another key fail with a
clear message instead of an opaque tag error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import stat
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg_pool import AsyncConnectionPool

from domain import events as ev
from infra.config import Settings

KEY_FILE = "secrets.key"
MIN_KEY_LENGTH = 32
_VERSION = b"\x01"
_NONCE = 12
_KEY_ID = 4
# The run's terminal events: its secrets are no longer needed after any of them.
_TERMINAL_EVENTS = ("run_succeeded", "run_failed", "run_cancelled", "run_stopped", "run_rejected")


class SecretsKeyError(Exception):
    """The key material is missing, too short or unreadable."""


class SecretsUnavailable(Exception):
    """A stored secret cannot be decrypted (the key changed) or is malformed."""


def _derive(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pipelines/run-secrets/" + purpose).derive(
        material
    )


def read_or_create_key_file(path: Path) -> bytes:
    """The key material kept in `path` (0600), created with 32 random bytes when missing.

    Safe when several services start at once: the new key is written to a private temporary
    file and hard-linked into place, which fails if another process got there first; then
    everyone reads the one file that won.
    """
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    material = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, material + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another service created it first: use theirs
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # never leave it readable by others
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    material = b"".join(chunks).strip()
    if len(material) < MIN_KEY_LENGTH:
        raise SecretsKeyError(
            f"{path} holds no usable key (at least {MIN_KEY_LENGTH} characters): restore it, or delete it "
            "to get a new one (secrets of runs still going on are then lost)"
        )
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        raise SecretsKeyError(f"{path} is readable by other users and not ours to fix: make it 0600")
    return material


def load_key_material(settings: Settings) -> bytes:
    """PIPELINES_SECRETS_KEY, else the content of <data_dir>/secrets.key (created when missing)."""
    if settings.secrets_key is not None:
        material = settings.secrets_key.strip().encode()
        if len(material) < MIN_KEY_LENGTH:
            raise SecretsKeyError(f"PIPELINES_SECRETS_KEY must be at least {MIN_KEY_LENGTH} characters")
        return material
    return read_or_create_key_file(Path(settings.data_dir).absolute() / KEY_FILE)


class SecretStore:
    """Encrypted run secrets in `run_secrets`. `key` is the key material (see the module doc)."""

    def __init__(self, pool: AsyncConnectionPool, key: bytes | str) -> None:
        material = key.encode() if isinstance(key, str) else key
        if len(material) < MIN_KEY_LENGTH:
            raise SecretsKeyError(f"the secrets key must be at least {MIN_KEY_LENGTH} bytes")
        self._pool = pool
        enc = _derive(material, b"encrypt")
        self._aead = AESGCM(enc)
        self._key_id = hashlib.sha256(b"key-id" + enc).digest()[:_KEY_ID]
        self._mac_key = _derive(material, b"request-digest")

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    @classmethod
    def from_settings(cls, pool: AsyncConnectionPool, settings: Settings) -> SecretStore:
        return cls(pool, load_key_material(settings))

    # ---- crypto ------------------------------------------------------------------------------

    @staticmethod
    def _aad(run_id: str, name: str) -> bytes:
        return b"pipelines-run-secret\0" + run_id.encode() + b"\0" + name.encode()

    def encrypt(self, run_id: str, name: str, value: str) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, value.encode(), self._aad(run_id, name))
        return _VERSION + self._key_id + nonce + sealed

    def decrypt(self, run_id: str, name: str, blob: bytes) -> str:
        head = 1 + _KEY_ID + _NONCE
        if len(blob) < head + 16 or blob[:1] != _VERSION:
            raise SecretsUnavailable(f"secret {name!r} of run {run_id} is malformed")
        if blob[1 : 1 + _KEY_ID] != self._key_id:
            raise SecretsUnavailable(
                f"secret {name!r} of run {run_id} was encrypted with another key: "
                "PIPELINES_SECRETS_KEY or secrets.key differs between the api and the executor, or changed"
            )
        try:
            plain = self._aead.decrypt(blob[1 + _KEY_ID : head], blob[head:], self._aad(run_id, name))
        except InvalidTag:
            raise SecretsUnavailable(f"secret {name!r} of run {run_id} does not decrypt (tampered with?)") from None
        return plain.decode()

    def request_digest(self, body: bytes) -> str:
        """A keyed hash of a request body, for idempotency keys of requests that carry secrets."""
        return "hmac-sha256:" + hmac.new(self._mac_key, body, hashlib.sha256).hexdigest()

    # ---- storage -----------------------------------------------------------------------------

    async def put(self, run_id: str, values: Mapping[str, str]) -> None:
        if not values:
            return
        rows = [(run_id, name, self.encrypt(run_id, name, value)) for name, value in values.items()]
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO run_secrets (run_id, name, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (run_id, name) DO UPDATE SET value = EXCLUDED.value",
                rows,
            )

    async def get(self, run_id: str) -> dict[str, str]:
        """The run's secrets ({} when it has none, or they were deleted). Raises
        SecretsUnavailable when a value cannot be decrypted."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT name, value FROM run_secrets WHERE run_id = %s ORDER BY name", (run_id,))
            rows = await cur.fetchall()
        return {name: self.decrypt(run_id, name, bytes(value)) for name, value in rows}

    async def names(self, run_id: str) -> list[str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT name FROM run_secrets WHERE run_id = %s ORDER BY name", (run_id,))
            return [row[0] for row in await cur.fetchall()]

    async def delete(self, run_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM run_secrets WHERE run_id = %s", (run_id,))

    async def purge(self, *, older_than: float = 3600.0) -> int:
        """Delete the secrets, stored more than `older_than` seconds ago, of runs that ended or
        that were never recorded (the api died between storing them and appending the run).
        Returns how many rows went."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM run_secrets s WHERE s.created_at < now() - make_interval(secs => %s) AND ("
                " NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = %s || s.run_id)"
                " OR EXISTS (SELECT 1 FROM events e WHERE e.run_id = s.run_id AND e.stream_id = %s || s.run_id"
                "            AND e.event_type = ANY(%s)))",
                (older_than, ev.run_stream(""), ev.run_stream(""), list(_TERMINAL_EVENTS)),
            )
            return cur.rowcount


class WebhookSecrets:
    """Per-pipeline webhook secrets, sealed with the same key as run secrets. Never returned by the API."""

    def __init__(self, store: SecretStore) -> None:
        self._store = store

    @staticmethod
    def _scope(pipeline_id: str) -> str:
        return f"webhook:{pipeline_id}"

    async def set(self, pipeline_id: str, secret: str) -> None:
        sealed = self._store.encrypt(self._scope(pipeline_id), "webhook", secret)
        async with self._store.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO webhook_secrets (pipeline_id, value) VALUES (%s, %s) "
                "ON CONFLICT (pipeline_id) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                (pipeline_id, sealed),
            )

    async def get(self, pipeline_id: str) -> tuple[str, datetime] | None:
        """(secret, when it was set), or None when none is set."""
        async with self._store.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT value, updated_at FROM webhook_secrets WHERE pipeline_id = %s", (pipeline_id,)
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return self._store.decrypt(self._scope(pipeline_id), "webhook", bytes(row[0])), row[1]

    async def delete(self, pipeline_id: str) -> None:
        async with self._store.pool.connection() as conn:
            await conn.execute("DELETE FROM webhook_secrets WHERE pipeline_id = %s", (pipeline_id,))
