"""Routes: translate HTTP <-> `generation.start` and format answers (OpenAI JSON/SSE, TGI)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import generation
from .auth import Principal
from .codec import Message, check_prompt_chars, encode_chat
from .components import Components
from .errors import InvalidRequest, NotFound, ServerError
from .generation import OPENAI_FINISH, Generation
from .reasons import public_memory
from .sampling import Sampling
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateDetails,
    GenerateRequest,
    GenerateResponse,
    MemoryInfo,
    MemorySpec,
    ModelCard,
    ModelList,
    RouteNode,
    RouteRequest,
    RouteResponse,
    SamplingFields,
    Usage,
)

log = logging.getLogger(__name__)
router = APIRouter()
_bearer = HTTPBearer(auto_error=False)


def components(request: Request) -> Components:
    return request.app.state.components


def principal(request: Request,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    header = f"{creds.scheme} {creds.credentials}" if creds else request.headers.get("authorization")
    return components(request).keys.authenticate(header)


Who = Annotated[Principal, Depends(principal)]


def _check_model(c: Components, model: str | None) -> str:
    if model is None:
        return c.model_ids[0]
    if model not in c.model_ids:
        raise NotFound(f"model {model!r} does not exist; this server serves {c.model_ids}", param="model",
                       code="model_not_found")
    return model


def _sampling(c: Components, body: SamplingFields, stop: list[str]) -> Sampling:
    asked = body.new_tokens()
    max_new = asked if asked is not None else c.settings.default_max_tokens
    return Sampling(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)


async def _encode(c: Components, text: str) -> list[int]:
    """Token ids of a prompt: refused by its size before tokenizing, then tokenized off the event loop."""
    check_prompt_chars(c.codec, len(text), c.settings.max_prompt_tokens)
    return await asyncio.to_thread(c.codec.encode, text)


async def _begin(request: Request, c: Components, prompt_ids: list[int], route_text: str, sampling: Sampling,
                 memory: MemorySpec, who: Principal) -> Generation:
    generation.check_limits(c.settings, len(prompt_ids), sampling.max_new_tokens, c.max_seq_len)
    return await generation.start(c.engine, c.resolver, prompt_ids=prompt_ids, route_text=route_text,
                                  sampling=sampling, memory=memory, principal=who)


async def _collect(request: Request, gen: Generation) -> tuple[str, str, int]:
    """Run a generation to its end: (text, finish_reason, completion tokens)."""
    parts, reason, n = [], "length", 0
    async for ev in gen.events(poll=request.is_disconnected):
        if ev.kind == "token":
            parts.append(ev.text)
            n += 1
        elif ev.kind == "done":
            reason = ev.finish_reason or "length"
        else:
            raise ev.error or RuntimeError("generation failed")
    return "".join(parts), reason, n


def _sse(obj: Mapping[str, object]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_event(exc: BaseException | None) -> dict[str, dict[str, str | None]]:
    """An error inside a stream: a request error as it is, anything else without its detail (logged)."""
    if isinstance(exc, ServerError):
        return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    log.error("generation failed in a stream: %r", exc)
    return {"error": {"message": "generation failed", "type": "server_error", "param": None,
                      "code": "generation_failed"}}


# ---- OpenAI ------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request, who: Who) -> ModelList:
    """Models this server serves."""
    c = components(request)
    now = int(time.time())
    return ModelList(data=[ModelCard(id=m, created=now, owned_by="hiermem") for m in c.model_ids])


@router.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(body: CompletionRequest, request: Request, who: Who
                      ) -> CompletionResponse | StreamingResponse:
    """Text completion (OpenAI), with per-request hierarchical memory."""
    c = components(request)
    model = _check_model(c, body.model)
    prompts = _prompts(body.prompt)
    if len(prompts) > c.settings.max_prompts:
        raise InvalidRequest(f"at most {c.settings.max_prompts} prompts per request", param="prompt")
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming supports one prompt per request", param="prompt")
    sampling = _sampling(c, body, body.stop_list())
    for p in prompts:  # every size check before any tokenizing
        if isinstance(p, str):
            check_prompt_chars(c.codec, len(p), c.settings.max_prompt_tokens)
        else:
            generation.check_limits(c.settings, len(p), sampling.max_new_tokens, c.max_seq_len)
            if min(p) < 0 or max(p) >= c.codec.vocab_size:
                raise InvalidRequest(f"token ids must be in [0, {c.codec.vocab_size})", param="prompt")
    encoded: list[tuple[list[int], str]] = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append((await _encode(c, p), p))
        else:
            encoded.append((p, await asyncio.to_thread(c.codec.decode, p)))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    gens: list[Generation] = []
    try:
        for ids, text in encoded:
            gens.append(await _begin(request, c, ids, text, sampling, body.memory, who))
    except BaseException:
        for g in gens:
            g.cancel()
        raise
    if body.stream:
        gen, echo = gens[0], (encoded[0][1] if body.echo else "")
        return _stream_response(_completion_stream(gen, rid, created, model, echo))
    results = await asyncio.gather(*(_collect(request, g) for g in gens))
    choices = [CompletionChoice(index=i, text=(encoded[i][1] if body.echo else "") + text,
                                finish_reason=OPENAI_FINISH.get(reason, reason))
               for i, (text, reason, _) in enumerate(results)]
    n_in, n_out = sum(g.prompt_tokens for g in gens), sum(n for _, _, n in results)
    memory = gens[0].memory if len(gens) == 1 else [g.memory for g in gens]
    return CompletionResponse(id=rid, created=created, model=model, choices=choices,
                              usage=_usage(n_in, n_out), memory=memory)


def _prompts(prompt: str | list[str] | list[int]) -> list[str | list[int]]:
    """A completion request's prompts: one string, strings, or one prompt of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):  # the schema validated every item as the first one's type
        return [list(prompt)]
    prompts: list[str | list[int]] = list(cast("list[str]", prompt))
    return prompts


