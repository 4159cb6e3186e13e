"""Serving: an OpenAI-compatible HTTP server over the continuous-batching scheduler, and a web playground.

`ServeConfig` is imported eagerly (the CLI derives `yuyan serve`'s options from it when any command
starts); the app and its guards load fastapi and uvicorn, so they are imported on first use."""

import importlib

from yuyan.serve.config import ServeConfig

LAZY = {
    "create_app": "yuyan.serve.app",
    "check_bind": "yuyan.serve.guards",
    "is_loopback": "yuyan.serve.guards",
}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'yuyan.serve' has no attribute {name!r}")


__all__ = ["ServeConfig", "create_app", "check_bind", "is_loopback"]
