"""The bank client's replica set: which addresses serve each shard of its bank, and which to ask first.

Addresses come from static configuration and from Redis discovery (one daemon thread re-reads Redis every
`refresh_s`; the last known replicas of a shard are kept while Redis is away or lists none). A replica is
used only once its `GetInfo` says it serves this bank (bank_id) and this shard of this layout (owned
subtrees): a replica of another bank version or shard layout is dropped (logged, counted in `rejected()`,
reported to `on_reject`) and checked again after `recheck_s`. One channel per address, reused, closed
once discovery no longer lists the address and it has been idle for `channel_idle_s`.

The fetching itself (calls, failover, verification of the blocks) is the client's (client.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from memory_store import Bank

from . import registry, wire
from ._gen import memory_bank_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name  # "hiermem.v1.MemoryBank"
FETCH_METHOD = f"/{SERVICE_NAME}/FetchBlocks"
INFO_METHOD = f"/{SERVICE_NAME}/GetInfo"
# Message size limit set on the channel (a chunk is at most 3 MiB, plus headroom for its header); the
# server sets the same (tests/services/memory_bank checks they agree).
MAX_MESSAGE_BYTES = 4 * 2**20


class AttemptFailed(Exception):
    """One call to one replica failed with `code` (the client decides whether to fail over)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code


