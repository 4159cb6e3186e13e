"""Progress for long work, on a terminal and off it: rich's live bar, or log lines.

A live bar redraws itself in place, which only a terminal shows; written to a file or a pipe (a job's log,
`2> train.log`, CI), rich prints it once, at the end, so hours of work would show nothing until then.
`Progress` is rich's `Progress` that, when its console is not a terminal, draws no bar and instead prints
one plain line every `log_seconds` (and a last one when it stops) per task:
`train: 120/300 (40%), 2.31/s, elapsed 0:00:52, ETA 0:01:18, loss 3.214 ...`. Every progress display in
yuyan (training, prepare, the evaluators) is made here.
"""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import TaskID

LOG_SECONDS = 10.0  # seconds between log lines when the output is not a terminal


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress(RichProgress):
    """rich.progress.Progress on a terminal; log lines every `log_seconds` elsewhere (see the module)."""

    def __init__(
        self,
        *columns,
        console: Console | None = None,
        log_seconds: float = LOG_SECONDS,
        unit: str = "",
        **kwargs,
    ):
        console = console or Console(stderr=True)
        disabled = bool(kwargs.pop("disable", False)) or console.quiet
        self.log_lines = not disabled and not console.is_terminal
        super().__init__(*columns, console=console, disable=disabled or self.log_lines, **kwargs)
        self.log_seconds, self.unit = log_seconds, unit
        self._log_console = console
        self._started: dict[TaskID, tuple[float, float]] = {}  # task -> (clock, completed) at its start
        self._logged: dict[TaskID, tuple[float, float]] = {}  # task -> (clock, completed) at its last line

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        now = time.monotonic()
        self._started[task_id] = (now, float(self._tasks[task_id].completed))
        self._logged[task_id] = (now, float(self._tasks[task_id].completed))
        return task_id

    def update(self, task_id: TaskID, *args, **kwargs) -> None:
        super().update(task_id, *args, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def stop(self) -> None:
        if self.log_lines:
            for task_id in list(self._started):
                if self._logged[task_id][1] != self._tasks[task_id].completed:  # not said yet
                    self._log(task_id, time.monotonic())
        super().stop()

    def _maybe_log(self, task_id: TaskID) -> None:
        if not self.log_lines:
            return
        now = time.monotonic()
        if now - self._logged[task_id][0] >= self.log_seconds:
            self._log(task_id, now)

    def log_line(self, task_id: TaskID, now: float | None = None) -> str:
        """The task's progress as one line: count, rate, elapsed time, ETA and its `info` field."""
        task = self._tasks[task_id]
        now = time.monotonic() if now is None else now
        t0, c0 = self._started[task_id]
        elapsed = now - t0
        done = float(task.completed)
        rate = (done - c0) / elapsed if elapsed > 0 else 0.0
        count = f"{done:,.0f}"
        parts = []
        if task.total:
            count += f"/{task.total:,.0f}"
        count += f" {self.unit}" if self.unit else ""
        if task.total:
            count += f" ({100 * done / task.total:.0f}%)"
        parts.append(f"{task.description}: {count}")
        parts.append(
            f"{rate:,.3g} {self.unit or 'steps'}/s"
            if rate < 1000
            else f"{rate:,.0f} {self.unit or 'steps'}/s"
        )
        parts.append(f"elapsed {_clock(elapsed)}")
        if task.total and rate > 0:
            parts.append(f"ETA {_clock((task.total - done) / rate)}")
        info = task.fields.get("info")
        if info:
            parts.append(str(info))
        return ", ".join(parts)

    def _log(self, task_id: TaskID, now: float) -> None:
        self._logged[task_id] = (now, float(self._tasks[task_id].completed))
        self._log_console.print(self.log_line(task_id, now), soft_wrap=True, markup=False, highlight=False)


__all__ = ["Progress", "LOG_SECONDS"]
