"""`yuyan serve`: the OpenAI-compatible server and web playground (FastAPI + uvicorn) for one model.

A thin call into `yuyan.serve.create_app`. The bind address is checked before the model is loaded: without
an API key the server only listens on loopback unless --insecure is given. The key may come from the
YUYAN_API_KEY environment variable (keeps it out of the process list); it is never printed or logged.
"""

from __future__ import annotations

import typer

from yuyan.cli.app import app
from yuyan.cli.common import MODEL, load_model


@app.command("serve")
def serve_cmd(
    model: str = MODEL,
    host: str = typer.Option(
        "127.0.0.1", help="address to listen on (non-loopback needs --api-key or --insecure)"
    ),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="YUYAN_API_KEY",
        show_envvar=True,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health",
    ),
    model_name: str = typer.Option(None, help="model id clients use (default: the folder name)"),
    max_batch: int = typer.Option(16, help="rows decoded together (continuous batching)"),
    max_queue: int = typer.Option(64, help="requests allowed to wait for a free row; more get 429"),
    max_body_bytes: int = typer.Option(1 << 20, help="largest request body; larger get 413"),
    max_tokens_limit: int = typer.Option(
        None, help="largest max_tokens a request may ask (default: the context)"
    ),
    max_n: int = typer.Option(8, help="most completions (n x prompts) per request"),
    max_connections: int = typer.Option(128, help="requests in flight besides /health; more get 429"),
    sliding_window: bool = typer.Option(
        False,
        "--sliding-window",
        help="let requests generate past the context by dropping the oldest tokens (a request's "
        "sliding_window field overrides this; off keeps OpenAI's contract: prompt + max_tokens must fit)",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="allow a non-loopback address without an API key"
    ),
    device: str = typer.Option(None, help="torch device (default: cpu)"),
    threads: int = typer.Option(
        1,
        help="torch CPU threads for decoding (0: torch's default); 1 leaves cores for HTTP "
        "and measured fastest for small models on a busy 2-core machine (BENCHMARKS.md)",
    ),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions) with a playground at /.

    Example: yuyan serve --model runs/demo --port 8000   then open http://127.0.0.1:8000/
    """
    import sys
    from pathlib import Path

    import uvicorn

    from yuyan.errors import UserError
    from yuyan.serve import ServeConfig, check_bind, create_app

    check_bind(host, api_key, insecure)
    for name, v in [
        ("max-batch", max_batch),
        ("max-body-bytes", max_body_bytes),
        ("max-n", max_n),
        ("max-connections", max_connections),
    ]:
        if v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    if max_queue < 0 or (max_tokens_limit is not None and max_tokens_limit < 1):
        raise UserError("--max-queue must be >= 0 and --max-tokens-limit >= 1")
    lm = load_model(model, device=device)
    cfg = ServeConfig(
        model_name=model_name or Path(str(lm.path)).name or "yuyan",
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        max_n=max_n,
        max_connections=max_connections,
        sliding_window=sliding_window,
    )
    # the scheduler thread and the HTTP event loop hand the GIL to each other at every token; Python's
    # default 5 ms switch interval made each wait up to 5 ms (measured: 1-client tokens/s x1.9 at 0.5 ms)
    sys.setswitchinterval(0.0005)
    server_app = create_app(lm, cfg)
    print(
        f"yuyan serve: model {cfg.model_name!r} at http://{host}:{port}/ (playground), "
        f"API at http://{host}:{port}/v1; API key {'required' if api_key else 'not required'}",
        flush=True,
    )
    # uvicorn's own connection cap is a backstop above ours (ours answers 429 and spares /health)
    uvicorn.run(
        server_app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=max_connections * 2 + 16,
        timeout_keep_alive=5,
    )
