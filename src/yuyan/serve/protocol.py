"""OpenAI's API as plain functions: a request body becomes prompt ids and one `GenerationConfig`, and the
scheduler's events become OpenAI's JSON chunks, server-sent events and final responses.

Requests: a completions prompt is a text, a list of texts, a list of ids or a list of id lists (each one
submission); chat messages go through the tokenizer's chat template and stop at its chat stop tokens.
Every request gets `context_overflow="error"` (nothing is ever cut silently) and the sliding window of the
request's `sliding_window` field, else the server's default; `max_tokens` defaults to 16 for completions
and to the rest of the context for chat. What remains here is the server's policy (the model name,
`max_tokens_limit`, `max_n`, the number of prompts); every generation setting is checked by the core when
the job is submitted. Responses: a choice's index is `prompt index * n + choice index`; logprobs take
OpenAI's two shapes (completions: parallel lists with text offsets; chat: one entry per token with bytes).
`echo` puts the prompt's text before each choice's text and, with `logprobs`, its tokens' logprobs before
the generated ones (the first token's is null); those come from the core's prompt scoring, which also
answers vLLM's `prompt_logprobs` (per completions choice, or for the whole chat response).
`response_format` becomes the core's grammar, `logit_bias` a sampling setting like the others. Chat `tools`
render into the system turn (apps/tools.py); a required or named `tool_choice` becomes the grammar of one
call, and a reply's calls are parsed out of its text into `tool_calls` (streamed replies with tools are
held until they end, then sent whole, since only then can a call be told from text).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields

from fastapi.responses import StreamingResponse

from yuyan.apps import tools
from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig, TokenLogprob
from yuyan.generate.core import encode_prompt
from yuyan.generate.sampling import SamplingParams
from yuyan.generate.scheduler import Finished, Prompt, Token
from yuyan.serve.config import ServeConfig
from yuyan.serve.guards import ApiError
from yuyan.serve.job import ClientGone, Job
from yuyan.serve.schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, SamplingRequest
from yuyan.tokenizer import Tokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# the request fields that are `SamplingParams` fields of the same name and meaning (None: the default);
# n is read apart (its OpenAI default is 1 and it also bounds the request)
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.name != "n")


# ------------------------------------------------------------------------------------------------ requests
def check_model(name: str | None, config: ServeConfig) -> None:
    if name is not None and name != config.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {config.model_name!r}",
            "model",
            "model_not_found",
        )


def _check_n(n: int, prompts: int, config: ServeConfig) -> None:
    if n * prompts > config.max_n:
        raise ApiError(
            400,
            f"{n * prompts} completions requested (n={n} x {prompts} prompts); this server "
            f"returns at most {config.max_n} per request",
            "n",
            "too_many_completions",
        )


def _max_new_tokens(asked: int | None, default: int, config: ServeConfig) -> int:
    """The request's max_tokens, or the default; both bounded by the server's max_tokens_limit."""
    limit = config.max_tokens_limit
    if asked is None:  # a default never exceeds the limit; at least 1 so the core reports a full context
        return max(1, min(default, limit or default))
    if limit is not None and asked > limit:
        raise ApiError(
            400,
            f"max_tokens is {asked} but this server allows at most {limit}; lower it",
            "max_tokens",
            "max_tokens_too_large",
        )
    return asked


def _sliding_window(body: SamplingRequest, config: ServeConfig) -> bool:
    return config.sliding_window if body.sliding_window is None else body.sliding_window


def generation_config(
    body: SamplingRequest,
    config: ServeConfig,
    max_new_tokens: int,
    logprobs: int | None,
    stop_token_ids: list[int] | None = None,
    prompt_logprobs: int | None = None,
    grammar: dict | None = None,
) -> GenerationConfig:
    """One request's settings: the sampling fields it gave, its stops and logprobs, its grammar (`grammar`,
    a tool call's, else its response_format's), and the context rule of the server's OpenAI contract. Not
    validated here: `Scheduler.submit` does that."""
    given = {k: getattr(body, k) for k in SAMPLING_FIELDS if getattr(body, k) is not None}
    try:
        if grammar is None and body.response_format is not None:
            grammar = body.response_format.grammar()
    except ValueError as e:
        raise ApiError(400, f"response_format: {e}", "response_format") from None
    return GenerationConfig.from_dict(
        {
            **given,
            "n": body.n or 1,
            "max_new_tokens": max_new_tokens,
            "stop": body.stop_list(),
            "stop_token_ids": stop_token_ids,
            "logprobs": logprobs,
            "context_overflow": "error",
            "sliding_window": _sliding_window(body, config),
            "grammar": grammar,
            "prompt_logprobs": prompt_logprobs,
        }
    )


def _prompt_list(prompt: str | list) -> list:
    """OpenAI's four prompt forms as a list of prompts (texts or id lists)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return [prompt]
    return list(prompt)


