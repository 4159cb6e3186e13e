"""Continuous batching: one background thread owns the decode core and steps every active request together.

The scheduler is a thread and a queue around one `core.Decoder` of `max_batch` rows and the model's whole
context: every step is one sampling pass and ONE forward pass over all live rows at their own positions.
New requests wait in a bounded queue; before each step the waiting requests that fit in the free rows are
admitted together (the core prefills them, once per prompt for n > 1). Each row samples with its own
settings and its own `torch.Generator` (seed + j for choice j, as in `generate()`), so a seeded request
gives the same tokens alone or among many; stop ids, stop strings, logprobs, the sliding window and
streaming hold-back are the core's. Every sampled token is pushed to its request as a `Token` event (id,
safe text piece, logprob, top alternatives); each finished choice sends `Finished`; a failure sends
`Failed`. Consumers pass an `emit` callback (the server hands events to its event loop) or iterate the
`Handle`. A request with `prompt_logprobs` is scored first (generate/scoring.py, every such request of a
step in one batched pass) and gets one `Prompt` event before its tokens; with max_new_tokens 0 that is
all it gets, besides its `Finished` events. `submit` validates on the caller's thread, through the same
checks `generate()` uses. The
scheduler knows nothing of HTTP.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig, TokenLogprob
from yuyan.generate.core import Decoder, Row, check_prompt
from yuyan.generate.grammar import compile_grammar
from yuyan.generate.kernels import decode_layout
from yuyan.generate.prefix import PrefixCache
from yuyan.generate.scoring import prompt_logprobs
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer

log = logging.getLogger("yuyan.scheduler")
SHUTDOWN = "the server is shutting down"
# While rows decode, background calls (attention inspections, embeddings: forward passes that are nobody's
# stream) get at most a share of the decode thread's time (`background_share`, default BACKGROUND_SHARE),
# so a stream's time per token grows at most 1 + share times however many of them wait; credit beyond
# BACKGROUND_BURST_S is not kept. Measured with 4 clients inspecting back to back beside one stream (the
# server on one core, BENCHMARKS.md): share 0.5 and burst 0.1 s made the stream 1.9x slower, 0.1 and
# 0.02 s 1.4x; each call's answer also costs the HTTP side, which this share cannot see.
BACKGROUND_SHARE = 0.1
BACKGROUND_BURST_S = 0.02


class QueueFull(Exception):
    """The waiting queue is full: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosed(Exception):
    """The scheduler is stopped (shutting down)."""


@dataclass
class Token:
    index: int  # choice index within the request (0..n-1)
    token_id: int
    text: str  # new text that is now safe to show (may be "" while a character or stop prefix is pending)
    logprob: float | None = None
    top: list[tuple[int, str, float]] | None = None  # (id, text, logprob) of the likeliest alternatives
    token: str = ""  # this token's own text, with the logprobs (the core decoded it for them already)


@dataclass
class Prompt:
    """The prompt's own logprobs (one entry per prompt token, None for the first), before any Token."""

    logprobs: list[TokenLogprob | None]
    index: int = 0  # every choice of the request shares them


@dataclass
class Finished:
    index: int
    finish_reason: str  # "stop" | "length"
    text: str  # the whole completion text of this choice
    prompt_tokens: int
    completion_tokens: int
    tail: str = ""  # text not yet sent in a Token event (held back when a stop token ended the row)


@dataclass
class Failed:
    message: str
    invalid: bool = False  # the request's own settings caused it (a 4xx), not a bug or a shutdown
    shutdown: bool = False  # the scheduler is stopping


Event = Token | Prompt | Finished | Failed


@dataclass
class _Request:
    id: int
    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    cancelled: bool = False
    done: bool = False
    finished: int = 0  # choices whose Finished event went out


class Handle:
    """A submitted request: `cancel()` frees its rows at the next step; iterate it for its events
    (only when no `emit` callback was given)."""

    def __init__(self, req: _Request, sched: Scheduler, q: queue.Queue | None):
        self._req, self._sched, self._q = req, sched, q

    @property
    def n(self) -> int:
        return self._req.config.sampling.n

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt)

    def cancel(self) -> None:
        self._req.cancelled = True
        self._sched._wake()

    def __iter__(self) -> Iterator[Event]:
        if self._q is None:
            raise RuntimeError("events go to the emit callback given to submit()")
        left = self.n
        while left:
            ev = self._q.get()
            yield ev
            if isinstance(ev, Failed):
                return
            if isinstance(ev, Finished):
                left -= 1