@dataclass
class Channel:
    channel: grpc.Channel
    fetch: grpc.UnaryStreamMultiCallable
    info: grpc.UnaryUnaryMultiCallable


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class ReplicaSet:
    """The replicas of `bank`'s shards (see the module docstring); thread-safe.

    Args: as `BankClient`'s of the same names (client.py documents them).
    """

    def __init__(self, bank: Bank, redis_url: str | None = None,
                 static_addresses: Mapping[str, Sequence[str] | str] | None = None, *,
                 refresh_s: float = 2.0, failure_memory_s: float = 30.0, tls_ca_file: str | Path | None = None,
                 tls_cert_file: str | Path | None = None, tls_key_file: str | Path | None = None,
                 tls_server_name: str | None = None, channel_idle_s: float = 60.0, verify_s: float = 30.0,
                 recheck_s: float = 2.0, on_reject: Callable[[str, str], None] | None = None) -> None:
        self.bank_id: str = bank.bank_id
        self.refresh_s = refresh_s
        self.failure_memory_s = failure_memory_s
        self.channel_idle_s = channel_idle_s
        self.verify_s = verify_s
        self.recheck_s = min(recheck_s, verify_s)
        self._on_reject = on_reject
        # address -> (serves our bank and the shard asked?, when checked, why not); see verify
        self._verdicts: dict[str, tuple[bool, float, str]] = {}
        self._rejected: dict[str, int] = {}
        self._owned = {sid: [(r.level, r.index) for r in bank.owned_subtrees(sid)] for sid in bank.shard_ids}
        self._credentials = None
        if tls_ca_file is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca_file), private_key=_read(tls_key_file),
                certificate_chain=_read(tls_cert_file))
        elif tls_cert_file is not None or tls_key_file is not None:
            raise ValueError("a client certificate needs tls_ca_file (TLS) as well")
        self._channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._static = {str(s): [a] if isinstance(a, str) else list(a) for s, a in (static_addresses or {}).items()}
        self._discovered: dict[str, list[str]] = {}
        self._failed_at: dict[str, float] = {}
        self._rr = itertools.count()
        self._channels: dict[str, Channel] = {}
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()  # guards the dicts above (short sections, never held across a call)
        self._closed = threading.Event()
        self._redis = None
        self._refresher: threading.Thread | None = None
        if redis_url is not None:
            self._redis = registry.connect_sync(redis_url)
            self.refresh()
            self._refresher = threading.Thread(target=self._refresh_forever, name="bank-client discovery",
                                               daemon=True)
            self._refresher.start()

    # --- the map -----------------------------------------------------------------------------------------

    def replicas(self) -> dict[str, list[str]]:
        """The current shard -> addresses map (static and discovered)."""
        with self._lock:
            shards = set(self._static) | set(self._discovered)
            return {s: list(dict.fromkeys(self._discovered.get(s, []) + self._static.get(s, []))) for s in shards}

    def rejected(self) -> dict[str, int]:
        """address -> times it was found serving another bank version or shard layout (and dropped)."""
        with self._lock:
            return dict(self._rejected)

    def channel_addresses(self) -> set[str]:
        """The addresses a channel is open to now."""
        with self._lock:
            return set(self._channels)

    # --- discovery ---------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reads Redis now; returns whether it answered."""
        if self._redis is None:
            return False
        try:
            listing = registry.list_replicas_sync(self._redis, self.bank_id)
        except registry.REDIS_ERRORS as exc:
            log.warning("Redis unreachable, keeping the last known replicas: %s", exc)
            return False
        # A shard that Redis lists without replicas (e.g. just after a Redis restart, before the replicas'
        # next heartbeat) keeps its last known addresses: stale ones fail over, missing ones cannot.
        for shard, recs in listing.items():
            good = set()
            for rec in recs:
                why = self._record_mismatch(shard, rec)
                if why:
                    self.reject(str(rec.get("address")), f"registry record: {why}")
                else:
                    good.add(rec["address"])
            with self._lock:
                self._discovered[shard] = sorted(good)
        self._close_stale_channels()
        return True

    def _refresh_forever(self) -> None:
        while not self._closed.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # discovery must keep going
                log.exception("bank client: refresh failed")

    def _record_mismatch(self, shard: str, rec: dict) -> str:
        """Why a registry record cannot be a replica of our bank's `shard` ("" when it can)."""
        if rec.get("bank_id") != self.bank_id:
            return f"serves bank {str(rec.get('bank_id'))[:12]}, not {self.bank_id[:12]}"
        if shard not in self._owned:
            return f"shard {shard} is not in our layout (shards {sorted(self._owned)})"
        owned = [tuple(x) for x in rec.get("owned") or []]
        if owned != self._owned[shard]:
            return f"shard {shard} owns other subtrees in its layout (resharded?)"
        if not isinstance(rec.get("address"), str):
            return "no address"
        return ""

    # --- verdicts ----------------------------------------------------------------------------------------

    def reject(self, addr: str, why: str) -> None:
        """`addr` serves another bank version or layout: skip it until `recheck_s` has passed."""
        with self._lock:
            self._verdicts[addr] = (False, time.monotonic(), why)
            first = addr not in self._rejected
            self._rejected[addr] = self._rejected.get(addr, 0) + 1
        (log.warning if first else log.debug)("not using replica %s: %s", addr, why)
        if self._on_reject is not None:
            try:
                self._on_reject(addr, why)
            except Exception:  # a metrics hook must not break a fetch
                log.exception("on_reject hook failed")

    def failed(self, addr: str) -> None:
        """A call to `addr` failed: ask it after the others for `failure_memory_s`."""
        with self._lock:
            self._failed_at[addr] = time.monotonic()

    def verify(self, addr: str, shard: str, timeout: float) -> None:
        """Checks with GetInfo (once per `verify_s`) that `addr` serves our bank's `shard` in our layout.

        Raises AttemptFailed: UNAVAILABLE-like codes when it cannot be asked, FAILED_PRECONDITION when
        it serves another bank version or layout (then it is dropped and checked again later)."""
        now = time.monotonic()
        with self._lock:
            verdict = self._verdicts.get(addr)
        if verdict is not None and now - verdict[1] < (self.verify_s if verdict[0] else self.recheck_s):
            if verdict[0]:
                return
            raise AttemptFailed(grpc.StatusCode.FAILED_PRECONDITION, verdict[2])
        try:
            info = self.channel(addr).info(pb.GetInfoRequest(), timeout=max(0.01, timeout))
        except grpc.RpcError as exc:
            raise AttemptFailed(exc.code(), f"GetInfo: {exc.details() or ''}") from None
        why = self._record_mismatch(shard, {"bank_id": info.bank_id, "address": addr,
                                            "owned": [(n.level, n.index) for n in info.owned]})
        if not why and info.shard_id != shard:
            why = f"serves shard {info.shard_id}, not {shard}"
        if why:
            self.reject(addr, why)
            raise AttemptFailed(grpc.StatusCode.FAILED_PRECONDITION, why)
        with self._lock:
            self._verdicts[addr] = (True, now, "")

    def order(self, addresses: list[str]) -> list[str]:
        """Round-robin among replicas without a recent failure, then the failed ones, oldest failure first,
        then those last found serving another bank version or layout (asked again after `recheck_s`)."""
        if not addresses:
            return []
        now = time.monotonic()
        k = next(self._rr) % len(addresses)
        rotated = addresses[k:] + addresses[:k]
        with self._lock:
            verdicts, failed = dict(self._verdicts), dict(self._failed_at)

        def rank(addr: str) -> tuple[bool, float]:
            v = verdicts.get(addr)
            t = failed.get(addr, 0.0)
            return (v is not None and not v[0], t if now - t < self.failure_memory_s else 0.0)

        return sorted(rotated, key=rank)  # stable: equal keys keep the rotation

    # --- channels ----------------------------------------------------------------------------------------

    def channel(self, addr: str) -> Channel:
        with self._lock:
            self._last_used[addr] = time.monotonic()
            entry = self._channels.get(addr)
            if entry is None:
                if self._credentials is not None:
                    channel = grpc.secure_channel(addr, self._credentials, options=self._channel_options)
                else:
                    channel = grpc.insecure_channel(addr, options=self._channel_options)
                entry = self._channels[addr] = Channel(
                    channel,
                    channel.unary_stream(FETCH_METHOD, request_serializer=pb.FetchBlocksRequest.SerializeToString,
                                         response_deserializer=wire.decode_chunk),
                    channel.unary_unary(INFO_METHOD, request_serializer=pb.GetInfoRequest.SerializeToString,
                                        response_deserializer=pb.GetInfoResponse.FromString))
            return entry

    def _close_stale_channels(self) -> None:
        """Closes channels to addresses no longer listed (replicas restarted elsewhere) once idle."""
        known = {a for addrs in self.replicas().values() for a in addrs}
        now = time.monotonic()
        stale = []
        with self._lock:
            for addr in [a for a in self._channels
                         if a not in known and now - self._last_used.get(a, 0.0) > self.channel_idle_s]:
                stale.append(self._channels.pop(addr))
                self._last_used.pop(addr, None)
                self._failed_at.pop(addr, None)
                self._verdicts.pop(addr, None)
                log.info("closing the channel to %s: no longer registered", addr)
        for ch in stale:
            ch.channel.close()

    def close(self) -> None:
        """Stops discovery and closes every channel."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        if self._redis is not None:
            self._redis.close()
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.channel.close()
