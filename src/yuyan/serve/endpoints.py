"""The server's endpoints beside generation: OpenAI's POST /v1/embeddings, vLLM's POST /tokenize and POST
/detokenize, GET /metrics in Prometheus' text format, and POST /v1/classify for a classifier checkpoint.

An embedding is the mean over an input's tokens of the model's final hidden states (after the final norm,
`Transformer.hidden`), L2-normalised, as float32. `dimensions` is refused unless it equals the model's
width: truncating and renormalising, as OpenAI's text-embedding-3 models allow, only keeps meaning for a
model trained for it (Matryoshka), which ours are not. The forward passes run on the scheduler thread as
background calls (`Scheduler.run_exclusive(background=True)`), as attention inspections do, within their
share of the decode thread's time; the inputs go in chunks of at most EMBED_CHUNK_TOKENS padded tokens, so
that no call holds the thread long, and each chunk's JSON is written there too. Tokenising and checking run
on the prepare thread, as for completions.
/tokenize takes a text (`add_special_tokens`, default true, adds what the tokenizer's own post-processor adds,
as Hugging Face's encode does; the completion endpoints encode a text prompt without them) or chat
messages rendered exactly as /v1/chat/completions renders them; `token_strs` are the vocabulary's pieces.
/metrics (behind the API key when one is set, like every path but /health) is a per-app `CollectorRegistry`:
requests by endpoint and status (the Guard's refusals included: the counting middleware sits outside it),
prompt tokens (generation prompts and embedding inputs) and generated tokens, the waiting requests and the
running rows (read when scraped), and histograms of request latency (to the last byte sent), time to first
token and time per output token. The token times are taken where the scheduler emits each event (a wrapper
of the `emit` callback a request is submitted with: one clock read and one observation per token), from the
request's submission, after tokenising, to its first token, then between a choice's tokens.
/v1/classify answers, for a model fine-tuned with `--task classify`, each text's class name and per-class
probabilities from `Classifier.predict_ids` (the checkpoint's head and class names); like embeddings, the
forward passes are background calls on the scheduler thread, in chunks of EMBED_CHUNK_TOKENS padded tokens.
Any other model answers 400 naming `model`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from yuyan.errors import UserError
from yuyan.generate.scheduler import Event, Finished, Handle, Scheduler, Token
from yuyan.model.transformer import Transformer
from yuyan.serve import protocol
from yuyan.serve.guards import ApiError
from yuyan.serve.schemas import (
    MAX_CLASSIFY_INPUTS,
    MAX_EMBED_INPUTS,
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()
EMBED_CHUNK_TOKENS = 1024  # padded tokens per background call (one input longer than this goes alone)
ERRORS = {
    400: "bad input (the field is named in `param`)",
    401: "missing or wrong API key",
    404: "unknown model",
    408: "the body did not arrive within the body deadline",
    413: "the body is larger than the limit",
    421: "a Host header this server does not answer to",
    429: "too many requests in flight or waiting (Retry-After)",
    503: "shutting down",
}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


BODY_ERRORS = _errors(400, 401, 404, 408, 413, 421, 429, 503)


def register(app: FastAPI) -> None:
    """Add the routes to an app (where it is made, so that its OpenAPI schema lists them)."""
    app.router.routes.extend(router.routes)


# ------------------------------------------------------------------------------------------------ embeddings
def _inputs(body: EmbeddingRequest) -> list:
    """OpenAI's four input forms as a list of inputs (texts or id lists)."""
    x = body.input
    if isinstance(x, str) or (x and all(isinstance(t, int) for t in x)):
        return [x]
    return list(x)


def embedding_inputs(body: EmbeddingRequest, s) -> list[list[int]]:
    """The token ids of each input, checked: the model name, `dimensions`, no empty input, at most
    MAX_EMBED_INPUTS inputs, ids in the vocabulary, each within the context (a 400 naming `input[i]`).
    Tokenises: run it off the event loop (`s` is the app's Server)."""
    protocol.check_model(body.model, s.config)
    width = s.lm.model.config.d_model
    if body.dimensions is not None and body.dimensions != width:
        raise ApiError(
            400,
            f"dimensions is {body.dimensions} but this model's embeddings have {width}; drop dimensions "
            f"or send {width} (shortened embeddings are not served)",
            "dimensions",
        )
    inputs = _inputs(body)
    if not 1 <= len(inputs) <= MAX_EMBED_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBED_INPUTS} inputs", "input")
    for i, x in enumerate(inputs):
        _check_size(s.prompts, i, x)
    texts = [x for x in inputs if isinstance(x, str)]
    try:
        encoded = iter(s.prompts.tok.encode_batch(texts) if texts else [])
    except UserError as e:
        raise ApiError(400, str(e), "input") from None
    ids = [next(encoded) if isinstance(x, str) else x for x in inputs]
    for i, x in enumerate(ids):
        _check_ids(s.prompts, i, x, s.lm.model.config.vocab_size)
    return ids


