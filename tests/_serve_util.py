"""Helpers for the server tests: run a FastAPI app with uvicorn in a thread on a free loopback port, with
the connection bounds `yuyan serve` runs (yuyan.serve.http)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
from tests.conftest import tiny_config

from yuyan.model.checkpoint import LanguageModel
from yuyan.model.transformer import Transformer
from yuyan.serve import ServeConfig, create_app


def tiny_lm(tokenizer, family: str = "gpt2", **kw) -> LanguageModel:
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size, **kw)).eval()
    return LanguageModel(model, tokenizer, "tiny")


@contextlib.contextmanager
def running(app):
    """Yield the base URL of `app` served by uvicorn on 127.0.0.1:<free port>; stop it afterwards."""
    import uvicorn

    from yuyan.serve.http import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        if not th.is_alive() or time.monotonic() - t0 > 30:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)
        sock.close()


@contextlib.contextmanager
def serve(tokenizer, family: str = "gpt2", **config):
    lm = tiny_lm(tokenizer, family)
    app = create_app(lm, ServeConfig(model_name="tiny", **config))
    with running(app) as base:
        yield base, lm, app
