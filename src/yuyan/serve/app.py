"""The OpenAI-compatible HTTP server (FastAPI): a thin adapter over the continuous-batching scheduler.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with and without
`stream: true`, server-sent events ending with `data: [DONE]`), POST /v1/inspect/attention (for the
playground) and the web playground at `/` (static files shipped in the package). The server holds no
model logic: prompts become token ids (the tokenizer's chat template for chat), each prompt is one
`Scheduler.submit` with its sampling settings, and the scheduler's events become OpenAI's JSON shapes.

Guards, in front of the app as one pure ASGI middleware: an API key (`Authorization: Bearer`, compared
with `hmac.compare_digest`) on everything but /health and the static playground; a bound on requests in
flight (429 + Retry-After); a bound on the request body (413), read before the app sees it. Bad input
always gets a 4xx in OpenAI's error shape; only a genuine bug gets a 500, which is logged. A client that
disconnects cancels its request, which frees its rows in the batch at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from yuyan.errors import UserError
from yuyan.generate.sampling import SamplingParams
from yuyan.generate.scheduler import Failed, Finished, Handle, QueueFull, Scheduler, SchedulerClosed, Token
from yuyan.serve.schemas import ChatCompletionRequest, CompletionRequest, InspectRequest, error_body

log = logging.getLogger("yuyan.serve")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # and /static/...: no key needed (no model access)


@dataclass
class ServeConfig:
    """Settings of `yuyan serve`, with safe defaults (every request dimension is bounded)."""

    model_name: str = "yuyan"
    api_key: str | None = None
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting for rows; more get 429
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask (None: the context)
    max_n: int = 8  # most completions (n x prompts) per request
    max_connections: int = 128  # requests in flight (besides /health); more get 429
    inspect_max_tokens: int = 128  # the attention view keeps the last this-many tokens
    threads: int | None = None  # torch CPU threads (process-wide); None leaves torch's setting

    def __repr__(self) -> str:  # never show the key
        fields = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return f"ServeConfig({fields})"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


class ClientGone(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless the user insists."""
    if not is_loopback(host) and not api_key and not insecure:
        raise UserError(
            f"refusing to serve on non-loopback address {host!r} without an API key; "
            "pass --api-key KEY (or YUYAN_API_KEY), bind 127.0.0.1, or add --insecure"
        )


