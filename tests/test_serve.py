"""Serving: the continuous-batching scheduler against the engine, and the HTTP server through the official
`openai` client (completion and chat, streamed and not, stop strings, n > 1, API keys, 16 concurrent
seeded clients equal to the same requests run alone, generation past the context with the sliding window
equal to the engine's), error shapes, 429 when the queue is full, and the `yuyan serve` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path

import httpx
import openai
import pytest
from tests._serve_util import serve, tiny_lm

from yuyan.cli.serve import HELP as SERVE_HELP
from yuyan.generate.config import GenerationConfig
from yuyan.generate.engine import generate
from yuyan.generate.remote import DecodeProcess
from yuyan.generate.sampling import SamplingParams
from yuyan.generate.scheduler import Finished, QueueFull, Scheduler, SchedulerClosed, Token, run_to_completion
from yuyan.model.checkpoint import save_checkpoint
from yuyan.serve import ServeConfig

KEY = "sk-test-7f3a9c"
PROMPTS = [f"def f{i}(x):\n    return x" + " +" * (i % 5) for i in range(16)]


def _ref(lm, prompt, **kw) -> list:
    """The engine's completions for one prompt (text or ids): the reference the server must equal."""
    kw.setdefault("sliding_window", False)
    return generate(lm.model, lm.tokenizer, [prompt], GenerationConfig.from_dict(kw))[0]


# ------------------------------------------------------------------------------------------ scheduler
def _hold(sched) -> threading.Event:
    """Park the scheduler thread until the returned event is set (it is parked when this returns). In a
    decode process the parking call is a background call that waits for a file."""
    if isinstance(sched, DecodeProcess):
        return _hold_remote(sched)
    parked, gate = threading.Event(), threading.Event()
    sched.run_exclusive(lambda: (parked.set(), gate.wait(60)))
    assert parked.wait(30)
    return gate


def _park(_context, parked: str, gate: str) -> None:
    """Runs in the decode process: say it is parked, then wait for the gate file (60 s at most)."""
    Path(parked).touch()
    t0 = time.monotonic()
    while not Path(gate).exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)


class _FileGate:
    def __init__(self, path: Path):
        self.path = path

    def set(self) -> None:
        self.path.touch()


def _hold_remote(sched) -> _FileGate:
    folder = Path(tempfile.mkdtemp())
    parked, gate = folder / "parked", folder / "gate"
    sched.background(_park, str(parked), str(gate))
    t0 = time.monotonic()
    while not parked.exists():
        assert time.monotonic() - t0 < 30, "the decode process did not park"
        time.sleep(0.01)
    return _FileGate(gate)


def test_scheduler_matches_engine(tokenizer, family):
    """Requests decoded together (queued, admitted mid-run, mixed n/settings/lengths) give exactly what
    engine.generate gives for each request alone."""
    lm = tiny_lm(tokenizer, family)
    cases = []
    for i, text in enumerate(PROMPTS[:10]):
        temp = 0.0 if i % 4 == 0 else 1.0
        kw = dict(
            temperature=temp,
            seed=i,
            n=1 + i % 3,
            top_k=(0 if i % 3 else 20),
            top_p=(0.9 if i % 5 == 1 else 1.0),
            frequency_penalty=(0.5 if i % 2 else 0.0),
        )
        cases.append((tokenizer.encode(text), kw, 6 + i))
    with Scheduler(lm.model, tokenizer, max_batch=5, max_queue=64) as s:
        handles = [
            s.submit(ids, GenerationConfig(max_new_tokens=mt, sampling=SamplingParams(**kw)))
            for ids, kw, mt in cases
        ]
        results = [run_to_completion(h, timeout=120) for h in handles]
    for (ids, kw, mt), res in zip(cases, results, strict=True):
        ref = _ref(lm, ids, max_new_tokens=mt, **kw)
        assert [r.text for r in res] == [c.text for c in ref]
        assert [r.finish_reason for r in res] == [c.finish_reason for c in ref]
        assert [r.completion_tokens for r in res] == [len(c.token_ids) for c in ref]


