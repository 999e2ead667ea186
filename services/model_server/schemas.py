"""HTTP request/response bodies: OpenAI-compatible, TGI-style, and the `memory` of docs/design.md §6."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _utf8_text(value: str) -> str:
    """Text a tokenizer can take: a lone surrogate (JSON `"\\ud800"`) is not encodable as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid unicode: the text holds a lone surrogate (not encodable as UTF-8)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8_text)]
"""A request string: valid unicode (no lone surrogates)."""


def at_most(n: int) -> BeforeValidator:
    """Refuse a list longer than `n` before validating its items: pydantic's `max_length` checks after them,
    which for a large list of small items holds the event loop (docs/model_server.md, "Strict input")."""

    def check(value: object) -> object:
        if isinstance(value, list) and len(value) > n:
            raise ValueError(f"at most {n} items, not {len(value)}")
        return value

    return BeforeValidator(check)


def _prompt_kind(value: object) -> str | None:
    """Which form a prompt has, from its first item, so only that form is validated: a union tries every
    member and collects an error per item of each failing one (docs/model_server.md, "Strict input")."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list[str]" if value and isinstance(value[0], str) else "list[int]"
    return None


MAX_PROMPT_LIST = 1024
MAX_MESSAGES = 4096
NodeIndex = Annotated[int, Field(ge=0, le=2**31 - 1)]
MemoryMode = Literal["auto", "off", "generic", "path", "none"]
"""What a response's memory object says was used."""
MemorySpec = Literal["auto", "off", "generic"] | Annotated[list[NodeIndex], Field(min_length=1, max_length=16),
                                                              at_most(16)]
StopList = Annotated[list[Text], Field(max_length=4), at_most(4)]
StopSpec = Text | StopList | None
PromptSpec = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPT_LIST), at_most(MAX_PROMPT_LIST),
                Tag("list[str]")]
    | Annotated[list[int], Field(min_length=1), Tag("list[int]")],  # ids checked in range by the route, after
    # its length: a per-item constraint here would hold the event loop (docs/model_server.md, "Strict input")
    Discriminator(_prompt_kind, custom_error_type="invalid_prompt",
                  custom_error_message="a string, a list of strings or a list of token ids")]
Float = Annotated[float, Field(allow_inf_nan=False)]

_MEMORY_DOC = ('"auto" routes the prompt, "off" uses the anchor alone, "generic" the bank\'s generic '
               "memory, or an explicit path (one node index per level, level 1 first)")


def _same(value: object, neutral: object) -> bool:
    """JSON equality that tells booleans from numbers (True is not 1) but 0 from 0.0."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    if isinstance(value, (int, float)) and isinstance(neutral, (int, float)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


def unsupported(*neutral: object) -> AfterValidator:
    """An OpenAI/TGI field this server does not implement: accepted only absent, null or at a value that
    changes nothing (what SDKs send by default), otherwise 400 naming the field."""
    accepted = ", ".join(["null", *(json.dumps(n) for n in neutral)])

    def check(value: object) -> object:
        if value is None or any(_same(value, n) for n in neutral):
            return value
        raise ValueError(f"not supported by this server (accepted values: {accepted})")

    return AfterValidator(check)


Unsupported = Annotated[object, Field(description="not supported by this server: accepted only as null or at "
                                                  "its neutral value (what SDKs send by default)")]


class _Request(BaseModel):
    """Request bodies are strict, as the OpenAI API is: no coercion ("yes" is not a boolean, true is not
    an integer, 2.0 is not a token count) and no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="usage is always sent, in the last chunk")


