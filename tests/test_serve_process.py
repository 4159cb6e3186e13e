"""The decode process (yuyan.generate.remote.DecodeProcess): the scheduler in a child process gives exactly
the in-process scheduler's events, carries background calls and their errors across, refuses what the
scheduler refuses, and fails requests (never hangs them) when the child dies; the child exits with its
parent, and stop() leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests._serve_util import serve, tiny_lm

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.remote import DecodeProcess
from yuyan.generate.scheduler import Finished, QueueFull, Scheduler, SchedulerClosed, Token
from yuyan.model.checkpoint import save_checkpoint
from yuyan.serve.guards import ApiError


def _configs() -> list[GenerationConfig]:
    rows = [
        dict(max_new_tokens=12, temperature=0.0),
        dict(max_new_tokens=9, temperature=1.0, seed=3, n=3, top_k=20),
        dict(max_new_tokens=10, temperature=0.8, seed=5, top_p=0.9, logprobs=2),
        dict(max_new_tokens=8, temperature=1.0, seed=7, repetition_penalty=1.3, stop=["\n"]),
    ]
    return [GenerationConfig.from_dict(r) for r in rows]


def _events(sched, prompts, configs) -> list[dict]:
    """Each request's events by choice, in order (how a request's choices interleave depends on when it
    was admitted, which is timing)."""
    handles = [sched.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
    out = []
    for h in handles:
        by_choice: dict[int, list] = {}
        for ev in h:
            by_choice.setdefault(ev.index, []).append(ev)
        out.append(by_choice)
    return out


def _exact(requests: list[dict]) -> list:
    return [
        {i: [(e.token_id, e.text) if isinstance(e, Token) else e for e in evs] for i, evs in c.items()}
        for c in requests
    ]


def _echo(context, x: int) -> tuple:
    """A background call: what it got, and what its context is in the process it runs in."""
    return x, type(context).__name__, os.getpid()


def _refuse(context, param: str) -> None:
    raise ApiError(400, f"bad {param}", param, "bad_value")


def test_decode_process_gives_the_in_process_schedulers_events(tokenizer):
    lm = tiny_lm(tokenizer)
    prompts = [tokenizer.encode(t) for t in ("def f(x):", "import os\n", "class A:", "x = [")]
    with Scheduler(lm.model, tokenizer, max_batch=8) as local:
        want = _events(local, prompts, _configs())
    with DecodeProcess(lm.model, tokenizer, max_batch=8, context={"k": 1}) as remote:
        assert remote.pid not in (None, os.getpid())
        got = _events(remote, prompts, _configs())
        # every choice's tokens (ids, text) and Finished event exactly; logprobs to float rounding (they
        # depend on which rows shared a batch, which is timing)
        assert _exact(got) == _exact(want)
        lp = [e.logprob for c in got for evs in c.values() for e in evs if getattr(e, "logprob", None)]
        ref = [e.logprob for c in want for evs in c.values() for e in evs if getattr(e, "logprob", None)]
        assert len(lp) == len(ref) > 0 and max(abs(a - b) for a, b in zip(lp, ref, strict=True)) < 1e-4
        assert [len(choices) for choices in got] == [1, 3, 1, 1]
        assert all(isinstance(evs[-1], Finished) for choices in got for evs in choices.values())
        # background calls run in the child with its copy of the context; their errors come back whole
        x, kind, pid = remote.background(_echo, 41).result(30)
        assert (x, kind, pid) == (41, "dict", remote.pid)
        with pytest.raises(ApiError) as e:
            remote.background(_refuse, "text").result(30)
        assert (e.value.status, e.value.param, e.value.code) == (400, "text", "bad_value")
        # refused in this process, as the scheduler refuses it
        with pytest.raises(UserError, match="beam search is not served"):
            remote.submit(prompts[0], GenerationConfig(max_new_tokens=2, num_beams=2))
        with pytest.raises(TypeError, match="background"):
            remote.run_exclusive(lambda: None)
        assert remote.stats()["running"] and remote.stats()["tokens_generated"] > 0
        child = remote.pid
    assert not Path(f"/proc/{child}").exists()  # stop() leaves no process
    with pytest.raises(SchedulerClosed):
        remote.submit(prompts[0], GenerationConfig(max_new_tokens=2))


def _park(context, parked: str, gate: str) -> None:
    Path(parked).touch()
    t0 = time.monotonic()
    while not Path(gate).exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)


def test_queue_full_and_cancel_cross_the_process(tokenizer, tmp_path):
    """The child's QueueFull reaches the caller with its retry-after; a cancelled request is dropped."""
    lm = tiny_lm(tokenizer)
    ids = tokenizer.encode("x")
    with DecodeProcess(lm.model, tokenizer, max_batch=1, max_queue=1) as remote:
        parked, gate = tmp_path / "parked", tmp_path / "gate"
        remote.background(_park, str(parked), str(gate))
        t0 = time.monotonic()
        while not parked.exists():
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        first = remote.submit(ids, GenerationConfig(max_new_tokens=3))
        with pytest.raises(QueueFull) as e:
            remote.submit(ids, GenerationConfig(max_new_tokens=3))
        assert e.value.retry_after >= 1
        first.cancel()
        gate.touch()
        t0 = time.monotonic()
        while remote.waiting:  # the child drops the cancelled request at its next step
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        after = list(remote.submit(ids, GenerationConfig(max_new_tokens=3)))
        assert isinstance(after[-1], Finished) and after[-1].completion_tokens == 3