def longest_token_bytes(tok: Tokenizer) -> int | None:
    """An upper bound on the UTF-8 bytes of input one token can stand for, or None when the tokenizer
    normalizes its input (a normalizer may shrink or drop text, so the input's size bounds nothing).
    A token's piece holds one character per byte for byte-level BPE and at least one per byte otherwise,
    so the longer of its piece and its decoded text, in bytes, bounds the input it covers."""
    if tok.tok.normalizer is not None:
        return None
    longest = 1
    for i in range(tok.vocab_size):
        piece = tok.tok.id_to_token(i) or ""
        longest = max(longest, len(piece.encode("utf-8", "replace")), len(tok.decode([i]).encode()))
    return longest


@dataclass
class Prompts:
    """What a server knows to refuse a prompt before tokenising it: the context, and how many bytes of
    text can fit in it at most (the context x the longest token's bytes; None: unknown)."""

    tok: Tokenizer
    block_size: int
    max_bytes: int | None

    @classmethod
    def of(cls, tok: Tokenizer, block_size: int) -> Prompts:
        longest = longest_token_bytes(tok)
        return cls(tok, block_size, None if longest is None else block_size * longest)

    def body_bytes(self, max_n: int) -> int | None:
        """The most bytes a completion or chat request body needs when every prompt fits (None: unknown):
        max_n prompts of max_bytes text, each byte at worst a 6-byte JSON escape (or ids of up to 8 bytes
        each), plus 64 KiB for the other fields. A larger body cannot be a request this model can serve."""
        if self.max_bytes is None:
            return None
        return max_n * max(6 * self.max_bytes, 8 * self.block_size) + (64 << 10)

    def too_long(self, param: str, size: int, unit: str) -> ApiError:
        what = "tokens" if unit == "tokens" else "bytes of UTF-8"
        why = "" if unit == "tokens" else f", more than {self.max_bytes} bytes of text can fill"
        return ApiError(
            400,
            f"the {param} is {size} {what}; this model's maximum context length is {self.block_size} "
            f"tokens{why}; shorten it",
            param,
            "context_length_exceeded",
        )

    def check_text(self, param: str, texts: list[str]) -> None:
        """Refuse text that cannot fit the context, at the cost of counting its bytes, not tokenising it:
        a 1 MB prompt is a 400 in microseconds and never holds the tokenizer (or the GIL)."""
        if self.max_bytes is None:
            return
        size = sum(len(t.encode()) for t in texts)  # a C loop: ~0.3 ms per MB
        if size > self.max_bytes:
            raise self.too_long(param, size, "bytes")

    def encode(self, prompts: list) -> list[list[int]]:
        """Texts and id lists as ids: texts are checked against the byte bound, then tokenised together
        by `encode_batch`, which releases the GIL (`encode` holds it: 0.7 s for 1 MB, stalling every
        stream); id lists longer than the context are refused before they are read."""
        texts = [p for p in prompts if isinstance(p, str)]
        self.check_text("prompt", texts)
        for p in prompts:
            if not isinstance(p, str) and len(p) > self.block_size:
                raise self.too_long("prompt", len(p), "tokens")
        encoded = iter(self.tok.encode_batch(texts) if texts else [])
        try:
            return [encode_prompt(self.tok, next(encoded) if isinstance(p, str) else p) for p in prompts]
        except UserError as e:
            raise ApiError(400, str(e), "prompt") from None

    def last_tokens(self, text: str, keep: int) -> list[int]:
        """The last `keep` tokens of a text, tokenising only its end: the last (keep + 16) x the longest
        token's bytes characters, enough for keep + 16 tokens (the first few of a cut may differ from
        the whole text's, so 16 spare ones are cut off). The whole text without a byte bound."""
        if self.max_bytes is not None:
            text = text[-(keep + 16) * (self.max_bytes // self.block_size) :]
        return self.tok.encode_batch([text])[0][-keep:]


def completion_request(
    body: CompletionRequest, prompts_of: Prompts, config: ServeConfig
) -> tuple[list[list[int]], GenerationConfig]:
    """A completions body as (the prompts' ids, their shared config). Tokenizes: run it off the event loop."""
    check_model(body.model, config)
    prompts = _prompt_list(body.prompt)
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise ApiError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", "prompt")
    _check_n(body.n or 1, len(prompts), config)
    if body.best_of is not None and body.best_of not in (1, body.n or 1):
        raise ApiError(
            400,
            f"best_of {body.best_of} > n is not served (ranking extra samples server-side); ask for "
            "n samples with logprobs and rank them, or drop best_of",
            "best_of",
        )
    if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
        raise ApiError(
            400, "max_tokens 0 generates nothing; use it with echo or prompt_logprobs", "max_tokens"
        )
    ids = prompts_of.encode(prompts)
    default = COMPLETION_DEFAULT_MAX_TOKENS
    if not _sliding_window(body, config):  # a default that fits every prompt's context is never refused
        default = min(default, prompts_of.block_size - max(len(x) for x in ids))
    mt = _max_new_tokens(body.max_tokens, default, config)
    return ids, generation_config(body, config, mt, body.logprobs, None, _prompt_scores(body, mt))


def _prompt_scores(body: CompletionRequest, max_new_tokens: int) -> int | None:
    """How many top alternatives the prompt's scoring needs (None: no scoring): echo's logprobs, vLLM's
    prompt_logprobs, and 0 for an echo of max_tokens 0 (the core then only scores)."""
    wants = [body.prompt_logprobs]
    if body.echo:
        wants.append(body.logprobs if body.logprobs is not None else (0 if max_new_tokens == 0 else None))
    wants = [w for w in wants if w is not None]
    return max(wants) if wants else None


def chat_request(
    body: ChatCompletionRequest, prompts_of: Prompts, config: ServeConfig
) -> tuple[list[int], GenerationConfig]:
    """A chat body as (the templated conversation's ids, its config). Tokenizes: run it off the event loop."""
    check_model(body.model, config)
    _check_n(body.n or 1, 1, config)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    messages = chat_messages(body)
    prompts_of.check_text("messages", [m["content"] for m in messages])
    tok = prompts_of.tok
    ids, _ = tok.apply_chat_template(messages, add_generation_prompt=True)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    mt = _max_new_tokens(asked, prompts_of.block_size - len(ids), config)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    stops = list(tok.chat_stop_ids) or None
    grammar = _call_grammar(body)
    return ids, generation_config(body, config, mt, logprobs, stops, body.prompt_logprobs, grammar)


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """The conversation as the chat template's messages: developer turns as system ones, the tools (unless
    tool_choice is "none") in the system turn, earlier tool calls and tool results as text (apps/tools.py)."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"{where} has no content", f"{where}.content")
        if m.tool_calls is not None and m.role != "assistant":
            raise ApiError(400, f"{where}: only assistant turns carry tool_calls", f"{where}.tool_calls")
        if m.tool_call_id is not None and m.role != "tool":
            raise ApiError(400, f"{where}: only tool turns carry tool_call_id", f"{where}.tool_call_id")
        calls = []
        for j, c in enumerate(m.tool_calls or []):
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                param = f"{where}.tool_calls[{j}].function.arguments"
                raise ApiError(400, f"{param} must be a JSON object as text", param)
            calls.append({"name": c.function.name, "arguments": args})
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text(), "tool_calls": calls})
    return tools.render(out, _offered_tools(body))


def _offered_tools(body: ChatCompletionRequest) -> list[dict] | None:
    if body.tool_choice is not None and not body.tools:
        raise ApiError(400, "tool_choice needs tools: give tools or drop tool_choice", "tool_choice")
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _call_grammar(body: ChatCompletionRequest) -> dict | None:
    """The grammar of a required or named tool call (None: the reply is free, its calls parsed after)."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "auto", "none"):
        return None
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400,
            "a required tool call and response_format both constrain the reply; drop one",
            "response_format",
        )
    offered = _offered_tools(body)
    try:
        return tools.call_grammar(offered, None if choice == "required" else choice.function.name)
    except UserError as e:
        raise ApiError(400, str(e), "tool_choice") from None


def tool_names(body: SamplingRequest) -> set[str] | None:
    """The functions a chat reply may call (None: its text is only content)."""
    if not isinstance(body, ChatCompletionRequest) or not body.tools or body.tool_choice == "none":
        return None
    return {t.function.name for t in body.tools}


# ------------------------------------------------------------------------------------------------ responses
@dataclass
class Reply:
    """What a response holds besides the events: its kind (completions or chat), ids and usage sizes."""

    chat: bool
    model: str
    n: int  # choices per prompt
    prompt_tokens: int  # all prompts together
    logprobs: int | None
    include_usage: bool = False  # streamed: a last chunk with usage
    echo: list[str] | None = None  # completions with echo: each prompt's text, put before its choices' text
    first: list[str] = field(default_factory=list)  # the text of each prompt's first token (echo logprobs)
    echo_logprobs: bool = False  # the echo's logprobs come first in each choice's logprobs
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: this many alternatives per prompt token
    scored: bool = False  # the core sends each prompt's logprobs (a Prompt event) before its tokens
    scores: dict[int, list] = field(default_factory=dict)  # prompt index -> its logprobs, as they came
    tools: set[str] | None = None  # chat with tools: the functions whose calls are parsed out of the text
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"


def reply_for(
    body: SamplingRequest,
    chat: bool,
    prompts: list[list[int]],
    config: GenerationConfig,
    model: str,
    tok: Tokenizer | None = None,
) -> Reply:
    echo = None
    if not chat and getattr(body, "echo", False):  # a text prompt echoes as sent, ids as they decode
        sent = _prompt_list(body.prompt)
        echo = [p if isinstance(p, str) else tok.decode(ids) for p, ids in zip(sent, prompts, strict=True)]
        first = [tok.decode(ids[:1]) for ids in prompts]
    return Reply(
        chat=chat,
        model=model,
        n=config.sampling.n,
        prompt_tokens=sum(len(p) for p in prompts),
        logprobs=config.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo=echo,
        first=first if echo is not None else [],
        echo_logprobs=echo is not None and config.logprobs is not None,
        prompt_logprobs=body.prompt_logprobs,
        scored=config.prompt_logprobs is not None,
        tools=tool_names(body) if chat else None,
    )


def _base(reply: Reply, chunk: bool = False) -> dict:
    if not reply.chat:
        return {"id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model}
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    return {
        "id": reply.id,
        "object": kind,
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": None,
    }


def _usage(reply: Reply, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": reply.prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    tokens: list[Token], offset: int = 0, prompt: list | None = None, first: str = "", k: int = 0
) -> dict:
    """Completions' logprobs: parallel lists, `text_offset` counted from `offset` in the choice's text;
    an echoed prompt's entries first (`prompt`: the core's, None for the first token, whose text is
    `first`; `k` alternatives each)."""
    entries: list = []
    if prompt:
        entries = [(first, None, None)] + [
            (e.token, e.logprob, {s: v for _, s, v in e.top[:k]}) for e in prompt[1:]
        ]
    entries += [(t.token, t.logprob, {s: lp for _, s, lp in (t.top or [])}) for t in tokens]
    offsets, at = [], offset
    for s, _, _ in entries:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": [s for s, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the token itself and its k likeliest alternatives."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        d = {
            str(a): {"logprob": v, "rank": r + 1, "decoded_token": s} for r, (a, s, v) in enumerate(e.top[:k])
        }
        d.setdefault(str(e.token_id), {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token})
        out.append(d)
    return out


def chat_logprobs(tokens: list[Token]) -> dict:
    """Chat's logprobs: one entry per token with its bytes and its top alternatives."""

    def entry(s: str, lp: float | None) -> dict:
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(t.token, t.logprob),
                "top_logprobs": [entry(s, lp) for _, s, lp in (t.top or [])],
            }
            for t in tokens
        ]
    }