class SamplingFields(_Request):
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (server default if absent)")
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="extension: keep the k most likely tokens (0 = all)")
    n: int = Field(1, ge=1, le=1, description="only 1 choice per prompt is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSpec = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: Text | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-sequence token")
    memory: MemorySpec = Field("auto", description=_MEMORY_DOC)
    frequency_penalty: Annotated[Unsupported, unsupported(0)] = None
    presence_penalty: Annotated[Unsupported, unsupported(0)] = None
    logit_bias: Annotated[Unsupported, unsupported({})] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def new_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    model: Text | None = None
    prompt: PromptSpec
    echo: bool = False
    best_of: Annotated[Unsupported, unsupported(1)] = None
    logprobs: Annotated[Unsupported, unsupported()] = None
    suffix: Annotated[Unsupported, unsupported("")] = None


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], at_most(MAX_MESSAGES)] | None = None
    name: Annotated[Unsupported, unsupported()] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description='only "text" is supported')


class ChatRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES), at_most(MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    response_format: ResponseFormat | None = None
    logprobs: Annotated[Unsupported, unsupported(False)] = None
    top_logprobs: Annotated[Unsupported, unsupported(0)] = None
    tools: Annotated[Unsupported, unsupported([])] = None
    tool_choice: Annotated[Unsupported, unsupported("none")] = None
    functions: Annotated[Unsupported, unsupported([])] = None
    function_call: Annotated[Unsupported, unsupported("none")] = None
    parallel_tool_calls: Annotated[Unsupported, unsupported(True, False)] = None
    store: Annotated[Unsupported, unsupported(False)] = None
    metadata: Annotated[Unsupported, unsupported({})] = None
    service_tier: Annotated[Unsupported, unsupported("auto", "default")] = None
    modalities: Annotated[Unsupported, unsupported(["text"])] = None
    audio: Annotated[Unsupported, unsupported()] = None
    prediction: Annotated[Unsupported, unsupported()] = None
    reasoning_effort: Annotated[Unsupported, unsupported()] = None
    web_search_options: Annotated[Unsupported, unsupported()] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise ValueError("give max_completion_tokens or max_tokens, not two different values")
        return value

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class GenerateParameters(_Request):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, gt=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopList = Field(default_factory=list)
    do_sample: bool = False
    details: bool = False
    best_of: Annotated[Unsupported, unsupported(1)] = None
    decoder_input_details: Annotated[Unsupported, unsupported(False)] = None
    frequency_penalty: Annotated[Unsupported, unsupported(0)] = None
    grammar: Annotated[Unsupported, unsupported()] = None
    repetition_penalty: Annotated[Unsupported, unsupported(1)] = None
    return_full_text: Annotated[Unsupported, unsupported(False)] = None
    top_n_tokens: Annotated[Unsupported, unsupported(0)] = None
    truncate: Annotated[Unsupported, unsupported()] = None
    typical_p: Annotated[Unsupported, unsupported(1)] = None
    watermark: Annotated[Unsupported, unsupported(False)] = None
    adapter_id: Annotated[Unsupported, unsupported()] = None


class GenerateRequest(_Request):
    """`POST /generate` and `/generate_stream` (TGI)."""

    inputs: Text
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))
    stream: bool = Field(False, description="TGI's flag: true only on /generate_stream")
    memory: MemorySpec = Field("auto", description=_MEMORY_DOC)


class RouteRequest(_Request):
    """`POST /v1/route`: where a prompt (or a conversation) would be routed, without generating."""

    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES),
                        at_most(MAX_MESSAGES)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RouteRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


# ---- responses ----------------------------------------------------------------------------------
class MemoryInfo(BaseModel):
    """The memory a response was generated with (docs/design.md §6)."""

    mode: MemoryMode
    path: list[int] | None = None
    levels: list[int] = Field(default_factory=list, description="levels whose blocks were injected")
    cache_hits: int | None = Field(default=0, description="null for a key not allowed to see cache state")
    cache_misses: int | None = Field(default=0, description="null for a key not allowed to see cache state")
    fetch_ms: float | None = Field(default=0.0, description="null for a key not allowed to see timings")
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
    cached: bool | None = Field(default=False, description="null for a key not allowed to see cache state")


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
