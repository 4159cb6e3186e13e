"""Continuous batching: one background thread owns the model and decodes every active request together.

The scheduler keeps a batch `KVCache` of `max_batch` rows. Active rows are kept packed at the front
(rows 0..B-1): a finished or cancelled row is replaced by the last active row (`copy_row`), so every step
is ONE forward pass of B tokens (T=1 per row) at per-row positions `cache.lengths[:B]`. New requests wait
in a bounded queue; at each step the waiting requests that fit are prefilled together (right-padded, with
the engine's `prefill`) straight into free rows, and a request with n > 1 is prefilled once and copied to
its n rows. Sampling uses the batched per-row processors of `sampling.py` with each row's own settings and
its own `torch.Generator` (seed + j for choice j, as in `engine.generate`), so a seeded request gives the
same tokens alone or among many. Text, stop strings and streaming hold-back are the engine's `Row`.
Every sampled token is pushed to the request as a `Token` event (id, safe text piece, logprob, top
alternatives); each finished choice sends `Finished`; an internal failure sends `Failed`. Consumers either
pass an `emit` callback (the server hands events to its event loop) or iterate the `Handle`.
The scheduler knows nothing of HTTP.
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
from yuyan.generate.engine import Row, decode_layout, prefill
from yuyan.generate.sampling import (
    SamplingParams,
    logprobs_topk,
    make_generator,
    process,
    sample,
    stack_params,
)
from yuyan.model.transformer import KVCache, Transformer
from yuyan.tokenizer import Tokenizer

log = logging.getLogger("yuyan.scheduler")


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


Event = Token | Finished | Failed


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    stop_ids: set[int]
    logprobs: int | None
    emit: Callable[[Event], None]
    cancelled: bool = False
    done: bool = False


@dataclass
class _Slot:
    req: _Request
    index: int
    row: Row
    gen: torch.Generator | None
    params: SamplingParams


class Handle:
    """A submitted request: `cancel()` frees its rows at the next step; iterate it for its events
    (only when no `emit` callback was given)."""

    def __init__(self, req: _Request, sched: Scheduler, q: queue.Queue | None):
        self._req, self._sched, self._q = req, sched, q

    @property
    def n(self) -> int:
        return self._req.params.n

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

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        threads: int | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = decode_layout(model.eval())
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        # torch's CPU threads (process-wide): small-batch decode is matrix-vector work that one core does
        # as fast as two, and spare cores keep the HTTP loop responsive; None leaves torch's setting
        self.threads = threads
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: list[tuple[Callable, Future]] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.active = 0  # rows decoding now (read by /health)
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
            calls, self._calls = self._calls, []
        for r in pending:
            _safe_emit(r, Failed("the server is shutting down"))
        for _, fut in calls:
            fut.set_exception(SchedulerClosed("the server is shutting down"))

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 16,
        stop: list[str] | tuple[str, ...] = (),
        stop_ids: set[int] | list[int] | None = None,
        logprobs: int | None = None,
        emit: Callable[[Event], None] | None = None,
    ) -> Handle:
        """Queue one prompt (token ids) for params.n choices. Raises UserError for bad input, QueueFull when
        `max_queue` requests already wait. stop_ids None: the tokenizer's end-of-text token."""
        params = (params or SamplingParams()).validate()
        prompt = [int(t) for t in prompt]
        V = self.model.config.vocab_size
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= V:
            raise UserError(f"prompt token ids must be in [0, {V}); use the model's tokenizer")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_len:
            raise UserError(
                f"this model's maximum context length is {self.max_len} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the prompt, {max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens"
            )
        if params.n > self.max_batch:
            raise UserError(f"n is {params.n} but the server decodes at most {self.max_batch} rows; lower n")
        if any(not isinstance(s, str) or not s for s in stop):
            raise UserError("stop strings must be non-empty strings")
        if stop_ids is None:
            eot = self.tokenizer.eot_id if self.tokenizer is not None else None
            stop_ids = set() if eot is None else {eot}
        q: queue.Queue | None = None
        if emit is None:
            q = queue.Queue()
            emit = q.put
        req = _Request(next(self._ids), prompt, params, max_tokens, list(stop), set(stop_ids), logprobs, emit)
        with self._cv:
            if self._stopping or self._thread is None:
                raise SchedulerClosed("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests already wait); retry shortly")
            self._waiting.append(req)
            self._cv.notify_all()
        return Handle(req, self, q)

    def run_exclusive(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the scheduler thread between two decode steps (e.g. an attention inspection)."""
        fut: Future = Future()
        with self._cv:
            if self._stopping or self._thread is None:
                raise SchedulerClosed("the scheduler is not running")
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            cfg = self.model.config
            dtype = self.model.embed_tokens.weight.dtype
            self.cache = KVCache(cfg, self.max_batch, max_len=self.max_len, device=self.device, dtype=dtype)
            self.counts = torch.zeros(
                self.max_batch, cfg.vocab_size, device=self.device
            )  # output token counts
            self.prompt_mask = torch.zeros(
                self.max_batch, cfg.vocab_size, dtype=torch.bool, device=self.device
            )
            self.slots: list[_Slot] = []
            self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the active rows
            self.st = None  # SamplingTensors of the active rows; None when the rows changed
            while True:
                with self._cv:
                    while not (self._stopping or self.slots or self._waiting or self._calls):
                        self._cv.wait()
                    if self._stopping:
                        break
                    calls, self._calls = self._calls, []
                    admitted = self._take_waiting()
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # the caller gets the exception through the future
                        fut.set_exception(e)
                try:
                    self._iteration(admitted)
                except Exception:
                    log.exception("scheduler step failed; failing the active requests")
                    for s in self.slots:
                        _safe_emit(s.req, Failed("internal error while generating"))
                        s.req.done = True
                    for r in admitted:
                        if not r.done:
                            _safe_emit(r, Failed("internal error while generating"))
                    self.slots, self.logits, self.st = [], None, None
                    self.cache.reset()
                self.active = len(self.slots)
            for s in self.slots:
                _safe_emit(s.req, Failed("the server is shutting down"))

    def _take_waiting(self) -> list[_Request]:
        """Pop the waiting requests (FIFO) whose n rows fit in the free rows; drop cancelled ones."""
        free = self.max_batch - len(self.slots)
        out = []
        while self._waiting:
            r = self._waiting[0]
            if r.cancelled:
                self._waiting.popleft()
                continue
            if r.params.n > free:
                break
            self._waiting.popleft()
            out.append(r)
            free -= r.params.n
        return out

    def _iteration(self, admitted: list[_Request]) -> None:
        # 1. rows of cancelled requests leave the batch at once
        gone = [i for i, s in enumerate(self.slots) if s.req.cancelled]
        if gone:
            self._remove(gone)
        # 2. prefill the admitted requests straight into the free rows
        if admitted:
            self._admit(admitted)
        B = len(self.slots)
        if B == 0:
            return
        # 3. choose one token per row with that row's settings
        if self.st is None:
            self.st = stack_params(
                [s.params for s in self.slots], device=self.device, generators=[s.gen for s in self.slots]
            )
        st, logits = self.st, self.logits
        counts = self.counts[:B] if st.use_penalties else None
        pmask = self.prompt_mask[:B] if st.use_penalties else None
        proc = process(logits, st, counts, pmask)
        # settings that are valid one by one can still overflow (temperature 1e-300, penalty 5e-324): such a
        # row has no distribution to sample; fail that request alone, never the batch. Only processors can do
        # that (an all-greedy batch without penalties gets the logits back untouched), and a row's max is
        # nan, +inf or -inf exactly when it holds a nan, a +inf or nothing but -inf: one reduction.
        bad = ~torch.isfinite(proc.amax(-1)) if proc is not logits else None
        if bad is not None and bool(bad.any()):
            for i in bad.nonzero().flatten().tolist():
                req = self.slots[i].req
                if not req.cancelled:
                    _safe_emit(
                        req,
                        Failed(
                            "the sampling settings overflowed the model's logits; use a "
                            "temperature >= 0.01 and penalties of moderate size",
                            invalid=True,
                        ),
                    )
                    req.cancelled = True  # its rows leave at the next step
            proc = torch.where(bad[:, None], logits, proc)
        tokens = sample(proc, st.greedy, st.generators)  # (B,)
        self.counts[:B].scatter_add_(1, tokens[:, None], torch.ones(B, 1, device=self.device))
        k = max((s.req.logprobs or 0) for s in self.slots)
        want_lp = any(s.req.logprobs is not None for s in self.slots)
        if want_lp:
            lp, top_v, top_i = logprobs_topk(logits, k)
            chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
        tok_list = tokens.tolist()
        lengths = self.cache.lengths[:B].tolist()
        finished = []
        for i, s in enumerate(self.slots):
            t, row, req = tok_list[i], s.row, s.req
            if req.cancelled:  # nothing more goes to a cancelled request; its row leaves next step
                continue
            if t in req.stop_ids:
                row.generated.append(t)
                row.finish = "stop"
            else:
                row.add(t)
                if len(row.generated) >= req.max_tokens or lengths[i] >= self.max_len:
                    row.finish = row.finish or "length"
            if row.finish is not None:
                row.close()
            tail = ""
            if t in req.stop_ids:
                tail = row.safe_text()
            else:
                ev = Token(s.index, t, row.safe_text())
                if req.logprobs is not None:
                    dec = self.tokenizer.decode
                    ev.logprob = chosen[i]
                    ev.top = [
                        (a, dec([a]), v)
                        for a, v in zip(top_i[i][: req.logprobs], top_v[i][: req.logprobs], strict=True)
                    ]
                _safe_emit(req, ev)
            if row.finish is not None:
                ids = row.generated
                n_out = len(ids) - (1 if ids and ids[-1] in req.stop_ids and row.finish == "stop" else 0)
                _safe_emit(req, Finished(s.index, row.finish, row.text, row.prompt_len, n_out, tail))
                finished.append(i)
        self.tokens_out += B
        self.steps += 1
        # 4. finished rows leave; the others decode their new token in one forward pass
        if finished:
            tokens = self._remove(finished, tokens)
        B = len(self.slots)
        if B == 0:
            self.logits = None
            return
        pos = self.cache.lengths[:B, None]  # (B, 1): each row at its own position
        h = self.model.hidden(tokens[:B, None], pos=pos, cache=self.cache)  # (B, 1, d)
        self.cache.lengths[:B] += 1
        self.logits = self.model.lm_head(h[:, 0]).float()

    def _admit(self, reqs: list[_Request]) -> None:
        first = len(self.slots)
        rows, seqs = [], []
        at = first
        for r in reqs:
            rows.append(at)
            seqs.append(r.prompt)
            at += r.params.n
        new_logits = prefill(self.model, self.cache, rows, seqs)  # (R, V) logits after each prompt
        per_row = []
        for r, row0, lg in zip(reqs, rows, new_logits, strict=True):
            pm = torch.zeros(self.prompt_mask.shape[1], dtype=torch.bool, device=self.device)
            pm[torch.tensor(r.prompt, device=self.device)] = True
            for j in range(r.params.n):
                b = row0 + j
                if j:
                    self.cache.copy_row(b, self.cache, row0)
                self.counts[b].zero_()
                self.prompt_mask[b] = pm
                seed = None if r.params.seed is None else r.params.seed + j
                self.slots.append(
                    _Slot(
                        r,
                        j,
                        Row(r.prompt, self.tokenizer, r.stop),
                        make_generator(seed, self.device),
                        r.params,
                    )
                )
                per_row.append(lg)
        added = torch.stack(per_row)
        self.logits = added if self.logits is None or first == 0 else torch.cat((self.logits[:first], added))
        self.st = None

    def _remove(self, idx: list[int], tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Remove rows idx, filling each hole with the last active row (keeps rows 0..B-1 packed)."""
        for i in sorted(idx, reverse=True):
            last = len(self.slots) - 1
            if i != last:
                self.cache.copy_row(i, self.cache, last)
                self.counts[i] = self.counts[last]
                self.prompt_mask[i] = self.prompt_mask[last]
                self.slots[i] = self.slots[last]
                if self.logits is not None:
                    self.logits[i] = self.logits[last]
                if tokens is not None:
                    tokens[i] = tokens[last]
            self.slots.pop()
        B = len(self.slots)
        if self.logits is not None:
            self.logits = self.logits[:B]
        self.st = None
        return None if tokens is None else tokens[:B]

    def stats(self) -> dict:
        return {
            "active_rows": self.active,
            "waiting": len(self._waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "tokens_generated": self.tokens_out,
            "running": self._thread is not None and self._thread.is_alive(),
        }


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
    "Finished",
    "Failed",
    "QueueFull",
    "SchedulerClosed",
    "run_to_completion",
]
