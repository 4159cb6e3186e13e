"""What stands in front of the server's routes: the `Guard` middleware, `ApiError` and the error handlers.

`Guard` is one pure ASGI middleware with four bounds: the Host header (only loopback names, the
configured host and `allowed_hosts`: a 421 otherwise, so a web page cannot reach a loopback server by DNS
rebinding); an API key (`Authorization: Bearer` or `x-api-key`, compared with `hmac.compare_digest`) on
everything but /health and the static playground; the request body (413 over its size, 408 when it has
not arrived whole within `body_timeout_s`, which closes the connection), read whole before the app sees
it so that no route ever parses an unbounded body; and the requests in flight (429 + Retry-After),
counted only once the body is in, so that slow bodies hold their own connections and nobody else's turn
(/health is never counted, so it answers under any load).
`install_error_handlers` turns every exception into OpenAI's error shape: bad input (a pydantic error,
an `ApiError`, the generation core's `UserError`) is a 4xx, a full queue a 429, a shutdown a 503, and only
a genuine bug a 500, which is logged. `check_bind` refuses to expose an unauthenticated server.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from yuyan.errors import UserError
from yuyan.generate.core import ContextLengthError
from yuyan.generate.scheduler import QueueFull, SchedulerClosed
from yuyan.serve.config import ServeConfig
from yuyan.serve.schemas import error_body

log = logging.getLogger("yuyan.serve")
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # and /static/...: no key needed (no model access)
BODY_METHODS = ("POST", "PUT", "PATCH")


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP status, message, the offending parameter and a code."""

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

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def user_error(e: UserError, prompt_param: str = "prompt") -> ApiError:
    """The 400 for a setting the generation core refused. A context overflow names what to shorten: the
    prompt (`prompt_param`: "prompt", or "messages" for chat) or max_tokens."""
    if isinstance(e, ContextLengthError):
        param = prompt_param if e.part == "prompt" else "max_tokens"
        return ApiError(400, str(e), param, "context_length_exceeded")
    return ApiError(400, str(e))


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


# ------------------------------------------------------------------------------------------------ the guard
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # a bind address that is no name a client would use


