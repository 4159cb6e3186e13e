"""One HTTP request's generation: its scheduler submissions and the single asyncio stream of their events.

A completions request may carry several prompts; each is one `Scheduler.submit`, and `Job` fans their
events (emitted on the scheduler thread) into one asyncio queue on the request's event loop, tagged with
the prompt's index. Submission is all or nothing: when a prompt is refused, the prompts already submitted
are cancelled. A `Failed` event cancels the rest and becomes an `ApiError` (400 when the request's own
settings caused it, 503 on shutdown, else 500); a client that disconnects cancels the job, which frees its
rows at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.scheduler import Event, Failed, Finished, Handle, Scheduler
from yuyan.serve.guards import ApiError, user_error

POLL_S = 1.0  # how often a waiting non-streamed request checks that its client is still there


class ClientGone(Exception):
    """The client of a non-streamed request disconnected before its answer was ready."""


class Job:
    """The scheduler handles of one HTTP request and the asyncio queue their events arrive on."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Handle] = []

    def submit(self, prompts: list[list[int]], config: GenerationConfig, prompt_param: str = "prompt") -> Job:
        """Submit every prompt with the same config; any refusal cancels the ones already submitted and is
        raised as the `ApiError` that names the offending parameter."""
        try:
            for pi, ids in enumerate(prompts):
                self.handles.append(self.sched.submit(ids, config, emit=self._emitter(pi)))
        except UserError as e:
            self.cancel()
            raise user_error(e, prompt_param) from None
        except BaseException:
            self.cancel()
            raise
        return self

    def _emitter(self, pi: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:  # runs on the scheduler thread
            self.loop.call_soon_threadsafe(self.q.put_nowait, (pi, ev))

        return emit

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """(prompt index, event) until every choice finished. With `disconnected` (the request's
        `is_disconnected`), a client that left cancels the job and raises `ClientGone`."""
        left = sum(h.n for h in self.handles)
        while left:
            try:
                pi, ev = await asyncio.wait_for(self.q.get(), timeout=POLL_S)
            except (TimeoutError, asyncio.TimeoutError):
                if disconnected is not None and await disconnected():
                    self.cancel()
                    raise ClientGone() from None
                continue
            if isinstance(ev, Failed):
                self.cancel()
                raise _failure(ev)
            if isinstance(ev, Finished):
                left -= 1
            yield pi, ev


def _failure(ev: Failed) -> ApiError:
    if ev.invalid:  # e.g. settings that are each valid but together overflow the logits
        return ApiError(400, ev.message, None, "invalid_sampling")
    shutting = ev.shutdown
    return ApiError(
        503 if shutting else 500,
        ev.message,
        None,
        "shutting_down" if shutting else "internal_error",
        "server_error",
    )


__all__ = ["ClientGone", "Job"]
