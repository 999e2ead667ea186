"""HTTP request/response bodies: OpenAI-compatible, TGI-style, and the `memory` object of DESIGN §6."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NodeIndex = Annotated[int, Field(ge=0, le=2**31 - 1)]
MemoryMode = Literal["auto", "off", "generic", "path", "none"]
"""What a response's memory object says was used."""
MemorySpec = Literal["auto", "off", "generic"] | Annotated[list[NodeIndex], Field(min_length=1, max_length=16)]
StopSpec = str | Annotated[list[str], Field(max_length=4)] | None

_MEMORY_DOC = ('"auto" routes the prompt, "off" uses the anchor alone, "generic" the bank\'s generic '
               "memory, or an explicit path (one node index per level, level 1 first)")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Request):
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (server default if absent)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="extension: keep the k most likely tokens (0 = all)")
    n: int = Field(1, ge=1, le=1, description="only 1 choice per prompt is supported")
    stream: bool = False
    stop: StopSpec = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-sequence token")
    memory: MemorySpec = Field("auto", description=_MEMORY_DOC)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]],
                                                                          Field(min_length=1)]
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class GenerateParameters(_Request):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Annotated[list[str], Field(max_length=4)] = Field(default_factory=list)
    do_sample: bool = False
    details: bool = False


class GenerateRequest(_Request):
    """`POST /generate` and `/generate_stream` (TGI)."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))
    memory: MemorySpec = Field("auto", description=_MEMORY_DOC)


class RouteRequest(_Request):
    """`POST /v1/route`: where a prompt (or a conversation) would be routed, without generating."""

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RouteRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


# ---- responses ----------------------------------------------------------------------------------
class MemoryInfo(BaseModel):
    """The memory a response was generated with (DESIGN §6)."""

    mode: MemoryMode
    path: list[int] | None = None
    levels: list[int] = Field(default_factory=list, description="levels whose blocks were injected")
    cache_hits: int = 0
    cache_misses: int = 0
    fetch_ms: float = 0.0
    route_ms: float = 0.0
    degraded: bool = False
    reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    memory: MemoryInfo | list[MemoryInfo]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memory: MemoryInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hiermem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None
    memory: MemoryInfo


class RouteNode(BaseModel):
    level: int
    index: int
    shard: str | None = None
    cached: bool = False


class RouteResponse(BaseModel):
    path: list[int] | None
    nodes: list[RouteNode]
    route_ms: float
    reason: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape, for every 4xx/5xx."""

    error: ErrorBody
