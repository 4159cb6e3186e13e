"""yuyan.progress: a bar on a terminal, timed log lines elsewhere (the training run's own lines are checked
through a pipe in test_classify_labels.py)."""

from __future__ import annotations

import io

from rich.console import Console

from yuyan import progress as P


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=80), buf


def test_lines_every_interval_and_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    console, buf = _console(terminal=False)
    with P.Progress(console=console, log_seconds=10, unit="steps") as bar:
        task = bar.add_task("train", total=100, info="")
        for step in range(1, 61):
            clock[0] += 0.5  # 2 steps/s
            bar.update(task, completed=step, info=f"loss {5 - step / 30:.3f}")
    lines = buf.getvalue().splitlines()
    # a line after 10 s (step 20), 20 s (step 40), 30 s (step 60); none at the end: step 60 was said
    assert [ln.split(",")[0] for ln in lines] == [
        "train: 20/100 steps (20%)",
        "train: 40/100 steps (40%)",
        "train: 60/100 steps (60%)",
    ]
    assert lines[0] == "train: 20/100 steps (20%), 2 steps/s, elapsed 0:00:10, ETA 0:00:40, loss 4.333"
    assert "━" not in buf.getvalue()  # no bar drawn into a file


def test_last_line_when_work_ends_between_intervals(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    console, buf = _console(terminal=False)
    with P.Progress(console=console, log_seconds=10, unit="bytes") as bar:
        task = bar.add_task("tokenizing", total=3000)
        clock[0] = 3.0
        bar.advance(task, 3000)
    assert buf.getvalue().splitlines() == [
        "tokenizing: 3,000/3,000 bytes (100%), 1,000 bytes/s, elapsed 0:00:03, ETA 0:00:00"
    ]


def test_terminal_gets_the_bar_and_disabled_gets_nothing():
    console, buf = _console(terminal=True)
    with P.Progress(console=console, log_seconds=0) as bar:
        bar.update(bar.add_task("train", total=2), completed=2)
    assert not bar.log_lines and "train:" not in buf.getvalue()
    console, buf = _console(terminal=False)
    with P.Progress(console=console, log_seconds=0, disable=True) as bar:
        bar.update(bar.add_task("train", total=2), completed=2)
    assert buf.getvalue() == ""
