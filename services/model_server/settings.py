"""Typed settings of the model server: env `HIERMEM_MODEL_<FIELD>`, mirrored by `hiermem serve-model` flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def parse_static_addresses(value: object) -> dict[str, list[str]]:
    """Accept `{"shard": ["h:p", ...]}`, its JSON text, or `shard=h:p,shard=h:p2` (one replica per item)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in value.items()}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return parse_static_addresses(json.loads(text))
        out: dict[str, list[str]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            shard, sep, addr = item.partition("=")
            if not sep or not shard or not addr:
                raise ValueError(f"static address {item!r} is not of the form shard=host:port")
            out.setdefault(shard.strip(), []).append(addr.strip())
        return out
    raise ValueError("static_addresses must be a mapping or 'shard=host:port,...'")


class ModelServerSettings(BaseSettings):
    """Everything the model server is configured with; built once at start-up and passed down."""

    model_config = SettingsConfigDict(env_prefix="HIERMEM_MODEL_", extra="forbid", use_attribute_docstrings=True)

    anchor: str = "smollm2"
    """Anchor to load: `smollm2`, `tiny`, or a directory of an HF checkpoint."""
    bank: Path | None = None
    """Bank directory (manifest.json + tree.safetensors); None serves the anchor alone."""
    redis_url: str | None = None
    """Redis URL for shard discovery (docs/design.md §5); None uses static addresses or the bank's files."""
    static_addresses: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    """Shard replicas without Redis: `shard=host:port,...`; empty with no Redis reads blocks from `bank`."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to bind; 0 picks a free one (logged as `LISTENING host:port`)."""
    model_name: str = "hiermem"
    """Model id reported by `/v1/models` and accepted in requests (besides the anchor name)."""
    cache_bytes: int = Field(2 * 2**30, ge=0)
    """Byte budget of the block cache's LRU part (pinned levels are counted apart)."""
    pinned_levels: int = Field(1, ge=0, le=16)
    """Levels 1..pinned_levels are preloaded at start-up and never evicted."""
    max_batch: int = Field(16, ge=1, le=256)
    """Most sequences decoded together (KV-cache slots)."""
    max_queue: int = Field(64, ge=0)
    """Most requests waiting for a slot; one more gets 429 + Retry-After."""
    scheduler: Literal["subtree", "fifo"] = "subtree"
    """Admission order: `subtree` favours requests sharing memory nodes with the batch; `fifo` is plain."""
    max_wait_s: float = Field(30.0, gt=0)
    """Aging bound of the subtree scheduler: a request waiting this long is admitted first."""
    max_skips: int = Field(6, ge=0)
    """Aging bound in admissions: a request passed over this many times by later arrivals goes first."""
    wait_factor: float = Field(2.0, ge=0)
    """Relative aging bound of the subtree scheduler: a request waiting this many times the recent mean
    wait goes first (0 = off). Keeps the tail of the time to first token near FIFO's."""
    admit_group: int = Field(2, ge=1)
    """Subtree scheduler: while the batch runs, admit only when this many rows are free (or fewer wait), so
    the admitted requests are chosen to share memory with each other too."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of the anchor, its KV cache and the memory slots: `auto` times a matmul in both at
    start-up and takes bfloat16 only where it is clearly faster on this CPU (logged as `compute dtype`)."""
    prefill_chunk: int = Field(256, ge=1)
    """Prompt tokens prefilled per engine step, so running sequences never stall for a whole prompt; prompts
    waiting together share one forward while their chunks, padded to the longest, fit in this many tokens."""
    max_seq_len: int = Field(2048, ge=8)
    """KV-cache length per slot (prompt + generated tokens), capped by the anchor's context."""
    max_prompt_tokens: int = Field(2048, ge=1)
    """Longest prompt accepted (tokens)."""
    max_tokens_limit: int = Field(512, ge=1)
    """Largest `max_tokens` a request may ask for."""
    default_max_tokens: int = Field(16, ge=1)
    """`max_tokens` when the request gives none."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body (bytes); more gets 413."""
    max_prompts: int = Field(8, ge=1)
    """Most prompts in one `/v1/completions` request."""
    api_keys_file: Path | None = None
    """JSON file of hashed API keys (see docs/model_server.md); None leaves the API open."""
    strict: bool = False
    """Answer 503 instead of serving with fewer memory levels when a shard cannot be reached."""
    fetch_timeout_s: float = Field(10.0, gt=0)
    """Deadline of one block fetch from the bank (a replica that has not answered within half of what is left
    is given up for another replica of its shard)."""
    bank_follow_s: float = Field(5.0, ge=0)
    """With a versioned bank root (`current` pointer): seconds between checks whether it points at a new
    version; new requests move to it once every shard has a replica serving it (0 = never)."""
    bank_tls_ca_file: Path | None = None
    """PEM CA bundle to verify the bank shards by: dial them over TLS (mirrors the shards'
    `HIERMEM_BANK_TLS_CERT_FILE`); unset = plaintext."""
    bank_tls_cert_file: Path | None = None
    """PEM client certificate chain for shards that require mutual TLS (`HIERMEM_BANK_TLS_CLIENT_CA_FILE`)."""
    bank_tls_key_file: Path | None = None
    """PEM private key of `bank_tls_cert_file`."""
    bank_tls_server_name: str | None = None
    """Name to expect in the shards' certificates when it is not the host dialled (e.g. one certificate
    for every replica)."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After sent with 429."""
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads for the engine; 0 keeps torch's default."""
    metrics_auth: Literal["open", "key"] = "open"
    """Who may read `/metrics`: `open` (anyone who reaches the port, as Prometheus scrapes without a token)
    or `key` (a Bearer key whose entry in `api_keys_file` has `"metrics": true`; needs `api_keys_file`)."""

    @field_validator("static_addresses", mode="before")
    @classmethod
    def _parse_static(cls, value: object) -> dict[str, list[str]]:
        return parse_static_addresses(value)

    @model_validator(mode="after")
    def _check(self) -> ModelServerSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.bank is None and (self.redis_url or self.static_addresses):
            raise ValueError("redis_url / static_addresses need a bank (its manifest and tree)")
        if self.bank is None and self.strict:
            raise ValueError("strict needs a bank")
        if (self.bank_tls_cert_file is None) != (self.bank_tls_key_file is None):
            raise ValueError("bank_tls_cert_file and bank_tls_key_file go together")
        if self.bank_tls_cert_file is not None and self.bank_tls_ca_file is None:
            raise ValueError("bank_tls_cert_file (mutual TLS) needs bank_tls_ca_file")
        for name in ("bank_tls_ca_file", "bank_tls_cert_file", "bank_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        if self.metrics_auth == "key" and self.api_keys_file is None:
            raise ValueError("metrics_auth = key needs an api_keys_file (the keys allowed to read /metrics)")
        if self.api_keys_file is not None and not Path(self.api_keys_file).is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} does not exist")
        return self