def _check_size(prompts: protocol.Prompts, i: int, x: str | list[int]) -> None:
    """Input i is not empty, and fits the context by its ids' count or its text's bytes (not read yet)."""
    param = f"input[{i}]"
    if not x:
        raise ApiError(400, f"{param} is empty; every input needs at least one token", param)
    if not isinstance(x, str) and len(x) > prompts.block_size:
        raise prompts.too_long(param, len(x), "tokens")
    if isinstance(x, str) and prompts.max_bytes is not None and len(x.encode()) > prompts.max_bytes:
        raise prompts.too_long(param, len(x.encode()), "bytes")


def _check_ids(prompts: protocol.Prompts, i: int, ids: list[int], vocab: int) -> None:
    param = f"input[{i}]"
    if len(ids) > prompts.block_size:
        raise prompts.too_long(param, len(ids), "tokens")
    if min(ids) < 0 or max(ids) >= vocab:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ApiError(400, f"{param} holds the token id {bad}, not in 0..{vocab - 1}", param)


def embed(model: Transformer, batch: list[list[int]]) -> torch.Tensor:
    """(B, d_model) float32 embeddings of B inputs (token ids): the mean of each input's final normalised
    hidden states over its tokens, L2-normalised. The inputs are right-padded into one forward pass: with
    causal attention a pad never reaches the real tokens before it."""
    device = next(model.parameters()).device
    T = max(len(x) for x in batch)
    idx = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in batch], device=device)
    with torch.inference_mode():
        h = model.hidden(idx.to(device)).float()  # (B, T, d_model)
        keep = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()  # (B, T)
        pooled = (h * keep[..., None]).sum(1) / lengths[:, None].float()
        return F.normalize(pooled, dim=-1).cpu()


def embedding_chunks(ids: list[list[int]], budget: int = EMBED_CHUNK_TOKENS) -> list[list[int]]:
    """The inputs' indices in groups of one forward pass each: by length (little padding), at most
    `budget` padded tokens a group, at least one input."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    groups: list[list[int]] = [[]]
    for i in order:
        if groups[-1] and (len(groups[-1]) + 1) * len(ids[i]) > budget:
            groups.append([])
        groups[-1].append(i)
    return groups


def embedding_json(model: Transformer, ids: list[list[int]], group: list[int], fmt: str) -> list[bytes]:
    """The `data` entries of one group, as JSON: made on the scheduler thread (a background call)."""
    vectors = embed(model, [ids[i] for i in group])
    out = []
    for i, v in zip(group, vectors, strict=True):
        if fmt == "base64":  # little-endian float32 bytes, as OpenAI sends them
            value: list[float] | str = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            value = v.tolist()
        out.append(json.dumps({"object": "embedding", "index": i, "embedding": value}).encode())
    return out


def embedding_part(s, ids: list[list[int]], group: list[int], fmt: str) -> list[bytes]:
    """`embedding_json` as a background call (`s`: the scheduler's context, an app.Served)."""
    return embedding_json(s.lm.model, ids, group, fmt)


async def _background_items(request: Request, ids: list[list[int]], part, *args) -> tuple[bytes, str]:
    """The JSON items of every input, `part(context, *args, ids, group)` run on the decoding side as
    background calls of `embedding_chunks` groups (between decode steps), joined in input order; with the
    usage object, the inputs' tokens counted in /metrics."""
    s = request.app.state.server
    parts: dict[int, bytes] = {}
    for group in embedding_chunks(ids):
        work = s.sched.background(part, ids, group, *args)
        parts.update(zip(group, await asyncio.wrap_future(work), strict=True))
    tokens = sum(len(x) for x in ids)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.prompt_tokens.inc(tokens)
    usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
    return b",".join(parts[i] for i in range(len(ids))), usage


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}, **BODY_ERRORS})
async def embeddings(body: EmbeddingRequest, request: Request):
    """OpenAI's embeddings: the L2-normalised mean of the final hidden states over each input's tokens."""
    s = request.app.state.server
    ids = await s.off_loop(embedding_inputs, body, s)
    data, usage = await _background_items(request, ids, embedding_part, body.encoding_format)
    tail = f'],"model":{json.dumps(s.config.model_name)},"usage":{usage}}}'
    return Response(b'{"object":"list","data":[' + data + tail.encode(), media_type="application/json")


