"""Text <-> token ids of the anchor, and what keeps tokenizing safe: the codec (`Codec`, `HFCodec` over the
anchor's HF tokenizer), the size check that refuses a huge prompt before it is tokenized, and the chat
encoding in which special tokens come only from the chat template, never from a message's content.

Tokenizing is slow for large texts: the routes call `check_prompt_chars` on the event loop, then the rest
here in a worker thread (docs/model_server.md, "The event loop stays free")."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
"""A chat message as the codec reads it: {"role": ..., "content": ...}."""


class Codec(Protocol):
    """Text <-> token ids of the anchor. A codec may also say `max_token_chars` (the most characters one
    token stands for) and hold an HF tokenizer as `tok`; `max_token_chars` and `encode_chat` use them."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat(self, messages: list[Message]) -> list[int]: ...


class HFCodec:
    """Text <-> ids through the anchor's tokenizer; chat through its chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, bos_token_id: int | None = None
                 ) -> None:
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.bos = bos_token_id

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if not ids and self.bos is not None:
            ids = [self.bos]  # an empty prompt still needs one position to predict from
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: list[Message]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(i) for i in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)


def hf_tokenizer(codec: Codec) -> PreTrainedTokenizerBase | None:
    """The HF tokenizer behind `codec` (an `HFCodec`'s `tok`); None for a codec without one."""
    return getattr(codec, "tok", None)


def _backend(tok: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The Rust `tokenizers.Tokenizer` of a fast HF tokenizer; None for a slow one."""
    return getattr(tok, "backend_tokenizer", None)


# ---- the size check before tokenizing -------------------------------------------------------------------
_NORMALIZER_MARGIN = 4  # a normalizer may shrink text before tokenizing; leave it room

_cache_lock = threading.Lock()
_max_chars: dict[int, int | None] = {}  # id(tokenizer) -> its longest vocabulary entry (x margin)
_text_tokenizers: dict[int, Tokenizer] = {}  # id(backend) -> its copy that reads special tokens as text


def max_token_chars(codec: Codec) -> int | None:
    """The most characters one token of `codec` can stand for (None: unknown), so a text longer than
    `limit * max_token_chars` characters is over `limit` tokens without tokenizing it. A codec may say so
    itself (`max_token_chars`); for an HF tokenizer it is the longest vocabulary entry (byte-level BPE:
    one character per byte, and a text has at least as many bytes as characters)."""
    known = getattr(codec, "max_token_chars", None)
    if known is not None:
        return int(known)
    tok = hf_tokenizer(codec)
    if tok is None:
        return None
    with _cache_lock:
        if id(tok) in _max_chars:
            return _max_chars[id(tok)]
    backend = _backend(tok)
    vocab: dict[str, int] = (backend.get_vocab(with_added_tokens=True) if backend is not None
                             else tok.get_vocab())
    longest = max((len(t) for t in vocab), default=0) or None
    if longest is not None and backend is not None and backend.normalizer is not None:
        longest *= _NORMALIZER_MARGIN
    with _cache_lock:
        _max_chars[id(tok)] = longest
    return longest


def check_prompt_chars(codec: Codec, n_chars: int, limit: int) -> None:
    """400 (context_length_exceeded) when a text of `n_chars` characters must be over `limit` tokens: the
    size check that keeps a huge prompt from being tokenized at all."""
    per_token = max_token_chars(codec)
    if per_token is not None and n_chars > limit * per_token:
        raise InvalidRequest(f"the prompt has {n_chars} characters, more than {limit} tokens can hold; the "
                             f"limit is {limit} tokens", param="prompt", code="context_length_exceeded")


# ---- chat: special tokens only from the template --------------------------------------------------------
def _text_tokenizer(backend: Tokenizer) -> Tokenizer:
    """A copy of `backend` that reads special-token text as plain text."""
    with _cache_lock:
        copy = _text_tokenizers.get(id(backend))
        if copy is None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(backend.to_str())
            copy.encode_special_tokens = True
            _text_tokenizers[id(backend)] = copy
        return copy


def encode_chat(codec: Codec, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation through the chat template, with the messages' content tokenized as
    text: special tokens (`<|im_start|>`, `<|im_end|>`, ...) come only from the template, so a message
    cannot open a turn of another role. The template is rendered with a unique marker per message; the
    template's text between the markers is tokenized as usual, the content with special tokens split (when
    the template puts the content in verbatim; otherwise see `_chat_without_markers`).
    A codec without an HF tokenizer (`tok`) uses its own `chat`."""
    tok = hf_tokenizer(codec)
    backend = _backend(tok) if tok is not None else None
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
    rendered: str = tok.apply_chat_template([{"role": m["role"], "content": mark} for m, mark in zip(
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
    real: str = tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                        tokenize=False)
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


def _chat_without_markers(codec: Codec, tok: PreTrainedTokenizerBase, messages: Sequence[Message]
                          ) -> list[int]:
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
