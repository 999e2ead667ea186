"""Sampling and single-prompt generation.

`sample_next` is the per-step function a batching engine calls: logits rows + per-row params -> tokens.
`generate` runs one prompt to completion with a one-slot KV cache (greedy when temperature == 0), stopping
at EOS, a stop sequence, or max_new_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lm.kv_cache import KVCache
from lm.model import FFNMemory, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator seeded from `seed` (None when unseeded: global RNG)."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token of every row.

    Args:
        logits: (B, V) last-position logits.
        params: one SamplingParams per row.
        generators: one generator per row (from `SamplingParams.make_generator`, kept for the whole
            generation so a seeded row is reproducible whatever else is in the batch), or None.
    Returns:
        (B,) int64 on the logits' device.
    """
    B = logits.shape[0]
    if len(params) != B:
        raise ValueError(f"{B} logits rows but {len(params)} params")
    out = logits.argmax(-1)  # greedy rows keep this
    for b, p in enumerate(params):
        if p.temperature == 0:
            continue
        probs = _sampling_probs(logits[b], p)
        if probs is None:  # nothing left to draw from (every logit -inf / NaN): the most likely token
            out[b] = int(torch.nan_to_num(logits[b].float(), nan=float("-inf")).argmax())
            continue
        gen = generators[b] if generators is not None else None
        out[b] = torch.multinomial(probs, 1, generator=gen).to(out.device)[0]
    return out


def _sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor | None:
    """The distribution one row is drawn from, numerically safe for every accepted temperature and top_p
    (any positive value, however small): computed in float64 relative to the largest logit, so a tiny
    temperature sends every other token to probability 0 (never inf/inf = NaN), and the most likely token
    is always kept by top-k/top-p. None when no logit is finite."""
    row = torch.nan_to_num(logits.detach().to("cpu", torch.float64), nan=float("-inf"), posinf=1e300)
    top = row.max()
    if not torch.isfinite(top):
        return None
    row = (row - top) / p.temperature  # <= 0, the best token(s) at 0; -inf where an underflow/overflow
    row = torch.nan_to_num(row, nan=float("-inf"), neginf=float("-inf"))
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(row, descending=True)
        sorted_probs = torch.softmax(sorted_logits, -1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p  # keep the smallest prefix reaching p
        drop[0] = False  # the most likely token always stays (a top_p below float precision keeps just it)
        row = row.scatter(0, idx[drop], float("-inf"))
    probs = torch.softmax(row, -1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return None
    return probs


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (stop sequence and EOS excluded from `text`, EOS excluded here)
    text: str
    finish_reason: str  # "stop" (EOS or stop sequence) or "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes from prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop sequence starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def default_eos_ids(model: Transformer, tokenizer) -> set[int]:
    """The tokens that end a generation by default: the model config's EOS ids plus the tokenizer's."""
    eos = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams,
             memory: FFNMemory | None = None, eos_token_ids: Sequence[int] | None = None) -> GenerationResult:
    """Generate a completion of one prompt.

    Args:
        prompt_ids: token ids of the prompt (a list or a 1-D tensor).
        memory: a MemoryBatch (or another FFNMemory) built for one row, or None for the anchor alone.
        eos_token_ids: default: the model config's EOS ids plus the tokenizer's.
    """
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=model.device)[None]  # (1, T)
    eos = set(eos_token_ids) if eos_token_ids is not None else default_eos_ids(model, tokenizer)
    cache = KVCache(model.config, 1, ids.shape[1] + params.max_new_tokens + 1, dtype=model.dtype,
                    device=model.device)
    slot = cache.allocate()
    gen = params.make_generator()
    out: list[int] = []
    finish = "length"
    text: str | None = None  # set when a stop sequence cut it
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, slots=[slot], memory=memory, last_only=True)[:, -1]  # (1, V)
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(params.max_new_tokens):
        tok = int(sample_next(logits, [params], [gen])[0])
        if tok in eos:
            finish = "stop"
            break
        out.append(tok)
        if params.stop:
            so_far = tokenizer.decode(out, skip_special_tokens=True)
            cut = find_stop(so_far, params.stop)
            if cut is not None:
                text, finish = so_far[:cut], "stop"
                break
        if step + 1 < params.max_new_tokens:
            logits = model(torch.tensor([[tok]], device=model.device), cache=cache, slots=[slot],
                           memory=memory)[:, -1]
    decode_s = time.perf_counter() - t1
    if text is None or finish != "stop":
        text = tokenizer.decode(out, skip_special_tokens=True)
    return GenerationResult(out, text, finish, ids.shape[1], t_prefill, decode_s)