def host_name(header: str) -> str:
    """The name in a Host header, without its port or brackets, lowercased: `[::1]:8000` -> `::1`."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


GENERATION_PATHS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}  # and their prompt field


class Guard:
    """Pure ASGI middleware: Host header, API key, the request body (size and deadline), requests in
    flight."""

    def __init__(self, app: ASGIApp, config: ServeConfig, generation_body_bytes: int | None = None):
        self.app, self.config = app, config
        # completion and chat bodies larger than any request whose prompts fit the model are refused by
        # their Content-Length, unread: parsing a hostile 1 MB body held the GIL beside every stream
        self.generation_body_bytes = generation_body_bytes
        self.key = config.api_key.encode() if config.api_key else None
        self.any_host = "*" in config.allowed_hosts
        names = [*config.allowed_hosts, *([] if config.host in WILDCARD_BINDS else [config.host])]
        self.hosts = {host_name(h) for h in names}
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        refused = self._host_error(headers) or self._auth_error(path, headers)
        if refused is None and path == "/health":
            return await self.app(scope, receive, send)
        if refused is None and scope.get("method") in BODY_METHODS:
            # read before the request counts as in flight: a slow body holds its own connection only
            body, refused = await self._read_body(receive, headers, path)
            if body is None and refused is None:  # the client left while sending
                return None
            if refused is None:
                scope, receive = self._replay(scope, headers, body, receive)
        if refused is None and self.in_flight >= self.config.max_connections:
            refused = ApiError(
                429,
                "too many requests in flight; retry shortly",
                code="too_many_requests",
                type_="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        if refused is not None:
            return await refused.response()(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _host_error(self, headers: dict[str, bytes]) -> ApiError | None:
        """A browser page on another site can reach a loopback server through DNS rebinding, but its
        requests carry that site's name as Host: answer only the names this server is known by."""
        raw = headers.get("host")
        if self.any_host or raw is None:  # no Host header: not a browser (HTTP/1.0 tools)
            return None
        name = host_name(raw.decode("latin-1"))
        if name in self.hosts or is_loopback(name):
            return None
        return ApiError(
            421,
            f"this server does not answer to the Host {name[:100]!r} (a guard against DNS rebinding); "
            f"use its loopback address or configured host, or start it with --allowed-hosts {name[:100]} "
            "(or '*' for any)",
            code="host_not_allowed",
        )

    def _auth_error(self, path: str, headers: dict[str, bytes]) -> ApiError | None:
        if self.key is None or path in PUBLIC_PATHS or path.startswith("/static/"):
            return None
        auth = headers.get("authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
        if hmac.compare_digest(given, self.key):
            return None
        msg = "incorrect API key provided" if given else "missing API key: send 'Authorization: Bearer KEY'"
        return ApiError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _replay(scope: Scope, headers: dict[str, bytes], body: bytes, receive: Receive):
        """The scope and receive the app sees: the body read whole, replayed as one message."""
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        if "content-type" not in headers:  # a JSON API: a body without a type is read as JSON
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}

        async def receive_again():
            return replay.pop() if replay else await receive()

        return scope, receive_again

    async def _read_body(
        self, receive: Receive, headers: dict[str, bytes], path: str
    ) -> tuple[bytes | None, ApiError | None]:
        """(the whole body, None), (None, the 413 or 408 refusal), or (None, None) if the client left.
        A 408 closes the connection (its body is slow by definition); after a 413 the rest of the body
        is discarded as it arrives, for at most the header deadline (http.py)."""
        limit, deadline = self.config.max_body_bytes, self.config.body_timeout_s
        close = {"Connection": "close"}
        too_big = ApiError(
            413,
            f"request body is larger than the limit of {limit} bytes; send less (the server's "
            "--max-body-bytes)",
            code="request_too_large",
        )  # the connection stays open so the client reads this; http.py bounds the rest of its body
        try:
            declared = int(headers.get("content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:  # refused before a byte is read
            return None, too_big
        fits = self.generation_body_bytes
        if fits is not None and path in GENERATION_PATHS and fits < limit:  # a prompt that cannot fit
            too_big = ApiError(
                400,
                "the request body holds more prompt than this model's context can take (a request whose "
                f"prompts fit needs at most {fits} bytes); send a shorter prompt",
                param=GENERATION_PATHS[path],
                code="context_length_exceeded",
                headers=close,  # the rest of the body is left unread: the connection cannot be reused
            )
            if declared > fits:  # by its Content-Length, before a byte is read
                return None, too_big
            limit = fits  # a chunked body: refused once it grows past the bound
        try:
            async with asyncio.timeout(deadline):
                return await self._read_chunks(receive, limit, too_big)
        except TimeoutError:
            slow = ApiError(
                408,
                f"the request body did not arrive within {deadline:g} s; send it at once (the "
                "server's --body-timeout-s)",
                code="request_timeout",
                headers=close,
            )
            return None, slow

    @staticmethod
    async def _read_chunks(
        receive: Receive, limit: int, too_big: ApiError
    ) -> tuple[bytes | None, ApiError | None]:
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, None
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > limit:
                return None, too_big
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks), None


# ------------------------------------------------------------------------------------------------ handlers
def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


def _union_tag(loc: object) -> bool:
    """pydantic's name of a union branch in an error's location (`str`, `list[TextPart]`), not a field."""
    return isinstance(loc, str) and ("[" in loc or loc in ("str", "int", "float", "bool"))


async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, with the field path as OpenAI's `param`."""
    errs = e.errors()
    if any(x.get("type") == "json_invalid" for x in errs):
        return ApiError(
            400, "the request body is not valid JSON; send a JSON object", code="invalid_json"
        ).response()
    # a union field fails once per branch: the deepest complaint is the one that names what is wrong
    # (`content.0.text` holds a lone surrogate, not "content should be a string")
    first = max(errs, key=lambda x: len(x.get("loc", ())), default={})
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x)) or None
    msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":  # never dropped: it might have changed the answer
        name = str((first.get("loc") or ("",))[-1])  # may be "": a field named by the empty string
        where = param if param is not None else name
        msg = f"{where or repr(name)}: this server does not support the field {name!r}; remove it"
        return ApiError(400, msg[:500], where, "unsupported_field").response()
    return ApiError(400, msg[:500], param, first.get("type")).response()


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return _json(e.status_code, error_body(str(e.detail), kind, None, code), getattr(e, "headers", None))


async def _user(request: Request, e: UserError) -> JSONResponse:
    return user_error(e).response()


async def _full(request: Request, e: QueueFull) -> JSONResponse:
    return _json(
        429, error_body(str(e), "rate_limit_error", None, "queue_full"), {"Retry-After": str(e.retry_after)}
    )


async def _closed(request: Request, e: SchedulerClosed) -> JSONResponse:
    return _json(503, error_body(str(e), "server_error", None, "shutting_down"), {"Retry-After": "5"})


async def _bug(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _json(500, error_body("internal server error", "server_error", None, "internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise, answered in OpenAI's shape."""
    for exc, handler in [
        (ApiError, _api_error),
        (RequestValidationError, _validation),
        (StarletteHTTPException, _http),
        (UserError, _user),
        (QueueFull, _full),
        (SchedulerClosed, _closed),
        (Exception, _bug),
    ]:
        app.add_exception_handler(exc, handler)


__all__ = [
    "ApiError",
    "Guard",
    "check_bind",
    "host_name",
    "install_error_handlers",
    "is_loopback",
    "user_error",
]
