"""The one domain call behind every generating route: limits, memory, queue, and the token stream."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .auth import Principal
from .engine import Engine, Event, GenRequest
from .errors import InvalidRequest, Overloaded
from .request_memory import NO_MEMORY
from .resolver import MemoryResolver
from .sampling import Sampling
from .schemas import MemoryInfo, MemorySpec
from .settings import ModelServerSettings

log = logging.getLogger(__name__)

OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


class Codec(Protocol):
    """Text <-> token ids of the anchor."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass
class Generation:
    """A submitted request: its memory object and the engine's events, in order."""

    request: GenRequest
    memory: MemoryInfo
    queue: asyncio.Queue
    engine: Engine
    prompt_tokens: int

    async def events(self, poll: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Event]:
        """Yield token events, then one done/error event. `poll` (async, -> bool) is asked every 0.5 s
        whether the client went away; if so the request is cancelled."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except TimeoutError:
                    if poll is not None and await poll():
                        self.cancel()
                        return
                    continue
                yield ev
                if ev.kind != "token":
                    return
        finally:
            if not self.request.finished:
                self.cancel()

    def cancel(self) -> None:
        self.engine.cancel(self.request)


# ---- tokenizing (called off the event loop, after `check_prompt_chars`) ---------------------------------
_NORMALIZER_MARGIN = 4  # a normalizer may shrink text before tokenizing; leave it room


def max_token_chars(codec: Any) -> int | None:
    """The most characters one token of `codec` can stand for (None: unknown), so a text longer than
    `limit * max_token_chars` characters is over `limit` tokens without tokenizing it. A codec may say so
    itself (`max_token_chars`); for an HF tokenizer it is the longest vocabulary entry (byte-level BPE:
    one character per byte, and a text has at least as many bytes as characters)."""
    known = getattr(codec, "max_token_chars", None)
    if known is not None:
        return int(known)
    tok = getattr(codec, "tok", None)
    if tok is None:
        return None
    with _cache_lock:
        if id(tok) in _max_chars:
            return _max_chars[id(tok)]
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else tok.get_vocab()
    longest = max((len(t) for t in vocab), default=0) or None
    if longest is not None and backend is not None and backend.normalizer is not None:
        longest *= _NORMALIZER_MARGIN
    with _cache_lock:
        _max_chars[id(tok)] = longest
    return longest


_cache_lock = threading.Lock()
_max_chars: dict[int, int | None] = {}
_text_tokenizers: dict[int, Any] = {}


def check_prompt_chars(codec: Any, n_chars: int, limit: int) -> None:
    """400 (context_length_exceeded) when a text of `n_chars` characters must be over `limit` tokens: the
    size check that keeps a huge prompt from being tokenized at all."""
    per_token = max_token_chars(codec)
    if per_token is not None and n_chars > limit * per_token:
        raise InvalidRequest(f"the prompt has {n_chars} characters, more than {limit} tokens can hold; the "
                             f"limit is {limit} tokens", param="prompt", code="context_length_exceeded")


def _text_tokenizer(backend: Any) -> Any:
    """A copy of `backend` (a `tokenizers.Tokenizer`) that reads special-token text as plain text."""
    with _cache_lock:
        copy = _text_tokenizers.get(id(backend))
        if copy is None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(backend.to_str())
            copy.encode_special_tokens = True
            _text_tokenizers[id(backend)] = copy
        return copy


def encode_chat(codec: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the chat template, with the messages' content tokenized as
    text: special tokens (`<|im_start|>`, `<|im_end|>`, ...) come only from the template, so a message
    cannot open a turn of another role. The template is rendered with a unique marker per message; the
    template's text between the markers is tokenized as usual, the content with special tokens split (when the
template puts the content in verbatim; otherwise see `_chat_without_markers`).
    A codec without an HF tokenizer (`tok`) uses its own `chat`."""
    tok = getattr(codec, "tok", None)
    backend = getattr(tok, "backend_tokenizer", None)
    if tok is None or backend is None:
        return codec.chat(list(messages))
    text_tok = _text_tokenizer(backend)
    contents = [m["content"] for m in messages]
    if not getattr(tok, "chat_template", None):  # codec's plain format: all of it is text
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        plain: list[int] = text_tok.encode(text, add_special_tokens=False).ids
        return plain or codec.encode("")
    tag = uuid.uuid4().hex
    marks = [f"\x00{tag}:{i}\x00" for i in range(len(messages))]
    rendered = tok.apply_chat_template([{"role": m["role"], "content": mark} for m, mark in zip(
        messages, marks, strict=True)], add_generation_prompt=True, tokenize=False)
    pieces: list[str] = []
    rest = rendered
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found or mark in rest:
            return _chat_without_markers(codec, tok, messages)
        pieces.append(before)
    pieces.append(rest)
    # the template must put the content in verbatim (no `| trim` and the like), else the pieces lie
    real = tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    if real != "".join(p + c for p, c in zip(pieces, [*contents, ""], strict=True)):
        return _chat_without_markers(codec, tok, messages)
    template_ids = backend.encode_batch(pieces, add_special_tokens=False)
    content_ids = text_tok.encode_batch(contents, add_special_tokens=False)
    ids: list[int] = []
    for i, part in enumerate(template_ids):
        ids.extend(part.ids)
        if i < len(content_ids):
            ids.extend(content_ids[i].ids)
    return [int(i) for i in ids]


