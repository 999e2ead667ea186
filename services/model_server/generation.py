"""The one domain call behind every generating route: limits, memory, queue, and the token stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .auth import Principal
from .engine import Engine, Event, GenRequest
from .errors import InvalidRequest, Overloaded
from .reasons import NO_BANK_REASON, public_memory
from .request_memory import NO_MEMORY
from .resolver import MemoryResolver
from .sampling import Sampling
from .schemas import MemoryInfo, MemorySpec
from .settings import ModelServerSettings

log = logging.getLogger(__name__)

OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class Generation:
    """A submitted request: its memory object and the engine's events, in order."""

    request: GenRequest
    memory: MemoryInfo
    queue: asyncio.Queue[Event]
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
        request_memory, info = NO_MEMORY, MemoryInfo(mode="none", reason=NO_BANK_REASON)
    else:
        request_memory, info = await asyncio.to_thread(resolver.resolve, memory, route_text, principal)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

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
