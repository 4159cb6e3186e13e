"""The OpenAI-compatible HTTP server (FastAPI): the wiring of a thin adapter over the continuous-batching
scheduler.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with and without
`stream: true`, server-sent events ending with `data: [DONE]`), POST /v1/inspect/attention (for the
playground) and the web playground at `/` (static files shipped in the package); endpoints.py adds POST
/v1/embeddings, POST /tokenize, POST /detokenize, GET /metrics and POST /v1/classify (for a classifier). `create_app` makes the
scheduler, ties it to the app's lifespan, puts the guards in front and installs the error handlers
(guards.py); the routes are a few lines each over what the app holds (`Server`): a request body becomes
prompt ids and a `GenerationConfig` (protocol.py), each prompt is one `Scheduler.submit` (job.py), and
the scheduler's events become OpenAI's JSON shapes (protocol.py). The server holds no model logic and
checks no generation setting: the generation core does, and every engine feature (the sliding window
included) reaches the server through it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.remote import DecodeProcess
from yuyan.generate.scheduler import Scheduler
from yuyan.model.checkpoint import LanguageModel
from yuyan.model.heads import Classifier
from yuyan.serve import endpoints, protocol
from yuyan.serve.config import ServeConfig
from yuyan.serve.guards import ApiError, Guard, install_error_handlers
from yuyan.serve.job import Job
from yuyan.serve.playground import STATIC, attention_json, attention_view
from yuyan.serve.schemas import (
    AttentionView,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    InspectRequest,
    ModelCard,
    ModelList,
)

log = logging.getLogger("yuyan.serve")
router = APIRouter()


@dataclass
class Served:
    """What background calls read on the decoding side (the scheduler's `context`; a decode process gets
    its own copy): the model, its tokenizer, the settings, the prompt bounds and a classification head."""

    lm: LanguageModel
    config: ServeConfig
    prompts: protocol.Prompts
    classifier: Classifier | None = None


@dataclass
class Server:
    """What the routes share, kept on `app.state.server`: the model, its scheduler and the settings."""

    lm: LanguageModel
    sched: Scheduler | DecodeProcess
    config: ServeConfig
    own: bool  # the scheduler was made here: started and stopped with the app
    prompts: protocol.Prompts
    # tokenising and checking requests: one thread, off the event loop and the decode loop, so that
    # large requests queue behind each other and take at most one core from the streams
    prepare: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="yuyan-prepare")
    )
    created: int = field(default_factory=lambda: int(time.time()))
    classifier: Classifier | None = None  # a checkpoint's classification head (POST /v1/classify)

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) on the prepare thread."""
        return await asyncio.get_running_loop().run_in_executor(self.prepare, fn, *args)

    @property
    def context(self) -> int:
        return self.sched.block_size

    def card(self) -> dict:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "yuyan",
            "context_length": self.context,
        }


def check_finite_logits(lm: LanguageModel, name: str) -> None:
    """Refuse a model whose logits are not finite (NaN or infinite weights, or weights that overflow):
    every request would fail, and the sampling error would blame the client's settings."""
    tok = lm.tokenizer
    probe = next((i for i in (tok.eot_id, tok.bos_id, 0) if i is not None), 0)
    param = next(lm.model.parameters())
    with torch.no_grad():
        logits = lm.model(torch.tensor([[probe]], device=param.device))
    if not bool(torch.isfinite(logits).all()):
        raise UserError(
            f"the model {name!r} produced non-finite logits (NaN or infinity) for a single token: its "
            "weights are broken (a diverged run or a damaged file); serve another checkpoint"
        )


def create_app(
    lm: LanguageModel, config: ServeConfig | None = None, scheduler: Scheduler | None = None
) -> FastAPI:
    """The FastAPI app over a loaded `LanguageModel` (model + tokenizer). Without a scheduler one is made,
    started and stopped with the app's lifespan; a given scheduler is the caller's to start and stop.
    Raises UserError for settings that bound nothing or a model whose logits are not finite."""
    config = (config or ServeConfig()).validate()
    check_finite_logits(lm, config.model_name)
    prompts = protocol.Prompts.of(lm.tokenizer, lm.model.config.block_size)
    has_head = lm.meta.get("task") == "classify" and "score.weight" in lm.extra_tensors
    classifier = Classifier.from_language_model(lm) if has_head else None
    served = Served(lm, config, prompts, classifier)
    if scheduler is not None:
        if scheduler.context is None:
            scheduler.context = served
        sched = scheduler
    else:
        make = DecodeProcess if config.decode_process else Scheduler
        sched = make(
            lm.model,
            lm.tokenizer,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            threads=config.threads,
            prefix_cache_tokens=config.prefix_cache_tokens,
            context=served,
            background_share=config.background_share,
        )
    app = _api()
    app.state.server = Server(
        lm, sched, config, own=scheduler is None, prompts=prompts, classifier=classifier
    )
    app.state.scheduler, app.state.config = sched, config
    app.add_middleware(Guard, config=config, generation_body_bytes=prompts.body_bytes(config.max_n))
    endpoints.instrument(app)  # after the Guard: its refusals are counted too
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _api() -> FastAPI:
    app = FastAPI(title="yuyan", version="1", lifespan=_lifespan, docs_url=None, redoc_url=None)
    _without_422(app)
    # the routes themselves, not an included router: app.routes then lists every path (the key test walks it)
    app.router.routes.extend(router.routes)
    endpoints.register(app)
    return app