def test_scheduler_cancel_frees_row_and_queue_bounds(tokenizer):
    lm = tiny_lm(tokenizer)
    ids = tokenizer.encode("import os")
    s = Scheduler(lm.model, tokenizer, max_batch=1, max_queue=2)
    with pytest.raises(SchedulerClosed):
        s.submit(ids, GenerationConfig(max_new_tokens=4))
    with s:
        # a request that cancels itself at its 3rd token: its row leaves before a 4th token is sampled
        got: list = []
        holder: dict = {}

        def emit(ev):
            got.append(ev)
            if sum(isinstance(e, Token) for e in got) == 3:
                holder["h"].cancel()

        gate = _hold(s)  # hold the scheduler thread so that the queue state is deterministic
        greedy = SamplingParams(temperature=0)
        holder["h"] = s.submit(
            ids, GenerationConfig(max_new_tokens=50, sampling=greedy, stop_token_ids=[]), emit=emit
        )
        other = s.submit(ids, GenerationConfig(max_new_tokens=5, sampling=greedy, stop_token_ids=[]))
        with pytest.raises(QueueFull):
            s.submit(ids, GenerationConfig(max_new_tokens=4))
        gate.set()
        fin = run_to_completion(other, timeout=60)  # max_batch 1: it only runs once the cancelled row left
        assert fin[0].completion_tokens == 5
        assert sum(isinstance(e, Token) for e in got) == 3 and not any(isinstance(e, Finished) for e in got)
        strict = dict(context_overflow="error", sliding_window=False)
        for bad in [dict(max_new_tokens=0), dict(max_new_tokens=lm.model.config.block_size, **strict)]:
            with pytest.raises(Exception, match="max_tokens|context"):
                s.submit(ids, GenerationConfig(**bad))
        assert s.stats()["waiting"] == 0


# ------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(tokenizer):
    with serve(tokenizer, api_key=KEY, max_batch=16, max_n=8) as (base, lm, app):
        yield base, lm, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _stream_text(stream, chat: bool) -> tuple[dict[int, str], dict[int, str], dict | None]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            piece = (c.delta.content if chat else c.text) or ""
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_completions_and_chat_match_engine(server, client):
    base, lm, _ = server
    tok = lm.tokenizer
    prompt = PROMPTS[3]
    ref = _ref(lm, prompt, temperature=1.0, seed=7, max_new_tokens=12)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, seed=7)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(
        ref.token_ids
    )
    s = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = _stream_text(s, chat=False)
    assert texts == {0: ref.text} and finish == {0: ref.finish_reason}
    assert usage.completion_tokens == len(ref.token_ids)
    # chat: the tokenizer's chat template, ended by the chat stop tokens
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好, what is 2+2?"}]
    ids, _ = tok.apply_chat_template(msgs, add_generation_prompt=True)
    cref = _ref(lm, ids, temperature=0.8, seed=3, max_new_tokens=15, stop_token_ids=tok.chat_stop_ids)[0]
    c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, seed=3, temperature=0.8)
    assert c.choices[0].message.content == cref.text and c.choices[0].message.role == "assistant"
    assert c.usage.prompt_tokens == len(ids)
    s = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=15, seed=3, temperature=0.8, stream=True
    )
    texts, finish, _ = _stream_text(s, chat=True)
    assert texts == {0: cref.text} and finish == {0: cref.finish_reason}
    # logprobs: the chosen token's logprob is the largest of the top alternatives under greedy decoding
    lp = (
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
        )
        .choices[0]
        .logprobs.content
    )
    assert len(lp) >= 1 and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in lp)


def test_stop_strings_and_n(server, client):
    base, lm, _ = server
    prompt = PROMPTS[5]
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, seed=11).choices[0].text
    i = next(
        i for i in range(3, len(full) - 2) if full.find(full[i : i + 2]) == i and full[i : i + 2].strip()
    )
    stop = full[i : i + 2]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, seed=11, stop=[stop, "@@never"])
    assert r.choices[0].text == full[:i] and r.choices[0].finish_reason == "stop"
    texts, finish, _ = _stream_text(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, seed=11, stop=stop, stream=True
        ),
        chat=False,
    )
    assert texts == {0: full[:i]} and finish == {0: "stop"}
    # n > 1: choice j samples with seed + j, as engine.generate does
    ref = _ref(lm, prompt, temperature=1.0, seed=5, n=3, max_new_tokens=8)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, seed=5, n=3)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [c.text for c in ref]
    assert len({c.text for c in ref}) > 1
    texts, _, _ = _stream_text(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=5, n=2, stream=True
        ),
        chat=True,
    )
    assert sorted(texts) == [0, 1]


