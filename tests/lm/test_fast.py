"""The serving path of the anchor (`lm.fast`): prepacked linears compute nn.Linear's function, float32 stays
float32-exact, the dtype choice is measured and overridable, and the fast path's greedy tokens agree with the
float32 model (SmolLM2, 200 prompts x 32 tokens; bench/fidelity.py reports the same figures)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from lm.dtype import fast_dtype
from lm.fast import (
    GROUP,
    Int4Linear,
    PackedLinear,
    _int4_works,
    _packing_works,
    int4_grid,
    pack_int4,
    prepare_for_inference,
    set_int4_max_rows,
)
from lm.kv_cache import KVCache
from tests.lm.conftest import rel_err, tiny_model

needs_packing = pytest.mark.skipif(not _packing_works(torch.float32), reason="oneDNN prepacking unavailable")


@needs_packing
@pytest.mark.parametrize("shape", [(5, 64), (3, 1, 64), (2, 7, 64)])
def test_packed_linear_keeps_shape_and_function(shape):
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(*shape)
    got = PackedLinear(lin, torch.float32, 8)(x)
    assert got.shape == (*shape[:-1], 48)
    assert rel_err(got, lin(x)) <= 1e-5
    if _packing_works(torch.bfloat16):
        got16 = PackedLinear(lin, torch.bfloat16, 8)(x)  # a float32 input is cast to the weights' dtype
        assert got16.dtype == torch.bfloat16 and rel_err(got16.float(), lin(x)) <= 2e-2


@needs_packing
def test_float32_preparation_gives_the_same_logits_with_cache_and_batch(model):
    fast = copy.deepcopy(model)
    info = prepare_for_inference(fast, "float32", rescore_head=False)  # float32 throughout, the head included
    assert info["dtype"] == "float32" and info["packed_linears"] == 4 * model.config.n_layers + 1
    assert not any(type(m) is nn.Linear for m in fast.modules())
    ids = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        assert rel_err(fast(ids), model(ids)) <= 1e-5
        cache = KVCache(fast.config, 3, 16)
        slots = [cache.allocate() for _ in range(3)]
        fast(ids[:, :5], cache=cache, slots=slots)
        step = fast(ids[:, 5:6], cache=cache, slots=slots)
        assert rel_err(step, model(ids[:, :6])[:, -1:]) <= 1e-5


@pytest.mark.skipif(not _packing_works(torch.bfloat16), reason="no bfloat16 prepacking on this CPU")
def test_bfloat16_preparation_keeps_residual_and_logits_in_float32(model):
    fast = copy.deepcopy(model)
    info = prepare_for_inference(fast, "bfloat16")
    assert (info["dtype"], info["residual_dtype"]) == ("bfloat16", "float32")
    assert fast.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, want = fast(ids), model(ids)
        hidden = fast.model.norm(fast._run_layers(fast._embed(ids), fast._context(ids, None, None, None, None)))
    assert logits.dtype == torch.float32 and hidden.dtype == torch.float32
    assert rel_err(logits, want) <= 5e-2
    # each position's best logit is the float32 head's on the (float32) hidden state: same token, same value
    # (only the 8 candidates bfloat16 ranked first are recomputed, so lower ranks may keep bfloat16 values)
    exact = hidden @ model.lm_head.weight.T
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert torch.allclose(logits.max(-1).values, exact.max(-1).values, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _packing_works(torch.bfloat16), reason="no bfloat16 prepacking on this CPU")
def test_decode_attention_dtype_is_measured_and_used_only_for_decode(model, monkeypatch):
    """With bfloat16 weights decode attention runs in float32 where that was measured faster here; either way a
    prefill attends in bfloat16, a decode step in the chosen dtype, and the logits stay float32's."""
    import torch.nn.functional as F

    fast = copy.deepcopy(model)
    info = prepare_for_inference(fast, "bfloat16")
    m = info["decode_attention_measurement"]
    assert m["rows"] == 8 and m["float32_ms"] > 0 and m["bfloat16_ms"] > 0
    assert info["decode_attention_dtype"] == ("float32" if m["float32_ms"] < m["bfloat16_ms"] else "bfloat16")
    assert fast.decode_attention_dtype == (torch.float32 if info["decode_attention_dtype"] == "float32" else None)
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: (seen.append(q.dtype), real(q, *a, **k))[1])
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[:, -1:]
        for attn_dtype in (torch.float32, None):
            fast.decode_attention_dtype = attn_dtype
            cache = KVCache(fast.config, 2, 16, dtype=fast.dtype)
            slots = [cache.allocate() for _ in range(2)]
            seen.clear()
            fast(ids[:, :6], cache=cache, slots=slots)
            assert set(seen) == {torch.bfloat16}  # prefill: the weights' dtype
            seen.clear()
            step = fast(ids[:, 6:], cache=cache, slots=slots)
            assert set(seen) == {attn_dtype or torch.bfloat16}
            assert step.dtype == torch.float32 and rel_err(step, want) <= 5e-2
    assert prepare_for_inference(copy.deepcopy(model), "float32")["decode_attention_dtype"] == "float32"


