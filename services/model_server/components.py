"""What a running model server is made of, and how it is built from settings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from memory_store import AnchorIdentity, Bank, NodeRef
from services.memory_bank.result import FetchResult

from .auth import KeyStore
from .block_cache import BlockCache, Fetcher
from .codec import Codec
from .engine import Engine
from .metrics import Metrics
from .resolver import BankView, Embed, MemoryResolver
from .scheduler import Scheduler
from .settings import ModelServerSettings

if TYPE_CHECKING:  # pragma: no cover
    from services.memory_bank.client import BankClient

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
    closers: list[Callable[[], object]] = field(default_factory=list)

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


class LocalFetcher:
    """Reads blocks straight from the bank's shard files (no bank service configured)."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank

    def fetch(self, refs: Sequence[NodeRef]) -> FetchResult:
        result = FetchResult()
        for ref in refs:
            try:
                block = self.bank.read_block(ref, packed=True)  # as stored, like the bank client's
            except Exception as exc:  # reported per node, like the bank client
                result.failed[ref] = f"{type(exc).__name__}: {exc}"
                continue
            result.blocks[ref] = block
            result.nbytes += block.numel() * block.element_size()
        return result

    def close(self) -> None:
        """Nothing to close: the bank is the server's."""


def pin_deadline_s(settings: ModelServerSettings) -> float:
    """How long start-up keeps retrying pinned blocks that failed (a fetch timed out on a loaded machine, a
    shard still starting) before leaving them to be fetched on demand: 6 fetch timeouts, at least a minute."""
    return max(60.0, 6.0 * settings.fetch_timeout_s)


def build_memory_side(settings: ModelServerSettings, bank: BankView, fetcher: Fetcher, embed: Embed,
                      metrics: Metrics, dtype: torch.dtype = torch.float32) -> tuple[MemoryResolver, BlockCache]:
    """Block cache (shallow levels preloaded) and the resolver over it; blocks are held in `dtype`, the
    runner's compute dtype, so they are converted once, when fetched."""
    cache = BlockCache(fetcher, capacity_bytes=settings.cache_bytes, pinned_levels=settings.pinned_levels,
                       shard_of=bank.shard_of, subtree_of=lambda ref: bank.tree.ancestor(ref.level, ref.index, 1),
                       metrics=metrics, timeout_s=settings.fetch_timeout_s, dtype=dtype)
    resolver = MemoryResolver(bank, cache, embed, strict=settings.strict, metrics=metrics, dtype=dtype)
    if settings.pinned_levels:
        # a deleted node never comes back: not asked for, not retried
        refs = [ref for ref in resolver.pinned_refs(settings.pinned_levels) if bank.is_present(ref)]
        failed = cache.preload(refs, deadline_s=pin_deadline_s(settings))
        log.info("preloaded %d pinned blocks (%d unavailable)", len(refs) - len(failed), len(failed))
    return resolver, cache


def make_fetcher(settings: ModelServerSettings, bank: Bank, metrics: Metrics) -> LocalFetcher | BankClient:
    """The bank client of `bank` (shard replicas through Redis / static addresses, TLS as configured), or
    the bank's own files when no bank service is configured."""
    if not (settings.redis_url or settings.static_addresses):
        return LocalFetcher(bank)
    from services.memory_bank.client import BankClient

    return BankClient(
        bank, redis_url=settings.redis_url, static_addresses=settings.static_addresses or None,
        timeout_s=settings.fetch_timeout_s, tls_ca_file=settings.bank_tls_ca_file,
        tls_cert_file=settings.bank_tls_cert_file, tls_key_file=settings.bank_tls_key_file,
        tls_server_name=settings.bank_tls_server_name,
        on_reject=lambda _addr, _why: metrics.rejected_replicas.inc())


def build_components(settings: ModelServerSettings) -> Components:
    """Load the anchor, open the bank (refusing one built for another anchor), connect the bank client,
    preload the pinned levels; the engine is started by the app's lifespan. With a versioned bank root
    (docs/operating.md) a `BankFollower` moves new requests to a new version once its replicas serve."""
    from .runner import load_codec_and_runner

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = Metrics()
    keys = KeyStore.load(settings.api_keys_file)
    bank = None
    if settings.bank is not None:
        bank = Bank.open(settings.bank)
        log.info("bank %s from %s", bank.bank_id[:12], bank.dir)
    anchor, codec, runner = load_codec_and_runner(
        settings.anchor, n_slots=settings.max_batch, max_seq_len=settings.max_seq_len,
        memory_layers=bank.spec.memory_layers if bank is not None else None, dtype=settings.dtype)
    metrics.track_reserved(lambda: runner.reserved_bytes)
    closers: list[Callable[[], object]] = []
    resolver, bank_id, ready_check = None, None, (lambda: (True, "ok"))
    embed = None
    if bank is not None:
        from memory_store import load_embedder

        bank.check_anchor(anchor.identity)  # BankMismatch: server.py ends the process with its message
        bank_id = bank.bank_id
        fetcher = make_fetcher(settings, bank, metrics)
        closers.append(fetcher.close)
        embed = load_embedder(bank.spec.embedder_name).embed
        resolver, cache = build_memory_side(settings, bank, fetcher, embed, metrics, runner.compute_dtype)
        closers.append(cache.close)
        ready_check = _bank_ready_check(fetcher)
    engine = Engine(runner, scheduler=Scheduler(
        settings.scheduler, settings.max_wait_s, settings.max_skips, settings.wait_factor, settings.admit_group),
                    max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk, metrics=metrics,
                    retry_after_s=settings.retry_after_s, max_rows=settings.max_batch)
    ids = [settings.model_name] + ([settings.anchor] if settings.anchor != settings.model_name else [])
    comps = Components(settings=settings, metrics=metrics, keys=keys, codec=codec, engine=engine,
                       resolver=resolver, model_ids=ids, bank_id=bank_id, ready_check=ready_check,
                       closers=closers)
    if bank is not None and embed is not None and settings.bank_follow_s > 0:
        from memory_store.bank import is_version_root

        if settings.bank is not None and is_version_root(settings.bank):
            follower = BankFollower(comps, bank, anchor.identity, embed)
            follower.start()
            closers.append(follower.stop)  # closers run last first: the follower stops before the rest
    return comps