class Scheduler:
    """Continuous batching over one model. `start()` launches the thread; `submit()` is thread-safe."""

    in_process = True  # background calls share this process's objects (a DecodeProcess: False)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        threads: int | None = None,
        prefix_cache_tokens: int = 0,
        context: object = None,
        background_share: float = BACKGROUND_SHARE,
    ):
        self.check_settings(max_batch, max_queue, prefix_cache_tokens, background_share)
        self.background_share = background_share
        self.model = decode_layout(model.eval())
        self.context = context  # what background(fn, *args) calls get first
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block_size = model.config.block_size
        # torch's CPU threads (process-wide): small-batch decode is matrix-vector work that one core does
        # as fast as two, and spare cores keep the HTTP loop responsive; None leaves torch's setting
        self.threads = threads
        # K/V of prompt prefixes shared between requests (generate/prefix.py); 0: off
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: list[tuple[Callable, Future]] = []
        self._background: deque[tuple[Callable, Future]] = deque()
        self._credit = 0.0  # seconds of decode-thread time background calls may still take
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.core: Decoder | None = None
        self.steps = 0
        self.tokens_out = 0

    # ------------------------------------------------------------------------------------ client side
    def start(self) -> Scheduler:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="yuyan-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            pending, self._waiting = list(self._waiting), deque()
            calls, self._calls = self._calls + list(self._background), []
            self._background = deque()
        for r in pending:
            _safe_emit(r, Failed(SHUTDOWN, shutdown=True))
        for _, fut in calls:
            fut.set_exception(SchedulerClosed(SHUTDOWN))

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @staticmethod
    def check_settings(
        max_batch: int, max_queue: int, prefix_cache_tokens: int, background_share: float = BACKGROUND_SHARE
    ) -> None:
        if not 0 < background_share <= 1:
            raise UserError(f"background_share must be in (0, 1], got {background_share}")
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if prefix_cache_tokens < 0:
            raise UserError(f"prefix_cache_tokens must be >= 0 (0: off), got {prefix_cache_tokens}")

    def check(self, prompt: list[int], config: GenerationConfig) -> list[int]:
        """The request's settings and prompt, checked as `generate()` checks them, plus what a batch of
        this scheduler cannot do; returns the prompt ids to decode. Raises UserError (ContextLengthError)."""
        V = self.model.config.vocab_size
        return check_request(prompt, config, self.max_batch, self.block_size, V, self.tokenizer)

    def submit(
        self, prompt: list[int], config: GenerationConfig, *, emit: Callable[[Event], None] | None = None
    ) -> Handle:
        """Queue one prompt (token ids) for config.sampling.n choices. Raises UserError for bad input,
        QueueFull when `max_queue` requests already wait."""
        ids = self.check(prompt, config)
        q: queue.Queue | None = None
        if emit is None:
            q = queue.Queue()
            emit = q.put
        req = _Request(next(self._ids), ids, config, emit)
        with self._cv:
            if self._stopping or self._thread is None:
                raise SchedulerClosed("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests already wait); retry shortly")
            self._waiting.append(req)
            self._cv.notify_all()
        return Handle(req, self, q)

    def run_exclusive(self, fn: Callable[[], object], background: bool = False) -> Future:
        """Run fn() on the scheduler thread between two decode steps. A `background` call (an attention
        inspection, an embedding: a forward pass no stream waits for) runs when no row decodes, or when
        its share of the thread's time allows (`background_share`); at most max_queue of them wait, then
        QueueFull. The thread's torch settings apply, so it never competes with decoding for the cores."""
        fut: Future = Future()
        with self._cv:
            if self._stopping or self._thread is None:
                raise SchedulerClosed("the scheduler is not running")
            if background and len(self._background) >= max(1, self.max_queue):
                raise QueueFull(
                    f"the server is busy ({len(self._background)} inspections wait); retry shortly"
                )
            (self._background if background else self._calls).append((fn, fut))
            self._cv.notify_all()
        return fut

    def background(self, fn: Callable[..., object], *args) -> Future:
        """fn(self.context, *args) as a background call (run_exclusive(background=True)): the form a
        `DecodeProcess` can send to its child, where the context is the child's copy."""
        return self.run_exclusive(lambda: fn(self.context, *args), background=True)

    def _background_due(self) -> list[tuple[Callable, Future]]:
        """The next background call, when no row decodes or its time share allows one (lock held)."""
        if self._background and (not self.core.rows or self._credit >= 0):
            return [self._background.popleft()]
        return []

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.core = Decoder(
            self.model, self.tokenizer, self.max_batch, self.block_size, prefix_cache=self.prefix_cache
        )
        while True:
            with self._cv:
                while not (
                    self._stopping or self.core.rows or self._waiting or self._calls or self._background
                ):
                    self._cv.wait()
                if self._stopping:
                    break
                calls, self._calls = self._calls, []
                background = self._background_due()
                admitted = self._take_waiting()
            _run_calls(calls)
            if background:
                t0 = time.perf_counter()
                _run_calls(background)
                if self.core.rows:
                    self._credit -= time.perf_counter() - t0
            t0 = time.perf_counter()
            decoding = bool(self.core.rows or admitted)
            try:
                self._iteration(admitted)
                if decoding:
                    spent = (time.perf_counter() - t0) * self.background_share
                    self._credit = min(self._credit + spent, BACKGROUND_BURST_S)
            except Exception:
                log.exception("scheduler step failed; failing the active requests")
                self._fail_all(admitted, Failed("internal error while generating"))
        self._fail_all([], Failed(SHUTDOWN, shutdown=True))

    def _fail_all(self, admitted: list[_Request], failure: Failed) -> None:
        owners = {id(r.owner): r.owner for r in self.core.rows}
        for req in [*owners.values(), *admitted]:
            if not req.done:
                _safe_emit(req, failure)
                req.done = True
        self.core.remove(list(self.core.rows))

    def _take_waiting(self) -> list[_Request]:
        """Pop the waiting requests (FIFO) whose n rows fit in the free rows; drop cancelled ones."""
        free = self.core.free
        out = []
        while self._waiting:
            r = self._waiting[0]
            if r.cancelled:
                self._waiting.popleft()
                continue
            if r.config.sampling.n > free:
                break
            self._waiting.popleft()
            out.append(r)
            free -= r.config.sampling.n
        return out

    def _iteration(self, admitted: list[_Request]) -> None:
        core = self.core
        # 1. rows of cancelled requests leave the batch at once
        core.remove([r for r in core.rows if r.owner.cancelled])
        # 2. the admitted requests are scored when they ask for prompt logprobs, and prefilled into the free
        # rows unless scoring was all they asked for
        admitted = self._score(admitted)
        if admitted:
            core.admit([r.prompt for r in admitted], [r.config for r in admitted], admitted)
        if not core.rows:
            return
        # 3. every row takes a token; its events go out before the forward pass that follows
        took = core.choose()
        for row in took:
            self._events(row)
        self.tokens_out += len(took)
        self.steps += 1
        # 4. finished rows leave; the others decode their new token in one forward pass
        for row in core.advance():
            self._events(row)

    def _score(self, admitted: list[_Request]) -> list[_Request]:
        """Send the prompt logprobs of the requests that want them (one batched pass); finish those with
        max_new_tokens 0. Returns the requests that go on to decode."""
        scored = [r for r in admitted if r.config.prompt_logprobs is not None]
        if not scored:
            return admitted
        lps = prompt_logprobs(
            self.model, self.tokenizer, [r.prompt for r in scored], [r.config.prompt_logprobs for r in scored]
        )
        for req, lp in zip(scored, lps, strict=True):
            _safe_emit(req, Prompt(lp))
            if req.config.max_new_tokens == 0:
                for j in range(req.config.sampling.n):
                    _safe_emit(req, Finished(j, "length", "", len(req.prompt), 0))
                req.done = True
        return [r for r in admitted if not r.done]

    def _events(self, row: Row) -> None:
        """The Token events of what a row took this step, then Finished (or Failed) when it ended."""
        req = row.owner
        if req.cancelled or req.done:
            return
        if row.error:
            _safe_emit(req, Failed(row.error, invalid=not row.model_error))
            req.cancelled = True  # its other rows leave at the next step
            return
        ended_by_id = bool(row.new) and row.new[-1] in row.stop_ids and row.finish == "stop"
        shown = row.new[:-1] if ended_by_id else row.new
        piece = row.safe_text()
        want = row.config.logprobs is not None and bool(row.new)
        lps = row.logprobs[-len(row.new) :] if want else []  # one per token taken, a stop id's included
        for j, t in enumerate(shown):
            ev = Token(row.index, t, piece if j == len(shown) - 1 else "")
            if lps:
                ev.logprob, ev.top, ev.token = lps[j].logprob, lps[j].top, lps[j].token
            _safe_emit(req, ev)
        if ended_by_id and lps:  # the stop id adds no text but was sampled: its logprob, as vLLM reports it
            e = lps[-1]
            _safe_emit(req, Token(row.index, e.token_id, "", e.logprob, e.top, e.token))
        if row.finish is not None:
            tail = piece if ended_by_id else ""
            _safe_emit(
                req,
                Finished(row.index, row.finish, row.text, row.prompt_len, row.completion_tokens, tail),
            )
            req.finished += 1
            req.done = req.finished == req.config.sampling.n

    @property
    def active(self) -> int:
        """Rows decoding now (read by /health from another thread: a list's length is one read)."""
        return len(self.core.rows) if self.core is not None else 0

    def stats(self) -> dict:
        return {
            "active_rows": self.active,
            "waiting": len(self._waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "tokens_generated": self.tokens_out,
            "running": self._thread is not None and self._thread.is_alive(),
            "background_waiting": len(self._background),
            "prefix_cache": self.prefix_cache.stats() if self.prefix_cache is not None else None,
        }


def check_request(
    prompt: list[int],
    config: GenerationConfig,
    max_batch: int,
    block_size: int,
    vocab_size: int,
    tokenizer: Tokenizer,
) -> list[int]:
    """`Scheduler.check` for a scheduler of these sizes (a `DecodeProcess` checks in the caller's process)."""
    config.validate()
    checks = [
        (
            config.max_new_tokens >= 1 or config.prompt_logprobs is not None,
            f"max_tokens must be >= 1 (0 only to score the prompt), got {config.max_new_tokens}",
        ),
        (config.num_beams == 1, "beam search is not served; use num_beams 1"),
        (config.speculative == 0, "speculative decoding is not served; use speculative 0"),
        (
            config.sampling.n <= max_batch,
            f"n is {config.sampling.n} but the server decodes at most {max_batch} rows; lower n",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if config.grammar is not None:  # a bad schema or regex is the request's error, before it queues
        compile_grammar(tokenizer, config.grammar, vocab_size)
    return check_prompt([int(t) for t in prompt], config, block_size, vocab_size)


def _run_calls(calls: list[tuple[Callable, Future]]) -> None:
    for fn, fut in calls:
        try:
            fut.set_result(fn())
        except Exception as e:  # the caller gets the exception through the future
            fut.set_exception(e)


def _safe_emit(req: _Request, ev: Event) -> None:
    """Deliver an event; a consumer that is gone (closed loop) cancels its request instead of failing a step."""
    try:
        req.emit(ev)
    except Exception:
        req.cancelled = True


def run_to_completion(handle: Handle, timeout: float | None = None) -> list[Finished]:
    """Wait for every choice of a handle (iterated) and return the Finished events ordered by index."""
    done: list[Finished] = []
    t0 = time.monotonic()
    for ev in handle:
        if isinstance(ev, Failed):
            raise RuntimeError(ev.message)
        if isinstance(ev, Finished):
            done.append(ev)
        if timeout is not None and time.monotonic() - t0 > timeout:
            handle.cancel()
            raise TimeoutError("generation did not finish in time")
    return sorted(done, key=lambda f: f.index)


__all__ = [
    "Scheduler",
    "Handle",
    "Token",
    "Prompt",
    "Finished",
    "Failed",
    "QueueFull",
    "SchedulerClosed",
    "check_request",
    "run_to_completion",
]