def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------ guards
class Guard:
    """Pure ASGI middleware: API key, requests in flight, and the request body size."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.key = config.api_key.encode() if config.api_key else None
        self.in_flight = 0

    def _public(self, path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith("/static/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and not self._public(path):
            auth = headers.get("authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                msg = (
                    "missing API key: send 'Authorization: Bearer KEY'"
                    if not given
                    else "incorrect API key provided"
                )
                return await _json(
                    401,
                    error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                    {"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
        if path == "/health":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.config.max_connections:
            return await _json(
                429,
                error_body(
                    "too many requests in flight; retry shortly",
                    "rate_limit_error",
                    None,
                    "too_many_requests",
                ),
                {"Retry-After": "1"},
            )(scope, receive, send)
        self.in_flight += 1
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                limit = self.config.max_body_bytes
                try:
                    declared = int(headers.get("content-length", b"0") or 0)
                except ValueError:
                    declared = 0
                too_big = _json(
                    413,
                    error_body(
                        f"request body is larger than the limit of {limit} bytes; "
                        "send less (the server's --max-body-bytes)",
                        "invalid_request_error",
                        None,
                        "request_too_large",
                    ),
                )
                if declared > limit:
                    return await too_big(scope, receive, send)
                chunks, total = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body = msg.get("body", b"")
                    total += len(body)
                    if total > limit:
                        return await too_big(scope, receive, send)
                    chunks.append(body)
                    if not msg.get("more_body", False):
                        break
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                if "content-type" not in headers:  # a JSON API: a body without a type is read as JSON
                    scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}

                async def receive_again():
                    return replay.pop() if replay else await receive()

                return await self.app(scope, receive_again, send)
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


# ------------------------------------------------------------------------------------------------ the app
def create_app(lm, config: ServeConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """The FastAPI app over a loaded `LanguageModel` (model + tokenizer). Without a scheduler one is made,
    started and stopped with the app's lifespan; a given scheduler is the caller's to start and stop."""
    config = config or ServeConfig()
    model, tok = lm.model, lm.tokenizer
    own = scheduler is None
    sched = scheduler or Scheduler(
        model, tok, max_batch=config.max_batch, max_queue=config.max_queue, threads=config.threads
    )
    context = sched.max_len
    token_limit = min(config.max_tokens_limit or context, context)  # the default max_tokens is capped by it
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if own:
            sched.start()
        log.info(
            "serving %s (context %d, max batch %d); API key %s",
            config.model_name,
            context,
            sched.max_batch,
            "required" if config.api_key else "not required",
        )
        yield
        if own:
            await run_in_threadpool(sched.stop)

    app = FastAPI(title="yuyan", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.config = sched, config
    app.add_middleware(Guard, config=config)

    # ---------------------------------------------------------------- errors, all in OpenAI's shape
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _json(e.status, error_body(e.message, e.type, e.param, e.code), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _json(
                400,
                error_body(
                    "the request body is not valid JSON; send a JSON object",
                    "invalid_request_error",
                    None,
                    "invalid_json",
                ),
            )
        param = ".".join(loc) or None
        msg = (
            f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        )
        return _json(400, error_body(msg[:500], "invalid_request_error", param, first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _json(e.status_code, error_body(str(e.detail), kind, None, code), getattr(e, "headers", None))

    @app.exception_handler(UserError)
    async def _user(request, e: UserError):
        return _json(400, error_body(str(e), "invalid_request_error", None, None))

    @app.exception_handler(QueueFull)
    async def _full(request, e: QueueFull):
        return _json(
            429,
            error_body(str(e), "rate_limit_error", None, "queue_full"),
            {"Retry-After": str(e.retry_after)},
        )

    @app.exception_handler(SchedulerClosed)
    async def _closed(request, e: SchedulerClosed):
        return _json(503, error_body(str(e), "server_error", None, "shutting_down"), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _json(500, error_body("internal server error", "server_error", None, "internal_error"))

    # ---------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                "model",
                "model_not_found",
            )

    def sampling(body, n: int) -> SamplingParams:
        p = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            n=n,
        )
        try:
            return p.validate()
        except UserError as e:
            raise ApiError(400, str(e)) from None

    def budget(prompt_len: int, asked: int | None, default: int | None, where: str = "prompt") -> int:
        """max_tokens of one prompt: checked against the limit and the context."""
        if prompt_len >= context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len}; shorten the prompt",
                where,
                "context_length_exceeded",
            )
        if asked is None:
            return min(default or context, token_limit, context - prompt_len)
        if config.max_tokens_limit is not None and asked > config.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {asked} but this server allows at most {token_limit}; lower it",
                "max_tokens",
                "max_tokens_too_large",
            )
        if prompt_len + asked > context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens, but "
                f"{prompt_len + asked} were requested ({prompt_len} in the prompt, {asked} for the "
                "completion); shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return asked

    def check_n(n: int, prompts: int) -> None:
        if n * prompts > config.max_n:
            raise ApiError(
                400,
                f"{n * prompts} completions requested (n={n} x {prompts} prompts); this server "
                f"returns at most {config.max_n} per request",
                "n",
                "too_many_completions",
            )
        if n > sched.max_batch:
            raise ApiError(400, f"n={n} exceeds the batch size of {sched.max_batch}; lower n", "n", None)

    class Job:
        """The scheduler handles of one HTTP request and the asyncio queue their events arrive on."""

        def __init__(self):
            self.loop = asyncio.get_running_loop()
            self.q: asyncio.Queue = asyncio.Queue()
            self.handles: list[Handle] = []

        def submit(self, pi: int, ids: list[int], params: SamplingParams, **kw) -> None:
            def emit(ev, pi=pi):
                self.loop.call_soon_threadsafe(self.q.put_nowait, (pi, ev))

            try:
                self.handles.append(sched.submit(ids, params, emit=emit, **kw))
            except BaseException:
                self.cancel()
                raise

        def cancel(self) -> None:
            for h in self.handles:
                h.cancel()

        async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, object]]:
            left = sum(h.n for h in self.handles)
            while left:
                try:
                    pi, ev = await asyncio.wait_for(self.q.get(), timeout=1.0)
                except (TimeoutError, asyncio.TimeoutError):
                    if request is not None and await request.is_disconnected():
                        self.cancel()
                        raise ClientGone() from None
                    continue
                if isinstance(ev, Failed):
                    self.cancel()
                    if ev.invalid:
                        raise ApiError(400, ev.message, None, "invalid_sampling")
                    shutting = "shutting down" in ev.message
                    raise ApiError(
                        503 if shutting else 500,
                        ev.message,
                        None,
                        "shutting_down" if shutting else "internal_error",
                        "server_error",
                    )
                if isinstance(ev, Finished):
                    left -= 1
                yield pi, ev

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(job: Job, chunks) -> StreamingResponse:
        async def body():
            try:
                async for text in chunks:
                    yield text
            except ApiError as e:
                yield sse(error_body(e.message, e.type, e.param, e.code))
            finally:  # a disconnected client lands here too: free its rows
                job.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect(job: Job, request: Request, per_prompt_n: int):
        """Wait for every choice; returns {choice index: (Finished, [Token events])}."""
        out: dict[int, list] = {}
        try:
            async for pi, ev in job.events(request):
                ci = pi * per_prompt_n + ev.index
                entry = out.setdefault(ci, [None, []])
                if isinstance(ev, Token):
                    entry[1].append(ev)
                elif isinstance(ev, Finished):
                    entry[0] = ev
        except ClientGone:
            return None
        return out

    def usage(prompt_lens: list[int], completion_tokens: int) -> dict:
        p = sum(prompt_lens)
        return {
            "prompt_tokens": p,
            "completion_tokens": completion_tokens,
            "total_tokens": p + completion_tokens,
        }

    def completion_logprobs(tokens: list[Token], offset: int = 0) -> dict:
        texts = [tok.decode([t.token_id]) for t in tokens]
        offsets, at = [], offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in (t.top or [])} for t in tokens],
            "text_offset": offsets,
        }

    def chat_logprobs(tokens: list[Token]) -> dict:
        def entry(s, lp):
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(tok.decode([t.token_id]), t.logprob),
                    "top_logprobs": [entry(s, lp) for _, s, lp in (t.top or [])],
                }
                for t in tokens
            ]
        }

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        return {
            "status": "ok" if sched.stats()["running"] else "stopped",
            "model": config.model_name,
            **sched.stats(),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(config.model_name, created, context)]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str):
        check_model(model_id)
        return _model_card(config.model_name, created, context)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            texts_or_ids: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts_or_ids = [p]
        else:
            texts_or_ids = list(p)
        if not texts_or_ids or len(texts_or_ids) > 64:
            raise ApiError(400, "prompt must hold 1 to 64 prompts", "prompt", None)
        n = body.n or 1
        check_n(n, len(texts_or_ids))
        V = model.config.vocab_size

        def encode(x):
            ids = tok.encode(x) if isinstance(x, str) else list(x)
            if not ids:  # an empty prompt starts from the document separator (as the engine does)
                start = tok.eot_id if tok.eot_id is not None else tok.bos_id
                if start is None:
                    raise ApiError(400, "the prompt is empty; give some text", "prompt", None)
                ids = [start]
            if min(ids) < 0 or max(ids) >= V:
                raise ApiError(400, f"prompt token ids must be in [0, {V})", "prompt", None)
            return ids

        prompts = await run_in_threadpool(lambda: [encode(x) for x in texts_or_ids])
        params = sampling(body, n)
        limits = [budget(len(ids), body.max_tokens, 16) for ids in prompts]
        stop = body.stop_list()
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must be non-empty", "stop", None)
        job = Job()
        for pi, (ids, mt) in enumerate(zip(prompts, limits, strict=True)):
            job.submit(pi, ids, params, max_tokens=mt, stop=stop, logprobs=body.logprobs)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": config.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                n_out = 0
                offsets: dict[int, int] = {}
                async for pi, ev in job.events():
                    ci = pi * n + ev.index
                    if isinstance(ev, Token):
                        if not ev.text and body.logprobs is None:
                            continue
                        lp = None
                        if body.logprobs is not None:
                            lp = completion_logprobs([ev], offsets.get(ci, 0))
                        offsets[ci] = offsets.get(ci, 0) + len(ev.text)
                        yield sse(
                            {
                                **base,
                                "choices": [
                                    {"index": ci, "text": ev.text, "logprobs": lp, "finish_reason": None}
                                ],
                            }
                        )
                    else:
                        n_out += ev.completion_tokens
                        yield sse(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": ci,
                                        "text": ev.tail,
                                        "logprobs": None,
                                        "finish_reason": ev.finish_reason,
                                    }
                                ],
                            }
                        )
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage([len(x) for x in prompts], n_out)})

            return stream_response(job, chunks())
        res = await collect(job, request, n)
        if res is None:
            return _json(499, error_body("client closed the request", "invalid_request_error"))
        choices = []
        for ci in sorted(res):
            fin, toks = res[ci]
            lp = completion_logprobs(toks) if body.logprobs is not None else None
            choices.append(
                {"index": ci, "text": fin.text, "logprobs": lp, "finish_reason": fin.finish_reason}
            )
        n_out = sum(res[ci][0].completion_tokens for ci in res)
        return {**base, "choices": choices, "usage": usage([len(x) for x in prompts], n_out)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        n = body.n or 1
        check_n(n, 1)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", None)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        ids, _ = await run_in_threadpool(tok.apply_chat_template, messages, True)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        mt = budget(len(ids), asked, None, "messages")
        params = sampling(body, n)
        stop = body.stop_list()
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must be non-empty", "stop", None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = Job()
        job.submit(
            0,
            ids,
            params,
            max_tokens=mt,
            stop=stop,
            stop_ids=set(tok.chat_stop_ids) or None,
            logprobs=logprobs,
        )
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": config.model_name,
            "system_fingerprint": None,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            cbase = {**base, "object": "chat.completion.chunk"}

            async def chunks():
                for j in range(n):  # the first chunk of each choice carries the role
                    yield sse(
                        {
                            **cbase,
                            "choices": [
                                {
                                    "index": j,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                n_out = 0
                async for _, ev in job.events():
                    if isinstance(ev, Token):
                        if not ev.text and logprobs is None:
                            continue
                        lp = chat_logprobs([ev]) if logprobs is not None else None
                        yield sse(
                            {
                                **cbase,
                                "choices": [
                                    {
                                        "index": ev.index,
                                        "delta": {"content": ev.text},
                                        "logprobs": lp,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    else:
                        n_out += ev.completion_tokens
                        delta = {"content": ev.tail} if ev.tail else {}
                        yield sse(
                            {
                                **cbase,
                                "choices": [
                                    {
                                        "index": ev.index,
                                        "delta": delta,
                                        "logprobs": None,
                                        "finish_reason": ev.finish_reason,
                                    }
                                ],
                            }
                        )
                if include_usage:
                    yield sse({**cbase, "choices": [], "usage": usage([len(ids)], n_out)})

            return stream_response(job, chunks())
        res = await collect(job, request, n)
        if res is None:
            return _json(499, error_body("client closed the request", "invalid_request_error"))
        choices = []
        for ci in sorted(res):
            fin, toks = res[ci]
            choices.append(
                {
                    "index": ci,
                    "message": {"role": "assistant", "content": fin.text},
                    "logprobs": chat_logprobs(toks) if logprobs is not None else None,
                    "finish_reason": fin.finish_reason,
                }
            )
        n_out = sum(res[ci][0].completion_tokens for ci in res)
        return {**base, "choices": choices, "usage": usage([len(ids)], n_out)}

    @app.post("/v1/inspect/attention")
    async def inspect_attention(body: InspectRequest):
        """Tokens and per-layer, per-head attention (integers 0..1000) of the last tokens of a text."""
        check_model(body.model)
        ids = await run_in_threadpool(tok.encode, body.text)
        if not ids:
            raise ApiError(400, "the text has no tokens; give some text", "text", None)
        ids = ids[-min(config.inspect_max_tokens, context) :]
        fut = sched.run_exclusive(lambda: _attention(model, tok, ids))
        tokens, layers = await asyncio.wrap_future(fut)
        return {
            "model": config.model_name,
            "tokens": tokens,
            "scale": 1000,
            "attention": layers,
            "n_layer": len(layers),
            "n_head": len(layers[0]) if layers else 0,
        }

    # ---------------------------------------------------------------- the playground
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "yuyan", "context_length": context}


def _attention(model, tokenizer, ids: list[int]) -> tuple[list[str], list]:
    """Runs on the scheduler thread. Uses yuyan.interpret.attention when present."""
    import torch

    text = tokenizer.decode(ids)
    try:
        from yuyan.interpret.attention import attention_weights
    except ImportError:
        attention_weights = None
    if attention_weights is not None and tokenizer.encode(text) == ids:
        tokens, weights = attention_weights(model, tokenizer, text)
    else:  # the model's explicit attention path directly
        att: list = []
        with torch.no_grad():
            model(torch.tensor([ids], device=next(model.parameters()).device), attn_weights=att)
        tokens, weights = [tokenizer.id_to_piece(i) for i in ids], [a[0].float().cpu() for a in att]
    return tokens, [(w * 1000).round().to(torch.int32).tolist() for w in weights]


__all__ = ["ServeConfig", "create_app", "check_bind", "is_loopback"]