def _usage(n_in: int, n_out: int) -> Usage:
    return Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)


async def _completion_stream(gen: Generation, rid: str, created: int, model: str, echo: str
                             ) -> AsyncIterator[str]:
    base: dict[str, object] = {"id": rid, "object": "text_completion", "created": created, "model": model}
    first = True
    n = 0
    async for ev in gen.events():
        if ev.kind == "token":
            n += 1
            if not ev.text and not first:
                continue
            chunk = {**base, "choices": [{"index": 0, "text": (echo if first else "") + ev.text,
                                          "finish_reason": None, "logprobs": None}]}
            if first:
                chunk["memory"] = gen.memory.model_dump()
                first = False
            yield _sse(chunk)
        elif ev.kind == "done":
            yield _sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": OPENAI_FINISH.get(ev.finish_reason or "",
                                                                                 ev.finish_reason)}],
                        "usage": _usage(gen.prompt_tokens, n).model_dump(),
                        "memory": gen.memory.model_dump()})
        else:
            yield _sse(_error_event(ev.error))
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=ChatResponse, tags=["openai"],
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatRequest, request: Request, who: Who) -> ChatResponse | StreamingResponse:
    """Chat completion (OpenAI) through the anchor's chat template, with hierarchical memory."""
    c = components(request)
    model = _check_model(c, body.model)
    messages: list[Message] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                               for m in body.messages]
    check_prompt_chars(c.codec, sum(len(m["content"]) for m in messages), c.settings.max_prompt_tokens)
    ids = await asyncio.to_thread(encode_chat, c.codec, messages)
    route_text = "\n".join(m["content"] for m in messages if m["role"] != "system") or messages[-1]["content"]
    gen = await _begin(request, c, ids, route_text, _sampling(c, body, body.stop_list()), body.memory, who)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _stream_response(_chat_stream(gen, rid, created, model))
    text, reason, n = await _collect(request, gen)
    choice = ChatChoice(index=0, message=AssistantMessage(content=text),
                        finish_reason=OPENAI_FINISH.get(reason, reason))
    return ChatResponse(id=rid, created=created, model=model, choices=[choice],
                        usage=_usage(gen.prompt_tokens, n), memory=gen.memory)


async def _chat_stream(gen: Generation, rid: str, created: int, model: str) -> AsyncIterator[str]:
    base: dict[str, object] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                               "model": model}
    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None, "logprobs": None}],
                "memory": gen.memory.model_dump()})
    n = 0
    async for ev in gen.events():
        if ev.kind == "token":
            n += 1
            if ev.text:
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": ev.text},
                                                 "finish_reason": None, "logprobs": None}]})
        elif ev.kind == "done":
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": OPENAI_FINISH.get(ev.finish_reason or "",
                                                                                 ev.finish_reason)}],
                        "usage": _usage(gen.prompt_tokens, n).model_dump(),
                        "memory": gen.memory.model_dump()})
        else:
            yield _sse(_error_event(ev.error))
    yield "data: [DONE]\n\n"


