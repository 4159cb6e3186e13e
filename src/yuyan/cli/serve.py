"""`yuyan serve`: the OpenAI-compatible server and web playground (FastAPI + uvicorn) for one model.

A thin call into `yuyan.serve.create_app`, run by uvicorn with the server's connection bounds
(`yuyan.serve.http`). Every option but --model, --device and --log-level is a `ServeConfig` field, derived
from it (`max_body_bytes` -> `--max-body-bytes`, typed from its annotation, defaulting to its default), so
a setting is written once. The settings and the bind address are checked before the model is loaded:
without an API key the server only listens on loopback unless --insecure is given. The key may come from
the YUYAN_API_KEY environment variable (keeps it out of the process list); it is never printed or logged.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import MISSING, fields
from typing import Any

import typer

from yuyan.cli.app import app
from yuyan.cli.common import MODEL, load_model
from yuyan.serve.config import ServeConfig

# one line of --help per ServeConfig field (tests/test_serve.py checks that every field has one)
HELP = {
    "model_name": "model id clients use (default: the folder name)",
    "host": "address to listen on (non-loopback needs --api-key or --insecure); also a Host name accepted",
    "port": "TCP port",
    "api_key": "require 'Authorization: Bearer KEY' on every endpoint but /health (default: no key)",
    "max_batch": "rows decoded together (continuous batching)",
    "max_queue": "requests allowed to wait for a free row; more get 429",
    "max_body_bytes": "largest request body; larger get 413",
    "max_tokens_limit": "largest max_tokens a request may ask (default: the context)",
    "max_n": "most completions (n x prompts) per request",
    "max_connections": "requests in flight besides /health; more get 429",
    "max_open_connections": "open TCP connections; above it the oldest idle one is closed",
    "header_timeout_s": "seconds a connection may take to send its request headers before it is closed",
    "body_timeout_s": "seconds a request body may take to arrive whole; slower ones get 408",
    "allowed_hosts": "Host header name accepted besides loopback names and --host (repeatable or "
    "comma-separated; '*': any; default: none). Guards a loopback server against DNS rebinding",
    "inspect_max_tokens": "the playground's attention view keeps the last this-many tokens",
    "threads": "torch CPU threads for decoding (0: torch's default); 1 leaves cores for HTTP and measured "
    "fastest for small models on a busy 2-core machine (BENCHMARKS.md)",
    "dtype": "decode weights auto|fp32|bf16 (auto: bf16 where a timed decode step here says it pays)",
    "prefix_cache_tokens": "keep the keys/values of shared prompt prefixes (system prompts, few-shot "
    "headers) for this many tokens, LRU-evicted, so later requests skip recomputing them (0: off)",
    "decode_process": "decode in a process of its own, so that HTTP and JSON work never holds the decode "
    "loop's GIL (--no-decode-process: a thread of the server's process)",
    "http_nice": "with --decode-process, the HTTP process's CPU priority below the decode process's "
    "(nice increment, 0-19): on a busy machine decoding runs first and hostile requests wait",
    "background_share": "while rows decode, the most of the decode thread's time that attention "
    "inspections, embeddings and classifications may take (0-1]; idle, they run at once",
    "sliding_window": "let requests generate past the context by dropping the oldest tokens (a request's "
    "sliding_window field overrides this; off keeps OpenAI's contract: prompt + max_tokens must fit)",
}
# the command's own defaults where the library's would not suit a command line
DEFAULTS: dict[str, Any] = {"model_name": None, "threads": 1}


def _option(name: str, tp: Any, default: Any) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    extra: dict[str, Any] = {}
    if name == "api_key":
        extra = {"envvar": "YUYAN_API_KEY", "show_envvar": True}
    if tp is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    if typing.get_origin(tp) is list:
        tp, default = list[str] | None, None
    elif default is None:
        tp = tp if typing.get_origin(tp) else tp | None
    option = typer.Option(default, flag, help=HELP[name], **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp)


def serve_options(fn):
    """Replace the command's `config` parameter by one option per ServeConfig field; call it with the
    ServeConfig they make (not yet validated: the command fills in what depends on the model first)."""
    hints = typing.get_type_hints(ServeConfig)
    params = []
    for f in fields(ServeConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        params.append(_option(f.name, hints[f.name], DEFAULTS.get(f.name, default)))
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "config"]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {p.name: kwargs.pop(p.name) for p in params}
        hosts = [h.strip() for v in given["allowed_hosts"] or [] for h in v.split(",") if h.strip()]
        given["allowed_hosts"] = hosts
        given["threads"] = given["threads"] or None  # 0: torch's default
        return fn(config=ServeConfig(**given), **kwargs)

    command.__signature__ = sig.replace(parameters=own + params)
    command.__annotations__ = {
        **{k: v for k, v in fn.__annotations__.items() if k != "config"},
        **{p.name: p.annotation for p in params},
    }
    return command


@app.command("serve")
@serve_options
def serve_cmd(
    config: ServeConfig,
    model: str = MODEL,
    insecure: bool = typer.Option(
        False, "--insecure", help="allow a non-loopback address without an API key"
    ),
    device: str = typer.Option(None, help="torch device (default: cpu)"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions) with a playground at /.

    Example: yuyan serve --model runs/demo --port 8000   then open http://127.0.0.1:8000/
    """
    import os
    import sys
    from pathlib import Path

    import uvicorn

    from yuyan.serve import check_bind, create_app
    from yuyan.serve.http import uvicorn_config

    check_bind(config.host, config.api_key, insecure)
    config.validate()
    lm = load_model(model, device=device, dtype=config.dtype)
    config.model_name = config.model_name or Path(str(lm.path)).name or "yuyan"
    # the scheduler thread and the HTTP event loop hand the GIL to each other at every token; Python's
    # default 5 ms switch interval made each wait up to 5 ms (measured: 1-client tokens/s x1.9 at 0.5 ms)
    sys.setswitchinterval(0.0005)
    server_app = create_app(lm, config)
    server_app.state.scheduler.start()  # before uvicorn: a decode process that cannot start is one line
    if config.decode_process and config.http_nice:
        # this thread (the event loop) and the threads it starts from now on yield the CPU to the decode
        # process, which was started at the usual priority; the thread reading its events was too
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + config.http_nice)
    host, port = config.host, config.port
    print(
        f"yuyan serve: model {config.model_name!r} at http://{host}:{port}/ (playground), "
        f"API at http://{host}:{port}/v1; API key {'required' if config.api_key else 'not required'}",
        flush=True,
    )
    uvicorn.Server(uvicorn_config(server_app, log_level=log_level, host=host, port=port)).run()