def test_api_key_and_public_paths(server):
    base, _, _ = server
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for path in ["/v1/models", "/openapi.json"]:
        r = httpx.get(base + path)
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert (
        httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        == "tiny"
    )
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert "yuyan" in httpx.get(base + "/").text and httpx.get(base + "/static/app.js").status_code == 200


def test_16_concurrent_streams_equal_sequential(server, client):
    """16 seeded streaming clients at once give the same texts as the same requests one at a time."""
    base, lm, app = server
    reqs = [
        dict(prompt=p, max_tokens=10 + i % 7, seed=100 + i, temperature=1.0 if i % 3 else 0.0)
        for i, p in enumerate(PROMPTS)
    ]
    alone = [client.completions.create(model="tiny", **r).choices[0].text for r in reqs]
    out: list = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def worker(i):
        barrier.wait()
        s = client.completions.create(model="tiny", stream=True, **reqs[i])
        out[i] = _stream_text(s, chat=False)[0].get(0, "")

    steps0 = app.state.scheduler.steps
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == alone
    # batched: far fewer decode steps than tokens (sequential decoding would need one step per token)
    tokens = sum(r["max_tokens"] for r in reqs)
    assert app.state.scheduler.steps - steps0 < tokens / 2
    ref = [
        _ref(lm, r["prompt"], temperature=r["temperature"], seed=r["seed"], max_new_tokens=r["max_tokens"])[
            0
        ].text
        for r in reqs[:4]
    ]
    assert out[:4] == ref


def test_sliding_window_past_the_context_equals_generate(tokenizer, family):
    """With `sliding_window: true` a completion runs past the context and gives exactly what generate()
    gives with the sliding window, for learned and RoPE positions; without it the server keeps OpenAI's
    contract (a 400), and `ServeConfig.sliding_window` turns it on for every request."""
    prompt = PROMPTS[7]
    with serve(tokenizer, family) as (base, lm, app):
        C = app.state.scheduler.block_size
        mt = 2 * C
        n_prompt = len(lm.tokenizer.encode(prompt))
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt=prompt, max_tokens=mt)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
        for kw in [dict(temperature=0.0), dict(temperature=1.0, seed=3)]:
            ref = _ref(lm, prompt, max_new_tokens=mt, sliding_window=True, **kw)[0]
            assert n_prompt + len(ref.token_ids) > C  # the window really slid
            window = {"sliding_window": True}
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=mt, extra_body=window, **kw)
            assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
            assert r.usage.completion_tokens == len(ref.token_ids)
            s = c.completions.create(
                model="tiny", prompt=prompt, max_tokens=mt, extra_body=window, stream=True, **kw
            )
            texts, finish, _ = _stream_text(s, chat=False)
            assert texts == {0: ref.text} and finish == {0: ref.finish_reason}
    with serve(tokenizer, family, sliding_window=True) as (base, lm, app):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        ref = _ref(lm, prompt, max_new_tokens=mt, sliding_window=True, temperature=0)[0]
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=mt, temperature=0)
        assert r.choices[0].text == ref.text
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(
                model="tiny", prompt=prompt, max_tokens=mt, extra_body={"sliding_window": False}
            )
        assert e.value.body["code"] == "context_length_exceeded"