class BankFollower:
    """Moves a running model server to the bank version its root's `current` points at, once every shard
    of that version has a replica that serves it (GetInfo checked) and the pinned levels are loaded.

    New requests then use the new version's resolver (its own bank client and block cache); a request
    resolved before the switch keeps the blocks it has (keys are qualified by version, so the engine never
    mixes them); the old client and cache are closed `2 * fetch_timeout_s` later. A version that does not
    fit this server (another anchor, embedder or memory layers) is refused once, with an error in the log."""

    def __init__(self, comps: Components, bank: Bank, anchor_identity: AnchorIdentity | dict[str, str],
                 embed: Embed) -> None:
        self.comps = comps
        self.settings = comps.settings
        self.bank = bank
        self.anchor_identity = anchor_identity
        self.embed = embed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bank-follower", daemon=True)
        self._refused: set[str] = set()
        self._retired: list[tuple[float, list[Callable[[], object]]]] = []
        self.switches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        for _, closers in self._retired:
            _close_all(closers)
        self._retired.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.bank_follow_s):
            try:
                self.check_once()
            except Exception:  # following must never take the server down
                log.exception("bank follower: check failed")
            now = time.monotonic()
            for item in [r for r in self._retired if r[0] <= now]:
                self._retired.remove(item)
                _close_all(item[1])

    def check_once(self) -> bool:
        """Switch to the version `current` points at now if it can be served; returns whether it did."""
        from memory_store.bank import resolve_bank_dir

        assert self.settings.bank is not None
        target = resolve_bank_dir(self.settings.bank)
        if target == self.bank.dir or str(target) in self._refused:
            return False
        new = Bank.open(target)
        try:
            new.check_anchor(self.anchor_identity)
            new.check_embedder(self.bank.spec.embedder_name, self.bank.spec.embedder_dim)
            if (new.spec.memory_layers, new.spec.d_model) != (self.bank.spec.memory_layers, self.bank.spec.d_model):
                raise ValueError("its memory layers or width differ from the loaded bank's: restart the server")
        except Exception as exc:
            self._refused.add(str(target))
            log.error("bank follower: not switching to %s: %s", target, exc)
            return False
        fetcher = make_fetcher(self.settings, new, self.comps.metrics)
        if not isinstance(fetcher, LocalFetcher):
            serving = fetcher.verified_replicas()
            missing = [s for s in new.shard_ids if not serving.get(s)]
            if missing:
                log.info("bank follower: version %s (%s) not served yet by shards %s; staying on %s",
                         target.name, new.bank_id[:12], missing, self.bank.bank_id[:12])
                fetcher.close()
                return False
        resolver, cache = build_memory_side(self.settings, new, fetcher, self.embed, self.comps.metrics,
                                            self.comps.engine.runner.compute_dtype)
        old_closers = [c for c in self.comps.closers if c != self.stop]  # (bound methods: ==, not is)
        self.comps.resolver = resolver  # new requests resolve against the new version from here on
        self.comps.bank_id = new.bank_id
        self.comps.ready_check = _bank_ready_check(fetcher)
        self.comps.closers[:] = [fetcher.close, cache.close, self.stop]
        self._retired.append((time.monotonic() + 2 * self.settings.fetch_timeout_s, old_closers))
        log.info("bank follower: switched from %s to %s (%s)", self.bank.bank_id[:12], new.bank_id[:12], target)
        self.bank = new
        self.switches += 1
        return True


def _close_all(closers: list[Callable[[], object]]) -> None:
    for close in reversed(closers):
        try:
            close()
        except Exception:
            log.exception("error while closing")


def _bank_ready_check(fetcher: LocalFetcher | BankClient) -> Callable[[], tuple[bool, str]]:
    """Ready when the bank client knows at least one replica of some shard (local files: always)."""
    if isinstance(fetcher, LocalFetcher):
        return lambda: (True, "ok")
    replicas = fetcher.replicas

    def check() -> tuple[bool, str]:
        try:
            known = {shard: addrs for shard, addrs in replicas().items() if addrs}
        except Exception as exc:  # a probe that fails means not ready
            return False, f"bank client unavailable: {exc}"
        return (True, "ok") if known else (False, "no bank shard replica known")

    return check
