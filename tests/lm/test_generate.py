"""Sampling and generation: greedy, seeded sampling, top-k/top-p, stop sequences, EOS."""

from __future__ import annotations

import pytest
import torch

from lm import SamplingParams, generate, sample_next


def test_sample_next_greedy_and_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = SamplingParams(temperature=0)
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=1)
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=2)
    out = sample_next(logits, [greedy, top1, tiny_p], [None, top1.make_generator(), tiny_p.make_generator()])
    assert out.tolist() == logits.argmax(-1).tolist()


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    logits = torch.zeros(1, 1000)  # uniform: every draw is a fresh coin
    p = SamplingParams(temperature=1.0, seed=7)

    def draws(params):
        g = params.make_generator()
        return [int(sample_next(logits, [params], [g])[0]) for _ in range(20)]

    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_restricts_the_support():
    logits = torch.arange(10.0)[None]
    p = SamplingParams(temperature=5.0, top_k=3, seed=0)
    g = p.make_generator()
    seen = {int(sample_next(logits, [p], [g])[0]) for _ in range(200)}
    assert seen == {7, 8, 9}


def test_invalid_params_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_generate_stop_sequence_and_eos(tiny_anchor):
    model, tok = tiny_anchor.model, tiny_anchor.tokenizer
    prompt = tok("Once upon a time").input_ids
    free = generate(model, tok, prompt, SamplingParams(max_new_tokens=12), eos_token_ids=[])
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    again = generate(model, tok, prompt, SamplingParams(max_new_tokens=12), eos_token_ids=[])
    assert again.token_ids == free.token_ids  # greedy is deterministic

    # stop at the text of the 5th generated token: the completion is cut right before it
    stop = tok.decode(free.token_ids[4:5])
    assert stop.strip(), "the random model produced a whitespace-only token; pick another prompt"
    cut = generate(model, tok, prompt, SamplingParams(max_new_tokens=12, stop=[stop]), eos_token_ids=[])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]

    # treat the first token that is new after position 0 as EOS: generation ends right before it
    k = next(i for i in range(1, 12) if free.token_ids[i] not in free.token_ids[:i])
    eos = generate(model, tok, prompt, SamplingParams(max_new_tokens=12), eos_token_ids=[free.token_ids[k]])
    assert eos.finish_reason == "stop" and eos.token_ids == free.token_ids[:k]


def test_generate_with_seed_is_reproducible(tiny_anchor):
    model, tok = tiny_anchor.model, tiny_anchor.tokenizer
    prompt = tok("Hello").input_ids
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = generate(model, tok, prompt, p, eos_token_ids=[])
    assert a.token_ids == generate(model, tok, prompt, p, eos_token_ids=[]).token_ids
