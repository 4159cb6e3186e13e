"""`ServeConfig`: the settings of `yuyan serve`, every one a bound on what a request may ask.

The server's own policy lives here (which model name it answers to, how many tokens and completions a
request may ask, body size, requests in flight, how long a connection may take to send its request, which
Host names it answers); what makes a generation setting valid is the generation
core's business, never re-checked by the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from yuyan.errors import UserError
from yuyan.generate.prefix import BLOCK_TOKENS


@dataclass
class ServeConfig:
    """Settings of `yuyan serve`, with safe defaults (every request dimension is bounded)."""

    model_name: str = "yuyan"
    host: str = "127.0.0.1"  # the address to listen on; also a Host header the server accepts
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting for rows; more get 429
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    # largest max_tokens a request may ask; None: whatever fits the context (with the sliding window on,
    # a request may then run up to the schema's bound, so a public server with the window sets this)
    max_tokens_limit: int | None = None
    max_n: int = 8  # most completions (n x prompts) per request
    max_connections: int = 128  # requests in flight (besides /health); more get 429
    # open TCP connections; above it the oldest one not inside a request is closed (http.py)
    max_open_connections: int = 512
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this, else closed
    body_timeout_s: float = 30.0  # a request body must arrive whole within this, else 408 and closed
    # Host header names accepted besides loopback ones and `host` (against DNS rebinding); "*": any
    allowed_hosts: list[str] = field(default_factory=list)
    inspect_max_tokens: int = 128  # the attention view keeps the last this-many tokens
    threads: int | None = None  # torch CPU threads (process-wide); None leaves torch's setting
    # the default of a request's `sliding_window`: off keeps OpenAI's contract (prompt + max_tokens beyond
    # the context is a 400); on, generation goes past the context by dropping the oldest tokens
    sliding_window: bool = False
    # the decode weights' number format: auto takes bf16 where a timed decode step on this machine says it
    # pays (yuyan.generate.kernels.decode_precision); fp32 | bf16 force it
    dtype: str = "auto"
    # K/V of prompt prefixes kept between requests, in tokens (generate/prefix.py); 0: off. On by default:
    # chat system prompts, few-shot headers and a harness's context sent once per choice are then computed
    # once, and the bound keeps it small beside the decode cache (GPT-2 124M fp32: 288 MiB, a quarter of
    # its 16 rows x 1024 positions)
    prefix_cache_tokens: int = 4096
    # decode in a child process (yuyan.generate.remote.DecodeProcess): HTTP, JSON and validation then never
    # hold the decode loop's GIL, so one client's large requests cannot stall another's stream; off: the
    # scheduler is a thread of the server's process (what tests that reach into it use)
    decode_process: bool = True
    # with decode_process, `yuyan serve` lowers its HTTP process's CPU priority by this nice increment
    # (0: not): where the cores are busy, the decode process runs first, and one client's requests, however
    # many, wait for the CPU instead of stalling another's stream (RELIABILITY.md)
    http_nice: int = 5
    # while rows decode, attention inspections, embeddings and classifications get at most this share of
    # the decode thread's time (generate/scheduler.py); alone, they run at once
    background_share: float = 0.1

    def validate(self) -> ServeConfig:
        """Refuse settings that bound nothing (a UserError naming the option); returns self."""
        at_least_1 = [
            "port",
            "max_batch",
            "max_body_bytes",
            "max_n",
            "max_connections",
            "max_open_connections",
            "inspect_max_tokens",
        ]
        for name in at_least_1:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or (self.max_tokens_limit is not None and self.max_tokens_limit < 1):
            raise UserError("--max-queue must be >= 0 and --max-tokens-limit >= 1")
        if self.prefix_cache_tokens != 0 and self.prefix_cache_tokens < BLOCK_TOKENS:
            raise UserError(
                f"--prefix-cache-tokens must be 0 (off) or at least one block of {BLOCK_TOKENS} tokens, "
                f"got {self.prefix_cache_tokens}"
            )
        if not (math.isfinite(self.background_share) and 0 < self.background_share <= 1):
            raise UserError(f"--background-share must be in (0, 1], got {self.background_share}")
        if not 0 <= self.http_nice <= 19:
            raise UserError(f"--http-nice must be 0 to 19 (a nice increment), got {self.http_nice}")
        for name in ("header_timeout_s", "body_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {v}")
        return self

    def __repr__(self) -> str:  # never show the key
        fields = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return f"ServeConfig({fields})"


__all__ = ["ServeConfig"]
