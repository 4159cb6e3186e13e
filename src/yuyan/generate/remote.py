"""The scheduler in a process of its own: `DecodeProcess`, what `yuyan serve` decodes with.

In one process, every request's HTTP parsing, JSON and validation ran under the same GIL as the decode
loop, so a few clients sending oversized requests slowed everyone's streams (a stream's time per token
2.6-3.9x its time alone, measured). `DecodeProcess` runs a `Scheduler` in a child process (started with
`spawn`: a fresh interpreter, never a fork of a process whose OpenMP pool is in use, which hangs the child)
and offers the scheduler's client side to the caller: `check`, `submit` (a handle whose `cancel()` frees
its rows), `background(fn, *args)` (fn(context, *args) run between decode steps, as
`Scheduler.background`), `stats()`, `start()`, `stop()`. Requests are checked in the calling process, by
the checks the scheduler itself uses, so a bad request never crosses; the child checks again.

The model's tensors go to the child through torch's shared memory (not copied); the tokenizer and the
`context` of background calls are pickled with them. Between the two processes run two one-way pipes of
our own making: commands down (submit, cancel, call, stop), batches of events, call results and stats
snapshots up; both ends are ours, so their pickles are not untrusted input. In the child a sender thread
batches what the scheduler emits, so the decode loop never waits on the pipe; in the parent a reader thread
hands each event to the `emit` callback it was submitted with, as the scheduler thread would.

Failure: when the child dies (killed, out of memory), every waiting request gets `Failed`, pending calls
raise `SchedulerClosed`, new submissions are refused with `SchedulerClosed` and `stats()["running"]` turns
false until a new child, started at once, decodes (at most RESTARTS times in RESTART_WINDOW_S; then it
stays down). When the parent dies, the child reads the end of its command pipe and exits.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.scheduler import (
    BACKGROUND_SHARE,
    SHUTDOWN,
    Event,
    Failed,
    Finished,
    Handle,
    Scheduler,
    SchedulerClosed,
    check_request,
)
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer

log = logging.getLogger("yuyan.scheduler")
STATS_S = 0.05  # the child sends a stats snapshot at most this often, when it changed
START_TIMEOUT_S = 300.0  # the child must be decoding within this (it imports torch and maps the weights)
ACK_TIMEOUT_S = 60.0
# a child that dies unasked (the OOM killer's choice, a crash) is started again, at most RESTARTS times
# within RESTART_WINDOW_S; then it stays down and every request is a 503 until the server is restarted
RESTARTS = 3
RESTART_WINDOW_S = 300.0
NOT_RUNNING = "the decode process is not running"


def _pack(e: BaseException) -> tuple:
    """An exception as (class, args, attributes), rebuilt by `_unpack` without calling its __init__ (our
    errors take several arguments, which pickling an exception does not keep)."""
    packed = (type(e), e.args, dict(e.__dict__))
    try:
        pickle.dumps(packed)  # what the pipe will do; an exception it cannot carry becomes a RuntimeError
        return packed
    except Exception:
        return (RuntimeError, (f"{type(e).__name__}: {e}",), {})


def _unpack(packed: tuple) -> BaseException:
    cls, args, attrs = packed
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(attrs)
    return e


class RemoteHandle(Handle):
    """A request submitted to a `DecodeProcess`: `cancel()` and iteration as `Handle`'s."""

    def __init__(self, proc: DecodeProcess, rid: int, n: int, prompt_tokens: int, emit, q):
        self._proc, self._rid, self._n, self._prompt_tokens = proc, rid, n, prompt_tokens
        self._emit, self._q, self._left = emit, q, n

    @property
    def n(self) -> int:
        return self._n

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    def cancel(self) -> None:
        self._proc._send(("cancel", self._rid), quiet=True)

    def _deliver(self, ev: Event) -> bool:
        """Hand one event to the consumer; True when the request is over (every choice finished)."""
        try:
            self._emit(ev)
        except Exception:  # a consumer that is gone (closed loop) cancels, as the scheduler does
            self.cancel()
            return True
        if isinstance(ev, Finished):
            self._left -= 1
        return isinstance(ev, Failed) or self._left == 0


