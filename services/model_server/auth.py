"""Bearer API keys stored hashed (sha256), each with a tenant and the level-1 subtrees it may use.

Key file (JSON):

    {"keys": [{"sha256": "<hex of sha256(key)>", "tenant": "acme", "subtrees": [3]},
              {"sha256": "...", "tenant": "ops", "subtrees": null, "metrics": true}]}

`subtrees: null` (or absent) allows every subtree; `[]` allows no memory at all. Optional flags:
`telemetry` (the key sees cache hits/misses, fetch times and `/v1/route`'s `cached`, which tell what other
tenants used recently; default: true for a key with `subtrees: null`, false for one limited to subtrees) and
`metrics` (the key may read `/metrics` when the server runs with `metrics_auth = "key"`; default false).
The plain key never appears in the file, in memory beyond the request, or in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import Unauthorized


def hash_key(key: str) -> str:
    """Hex sha256 of a key, as stored in the key file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (`hm-` + 32 url-safe bytes)."""
    return "hm-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: tenant, the level-1 subtrees whose memories it may use (None = all), whether it may
    see cache state and timings (`telemetry`) and read `/metrics` when that needs a key (`metrics`)."""

    tenant: str
    subtrees: frozenset[int] | None
    telemetry: bool = True
    metrics: bool = False

    def allows(self, level1_index: int) -> bool:
        return self.subtrees is None or level1_index in self.subtrees


ANONYMOUS = Principal(tenant="anonymous", subtrees=None, telemetry=True, metrics=True)
"""The caller of a server without keys: one tenant, nothing to hide from it."""


class KeyStore:
    """Verifies Bearer keys against hashed entries; an empty store (no key file) lets everyone in."""

    def __init__(self, entries: dict[str, Principal] | None = None) -> None:
        self._by_hash = dict(entries or {})

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    @classmethod
    def load(cls, path: Path | None) -> KeyStore:
        if path is None:
            return cls()
        doc = json.loads(Path(path).read_text())
        entries: dict[str, Principal] = {}
        for i, item in enumerate(doc.get("keys", [])):
            digest = str(item["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"key #{i} in {path}: sha256 must be 64 hex digits")
            subtrees = item.get("subtrees")
            flags = {}
            for flag in ("telemetry", "metrics"):
                value = item.get(flag)
                if value is not None and not isinstance(value, bool):
                    raise ValueError(f"key #{i} in {path}: {flag} must be true or false")
                flags[flag] = value
            entries[digest] = Principal(
                tenant=str(item.get("tenant", f"tenant-{i}")),
                subtrees=None if subtrees is None else frozenset(int(s) for s in subtrees),
                telemetry=flags["telemetry"] if flags["telemetry"] is not None else subtrees is None,
                metrics=bool(flags["metrics"]),
            )
        if not entries:
            raise ValueError(f"{path} holds no keys")
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """Principal of an `Authorization: Bearer <key>` header; raises Unauthorized."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = hash_key(key.strip())
        for stored, principal in self._by_hash.items():
            if hmac.compare_digest(stored, digest):
                return principal
        raise Unauthorized("invalid API key")