def _chat_without_markers(codec: Any, tok: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """A template that changes the content (the markers do not come through, or the content is not put in
    verbatim): refuse content holding a special token's text, else the template as it is."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    specials = sorted({str(getattr(t, "content", t)) for t in added.values()}
                      | set(getattr(tok, "all_special_tokens", [])) - {""})
    for i, m in enumerate(messages):
        hit = next((t for t in specials if t in m["content"]), None)
        if hit is not None:
            raise InvalidRequest(f"message {i} holds the special token {hit!r}", param=f"messages.{i}.content",
                                 code="special_token_in_content")
    return codec.chat(list(messages))


# ---- what a client may see of the memory object -------------------------------------------------------
_PUBLIC_REASONS = {  # fixed texts that say nothing internal (resolver.py and this module produce them)
    "the API key allows no memory subtree",
    "no memory bank configured",
    "no memory: the prompt matches no document of the bank (route gate)",
    "the routed subtree was deleted from the bank: memory of the levels above it",
}


def public_memory(info: MemoryInfo, principal: Principal, request_id: str = "") -> MemoryInfo:
    """The memory object as the client sees it: `reason` from a fixed vocabulary (the detail, which may hold
    replica addresses or checksums, goes to the log), and cache hits/misses and fetch time only for a key
    allowed to see them (they tell what other tenants used recently)."""
    out = info.model_copy()
    if info.reason is not None and info.reason not in _PUBLIC_REASONS:
        if info.degraded and info.path is not None:
            missing = [lv for lv in range(1, len(info.path) + 1) if lv not in info.levels]
            out.reason = f"memory levels {missing} unavailable"
        else:
            out.reason = "memory unavailable"
        log.warning("request %s memory: %s", request_id or "-", info.reason)
    if not principal.telemetry:
        out.cache_hits = out.cache_misses = None
        out.fetch_ms = None
    return out


def check_limits(settings: ModelServerSettings, n_prompt: int, max_new: int, max_seq_len: int) -> None:
    """400 when a prompt or max_tokens is over its limit."""
    if n_prompt == 0:
        raise InvalidRequest("the prompt is empty", param="prompt", code="empty_prompt")
    if n_prompt > settings.max_prompt_tokens or n_prompt >= max_seq_len:
        limit = min(settings.max_prompt_tokens, max_seq_len - 1)
        raise InvalidRequest(f"the prompt has {n_prompt} tokens, the limit is {limit}", param="prompt",
                             code="context_length_exceeded")
    if max_new > settings.max_tokens_limit:
        raise InvalidRequest(f"max_tokens {max_new} is over the limit {settings.max_tokens_limit}",
                             param="max_tokens", code="max_tokens_exceeded")


async def start(engine: Engine, resolver: MemoryResolver | None, *, prompt_ids: list[int], route_text: str,
                sampling: Sampling, memory: MemorySpec, principal: Principal) -> Generation:
    """Resolve memory (off the event loop), then queue the request; raises the request's 4xx/503."""
    if engine.snapshot()["waiting"] >= engine.max_queue:  # refuse before spending a fetch on it
        raise Overloaded(f"queue full ({engine.max_queue} waiting); retry later", engine.retry_after_s)
    if resolver is None:
        if memory not in ("off", "auto"):
            raise InvalidRequest("this server has no memory bank", param="memory", code="no_bank")
        request_memory, info = NO_MEMORY, MemoryInfo(mode="none", reason="no memory bank configured")
    else:
        request_memory, info = await asyncio.to_thread(resolver.resolve, memory, route_text, principal)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(ev: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    req = GenRequest(prompt_ids=prompt_ids, params=sampling, sink=sink, memory=request_memory)
    engine.submit(req)
    if engine.metrics is not None:
        engine.metrics.tokens.labels(kind="prompt").inc(len(prompt_ids))
    log.info("request %s queued: %d prompt tokens, memory %s path=%s", req.request_id, len(prompt_ids),
             info.mode, info.path)
    info = public_memory(info, principal, req.request_id)
    return Generation(request=req, memory=info, queue=queue, engine=engine, prompt_tokens=len(prompt_ids))