BAD = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "5"}).encode(),
        400,
        "int_type",
    ),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, None),
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1000}).encode(),
        400,
        "context_length_exceeded",
    ),
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode(),
        400,
        "context_length_exceeded",
    ),
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x", "n": 9}).encode(),
        400,
        "too_many_completions",
    ),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "temperature": 3}).encode(), 400, None),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "stop": ["a"] * 5}).encode(), 400, None),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [99999]}).encode(), 400, None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": NaN}', 400, "finite_number"),
    ("/v1/completions", b"[" * 50000, 400, None),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": []}).encode(), 400, None),
    (
        "/v1/chat/completions",
        json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).encode(),
        400,
        None,
    ),
    (
        "/v1/chat/completions",
        json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        ).encode(),
        400,
        None,
    ),
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x", "temperature": 1e-44}).encode(),
        400,
        "invalid_sampling",
    ),  # each setting valid, together they overflow the logits (found by the 10k fuzz)
    (
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "x", "repetition_penalty": 5e-324}).encode(),
        400,
        None,
    ),
    ("/v1/inspect/attention", json.dumps({"text": ""}).encode(), 400, None),
    ("/v1/nothing", b"{}", 404, "not_found"),
    ("/v1/completions", b"x" * (1 << 20 + 1), 413, "request_too_large"),
]


@pytest.mark.parametrize(
    "path,body,status,code", BAD, ids=[f"{i}-{b[:20]!r}" for i, (_, b, _, _) in enumerate(BAD)]
)
def test_error_shapes(server, path, body, status, code):
    base, _, _ = server
    r = httpx.post(
        base + path,
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_queue_full_gives_429_with_retry_after(tokenizer):
    with serve(tokenizer, max_batch=1, max_queue=1) as (base, lm, app):
        sched = app.state.scheduler
        gate = _hold(sched)  # the scheduler thread waits: requests stay queued
        ids = lm.tokenizer.encode("x")
        first = sched.submit(ids, GenerationConfig(max_new_tokens=2))
        try:
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert httpx.get(base + "/health").status_code == 200
        finally:
            gate.set()
        run_to_completion(first, timeout=30)
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_in_flight_bound_gives_429_and_health_still_answers(tokenizer):
    with serve(tokenizer, max_connections=1) as (base, lm, app):
        sched = app.state.scheduler
        gate = _hold(sched)
        first: list = []
        t = threading.Thread(
            target=lambda: first.append(
                httpx.post(
                    base + "/v1/completions",
                    json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                    timeout=60,
                )
            )
        )
        try:
            t.start()
            t0 = time.monotonic()
            while (
                sched.stats()["waiting"] < 1
            ):  # the first request is in flight, queued behind the parked thread
                assert time.monotonic() - t0 < 30
                time.sleep(0.01)
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert (
                r.status_code == 429
                and r.headers["Retry-After"]
                and r.json()["error"]["code"] == "too_many_requests"
            )
            assert httpx.get(base + "/health").status_code == 200  # /health is never limited
        finally:
            gate.set()
            t.join(60)
        assert first[0].status_code == 200


# ------------------------------------------------------------------------------------------ the command
def test_serve_cli_refuses_public_bind_and_serves(run_cli, tokenizer, tmp_path):
    tiny_checkpoint = save_checkpoint(tmp_path / "tiny-ckpt", tiny_lm(tokenizer).model, tokenizer)
    p = run_cli("serve", "--model", tiny_checkpoint, "--host", "0.0.0.0")
    assert (
        p.returncode == 2
        and "error: refusing to serve on non-loopback" in p.stderr
        and "Traceback" not in p.stderr
    )
    # every ServeConfig field is an option (derived from the dataclass, with its own help line)
    help_text = run_cli("serve", "--help").stdout
    for f in fields(ServeConfig):
        assert "--" + f.name.replace("_", "-") in help_text and f.name in SERVE_HELP
    p = run_cli("serve", "--model", tiny_checkpoint, "--body-timeout-s", "0")
    assert p.returncode == 2 and "error: --body-timeout-s must be a positive" in p.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "sk-cli-secret-91e2"
    env = {**os.environ, "YUYAN_API_KEY": secret, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "yuyan",
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--max-batch",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 60, "server did not start"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0)
        name = c.models.list().data[0].id
        assert name == tiny_checkpoint.name
        assert c.completions.create(model=name, prompt="def", max_tokens=3).usage.completion_tokens >= 1
        assert (
            httpx.get(base + "/v1/models", headers={"Authorization": "Bearer " + secret[:-1]}).status_code
            == 401
        )
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert secret not in out and secret[:-1] not in out  # no secret is ever logged
    assert "API key required" in out
