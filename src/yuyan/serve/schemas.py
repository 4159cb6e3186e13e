"""Request bodies of the OpenAI-compatible API (pydantic), and the shape of its errors.

Types are strict (a string where a number belongs is a 400, not silently coerced), numbers must be finite,
every list and string that reaches the engine has a bound, every string is text (a lone surrogate is a
400 naming its field), and a field the server does not know is a 400 naming it: a field that would change
the answer is never dropped without a word (OpenAI's `suffix`, `audio`, `reasoning_effort`, vLLM's
`guided_json`...). The few fields that change nothing here are declared and documented as ignored (`user`,
`metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`). Field ranges follow OpenAI's
documentation; `top_k`, `min_p`, `repetition_penalty`, `prompt_logprobs` and `sliding_window` are
extensions (as vLLM adds them).
Responses are plain dicts built in protocol.py in OpenAI's shapes; the response models below only
describe them in the OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch.Generator.manual_seed's range, with room for seed + j
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_PROMPTS = 64  # a completions request may carry a list of prompts


def _no_lone_surrogate(value: object) -> None:
    """JSON's `\\ud800` escapes decode to a lone surrogate, a str that is not text (it has no UTF-8): it
    would fail in the tokenizer or in the response. Refused here, so the 400 names the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text; send "
                "valid Unicode (a character beyond U+FFFF is a pair of escapes)"
            ) from None
    elif isinstance(value, list):
        for v in value:
            _no_lone_surrogate(v)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    @field_validator("*")
    @classmethod
    def _text_only(cls, value: object) -> object:
        _no_lone_surrogate(value)
        return value


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON valid under a schema (always
    enforced: the output is decoded under the schema's grammar whether `strict` is true or not)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> dict | None:
        """The `GenerationConfig.grammar` it asks for (None: unconstrained text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return {"type": "json_schema", "schema": schema}


MAX_SCHEMA_BYTES = 64 << 10  # a response_format schema (or a tool's parameters) as JSON


class SamplingRequest(_Strict):
    """The fields completions and chat requests share: the model, length, sampling and streaming."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=1024,
        description="token id (as a string) -> a number in [-100, 100] added to its logit before sampling",
    )
    response_format: ResponseFormat | None = None
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="vLLM extension: each prompt token's logprob and this many top alternatives, per choice",
    )
    # fields that change nothing in the answer: accepted and ignored
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    prompt_cache_key: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    sliding_window: bool | None = Field(
        None,
        description="yuyan extension: generate past the model's context by dropping the oldest tokens, so "
        "prompt + max_tokens may exceed the context (default: the server's --sliding-window setting; off "
        "keeps OpenAI's contract, where such a request is refused with context_length_exceeded)",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict | None) -> dict | None:
        for k, v in (value or {}).items():
            if not k.isdigit() or len(k) > 9:
                raise ValueError(
                    f'key {k!r} is not a token id; keys are token ids as strings, such as "50256"'
                )
            if not -100 <= v <= 100:
                raise ValueError(f"the bias of token {k} is {v}; biases are in [-100, 100]")
        return value

    @field_validator("response_format")
    @classmethod
    def _schema_size(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        schema = value.json_schema.schema_ if value is not None and value.json_schema is not None else None
        if schema is not None and len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"the json_schema is larger than {MAX_SCHEMA_BYTES} bytes of JSON")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(max_length=1_000_000)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)  # 0: with echo, only score the prompt
    best_of: int | None = Field(
        None,
        ge=1,
        le=128,
        description="accepted when it equals n (or 1): ranking extra samples is not served",
    )


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_SCHEMA_BYTES)  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    """A call an earlier assistant turn made, sent back with the conversation."""

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    """One turn. `name` (a participant's name) is not served: our chat template has nowhere to put it, and
    ignoring it would change whose words the model reads; it is refused by name."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant turn that made tool calls
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=64)  # assistant turns
    tool_call_id: str | None = Field(None, max_length=256)  # tool turns: the call this answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None  # arguments follow the schema when the call is constrained (tool_choice)

    @field_validator("parameters")
    @classmethod
    def _schema_size(cls, value: dict | None) -> dict | None:
        if value is not None and len(json.dumps(value)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"the parameters schema is larger than {MAX_SCHEMA_BYTES} bytes of JSON")
        return value


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # "may call several": a constrained reply makes one call


class InspectRequest(_Strict):
    text: str = Field(min_length=1, max_length=100_000)
    model: str | None = Field(None, max_length=256)


# ------------------------------------------------------------------------------------------------ responses
# What the routes answer, for the OpenAPI schema (the fuzz test checks every response against it); the
# routes build plain dicts (protocol.py) and these are never used to serialize them.
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """OpenAI's error shape: every 4xx and 5xx."""

    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(_Open):
    """A completions answer (`stream: true` answers text/event-stream chunks instead)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: dict | None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(_Open):
    """A chat answer (`stream: true` answers text/event-stream chunks instead)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Open):
    status: Literal["ok", "stopped"]
    model: str


class AttentionView(_Open):
    model: str
    tokens: list[str]
    scale: int
    attention: list[list[list[list[int]]]]  # [layer][head][query][key]
    n_layer: int
    n_head: int


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


__all__ = [
    "AttentionView",
    "ChatCompletionResponse",
    "CompletionResponse",
    "ErrorResponse",
    "Health",
    "ModelCard",
    "ModelList",
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "InspectRequest",
    "SamplingRequest",
    "StreamOptions",
    "error_body",
]


# ------------------------------------------------------------------------------------------------ endpoints.py
# The bodies and answers of the embeddings, tokenize and detokenize endpoints (serve/endpoints.py).
MAX_EMBED_INPUTS = 2048  # OpenAI's bound on the inputs of one embeddings request


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings body. `input` takes the four prompt forms (a text, texts, ids, id lists); an
    empty input, too many inputs or an input longer than the context is a 400 (endpoints.py checks them,
    naming the input's index). `dimensions` is accepted only equal to the model's width."""

    input: str | list[str] | list[int] | list[list[int]] = Field(max_length=1_000_000)
    model: str = Field(max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=1_000_000)
    user: str | None = Field(None, max_length=256)  # changes nothing: accepted and ignored


class TokenizeRequest(_Strict):
    """vLLM's tokenize body, its two forms in one object: `prompt` (with `add_special_tokens`, default
    true) or chat `messages` (with `add_generation_prompt`, default true, and `tools`), not both."""

    model: str | None = Field(None, max_length=256)
    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict):
    """vLLM's detokenize body."""

    model: str | None = Field(None, max_length=256)
    tokens: list[int] = Field(max_length=1_000_000)


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Open):
    prompt: str


# POST /v1/classify (serve/endpoints.py): the served classifier's class and per-class probabilities per text
MAX_CLASSIFY_INPUTS = 2048


class ClassifyRequest(_Strict):
    """Texts to label with the served model's classification head (a text or a list of texts); a text
    longer than the context is cut to it, as `Classifier.predict` cuts it."""

    input: str | list[str] = Field(max_length=1_000_000)
    model: str | None = Field(None, max_length=256)


class Classification(_Open):
    index: int
    label: str  # the class name (the checkpoint's labels, e.g. from `finetune --labels neg,pos`)
    probs: dict[str, float]


class ClassifyResponse(_Open):
    object: Literal["list"]
    data: list[Classification]
    model: str
    labels: list[str]
    usage: EmbeddingUsage


__all__ += [
    "ClassifyRequest",
    "ClassifyResponse",
    "MAX_CLASSIFY_INPUTS",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "MAX_EMBED_INPUTS",
    "TokenizeRequest",
    "TokenizeResponse",
]