# ------------------------------------------------------------------------------------------------ classify
def classify_inputs(body: ClassifyRequest, s) -> list[list[int]]:
    """The token ids of each text (cut to the context), checked: the model name, a classification head,
    1 to MAX_CLASSIFY_INPUTS texts, none empty. Tokenises: run it off the event loop."""
    from yuyan.model.heads import encode_for_classify

    protocol.check_model(body.model, s.config)
    if s.classifier is None:
        raise ApiError(
            400,
            f"{s.config.model_name!r} has no classification head; serve a checkpoint fine-tuned with "
            "`yuyan finetune --task classify`",
            "model",
        )
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not 1 <= len(texts) <= MAX_CLASSIFY_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_CLASSIFY_INPUTS} texts", "input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ApiError(400, f"input[{i}] is empty", f"input[{i}]")
    try:
        ids, _ = encode_for_classify(s.lm.tokenizer, texts, s.classifier.config.block_size)
    except UserError as e:
        raise ApiError(400, str(e), "input") from None
    return ids


def classify_json(s, ids: list[list[int]], group: list[int]) -> list[bytes]:
    """The answers of the inputs `group` as JSON objects, a background call (`s`: an app.Served)."""
    out = s.classifier.predict_ids([ids[i] for i in group])
    return [
        json.dumps({"index": i, "label": label, "probs": probs}, ensure_ascii=False).encode()
        for i, (label, probs) in zip(group, out, strict=True)
    ]


@router.post("/v1/classify", responses={200: {"model": ClassifyResponse}, **BODY_ERRORS})
async def classify(body: ClassifyRequest, request: Request):
    """The served classifier's class name and per-class probabilities for each text."""
    s = request.app.state.server
    ids = await s.off_loop(classify_inputs, body, s)
    data, usage = await _background_items(request, ids, classify_json)
    labels = json.dumps(s.classifier.labels, ensure_ascii=False)
    tail = f'],"model":{json.dumps(s.config.model_name)},"labels":{labels},"usage":{usage}}}'
    return Response(b'{"object":"list","data":[' + data + tail.encode(), media_type="application/json")


# ------------------------------------------------------------------------------------------------ tokenize
def tokenize(body: TokenizeRequest, s) -> dict:
    """vLLM's tokenize answer. Tokenises: run it off the event loop."""
    protocol.check_model(body.model, s.config)
    tok = s.prompts.tok
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give either prompt (a text) or messages (a chat), not both", "prompt")
    if body.prompt is not None:
        for name in ("add_generation_prompt", "tools"):
            if getattr(body, name) is not None:
                raise ApiError(400, f"{name} goes with messages, not with prompt; drop it", name)
        try:
            ids = tok.tok.encode_batch_fast(
                [body.prompt], add_special_tokens=body.add_special_tokens is not False
            )
        except TypeError:
            raise ApiError(400, "prompt is not text", "prompt") from None
        ids = ids[0].ids
    else:
        if body.add_special_tokens:
            raise ApiError(
                400,
                "add_special_tokens with messages is not served: the chat template's tokens are the whole "
                "prompt /v1/chat/completions decodes; drop it",
                "add_special_tokens",
            )
        chat = ChatCompletionRequest.model_construct(messages=body.messages, tools=body.tools)
        messages = protocol.chat_messages(chat)
        gen_prompt = body.add_generation_prompt is not False
        ids, _ = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    strs = [tok.tok.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": s.context, "tokens": ids, "token_strs": strs}


def detokenize(body: DetokenizeRequest, s) -> dict:
    """vLLM's detokenize answer: the text of the ids, special tokens included."""
    protocol.check_model(body.model, s.config)
    try:
        return {"prompt": s.prompts.tok.decode(body.tokens)}
    except UserError as e:
        raise ApiError(400, str(e), "tokens") from None


@router.post("/tokenize", responses={200: {"model": TokenizeResponse}, **BODY_ERRORS})
async def tokenize_route(body: TokenizeRequest, request: Request):
    """vLLM's tokenize: a text (`prompt`) or a chat (`messages`) as token ids, with the context length."""
    s = request.app.state.server
    return await s.off_loop(tokenize, body, s)


@router.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **BODY_ERRORS})
async def detokenize_route(body: DetokenizeRequest, request: Request):
    """vLLM's detokenize: token ids as text."""
    s = request.app.state.server
    return await s.off_loop(detokenize, body, s)


