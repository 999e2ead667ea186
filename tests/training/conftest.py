"""Tiny fixtures for the training tests: a small facts corpus, the tiny anchor, the hash embedder."""

from __future__ import annotations

import pytest

from training.config import TrainConfig
from training.corpus import build_facts_corpus

SIZES = {"city_country": 16, "us_city_state": 6, "country_capital": 6, "element_number": 6}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build_facts_corpus(SIZES, seed=0).save(out)
    return out


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory):
    """A small documents corpus (paragraphs of several sentences, valid probes; training/corpus_docs.py)."""
    from training.corpus_docs import build_documents_corpus

    out = tmp_path_factory.mktemp("docs-corpus")
    build_documents_corpus({"city_country": 10, "us_city_state": 4, "country_capital": 4, "element_number": 4},
                           heldout_fraction=0.2, seed=0).save(out)
    return out


def tiny_config(corpus_dir, out, **kw) -> TrainConfig:
    values = dict(corpus=str(corpus_dir), out=str(out), anchor="tiny", embedder="hash-trigram", branching=[2, 2],
                  ranks=[8, 4], mem_layers=2, epochs=1, batch_size=8, lr=1e-2, warmup_steps=1, progress=False,
                  checkpoint_every=1000, compute_dtype="float32", threads="keep")
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and on the shared 2-core machine it costs."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