def _logprobs(reply: Reply, tokens: list[Token], offset: int = 0, pi: int | None = None) -> dict | None:
    """A choice's logprobs; with `pi` (a completions choice of prompt pi) the echoed prompt's come first."""
    if reply.logprobs is None:
        return None
    if reply.chat:
        return chat_logprobs(tokens)
    if pi is not None and reply.echo_logprobs:
        return completion_logprobs(tokens, offset, reply.scores.get(pi), reply.first[pi], reply.logprobs)
    return completion_logprobs(tokens, offset)


def _prompt_part(reply: Reply, pi: int) -> dict:
    """vLLM's prompt_logprobs of prompt pi, when asked for."""
    if reply.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": vllm_prompt_logprobs(reply.scores.get(pi, []), reply.prompt_logprobs)}


def echo_chunks(reply: Reply, pi: int) -> list[dict]:
    """The first streamed chunk of each choice of prompt pi: the echoed prompt (with its logprobs) and
    vLLM's prompt_logprobs (a chat stream gets those once, in a chunk without choices)."""
    if reply.chat:
        return [{**_base(reply, chunk=True), "choices": [], **_prompt_part(reply, pi)}]
    text = reply.echo[pi] if reply.echo is not None else ""
    lp = _logprobs(reply, [], 0, pi) if reply.echo_logprobs else None
    return [
        {
            **_base(reply, chunk=True),
            "choices": [
                {"index": pi * reply.n + j, "text": text, "logprobs": lp, "finish_reason": None}
                | _prompt_part(reply, pi)
            ],
        }
        for j in range(reply.n)
    ]


