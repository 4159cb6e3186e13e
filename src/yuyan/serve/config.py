"""`ServeConfig`: the settings of `yuyan serve`, every one a bound on what a request may ask.

The server's own policy lives here (which model name it answers to, how many tokens and completions a
request may ask, body size, requests in flight); what makes a generation setting valid is the generation
core's business, never re-checked by the server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Settings of `yuyan serve`, with safe defaults (every request dimension is bounded)."""

    model_name: str = "yuyan"
    api_key: str | None = None
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting for rows; more get 429
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    # largest max_tokens a request may ask; None: whatever fits the context (with the sliding window on,
    # a request may then run up to the schema's bound, so a public server with the window sets this)
    max_tokens_limit: int | None = None
    max_n: int = 8  # most completions (n x prompts) per request
    max_connections: int = 128  # requests in flight (besides /health); more get 429
    inspect_max_tokens: int = 128  # the attention view keeps the last this-many tokens
    threads: int | None = None  # torch CPU threads (process-wide); None leaves torch's setting
    # the default of a request's `sliding_window`: off keeps OpenAI's contract (prompt + max_tokens beyond
    # the context is a 400); on, generation goes past the context by dropping the oldest tokens
    sliding_window: bool = False

    def __repr__(self) -> str:  # never show the key
        fields = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return f"ServeConfig({fields})"


__all__ = ["ServeConfig"]