class DecodeProcess:
    """A `Scheduler` in a child process, with the scheduler's client side (see the module docstring).
    `context` is what `background(fn, *args)` calls receive first (pickled into the child)."""

    in_process = False

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        threads: int | None = None,
        prefix_cache_tokens: int = 0,
        context: Any = None,
        background_share: float = BACKGROUND_SHARE,
    ):
        # the same refusals as the scheduler's, before any process starts
        Scheduler.check_settings(max_batch, max_queue, prefix_cache_tokens, background_share)
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self._kwargs = dict(
            max_batch=max_batch,
            max_queue=max_queue,
            threads=threads,
            prefix_cache_tokens=prefix_cache_tokens,
            background_share=background_share,
        )
        self._lock = threading.Lock()  # one writer at a time on the command pipe
        self._ids = itertools.count()
        self._handles: dict[int, RemoteHandle] = {}
        self._pending: dict[int, Future] = {}  # submissions' acks and background calls' results
        self._stats: dict = {}
        self._ready = threading.Event()
        self._closed = True
        self._stopping = False
        self._why_closed = NOT_RUNNING
        self._restarts: list[float] = []  # when the child was restarted (monotonic)
        self._restarter: threading.Thread | None = None
        self._proc = None
        self._cmd = None
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> DecodeProcess:
        """Start the child and wait until it decodes (a UserError with its reason if it cannot)."""
        if self._proc is None:
            self._stopping = False
        return self._launch()

    def _launch(self) -> DecodeProcess:
        if self._proc is not None:
            return self
        self._ready.clear()
        self._why_closed = NOT_RUNNING
        import torch.multiprocessing as tmp  # its reducers send tensors through shared memory

        ctx = tmp.get_context("spawn")
        cmd_r, cmd_w = ctx.Pipe(duplex=False)
        ev_r, ev_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child,
            args=(cmd_r, ev_w, self.model, self.tokenizer, self._kwargs, self.context),
            name="yuyan-decode",
            daemon=True,
        )
        try:
            self._proc.start()  # pickles the model: its tensors move to shared memory here
        except (OSError, RuntimeError) as e:
            self._proc = None
            raise UserError(
                f"the decode process could not be given the model through shared memory (/dev/shm): {e}; "
                "give it more room (docker run --shm-size) or serve with --no-decode-process"
            ) from None
        cmd_r.close()
        ev_w.close()
        self._cmd, self._ev = cmd_w, ev_r
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="yuyan-decode-reader", daemon=True)
        self._reader.start()
        t0 = time.monotonic()
        while not self._ready.wait(0.1):
            if self._closed or time.monotonic() - t0 > START_TIMEOUT_S:
                why = self._why_closed if self._closed else "it did not start in time"
                self.stop(timeout=5)
                raise UserError(f"the decode process did not start: {why}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child: waiting requests get `Failed` (shutdown); kill it if it does not exit in time."""
        self._stopping = True
        restarter = self._restarter
        if restarter is not None and restarter is not threading.current_thread():
            restarter.join(START_TIMEOUT_S)
        if self._proc is None:
            return
        self._send(("stop",), quiet=True)
        self._end(timeout)

    def _end(self, timeout: float) -> None:
        """Wait for the child (kill it after `timeout`) and its reader, fail what waits, close the pipes."""
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self._gone()
        for conn in (self._cmd, self._ev):
            conn.close()
        self._proc = None

    def __enter__(self) -> DecodeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ client side
    def check(self, prompt: list[int], config: GenerationConfig) -> list[int]:
        """`Scheduler.check`, in this process."""
        return check_request(prompt, config, self.max_batch, self.block_size, self.vocab_size, self.tokenizer)

    def submit(
        self, prompt: list[int], config: GenerationConfig, *, emit: Callable[[Event], None] | None = None
    ) -> RemoteHandle:
        """`Scheduler.submit`: checked here, queued in the child (QueueFull / SchedulerClosed from there)."""
        ids = self.check(prompt, config)
        q: queue.Queue | None = None
        if emit is None:
            q = queue.Queue()
            emit = q.put
        rid = next(self._ids)
        handle = RemoteHandle(self, rid, config.sampling.n, len(ids), emit, q)
        ack: Future = Future()
        with self._lock:
            self._handles[rid] = handle  # before sending: its first events may come before the ack
            self._pending[rid] = ack
            self._send_locked(("submit", rid, ids, config))
        try:
            error = ack.result(ACK_TIMEOUT_S)
        except TimeoutError:
            error = _pack(SchedulerClosed("the decode process did not answer"))
        if error is not None:
            self._handles.pop(rid, None)
            raise _unpack(error)
        return handle

    def background(self, fn: Callable[..., Any], *args) -> Future:
        """fn(context, *args) in the child between decode steps, as `Scheduler.background`; fn must be a
        module-level function and args picklable. The future carries its result or its exception."""
        cid = next(self._ids)
        fut: Future = Future()
        with self._lock:
            self._pending[cid] = fut
            self._send_locked(("call", cid, fn, args))
        return fut

    def run_exclusive(self, fn: Callable[[], object], background: bool = False) -> Future:
        raise TypeError(
            "a decode process runs module-level functions only: use background(fn, *args), not a closure"
        )

    def stats(self) -> dict:
        alive = self._proc is not None and self._proc.is_alive() and not self._closed
        base = {"max_batch": self.max_batch, "max_queue": self.max_queue}
        return {**base, **self._stats, "running": alive and bool(self._stats.get("running"))}

    @property
    def waiting(self) -> int:
        return self._stats.get("waiting", 0)

    @property
    def active(self) -> int:
        return self._stats.get("active_rows", 0)

    @property
    def steps(self) -> int:
        return self._stats.get("steps", 0)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------------------------------ the pipes
    def _send(self, msg: tuple, quiet: bool = False) -> None:
        with self._lock:
            try:
                self._send_locked(msg)
            except SchedulerClosed:
                if not quiet:
                    raise

    def _send_locked(self, msg: tuple) -> None:
        if self._closed or self._cmd is None:
            raise SchedulerClosed(self._why_closed)
        try:
            self._cmd.send(msg)
        except (OSError, ValueError):
            raise SchedulerClosed("the decode process stopped") from None

    def _read(self) -> None:
        """The reader thread: every batch the child sends, dispatched in order, until the pipe ends."""
        while True:
            try:
                batch = self._ev.recv()
            except (EOFError, OSError):
                break
            for msg in batch:
                self._dispatch(msg)
        self._gone()

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "event":
            handle = self._handles.get(msg[1])
            if handle is not None and handle._deliver(msg[2]):
                self._handles.pop(msg[1], None)
        elif kind == "stats":
            self._stats = msg[1]
        elif kind in ("ack", "result"):
            fut = self._pending.pop(msg[1], None)
            if fut is None:
                return
            if kind == "ack":
                fut.set_result(msg[2])
            elif msg[3] is not None:
                fut.set_exception(_unpack(msg[3]))
            else:
                fut.set_result(msg[2])
        elif kind == "ready":
            self._stats = msg[1]
            self._ready.set()
        elif kind == "failed":
            self._why_closed = msg[1]

    def _gone(self) -> None:
        """The child has ended: fail what waits on it, refuse what comes; restart it when it died unasked."""
        with self._lock:
            first = not self._closed
            if first and not self._stopping:
                if self._proc is not None:
                    self._proc.join(2)  # the pipe ends a moment before the exit code is known
                code = None if self._proc is None else self._proc.exitcode
                if self._why_closed == NOT_RUNNING:
                    self._why_closed = f"the decode process stopped (exit code {code})"
            elif self._stopping:
                self._why_closed = SHUTDOWN
            self._closed = True
            handles, self._handles = list(self._handles.values()), {}
            pending, self._pending = list(self._pending.values()), {}
        failure = Failed(SHUTDOWN if self._stopping else self._why_closed, shutdown=self._stopping)
        for h in handles:
            h._deliver(failure)
        for fut in pending:
            if not fut.done():
                fut.set_exception(SchedulerClosed(self._why_closed))
        if not first or self._stopping or not self._ready.is_set():
            return  # asked to stop, already handled, or it never started (start() reports that)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if len(self._restarts) >= RESTARTS:
            log.error(
                "%s, the %s time in %.0f s: not restarted; requests fail (503) until the server is restarted",
                self._why_closed,
                RESTARTS + 1,
                RESTART_WINDOW_S,
            )
            return
        self._restarts.append(now)
        log.error("%s; starting it again (%d of %d)", self._why_closed, len(self._restarts), RESTARTS)
        self._why_closed += "; it is being started again, retry shortly"
        self._restarter = threading.Thread(target=self._restart, name="yuyan-decode-restart", daemon=True)
        self._restarter.start()

    def _restart(self) -> None:
        why = self._why_closed
        self._end(timeout=5)
        if self._stopping:
            return
        try:
            self._launch()
            log.warning("the decode process is running again (pid %s)", self.pid)
        except UserError as e:
            self._why_closed = f"{why.split(';')[0]}; starting it again failed: {e}"
            log.error("%s", self._why_closed)


# ---------------------------------------------------------------------------------------- the child
class _Out:
    """The child's outbox: what the scheduler thread and the command loop produce, sent in batches by a
    sender thread (a decode step never waits on the pipe), with a stats snapshot when it changed."""

    def __init__(self, conn, sched: Scheduler):
        self.conn, self.sched = conn, sched
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="yuyan-decode-sender", daemon=True)
        self.thread.start()

    def put(self, msg: tuple | None) -> None:
        self.q.put(msg)

    def _run(self) -> None:
        last: dict | None = None
        checked = 0.0  # when stats() was last read: at most every STATS_S, not once per decode step
        while True:
            try:
                batch = [self.q.get(timeout=STATS_S)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            done = any(m is None for m in batch)
            batch = [m for m in batch if m is not None]
            now = time.monotonic()
            # a submission or a finished request changes the counters: its ack or its last event goes
            # with fresh stats (once per request, not per token), sent first so that whoever the event
            # wakes already sees them (a /health read right after a response counts that request)
            edge = any(
                m[0] == "ack" or (m[0] == "event" and isinstance(m[2], Finished | Failed)) for m in batch
            )
            if done or edge or now - checked >= STATS_S:
                checked, stats = now, self.sched.stats()
                if stats != last:
                    batch.insert(0, ("stats", stats))
                    last = stats
            if batch:
                try:
                    self.conn.send(batch)
                except (OSError, ValueError):
                    return
            if done:
                return


class _Emitter:
    """The emit callback of one request in the child: its events into the outbox, and the request
    forgotten once it is over."""

    def __init__(self, out: _Out, rid: int, n: int, handles: dict):
        self.out, self.rid, self.left, self.handles = out, rid, n, handles
        self.over = False

    def __call__(self, ev: Event) -> None:
        self.out.put(("event", self.rid, ev))
        if isinstance(ev, Finished):
            self.left -= 1
        if isinstance(ev, Failed) or self.left == 0:
            self.over = True
            self.handles.pop(self.rid, None)


def _child(cmd, ev, model, tokenizer, kwargs: dict, context) -> None:
    """The decode process: a Scheduler, the command loop on the main thread, the sender thread."""
    sys.setswitchinterval(0.0005)  # the scheduler thread and the command loop hand the GIL over often
    # Ctrl-C reaches the whole process group: the parent shuts down and stops this process in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sched = Scheduler(model, tokenizer, context=context, **kwargs).start()
    except BaseException as e:
        ev.send([("failed", f"{type(e).__name__}: {e}")])
        return
    out = _Out(ev, sched)
    out.put(("ready", sched.stats()))
    handles: dict[int, Handle] = {}
    try:
        while True:
            try:
                msg = cmd.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = msg[0]
            if kind == "submit":
                _, rid, ids, config = msg
                emit = _Emitter(out, rid, config.sampling.n, handles)
                try:
                    handle = sched.submit(ids, config, emit=emit)
                    if not emit.over:  # a request can end before submit returns
                        handles[rid] = handle
                    out.put(("ack", rid, None))
                except Exception as e:
                    out.put(("ack", rid, _pack(e)))
            elif kind == "cancel":
                handle = handles.pop(msg[1], None)
                if handle is not None:
                    handle.cancel()
            elif kind == "call":
                _, cid, fn, args = msg
                try:
                    fut = sched.background(fn, *args)
                except Exception as e:
                    out.put(("result", cid, None, _pack(e)))
                    continue
                fut.add_done_callback(lambda f, cid=cid: out.put(("result", cid, *_outcome(f))))
            elif kind == "stop":
                break
    finally:
        sched.stop()
        out.put(None)
        out.thread.join(10)


def _outcome(fut: Future) -> tuple:
    e = fut.exception()
    return (None, _pack(e)) if e is not None else (fut.result(), None)


__all__ = ["DecodeProcess", "RemoteHandle"]
