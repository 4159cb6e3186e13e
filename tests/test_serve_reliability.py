"""The server under hostile connections and input (issue 15): idle and slow sockets are closed by their
deadlines and never cost /health or other clients their answers, the Host header is checked against DNS
rebinding, a lone surrogate anywhere in a request is a 400 naming the field, a model that yields
non-finite logits is refused at start, and oversized prompts are refused before they are tokenised."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
import torch
from tests._serve_util import serve, tiny_lm

from yuyan.errors import UserError
from yuyan.serve import ServeConfig, create_app

COMPLETION = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 3}


def _port(base: str) -> int:
    return urlparse(base).port


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (what it sent first is ignored)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_sockets_are_closed_and_health_answers(tokenizer):
    """300 idle sockets (no byte sent) and 20 that trickle header bytes: the cap of 100 open connections
    closes the oldest idle ones, /health and a completion answer at once, and every one of the idle and
    trickling sockets is closed by the header deadline."""
    with serve(tokenizer, header_timeout_s=1.5, max_open_connections=100) as (base, _, _):
        port = _port(base)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        trickle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in trickle:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finish
        try:
            t0 = time.monotonic()
            r = httpx.get(base + "/health", timeout=10)
            assert r.status_code == 200 and time.monotonic() - t0 < 5
            assert httpx.post(base + "/v1/completions", json=COMPLETION, timeout=30).status_code == 200
            for s in trickle[-5:]:  # a trickle of header bytes does not extend the deadline
                s.sendall(b"X-Slow: 1\r\n")
            open_after = [s for s in idle + trickle if not _closed_by_server(s, within=6)]
            assert not open_after, f"{len(open_after)} idle sockets still open after the header deadline"
        finally:
            for s in idle + trickle:
                s.close()


def _slow_body(port: int, stop: threading.Event, replies: list, i: int) -> None:
    """A chunked POST whose body never ends: one byte every 0.2 s until the server answers."""
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
    )
    s.sendall(head.encode())
    s.settimeout(0.2)
    got = b""
    try:
        while not stop.is_set():
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            except TimeoutError:
                s.sendall(b"1\r\n \r\n")
    except OSError:
        pass
    finally:
        s.close()
        replies[i] = got


def test_slow_bodies_get_408_and_others_are_served(tokenizer):
    """With 2 requests allowed in flight, 6 bodies that never end do not make anyone else's request a
    429: they are not in flight until read; each gets a 408 at its body deadline and is closed."""
    with serve(tokenizer, max_connections=2, body_timeout_s=2.0) as (base, _, _):
        stop = threading.Event()
        replies: list = [None] * 6
        threads = [
            threading.Thread(target=_slow_body, args=(_port(base), stop, replies, i)) for i in range(6)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)  # every slow body has started
            for _ in range(3):
                r = httpx.post(base + "/v1/completions", json=COMPLETION, timeout=30)
                assert r.status_code == 200, r.text
            for t in threads:
                t.join(15)
        finally:
            stop.set()
        assert all(r is not None and r.startswith(b"HTTP/1.1 408") for r in replies), replies
        assert all(b"request_timeout" in r for r in replies)


def test_body_answered_by_413_is_drained_for_a_deadline_at_most(tokenizer):
    """A declared 1 GB body is a 413 before a byte of it is read; a client that keeps sending it anyway
    is closed at the header deadline."""
    with serve(tokenizer, header_timeout_s=1.0) as (base, _, _):
        s = socket.create_connection(("127.0.0.1", _port(base)))
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n\r\n"
        s.sendall(head + b"x" * 1000)
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 10:
                s.sendall(b"x" * 100)
                time.sleep(0.1)
            closed = False
        except OSError:
            closed = True
        s.close()
        assert closed and time.monotonic() - t0 < 5


def test_host_header_check_against_dns_rebinding(tokenizer):
    with serve(tokenizer) as (base, _, _):
        for host in ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]", "LOCALHOST."]:
            r = httpx.get(base + "/v1/models", headers={"Host": host}, timeout=10)
            assert r.status_code == 200, (host, r.text)
        for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil"]:
            for path in ["/v1/models", "/health", "/"]:
                r = httpx.get(base + path, headers={"Host": host}, timeout=10)
                assert r.status_code == 421, (host, path, r.status_code)
                err = r.json()["error"]
                assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]
        r = httpx.post(base + "/v1/completions", json=COMPLETION, headers={"Host": "evil.example"})
        assert r.status_code == 421
    with serve(tokenizer, host="10.1.2.3", allowed_hosts=["My.Box"]) as (base, _, _):
        for host, status in [("my.box:8000", 200), ("10.1.2.3:8000", 200), ("evil.example", 421)]:
            assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == status, host
    with serve(tokenizer, allowed_hosts=["*"]) as (base, _, _):
        assert httpx.get(base + "/v1/models", headers={"Host": "evil.example"}).status_code == 200


SURROGATES = [  # (path, JSON body with a lone surrogate escape, the param the 400 must name)
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "user": "\\udc00"}', "user"),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}',
        "messages.0.name",
    ),
    ("/v1/inspect/attention", '{"text": "abc\\ud800"}', "text"),
]


def test_lone_surrogates_are_a_400_naming_the_field(tokenizer):
    with serve(tokenizer) as (base, _, _):
        for path, body, param in SURROGATES:
            r = httpx.post(
                base + path, content=body, headers={"Content-Type": "application/json"}, timeout=30
            )
            assert r.status_code == 400, (body, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"].startswith(param), (body, err)
        pair = '{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'  # a valid pair: U+1F600
        r = httpx.post(base + "/v1/completions", content=pair, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_model_with_non_finite_logits_is_refused_at_start(tokenizer):
    lm = tiny_lm(tokenizer)
    create_app(lm, ServeConfig(model_name="fine"))  # the same model, healthy: accepted
    with torch.no_grad():
        lm.model.lm_head.weight[3, 5] = float("nan")
    with pytest.raises(UserError, match="model 'broken' produced non-finite logits"):
        create_app(lm, ServeConfig(model_name="broken"))


@pytest.mark.parametrize("decode_process", [False, True])
def test_oversized_prompts_are_refused_before_tokenising(tokenizer, monkeypatch, decode_process):
    """A 1 MB prompt (text, chat or ids) is a 400 without reaching the tokenizer; the prompts that are
    tokenised are tokenised on the prepare thread (never the event loop), by the GIL-free encode_batch;
    an inspection's text on the decoding side (the scheduler thread, or the decode process)."""
    calls: list[tuple[str, str, int]] = []  # (method, thread, characters)
    real, real_encode = type(tokenizer).encode_batch, type(tokenizer).encode

    def spy(self, texts):
        calls.append(("encode_batch", threading.current_thread().name, sum(len(t) for t in texts)))
        return real(self, texts)

    def spy_encode(self, text):
        calls.append(("encode", threading.current_thread().name, len(text)))
        return real_encode(self, text)

    monkeypatch.setattr(type(tokenizer), "encode_batch", spy)
    monkeypatch.setattr(type(tokenizer), "encode", spy_encode)
    big = "def f(x): return x\n" * 50_000  # ~1 MB
    with serve(tokenizer, max_body_bytes=2 << 20, decode_process=decode_process) as (base, _, app):
        cases = [
            ("/v1/completions", {"model": "tiny", "prompt": big}, "prompt"),
            ("/v1/completions", {"model": "tiny", "prompt": ["x", big]}, "prompt"),
            ("/v1/completions", {"model": "tiny", "prompt": [5] * 100_000}, "prompt"),
            (
                "/v1/chat/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": big}]},
                "messages",
            ),
        ]
        for path, body, param in cases:
            r = httpx.post(base + path, json=body, timeout=30)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert calls == []  # not one character of them was tokenised
        r = httpx.post(base + "/v1/completions", json=COMPLETION, timeout=30)
        assert r.status_code == 200
        r = httpx.post(base + "/v1/inspect/attention", json={"text": big[:90_000]}, timeout=30)
        keep = min(app.state.config.inspect_max_tokens, app.state.scheduler.block_size)
        tail = real(tokenizer, [big[:90_000]])[0][-keep:]  # the whole text's last tokens
        assert r.status_code == 200 and "".join(r.json()["tokens"]) == tokenizer.decode(tail)
    batches = [(thread, n) for fn, thread, n in calls if fn == "encode_batch"]
    # the completion's prompt is tokenised on the prepare thread, the inspection's text on the scheduler
    # thread (a background call within its share of the decode thread's time; in the decode process, out
    # of this one's sight): never on the event loop
    decoding_side = [] if decode_process else ["yuyan-scheduler"]
    assert [thread for thread, _ in batches] == ["yuyan-prepare_0", *decoding_side]
    assert max(n for _, _, n in calls) < 10_000  # the attention view tokenised the text's end only