@torch.no_grad()
def greedy_batch(model: Transformer, prompts: Sequence[Sequence[int]], n_tokens: int, batch: int = 32
                 ) -> list[list[int]]:
    """Greedy continuations of `n_tokens` tokens (EOS not special) for many prompts, `batch` of them decoded
    together: each prompt prefilled into its own KV slot, then one step for all rows at their own lengths."""
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        group = [list(p) for p in prompts[s:s + batch]]
        cache = KVCache(model.config, len(group), max(map(len, group)) + n_tokens, dtype=model.dtype)
        slots = [cache.allocate() for _ in group]
        last = torch.stack([model(torch.tensor([p]), cache=cache, slots=[slot], last_only=True)[0, -1]
                            for p, slot in zip(group, slots, strict=True)])  # (B, V)
        tokens: list[list[int]] = [[] for _ in group]
        for t in range(n_tokens):
            nxt = last.argmax(-1)  # (B,)
            for row, tok in zip(tokens, nxt.tolist(), strict=True):
                row.append(int(tok))
            if t + 1 < n_tokens:
                last = model(nxt[:, None], cache=cache, slots=slots)[:, -1]
        out += tokens
    return out


@torch.no_grad()
def teacher_forced_argmax(model: Transformer, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], batch: int = 16) -> list[list[int]]:
    """For each continuation position i, the model's argmax given the prompt and continuation[:i]: how often a
    model would pick another model's tokens, without one early difference changing every later position."""
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        seqs = [list(p) + list(c[:-1]) for p, c in zip(prompts[s:s + batch], continuations[s:s + batch],
                                                        strict=True)]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right padding: causal positions stay exact
        for b, seq in enumerate(seqs):
            ids[b, :len(seq)] = torch.tensor(seq)
        pred = model(ids).argmax(-1)  # (B, T)
        for b, (p, c) in enumerate(zip(prompts[s:s + batch], continuations[s:s + batch], strict=True)):
            out.append(pred[b, len(p) - 1:len(p) - 1 + len(c)].tolist())
    return out


@dataclass
class Decoded:
    """One prompt's greedy continuation: its tokens (EOS excluded) and, with `top_k`, the model's top-k token
    ids and log-probabilities at every position it decided (one per token, plus the EOS position if reached)."""

    tokens: list[int] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_logp: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def greedy_decode(model: Transformer, prompts: Sequence[Sequence[int]], n_tokens: int, eos: set[int],
                  memory_for=None, top_k: int = 0, batch: int = 16,
                  on_batch: Callable[[int], None] | None = None) -> list[Decoded]:
    """Greedy continuations of up to `n_tokens` tokens, cut at EOS, `batch` prompts decoded together: each
    prefilled into its own KV slot, then one step for all rows at their own lengths.

    Args:
        memory_for: rows -> the FFN memory of those prompts (indices into `prompts`, in order), or None for
            the anchor alone; called once per row for its prefill and once per batch for the decode steps.
        top_k: also keep the top-k distribution at every decided position (e.g. distillation targets).
        on_batch: called with the number of prompts of each batch once it is decoded (a progress display).
    """
    out: list[Decoded] = []
    for s in range(0, len(prompts), batch):
        rows = list(range(s, min(s + batch, len(prompts))))
        group = [list(prompts[i]) for i in rows]
        cache = KVCache(model.config, len(group), max(map(len, group)) + n_tokens, dtype=model.dtype,
                        device=model.device)
        slots = [cache.allocate() for _ in group]
        last = torch.stack([
            model(torch.tensor([p], device=model.device), cache=cache, slots=[slot], last_only=True,
                  memory=memory_for([i]) if memory_for is not None else None)[0, -1]
            for i, p, slot in zip(rows, group, slots, strict=True)])  # (B, V)
        memory = memory_for(rows) if memory_for is not None else None
        got = [Decoded() for _ in group]
        done = [False] * len(group)
        for t in range(n_tokens):
            nxt = last.argmax(-1)
            if top_k:
                val, idx = torch.log_softmax(last.float(), -1).topk(top_k, -1)
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if top_k:
                    got[b].top_ids.append(idx[b])
                    got[b].top_logp.append(val[b])
                if tok in eos:
                    done[b] = True
                else:
                    got[b].tokens.append(int(tok))
            if all(done) or t + 1 == n_tokens:
                break
            last = model(nxt[:, None], cache=cache, slots=slots, memory=memory)[:, -1]
        out += got
        if on_batch is not None:
            on_batch(len(group))
    return out