def test_a_killed_decode_process_fails_its_requests_and_is_started_again(tokenizer, monkeypatch):
    """SIGKILL the decode process mid-stream: the stream ends with an error naming it, /health is a 503
    and new requests 503 until a new child decodes, then everything answers again; after RESTARTS deaths
    in the window it stays down."""
    from yuyan.generate import remote

    monkeypatch.setattr(remote, "RESTARTS", 1)
    with serve(tokenizer) as (base, lm, app):
        sched = app.state.scheduler
        body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 100_000, "stream": True}
        body["sliding_window"] = True  # generate until killed
        lines, first = [], sched.pid
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 5:
                    os.kill(first, signal.SIGKILL)
        assert any('"error"' in x and "decode process stopped" in x for x in lines), lines[-3:]
        health = httpx.get(base + "/health", timeout=10)
        if health.status_code == 503:  # it may be up again already
            assert health.json()["status"] == "stopped"
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
            assert r.status_code in (200, 503), r.text
        _wait_running(base)
        assert sched.pid != first
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = httpx.post(base + "/v1/embeddings", json={"model": "tiny", "input": "x"}, timeout=30)
        assert r.status_code == 200
        os.kill(sched.pid, signal.SIGKILL)  # the second death within the window: it stays down
        t0 = time.monotonic()
        while httpx.get(base + "/health", timeout=10).status_code == 200:
            assert time.monotonic() - t0 < 30
            time.sleep(0.05)
        time.sleep(1)
        health = httpx.get(base + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "stopped"
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
        assert r.status_code == 503 and "decode process stopped" in r.json()["error"]["message"]


def _wait_running(base: str) -> None:
    t0 = time.monotonic()
    while httpx.get(base + "/health", timeout=10).status_code != 200:
        assert time.monotonic() - t0 < 120, "the decode process was not started again"
        time.sleep(0.1)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(c) for c in text}
    return out


def test_the_decode_process_exits_with_its_parent(tokenizer, tmp_path):
    """`yuyan serve` SIGKILLed: its decode process reads the end of its command pipe and exits."""
    ckpt = save_checkpoint(tmp_path / "tiny", tiny_lm(tokenizer).model, tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "yuyan", "serve", "--model", str(ckpt), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["running"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 120, "yuyan serve did not start"
            time.sleep(0.2)
        decoders = [
            c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        assert decoders, "no decode process among the server's children"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200
        proc.kill()
        proc.wait(30)
        t0 = time.monotonic()
        while any(Path(f"/proc/{c}").exists() and _alive(c) for c in decoders):
            assert time.monotonic() - t0 < 30, "the decode process outlived its parent"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    """Not a zombie (a dead child of a dead parent is reaped by init soon, but may show for a moment)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