# ---- TGI ---------------------------------------------------------------------------------------
def _tgi_sampling(c: Components, body: GenerateRequest) -> Sampling:
    p = body.parameters
    sample = p.do_sample or p.temperature is not None or p.top_p is not None or p.top_k is not None
    return Sampling(max_new_tokens=p.max_new_tokens or c.settings.default_max_tokens,
                    temperature=(p.temperature or 1.0) if sample else 0.0, top_p=p.top_p or 1.0,
                    top_k=p.top_k or 0, seed=p.seed, stop=[s for s in p.stop if s])


@router.post("/generate", response_model=GenerateResponse, tags=["tgi"])
async def generate(body: GenerateRequest, request: Request, who: Who) -> GenerateResponse:
    """Text generation (TGI style), with hierarchical memory."""
    c = components(request)
    if body.stream:
        raise InvalidRequest("stream: use /generate_stream for a stream", param="stream")
    sampling = _tgi_sampling(c, body)
    gen = await _begin(request, c, await _encode(c, body.inputs), body.inputs, sampling, body.memory, who)
    text, reason, n = await _collect(request, gen)
    details = (GenerateDetails(finish_reason=reason, generated_tokens=n, seed=sampling.seed)
               if body.parameters.details else None)
    return GenerateResponse(generated_text=text, details=details, memory=gen.memory)


@router.post("/generate_stream", tags=["tgi"], responses={200: {"content": {"text/event-stream": {}}}})
async def generate_stream(body: GenerateRequest, request: Request,
                          who: Who) -> StreamingResponse:
    """Streaming text generation (TGI style, SSE)."""
    c = components(request)
    sampling = _tgi_sampling(c, body)
    gen = await _begin(request, c, await _encode(c, body.inputs), body.inputs, sampling, body.memory, who)
    return _stream_response(_tgi_stream(gen, sampling))


async def _tgi_stream(gen: Generation, sampling: Sampling) -> AsyncIterator[str]:
    parts: list[str] = []
    last: dict[str, object] | None = None
    n = 0
    async for ev in gen.events():
        if ev.kind == "token":
            if last is not None:
                yield _sse(last)
            n += 1
            parts.append(ev.text)
            last = {"index": n, "token": {"id": ev.token_id, "text": ev.text, "logprob": None, "special": False},
                    "generated_text": None, "details": None}
        elif ev.kind == "done":
            final = last or {"index": n, "token": None}
            final.update(generated_text="".join(parts), memory=gen.memory.model_dump(),
                         details={"finish_reason": ev.finish_reason, "generated_tokens": n,
                                  "seed": sampling.seed})
            yield _sse(final)
            last = None
        else:
            yield _sse(_error_event(ev.error))
    if last is not None:
        yield _sse(last)


# ---- memory ------------------------------------------------------------------------------------
@router.post("/v1/route", response_model=RouteResponse, tags=["memory"])
async def route(body: RouteRequest, request: Request, who: Who) -> RouteResponse:
    """Where a prompt would be routed in the memory tree (within the key's subtrees); fetches nothing."""
    c = components(request)
    if c.resolver is None:
        raise InvalidRequest("this server has no memory bank", code="no_bank")
    text = body.prompt if body.prompt is not None else "\n".join(
        m.text() for m in body.messages or [] if m.role not in ("system", "developer"))
    check_prompt_chars(c.codec, len(text), c.settings.max_prompt_tokens)  # before embedding it
    path, route_ms, reason = await asyncio.to_thread(c.resolver.route, text, who)
    nodes = []
    if path is not None:
        from memory_store import path_refs

        for ref in path_refs(path):  # `cached` tells what others used recently: only for telemetry keys
            nodes.append(RouteNode(level=ref.level, index=ref.index, shard=str(c.resolver.bank.shard_of(ref)),
                                   cached=(ref in c.resolver.cache) if who.telemetry else None))
    public = public_memory(MemoryInfo(mode="auto", path=path, reason=reason), who).reason
    return RouteResponse(path=path, nodes=nodes, route_ms=round(route_ms, 3), reason=public)


__all__ = ["router", "MemoryInfo"]