def test_a_body_too_big_for_any_fitting_prompt_is_refused_unread(tokenizer):
    """A completion body larger than any request whose prompts fit the model is a 400 by its Content-Length
    alone: the server answers before a byte of it arrives (parsing hostile megabytes held the GIL beside
    every stream) and closes the connection."""
    import json
    import socket
    from urllib.parse import urlsplit

    with serve(tokenizer, max_body_bytes=8 << 20, body_timeout_s=20) as (base, _, app):
        url = urlsplit(base)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
        )
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(head.encode())  # and no body at all
            chunks = []
            while chunk := sock.recv(65536):  # the server answers, then closes: read to the end
                chunks.append(chunk)
            reply = b"".join(chunks).decode()
        assert reply.startswith("HTTP/1.1 400") and "context_length_exceeded" in reply, reply[:300]
        assert "connection: close" in reply.lower()
        # a chunked body (no Content-Length) is refused once it grows past the bound, not at --max-body-bytes
        big = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}).encode()
        r = httpx.post(
            base + "/v1/completions", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert "request body holds more prompt" in err["message"]  # the body bound, not the prompt check
        r = httpx.post(base + "/v1/completions", json=COMPLETION, timeout=30)  # the server is fine
        assert r.status_code == 200


def test_background_calls_take_a_bounded_share_of_the_decode_thread(tokenizer):
    """Inspections and embeddings run on the scheduler thread as background calls: while a row decodes,
    their time stays within the background share of the decode time (plus the burst and one call), however
    many wait; with no row decoding they run at once. Each call here holds the thread 30 ms."""
    from yuyan.generate.config import GenerationConfig
    from yuyan.generate.scheduler import BACKGROUND_BURST_S, Scheduler

    lm = tiny_lm(tokenizer)
    spent = []

    def call():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.03:
            pass
        spent.append((time.perf_counter() - t0, sched.active))
        return len(spent)

    with Scheduler(lm.model, tokenizer, max_batch=2, max_queue=64) as sched:
        assert sched.run_exclusive(call, background=True).result(30) == 1  # idle: at once
        cfg = GenerationConfig.from_dict({"max_new_tokens": 300, "temperature": 0, "sliding_window": True})
        h = sched.submit(tokenizer.encode("def f(x):"), cfg)
        events = iter(h)
        next(events)  # decoding has begun
        t_start, steps0 = time.perf_counter(), sched.steps
        futs = [sched.run_exclusive(call, background=True) for _ in range(20)]
        for _ in events:
            pass
        t_decode = time.perf_counter() - t_start
        beside = sum(d for d, active in spent[1:] if active)
        assert sched.steps - steps0 >= 100  # most of the decoding happened beside the waiting calls
        bound = sched.background_share * (t_decode - beside) + BACKGROUND_BURST_S + 0.03
        assert beside <= bound * 1.1, (beside, t_decode)
        assert all(f.result(60) for f in futs)  # the rest ran once the row was done
