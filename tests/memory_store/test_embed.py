import numpy as np
import pytest

from memory_store import Embedder, MiniLMEmbedder, load_embedder


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return load_embedder("all-MiniLM-L6-v2")


def test_minilm_matches_sentence_transformers_and_is_normalised(minilm):
    texts = ["What is the atomic number of gold?", "hi", "Paris is the capital of France, on the Seine."]
    got = minilm.embed(texts)
    assert isinstance(minilm, Embedder) and got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = minilm.st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # batched and one by one agree, in input order
    np.testing.assert_allclose(np.vstack([minilm.embed([t]) for t in texts]), got, atol=1e-5)


def test_traced_single_text_path_matches_eager(minilm):
    assert minilm._traced is not None
    eager = MiniLMEmbedder.__new__(MiniLMEmbedder)
    eager.__dict__.update(minilm.__dict__, _traced=None)
    for text in ["x", "What is the atomic number of gold?", " ".join(["long prompt"] * 120)]:
        np.testing.assert_allclose(minilm.embed([text]), eager.embed([text]), atol=1e-5)


def test_similar_texts_are_closer(minilm):
    a, b, c = minilm.embed(["the atomic number of gold", "gold has atomic number 79", "a recipe for pancakes"])
    assert a @ b > a @ c + 0.2


def test_unknown_embedder_is_an_error():
    with pytest.raises(ValueError, match="unknown embedder"):
        load_embedder("nope")