# ------------------------------------------------------------------------------------------------ metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Metrics:
    """One app's collectors, in their own registry (several apps in one process never clash)."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    prompt_tokens: Counter
    generated_tokens: Counter
    ttft: Histogram
    tpot: Histogram
    paths: frozenset[str]

    @classmethod
    def of(cls, sched: Scheduler, paths: set[str]) -> Metrics:
        r = CollectorRegistry(auto_describe=True)
        m = cls(
            registry=r,
            requests=Counter("yuyan_requests", "HTTP requests answered", ["endpoint", "status"], registry=r),
            latency=Histogram(
                "yuyan_request_latency_seconds",
                "from a request's arrival to the last byte of its answer",
                ["endpoint"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            prompt_tokens=Counter(
                "yuyan_prompt_tokens", "prompt tokens submitted (generation and embeddings)", registry=r
            ),
            generated_tokens=Counter("yuyan_generation_tokens", "tokens generated", registry=r),
            ttft=Histogram(
                "yuyan_time_to_first_token_seconds",
                "from a request's submission (after tokenising) to each choice's first token",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            tpot=Histogram(
                "yuyan_time_per_output_token_seconds",
                "between two tokens of one choice",
                buckets=TOKEN_BUCKETS,
                registry=r,
            ),
            paths=frozenset(paths),
        )
        Gauge("yuyan_requests_waiting", "requests waiting for rows", registry=r).set_function(
            lambda: sched.waiting
        )
        Gauge("yuyan_rows_running", "rows decoding now", registry=r).set_function(lambda: sched.active)
        return m

    def endpoint(self, path: str) -> str:
        """The label of a path: a route's path, else "other" (a client never adds label values)."""
        if path in self.paths:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model_id}"
        return "/static" if path.startswith("/static/") else "other"

    def timed(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """`emit` with its tokens timed (runs on the scheduler thread, before the event is delivered)."""
        t0 = time.perf_counter()
        last: dict[int, float] = {}  # choice index -> when its latest token came

        def emit_timed(ev: Event) -> None:
            if isinstance(ev, Token):
                now = time.perf_counter()
                before = last.get(ev.index)
                if before is None:
                    self.ttft.observe(now - t0)
                else:
                    self.tpot.observe(now - before)
                last[ev.index] = now
            elif isinstance(ev, Finished):
                self.generated_tokens.inc(ev.completion_tokens)
            emit(ev)

        return emit_timed


class MeteredScheduler:
    """The scheduler as the routes see it: every submission's events timed by `Metrics.timed`; everything
    else is the scheduler's own."""

    def __init__(self, sched: Scheduler, metrics: Metrics):
        self.scheduler, self.metrics = sched, metrics

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def submit(self, prompt: list[int], config, *, emit: Callable[[Event], None] | None = None) -> Handle:
        handle = self.scheduler.submit(
            prompt, config, emit=None if emit is None else self.metrics.timed(emit)
        )
        self.metrics.prompt_tokens.inc(handle.prompt_tokens)
        return handle


class CountRequests:
    """Pure ASGI middleware: each request counted by endpoint and status, and its latency to the last byte
    sent, both recorded before that byte goes out."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m, t0 = self.metrics, time.perf_counter()
        endpoint = m.endpoint(scope.get("path", ""))
        status: list[int] = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                m.requests.labels(endpoint, str(message["status"])).inc()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                m.latency.labels(endpoint).observe(time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not status:  # answered 500 by the server's outermost handler
                m.requests.labels(endpoint, "500").inc()
                m.latency.labels(endpoint).observe(time.perf_counter() - t0)
            raise
        if not status:  # the client left before an answer
            m.requests.labels(endpoint, "499").inc()


def instrument(app: FastAPI) -> None:
    """Give an app its metrics: the registry /metrics answers, the counting middleware (added last, so it
    sits outside the Guard and counts its refusals) and the timed scheduler the routes submit to."""
    s = app.state.server
    paths = {getattr(r, "path", "") for r in app.routes} - {"/v1/models/{model_id}", ""}
    app.state.metrics = Metrics.of(s.sched, paths)
    s.sched = MeteredScheduler(s.sched, app.state.metrics)
    app.add_middleware(CountRequests, metrics=app.state.metrics)


PROMETHEUS = {"text/plain": {"schema": {"type": "string"}}}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": PROMETHEUS, "description": "Prometheus' text format"}, **_errors(401, 421)},
)
async def metrics_route(request: Request):
    """Counters, gauges and histograms of this server in Prometheus' text format (needs the API key)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = [
    "EMBED_CHUNK_TOKENS",
    "CountRequests",
    "MeteredScheduler",
    "Metrics",
    "detokenize",
    "embed",
    "embedding_chunks",
    "embedding_inputs",
    "instrument",
    "register",
    "tokenize",
]