def openapi_schema() -> dict:
    """The server's OpenAPI schema (what GET /openapi.json answers), without a model or a server."""
    return _api().openapi()


@asynccontextmanager
async def _lifespan(app: FastAPI):
    s: Server = app.state.server
    if s.own:
        await run_in_threadpool(s.sched.start)  # a decode process takes seconds to start
    log.info(
        "serving %s (context %d, max batch %d, sliding window %s); API key %s",
        s.config.model_name,
        s.context,
        s.sched.max_batch,
        "on" if s.config.sliding_window else "off",
        "required" if s.config.api_key else "not required",
    )
    yield
    s.prepare.shutdown(wait=False, cancel_futures=True)
    if s.own:
        await run_in_threadpool(s.sched.stop)


def _server(request: Request) -> Server:
    return request.app.state.server


async def _answer(
    s: Server, body, chat: bool, prompts: list[list[int]], gen: GenerationConfig, request: Request
):
    """Submit the prompts and answer: a stream of events, or the whole response once all are done."""
    job = Job(s.sched)  # made on the event loop, which its events are delivered to
    await s.off_loop(job.submit, prompts, gen, "messages" if chat else "prompt")  # checks every prompt
    reply = protocol.reply_for(body, chat, prompts, gen, s.config.model_name, s.prompts.tok)
    if body.stream:
        return protocol.streaming_response(job, reply)
    results = await protocol.collect(job, reply, request.is_disconnected)
    if results is None:
        return ApiError(499, "client closed the request").response()
    return protocol.response(reply, results)


# ------------------------------------------------------------------------------------------------ routes
def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": ERROR_MEANING[c]} for c in codes}


ERROR_MEANING = {
    400: "bad input (the field is named in `param`)",
    401: "missing or wrong API key",
    404: "unknown model",
    408: "the body did not arrive within the body deadline",
    413: "the body is larger than the limit",
    421: "a Host header this server does not answer to",
    429: "too many requests in flight or waiting (Retry-After)",
    503: "shutting down",
}
GENERATION_ERRORS = _errors(400, 401, 404, 408, 413, 421, 429, 503)
# `stream: true`: server-sent events, each `data:` a JSON chunk (or `[DONE]`); the schema is of one event
EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
STREAM = {"text/event-stream": {"schema": EVENT}}


def _without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this server answers bad input with OpenAI's 400."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


@router.get(
    "/health",
    responses={
        200: {"model": Health},
        503: {"model": Health, "description": "not decoding (the decode process is down or restarting)"},
        **_errors(421),
    },
)
async def health(request: Request):
    """200 while the server decodes; 503 with the same body (status "stopped") while it cannot, so that a
    load balancer or an orchestrator's probe sees it."""
    s = _server(request)
    stats = s.sched.stats()
    body = {"status": "ok" if stats["running"] else "stopped", "model": s.config.model_name, **stats}
    return JSONResponse(body, status_code=200 if stats["running"] else 503)


@router.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401, 421)})
async def models(request: Request):
    return {"object": "list", "data": [_server(request).card()]}


@router.get("/v1/models/{model_id}", responses={200: {"model": ModelCard}, **_errors(401, 404, 421)})
async def model_info(model_id: str, request: Request):
    s = _server(request)
    protocol.check_model(model_id, s.config)
    return s.card()


@router.post(
    "/v1/completions",
    responses={200: {"model": CompletionResponse, "content": STREAM}, **GENERATION_ERRORS},
)
async def completions(body: CompletionRequest, request: Request):
    s = _server(request)
    prompts, gen = await s.off_loop(protocol.completion_request, body, s.prompts, s.config)
    return await _answer(s, body, False, prompts, gen, request)


@router.post(
    "/v1/chat/completions",
    responses={200: {"model": ChatCompletionResponse, "content": STREAM}, **GENERATION_ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = _server(request)
    ids, gen = await s.off_loop(protocol.chat_request, body, s.prompts, s.config)
    return await _answer(s, body, True, [ids], gen, request)


@router.post("/v1/inspect/attention", responses={200: {"model": AttentionView}, **GENERATION_ERRORS})
async def inspect_attention(body: InspectRequest, request: Request):
    """Tokens and per-layer, per-head attention (integers 0..SCALE) of the last tokens of a text."""
    s = _server(request)
    protocol.check_model(body.model, s.config)
    keep = min(s.config.inspect_max_tokens, s.context)
    work = s.sched.background(_inspection, body.text, keep)
    return Response(await asyncio.wrap_future(work), media_type="application/json")


def _inspection(s: Served, text: str, keep: int) -> bytes:
    """The attention view as JSON bytes, made on the decoding side (the scheduler thread, or the decode
    process) as a background call: between decode steps, within its share of the thread's time,
    tokenising (only the text's end), the forward pass and the JSON (layers x heads x keep^2 integers)
    alike. On the HTTP side they competed with every stream's delivery: 4 inspecting clients made a
    stream's tokens 7x slower in one process, 3x with the JSON in the HTTP process of two."""
    ids = s.prompts.last_tokens(text, keep)
    if not ids:
        raise ApiError(400, "the text has no tokens; give some text", "text")
    with torch.inference_mode():
        tokens, layers = attention_view(s.lm.model, s.lm.tokenizer, ids)
    return attention_json(s.config.model_name, tokens, layers)


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html", media_type="text/html")


__all__ = ["check_finite_logits", "create_app", "openapi_schema"]
