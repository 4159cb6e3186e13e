"""Serving: an OpenAI-compatible HTTP server over the continuous-batching scheduler, and a web playground."""

from yuyan.serve.app import ServeConfig, check_bind, create_app, is_loopback

__all__ = ["ServeConfig", "create_app", "check_bind", "is_loopback"]
