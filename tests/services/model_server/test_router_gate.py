"""The model server routes through a bank's document router: matched prompts get their documents' path,
prompts the bank knows nothing about get no memory (and say why); a bank without a router routes by descent."""

from __future__ import annotations

import numpy as np

from memory_store import Bank
from memory_store.embed import HashEmbedder
from memory_store.router import DocRouter
from services.model_server.auth import Principal
from services.model_server.block_cache import BlockCache
from services.model_server.components import LocalFetcher
from services.model_server.metrics import Metrics
from services.model_server.reasons import GATED_REASON
from services.model_server.resolver import MemoryResolver
from tests.memory_store.conftest import tiny_spec, write_bank

DOCS = ["Kisumu is a city in Kenya. About 600,000 people live in Kisumu.",
        "Osmium, symbol Os, has atomic number 76.",
        "Zwolle is a city in the Netherlands. Zwolle observes UTC+1."]
EVERYONE = Principal("t", None)


def resolver_for(tmp_path, with_router: bool, metrics: Metrics | None = None) -> MemoryResolver:
    spec = tiny_spec()  # branching [2, 3], embedder_dim 16
    write_bank(tmp_path / "bank", spec)
    embed = HashEmbedder(dim=spec.embedder_dim).embed
    if with_router:
        paths = np.array([[0, 1], [1, 4], [1, 5]])
        DocRouter.build(DOCS, paths, embed).save(tmp_path / "bank")
    bank = Bank.open(tmp_path / "bank")
    cache = BlockCache(LocalFetcher(bank), capacity_bytes=1 << 20)
    return MemoryResolver(bank, cache, embed, metrics=metrics)


def test_prompts_go_to_their_documents_path_and_unknown_ones_get_no_memory(tmp_path):
    r = resolver_for(tmp_path, with_router=True)
    assert r.route("Which element has the symbol Os?", EVERYONE)[0] == [1, 4]
    assert r.route("Q: Where is Zwolle?\nA:", EVERYONE)[0] == [1, 5]
    path, _, reason = r.route("The planet closest to the sun is", EVERYONE)
    assert path is None and reason == GATED_REASON
    memory, info = r.resolve("auto", "The planet closest to the sun is", EVERYONE)
    assert memory.keys == () and info.mode == "auto" and not info.degraded and info.path is None
    memory, info = r.resolve("auto", "Which element has the symbol Os?", EVERYONE)
    assert info.path == [1, 4] and len(memory.blocks) == 2 and not info.degraded
    # a key limited to subtree 0 is never routed into subtree 1, even by the router
    limited = Principal("t", frozenset({0}))
    path, _, _ = r.route("Which element has the symbol Os?", limited)
    assert path is None or path[0] == 0


def test_a_bank_without_a_router_routes_every_prompt_by_descent(tmp_path):
    r = resolver_for(tmp_path, with_router=False)
    path, _, reason = r.route("The planet closest to the sun is", EVERYONE)
    assert path is not None and len(path) == 2 and reason is None


def test_routed_requests_are_counted_by_outcome(tmp_path):
    metrics = Metrics()
    r = resolver_for(tmp_path, with_router=True, metrics=metrics)
    r.resolve("auto", "Which element has the symbol Os?", EVERYONE)
    r.resolve("auto", "The planet closest to the sun is", EVERYONE)
    r.resolve("auto", "Name a prime number.", EVERYONE)
    r.resolve("auto", "Which element has the symbol Os?", Principal("t", frozenset({7})))  # no such subtree
    r.resolve("off", "Which element has the symbol Os?", EVERYONE)  # not routed: not counted

    def count(outcome: str) -> float:
        return metrics.registry.get_sample_value("hiermem_routed_requests_total", {"outcome": outcome}) or 0.0

    assert (count("memory"), count("gated"), count("not_allowed")) == (1.0, 2.0, 1.0)