def token_chunk(reply: Reply, ci: int, ev: Token, offset: int) -> dict:
    """The streamed chunk of one token of choice `ci` (`offset`: the choice's text so far, in characters)."""
    lp = _logprobs(reply, [ev], offset)
    piece = {"delta": {"content": ev.text}} if reply.chat else {"text": ev.text}
    choice = {"index": ci, **piece, "logprobs": lp, "finish_reason": None}
    return {**_base(reply, chunk=True), "choices": [choice]}


def finish_chunk(reply: Reply, ci: int, ev: Finished) -> dict:
    """The streamed chunk that ends choice `ci`, with the text held back until the end (`tail`)."""
    if reply.chat:
        piece: dict = {"delta": {"content": ev.tail} if ev.tail else {}}
    else:
        piece = {"text": ev.tail}
    choice = {"index": ci, **piece, "logprobs": None, "finish_reason": ev.finish_reason}
    return {**_base(reply, chunk=True), "choices": [choice]}


def role_chunks(reply: Reply) -> list[dict]:
    """Chat streams open each choice with a chunk that carries the role."""
    if not reply.chat:
        return []
    return [
        {
            **_base(reply, chunk=True),
            "choices": [
                {
                    "index": j,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        for j in range(reply.n)
    ]


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_chunks(job: Job, reply: Reply) -> AsyncIterator[dict]:
    """The chunks of a streamed response, in the order the events arrive."""
    for chunk in role_chunks(reply):
        yield chunk
    completion_tokens = 0
    offsets: dict[int, int] = {}  # characters streamed so far, per choice
    echo = reply.echo or []
    if echo and not reply.scored:  # nothing to wait for: the prompts' text comes first
        for pi in range(len(echo)):
            for chunk in echo_chunks(reply, pi):
                yield chunk
    offsets = {pi * reply.n + j: len(text) for pi, text in enumerate(echo) for j in range(reply.n)}
    async for pi, ev in job.events():
        ci = pi * reply.n + ev.index
        if isinstance(ev, Prompt):
            reply.scores[pi] = ev.logprobs
            for chunk in echo_chunks(reply, pi):
                yield chunk
        elif isinstance(ev, Token):
            if not ev.text and reply.logprobs is None:  # nothing to show yet (a held-back piece)
                continue
            yield token_chunk(reply, ci, ev, offsets.get(ci, 0))
            offsets[ci] = offsets.get(ci, 0) + len(ev.text)
        else:
            completion_tokens += ev.completion_tokens
            yield finish_chunk(reply, ci, ev)
    if reply.include_usage:
        yield {**_base(reply, chunk=True), "choices": [], "usage": _usage(reply, completion_tokens)}


async def _tool_stream(job: Job, reply: Reply) -> AsyncIterator[dict]:
    """A chat stream with tools: each choice is held until it ends (a call can only be told from text
    then) and sent as `tool_chunks`."""
    for chunk in role_chunks(reply):
        yield chunk
    held: dict[int, list[Token]] = {}
    completion_tokens = 0
    async for pi, ev in job.events():
        ci = pi * reply.n + ev.index
        if isinstance(ev, Prompt):
            reply.scores[pi] = ev.logprobs
        elif isinstance(ev, Token):
            held.setdefault(ci, []).append(ev)
        else:
            completion_tokens += ev.completion_tokens
            for chunk in tool_chunks(reply, ci, ev, held.pop(ci, [])):
                yield chunk
    if reply.include_usage:
        yield {**_base(reply, chunk=True), "choices": [], "usage": _usage(reply, completion_tokens)}


def streaming_response(job: Job, reply: Reply) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`; a failure mid-stream is one error event."""

    async def body():
        try:
            chunks = _tool_stream(job, reply) if reply.tools is not None else stream_chunks(job, reply)
            async for chunk in chunks:
                yield sse(chunk)
        except ApiError as e:
            yield sse(e.body())
        finally:  # a disconnected client lands here too: free its rows
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def collect(
    job: Job, reply: Reply, disconnected: Callable[[], Awaitable[bool]]
) -> dict[int, tuple[Finished, list[Token]]] | None:
    """Wait for every choice: {choice index: (its Finished, its Token events)}; None if the client left."""
    finished: dict[int, Finished] = {}
    tokens: dict[int, list[Token]] = {}
    try:
        async for pi, ev in job.events(disconnected):
            ci = pi * reply.n + ev.index
            if isinstance(ev, Prompt):
                reply.scores[pi] = ev.logprobs
            elif isinstance(ev, Token):
                tokens.setdefault(ci, []).append(ev)
            elif isinstance(ev, Finished):
                finished[ci] = ev
    except ClientGone:
        return None
    return {ci: (fin, tokens.get(ci, [])) for ci, fin in finished.items()}


def _message(reply: Reply, fin: Finished) -> tuple[dict, str]:
    """A chat choice's message and finish reason: its text, or the tool calls parsed out of it."""
    if reply.tools is not None:
        content, calls = tools.parse(fin.text, reply.tools)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
            return message, "tool_calls" if fin.finish_reason == "stop" else fin.finish_reason
    return {"role": "assistant", "content": fin.text}, fin.finish_reason


def tool_chunks(reply: Reply, ci: int, fin: Finished, toks: list[Token]) -> list[dict]:
    """A streamed chat reply with tools, sent whole when it ends (calls can only be told from text then):
    one chunk with the content or the calls (and every token's logprobs), one with the finish reason."""
    message, finish = _message(reply, fin)
    delta: dict = {"content": message["content"]} if message["content"] else {}
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
    base = _base(reply, chunk=True)
    body = {"index": ci, "delta": delta, "logprobs": _logprobs(reply, toks), "finish_reason": None}
    end = {"index": ci, "delta": {}, "logprobs": None, "finish_reason": finish}
    return [{**base, "choices": [body]}, {**base, "choices": [end]}]


def response(reply: Reply, results: dict[int, tuple[Finished, list[Token]]]) -> dict:
    """The whole (non-streamed) response: every choice in index order, and usage."""
    choices = []
    for ci in sorted(results):
        fin, toks = results[ci]
        finish = fin.finish_reason
        if reply.chat:
            message, finish = _message(reply, fin)
            piece: dict = {"message": message}
            lp = _logprobs(reply, toks)
        else:
            pi = ci // reply.n
            piece = {"text": (reply.echo[pi] if reply.echo is not None else "") + fin.text}
            piece |= _prompt_part(reply, pi)
            lp = _logprobs(reply, toks, 0, pi)
        choices.append({"index": ci, **piece, "logprobs": lp, "finish_reason": finish})
    completion_tokens = sum(fin.completion_tokens for fin, _ in results.values())
    extra = _prompt_part(reply, 0) if reply.chat else {}
    return {**_base(reply), "choices": choices, "usage": _usage(reply, completion_tokens), **extra}


__all__ = [
    "Reply",
    "chat_logprobs",
    "chat_messages",
    "chat_request",
    "check_model",
    "collect",
    "completion_logprobs",
    "completion_request",
    "echo_chunks",
    "vllm_prompt_logprobs",
    "longest_token_bytes",
    "Prompts",
    "finish_chunk",
    "generation_config",
    "reply_for",
    "response",
    "role_chunks",
    "sse",
    "stream_chunks",
    "streaming_response",
    "token_chunk",
    "tool_chunks",
    "tool_names",
]