def q4_1_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as llama.cpp's Q4_1 stores it: per group of 32 inputs d * q + m, q in 0..15, with
    q = 0 and q = 15 present (the group's min and max), d and m half precision."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // GROUP, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // GROUP, 1, generator=g) * 0.1).half().float()
    return (q * d + m).reshape(n, k)


def test_int4_grid_is_exact_on_4bit_weights_and_refuses_others():
    w = q4_1_weight(48, 128)
    q, scale, lo = int4_grid(w)
    assert q.dtype == torch.int32 and int(q.min()) == 0 and int(q.max()) == 15
    rebuilt = (q.view(48, 4, GROUP) * scale[..., None] + lo[..., None]).reshape(48, 128)
    assert torch.equal(rebuilt, w)
    assert int4_grid(torch.randn(48, 128)) is None  # a weight that was never 4-bit is not rounded to 4 bits
    assert int4_grid(w[:, :100]) is None  # inputs not a multiple of the group
    assert int4_grid(w.bfloat16()) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int4_linear_computes_the_linear_on_both_paths(rows, dtype):
    """In either compute dtype (bfloat16 on AMX, float32 on a CPU without fast bfloat16) the 4-bit path and
    the dense copy compute the linear, and the output is in the compute dtype."""
    if not (_int4_works(dtype) and _packing_works(dtype)):
        pytest.skip(f"no 4-bit CPU kernel or no {dtype} prepacking")
    w = q4_1_weight(96, 128, seed=rows)
    lin = nn.Linear(128, 96, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(2, rows, 128)
    want = x @ w.T
    four = Int4Linear(lin, pack_int4(int4_grid(w)), 8, max_rows=10**6, dtype=dtype)
    wide = Int4Linear(lin, pack_int4(int4_grid(w)), 8, max_rows=0, dtype=dtype)
    for layer in (four, wide):
        got = layer(x)
        assert got.shape == (2, rows, 96) and got.dtype == dtype
        assert rel_err(got.float(), want) <= 2e-2
    if dtype == torch.float32:
        assert rel_err(wide(x), want) <= 1e-5  # the dense float32 copy is exact
    m = nn.Sequential(four)
    assert set_int4_max_rows(m, 0) == 1 and four.max_rows == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepare_runs_4bit_weights_4bit_in_either_dtype(dtype):
    """Weights on a Q4_1 grid become `Int4Linear`s whatever the compute dtype, with the row count up to which
    the 4-bit kernel wins measured here; the model's logits stay the float32 model's (up to bfloat16)."""
    if not (_int4_works(getattr(torch, dtype)) and _packing_works(getattr(torch, dtype))):
        pytest.skip(f"no 4-bit CPU kernel or no {dtype} prepacking")
    four = tiny_model(ffn_dim=64)  # every linear's inputs a multiple of the 32-wide groups
    with torch.no_grad():
        for i, mod in enumerate(m for m in four.modules() if type(m) is nn.Linear and m is not four.lm_head):
            mod.weight.copy_(q4_1_weight(*mod.weight.shape, seed=i))
    fast = copy.deepcopy(four)
    info = prepare_for_inference(fast, dtype, rescore_head=False)
    layers = [m for m in fast.modules() if isinstance(m, Int4Linear)]
    assert info["int4_linears"] == len(layers) == 4 * four.config.n_layers
    assert all(lin.dtype == getattr(torch, dtype) and lin.max_rows == info["int4_max_rows"] for lin in layers)
    assert info["int4_measurement"]["rows"] and f"{dtype}_ms" in info["int4_measurement"]
    set_int4_max_rows(fast, 10**9)  # the 4-bit kernel on every call, as in a decode step
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(fast(ids).float(), four(ids)) <= 5e-2


def test_prepare_leaves_weights_that_are_not_4bit_alone(model):
    fast = copy.deepcopy(model)  # the tiny anchor: random float32 weights, on no 4-bit grid
    info = prepare_for_inference(fast, "bfloat16")
    assert info["int4_linears"] == 0 and not any(isinstance(m, Int4Linear) for m in fast.modules())


def test_dtype_choice_is_measured_or_taken_as_given():
    assert fast_dtype("float32")[0] == torch.float32 and fast_dtype("bfloat16")[0] == torch.bfloat16
    dtype, info = fast_dtype("auto")
    assert dtype in (torch.float32, torch.bfloat16)
    assert info["choice"] == str(dtype).removeprefix("torch.") and info["speedup"] > 0 and "reason" in info
    with pytest.raises(ValueError, match="dtype"):
        fast_dtype("float16")


@needs_packing
def test_int8_rescored_head_keeps_float32s_best_logit():
    """The float32 path's approximate head: int8 logits for all tokens, each row's 8 best recomputed in
    float32, so the argmax and its logit are float32's; the other logits are close."""
    from lm.fast import RescoredHead

    g = torch.Generator().manual_seed(0)
    head = nn.Linear(64, 500, bias=False)
    head.weight.data = torch.randn(500, 64, generator=g) * 0.1
    try:
        rescored = RescoredHead(head, 8, approx="int8")
    except (RuntimeError, AssertionError) as exc:  # no fbgemm/x86 quantized engine in this build
        pytest.skip(f"no dynamic int8 linear: {exc}")
    x = torch.randn(3, 5, 64, generator=g)
    got, exact = rescored(x), x @ head.weight.T
    assert got.shape == (3, 5, 500) and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert torch.allclose(got.max(-1).values, exact.max(-1).values, rtol=1e-5, atol=1e-5)
    assert rel_err(got, exact) <= 5e-2
    with pytest.raises(ValueError, match="approx"):
        RescoredHead(head, 8, approx="float16")


def test_dtype_probe_skips_the_full_measurement_where_bfloat16_crawls(monkeypatch):
    """A machine without bfloat16 units (an AVX2 EPYC: one full-size bfloat16 matmul took 14 s) is told
    apart on the small probe alone; a machine where the probe is not clearly slower gets the full one."""
    import lm.dtype as dt

    calls, probe_speedup = [], [1.0]

    def fake_measure(m, k, n, repeats=5):
        calls.append((m, k, n))
        speedup = probe_speedup[0] if (m, k, n) == dt.PROBE_SHAPE else 3.0
        return {"shape": [m, k, n], "float32_s": 1.0, "bfloat16_s": 1 / speedup, "speedup": speedup}

    monkeypatch.setattr(dt, "measure", fake_measure)
    for crawl, want, n_calls in ((0.03, torch.float32, 1), (0.9, torch.bfloat16, 2)):
        probe_speedup[0] = crawl
        monkeypatch.setattr(dt, "_CACHE", {})
        calls.clear()
        dtype, info = dt.fast_dtype("auto")
        assert dtype == want and len(calls) == n_calls and info["choice"] == str(want).removeprefix("torch.")
    assert "probe" not in info["reason"]


@needs_packing
def test_fast_path_greedy_tokens_agree_with_float32(smollm2):
    """Issue 11: whatever dtype `auto` picks here, >= 98% of 200 x 32 greedy tokens agree with float32 (at
    each position, given the float32 reference's tokens before it)."""
    from bench.fidelity import load_prompts
    from lm.generate import greedy_batch, teacher_forced_argmax

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # ~5 min on one AVX2 core with the 4-bit pass
    try:
        _greedy_agreement(smollm2, load_prompts, greedy_batch, teacher_forced_argmax)
    finally:
        torch.set_num_threads(threads)


def _greedy_agreement(smollm2, load_prompts, greedy_batch, teacher_forced_argmax) -> None:
    prompts = load_prompts(smollm2.tokenizer, 200)
    reference = copy.deepcopy(smollm2.model).float()
    # the same function as plain float32 (test above), faster: no 4-bit kernel, no approximate head
    prepare_for_inference(reference, "float32", int4=False, rescore_head=False)
    want = greedy_batch(reference, prompts, 32, batch=50)
    del reference
    fast = copy.deepcopy(smollm2.model).float()
    info = prepare_for_inference(fast, "auto")
    got = teacher_forced_argmax(fast, prompts, want)
    agree = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True)) / (200 * 32)
    print(f"\n{info['dtype']}: teacher-forced agreement with float32 {agree:.4f}")
    assert agree >= 0.98
    if info["int4_linears"]:  # decode steps run the 4-bit kernel: the same measurement with it everywhere
        assert info["int4_linears"] == 4 * smollm2.config.n_layers  # every layer's linear is Q4_1 in the wheel
        set_int4_max_rows(fast, 10**9)
        got = teacher_forced_argmax(fast, prompts, want)
        agree = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True)) / 6400
        print(f"4-bit linears: teacher-forced agreement with float32 {agree:.4f}")
        assert agree >= 0.98
