"""What a running model server is made of, and how it is built from settings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .auth import KeyStore
from .block_cache import BlockCache
from .engine import Engine
from .errors import BankIdentityMismatch
from .generation import Codec
from .memory import MemoryResolver
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import ModelServerSettings

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The parts a running server holds; `create_app` builds them unless a test passes its own."""

    settings: ModelServerSettings
    metrics: Metrics
    keys: KeyStore
    codec: Codec
    engine: Engine
    resolver: MemoryResolver | None = None
    model_ids: list[str] = field(default_factory=list)
    bank_id: str | None = None
    ready_check: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def max_seq_len(self) -> int:
        return int(self.engine.runner.max_seq_len)

    def close(self) -> None:
        self.engine.stop()
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # closing must go on with the others
                log.exception("error while closing")


def check_identity(bank_anchor: Any, anchor_identity: Any) -> None:
    """Refuse a bank built for another anchor (DESIGN §3)."""

    def as_pair(x: Any) -> tuple[str, str]:
        if isinstance(x, dict):
            return str(x.get("arch")), str(x.get("hash"))
        return str(x.arch), str(x.hash)

    bank_pair, anchor_pair = as_pair(bank_anchor), as_pair(anchor_identity)
    if bank_pair != anchor_pair:
        raise BankIdentityMismatch(
            f"the bank was built for anchor {bank_pair[0]} (hash {bank_pair[1][:16]}), but the loaded anchor "
            f"is {anchor_pair[0]} (hash {anchor_pair[1][:16]}); load the matching anchor or rebuild the bank")


class LocalFetcher:
    """Reads blocks straight from the bank's shard files (no bank service configured)."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank

    def fetch(self, refs: list[Any]) -> Any:
        from types import SimpleNamespace

        blocks, failed = {}, {}
        for ref in refs:
            try:
                blocks[ref] = self.bank.read_block(ref)
            except Exception as exc:  # reported per node, like the bank client
                failed[ref] = f"{type(exc).__name__}: {exc}"
        return SimpleNamespace(blocks=blocks, failed=failed)


def build_memory_side(settings: ModelServerSettings, bank: Any, fetcher: Any, embed: Callable,
                      metrics: Metrics) -> tuple[MemoryResolver, BlockCache]:
    """Block cache (shallow levels preloaded) and the resolver over it."""
    sizes = [len(c) for c in bank.tree.centroids]
    cache = BlockCache(fetcher, capacity_bytes=settings.cache_bytes, pinned_levels=settings.pinned_levels,
                       shard_of=lambda ref: str(bank.shard_of(ref)),
                       subtree_of=lambda ref: ref.index // (sizes[ref.level - 1] // sizes[0]), metrics=metrics,
                       timeout_s=settings.fetch_timeout_s)
    resolver = MemoryResolver(bank, cache, embed, strict=settings.strict, metrics=metrics)
    if settings.pinned_levels:
        refs = resolver.pinned_refs(settings.pinned_levels)
        failed = cache.preload(refs)
        log.info("preloaded %d pinned blocks (%d unavailable)", len(refs) - len(failed), len(failed))
    return resolver, cache


def build_components(settings: ModelServerSettings) -> Components:
    """Load the anchor, open the bank (refusing one built for another anchor), connect the bank client,
    preload the pinned levels; the engine is started by the app's lifespan."""
    from .runner import load_codec_and_runner

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = Metrics()
    keys = KeyStore.load(settings.api_keys_file)
    bank = None
    if settings.bank is not None:
        from memory_store import Bank

        bank = Bank.open(settings.bank)
    anchor, codec, runner = load_codec_and_runner(
        settings.anchor, n_slots=2 * settings.max_batch, max_seq_len=settings.max_seq_len,
        memory_layers=bank.spec.memory_layers if bank is not None else None, memory_impl=settings.memory_impl)
    closers: list[Callable[[], Any]] = []
    resolver, bank_id, ready_check = None, None, (lambda: (True, "ok"))
    if bank is not None:
        from memory_store import load_embedder

        check_identity(bank.anchor, anchor.identity)
        bank_id = bank.bank_id
        if settings.redis_url or settings.static_addresses:
            from services.memory_bank.client import BankClient

            fetcher: BankClient | LocalFetcher = BankClient(
                bank, redis_url=settings.redis_url, static_addresses=settings.static_addresses or None,
                timeout_s=settings.fetch_timeout_s, tls_ca_file=settings.bank_tls_ca_file,
                tls_cert_file=settings.bank_tls_cert_file, tls_key_file=settings.bank_tls_key_file,
                tls_server_name=settings.bank_tls_server_name,
                on_reject=lambda _addr, _why: metrics.rejected_replicas.inc())
            if hasattr(fetcher, "close"):
                closers.append(fetcher.close)
        else:
            fetcher = LocalFetcher(bank)
        embedder = load_embedder(bank.spec.embedder_name)
        resolver, cache = build_memory_side(settings, bank, fetcher, embedder.embed, metrics)
        closers.append(cache.close)
        ready_check = _bank_ready_check(fetcher)
    engine = Engine(runner, scheduler=Scheduler(
        settings.scheduler, settings.max_wait_s, settings.max_skips, settings.wait_factor, settings.admit_group),
                    max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk, metrics=metrics,
                    retry_after_s=settings.retry_after_s, max_rows=settings.max_batch)
    ids = [settings.model_name] + ([settings.anchor] if settings.anchor != settings.model_name else [])
    return Components(settings=settings, metrics=metrics, keys=keys, codec=codec, engine=engine,
                      resolver=resolver, model_ids=ids, bank_id=bank_id, ready_check=ready_check,
                      closers=closers)


def _bank_ready_check(fetcher: Any) -> Callable[[], tuple[bool, str]]:
    """Ready when the bank client knows at least one replica of some shard (local files: always)."""
    replicas = getattr(fetcher, "replicas", None)
    if replicas is None:
        return lambda: (True, "ok")

    def check() -> tuple[bool, str]:
        try:
            known = {shard: addrs for shard, addrs in replicas().items() if addrs}
        except Exception as exc:  # a probe that fails means not ready
            return False, f"bank client unavailable: {exc}"
        return (True, "ok") if known else (False, "no bank shard replica known")

    return check
