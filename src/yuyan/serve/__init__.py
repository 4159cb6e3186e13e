"""Serving: an OpenAI-compatible HTTP server over the continuous-batching scheduler, and a web playground."""

from yuyan.serve.app import create_app
from yuyan.serve.config import ServeConfig
from yuyan.serve.guards import check_bind, is_loopback

__all__ = ["ServeConfig", "create_app", "check_bind", "is_loopback"]
