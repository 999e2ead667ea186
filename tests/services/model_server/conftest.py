"""Fixtures: a model server app over fakes (FakeRunner/FakeCodec/FakeBank/FakeFetcher) via TestClient."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from services.model_server.app import create_app
from services.model_server.auth import KeyStore, hash_key
from services.model_server.components import Components, build_memory_side
from services.model_server.engine import Engine
from services.model_server.metrics import Metrics
from services.model_server.scheduler import Scheduler
from services.model_server.settings import ModelServerSettings

from .fakes import FakeCodec, FakeFetcher, FakeRunner, fake_embed


def make_components(settings: ModelServerSettings, *, runner: FakeRunner | None = None,
                    fetcher: FakeFetcher | None = None, with_bank: bool = True, codec=None) -> Components:
    metrics = Metrics()
    runner = runner or FakeRunner(n_slots=2 * settings.max_batch)
    resolver = None
    if with_bank:
        fetcher = fetcher or FakeFetcher()
        resolver, cache = build_memory_side(settings, fetcher.bank, fetcher, fake_embed, metrics)
    engine = Engine(runner, scheduler=Scheduler(
        settings.scheduler, settings.max_wait_s, settings.max_skips, settings.wait_factor, settings.admit_group),
                    max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk, metrics=metrics,
                    max_rows=settings.max_batch, retry_after_s=settings.retry_after_s)
    return Components(settings=settings, metrics=metrics, keys=KeyStore.load(settings.api_keys_file),
                      codec=codec or FakeCodec(), engine=engine, resolver=resolver, model_ids=["hiermem", "fake"],
                      bank_id="fake-bank" if with_bank else None)


@pytest.fixture
def make_client(tmp_path) -> Callable[..., TestClient]:
    """make_client(**settings) -> TestClient over fakes; `fetcher=` / `runner=` to inject."""
    clients = []

    def make(*, fetcher: FakeFetcher | None = None, runner: FakeRunner | None = None, with_bank: bool = True,
             codec=None, **overrides) -> TestClient:
        if with_bank:
            overrides.setdefault("bank", tmp_path)
        overrides.setdefault("pinned_levels", 0)
        settings = ModelServerSettings(**overrides)
        comps = make_components(settings, runner=runner, fetcher=fetcher, with_bank=with_bank, codec=codec)
        client = TestClient(create_app(settings, comps))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def keys_file(tmp_path):
    """Keys: 'k-all' (every subtree), 'k-sub1' (level-1 subtree 1 only), 'k-none' (no memory), 'k-ops'
    (every subtree, may read /metrics) and 'k-sub1-tel' (subtree 1, may see cache hits and timings)."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"sha256": hash_key("k-all"), "tenant": "ops", "subtrees": None},
        {"sha256": hash_key("k-sub1"), "tenant": "acme", "subtrees": [1]},
        {"sha256": hash_key("k-none"), "tenant": "nomem", "subtrees": []},
        {"sha256": hash_key("k-ops"), "tenant": "ops", "subtrees": None, "metrics": True},
        {"sha256": hash_key("k-sub1-tel"), "tenant": "acme-ops", "subtrees": [1], "telemetry": True},
    ]}))
    return path
