"""The server under hostile clients: idle-socket and slow-body floods, and oversized requests beside a stream.

Starts `yuyan serve` in a subprocess on a demo-sized model (random weights, a tokenizer trained in-process)
and measures three things, printing one JSON line:

- idle flood: --idle sockets opened and never written to, plus a tenth as many that trickle header bytes;
  while they are open, /health is timed every 50 ms and a completion is sent every 250 ms; reports the
  non-200 answers (must be 0) and /health latency. The header deadline then closes every flood socket.
- slow-body flood: --slow-bodies chunked POSTs that send one byte every 0.5 s and never end; /health and
  completions as above (no 429 may come of the slow bodies: they are not in flight until read).
- a stream beside oversized requests: one client streams completions and its time per token (first to
  last streamed token / tokens - 1) is measured alone and while --hostile clients send ~1 MB prompts
  (refused with 400) and 100,000-character attention inspections back to back; the phases alternate
  --rounds times so that machine drift hits both. The reference is the time per token alone, ours is the
  time beside the hostile clients, and the ratio is ours over it (goal: <= 1.5).

`--pin` (the default where there are 2+ cores) runs the server on core 0 and every client (the measured
stream and the hostile ones) on the other cores: on a 2-core machine the hostile clients' own work (making
and sending 1 MB bodies, parsing 400s) otherwise takes the server's core, and the figure measures the
clients as much as the server. `--no-pin` keeps the old, shared set-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.soak import _make_model, _percentile, free_port, start_server  # noqa: E402

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 10, 8  # the server's deadlines here (8 s: to see the 408s soon)


def _probe(base: str, model: str, seconds: float) -> dict:
    """/health every 50 ms and a completion every 250 ms for `seconds`: statuses and /health latency."""
    lat, statuses = [], {}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as c:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                code = c.get("/health").status_code
                lat.append((time.perf_counter() - t0) * 1000)
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[f"health {code}"] = statuses.get(f"health {code}", 0) + 1
            if i % 5 == 0:
                try:
                    body = {"model": model, "prompt": "def f(x):", "max_tokens": 4}
                    code = c.post("/v1/completions", json=body).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                statuses[f"completion {code}"] = statuses.get(f"completion {code}", 0) + 1
            i += 1
            time.sleep(0.05)
    ok = sum(v for k, v in statuses.items() if k.endswith(" 200"))
    return {
        "statuses": statuses,
        "non_200": sum(statuses.values()) - ok,
        "health_ms": {
            "n": len(lat),
            "p50": round(statistics.median(lat), 2) if lat else None,
            "p95": round(_percentile(lat, 0.95), 2),
            "max": round(max(lat), 2) if lat else None,
        },
    }


def _closed(s: socket.socket, within: float) -> bool:
    """Whether the server closes the socket within `within` seconds."""
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset by the server
        pass
    return True


def idle_flood(base: str, model: str, port: int, n: int, seconds: float) -> dict:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    trickle = [socket.create_connection(("127.0.0.1", port)) for _ in range(max(1, n // 10))]
    for s in trickle:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = time.monotonic()
    res = {"sockets": n + len(trickle), **_probe(base, model, seconds)}
    left = HEADER_TIMEOUT_S + 5 - (time.monotonic() - t0)
    res["closed_by_header_deadline"] = sum(_closed(s, max(0.1, left)) for s in socks + trickle)
    for s in socks + trickle:
        s.close()
    return res


def _slow_body(port: int, stop: threading.Event, answers: list) -> None:
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
        )
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                got = s.recv(64)
                answers.append(got.split(b"\r\n")[0].decode(errors="replace") or "closed")
                return
            except TimeoutError:
                s.sendall(b"1\r\n \r\n")
    except OSError as e:
        answers.append(type(e).__name__)


def slow_body_flood(base: str, model: str, port: int, n: int, seconds: float) -> dict:
    stop, answers = threading.Event(), []
    threads = [threading.Thread(target=_slow_body, args=(port, stop, answers), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(1)
    res = {"bodies": n, **_probe(base, model, seconds)}
    for t in threads:  # each is answered at the server's body deadline
        t.join(BODY_TIMEOUT_S + 5)
    stop.set()
    res["slow_body_answers"] = {a: answers.count(a) for a in set(answers)}
    return res


def _stream_tpot(c: httpx.Client, model: str, max_tokens: int) -> float | None:
    """ms per token of one streamed completion: from sending it to its last token, over its tokens (a
    stall anywhere counts, and tokens that arrive in a burst after one do not hide it)."""
    body = {
        "model": model,
        "prompt": "def f(x):",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stop": [],
    }
    t0, last, n = time.perf_counter(), None, 0
    with c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"finish_reason": null' in line:
                last, n = time.perf_counter(), n + 1
    return (last - t0) / n * 1000 if n > 2 else None


def _hostile(base: str, model: str, stop, counts, w: int, kinds: tuple[str, ...]) -> None:
    """One hostile client (its own process, so that building 1 MB bodies never takes the measuring
    client's GIL)."""
    big = "def f(x): return x\n" * 50_000  # ~1 MB: refused, it cannot fit any context
    text = ("the quick brown fox " * 5000)[:100_000]
    # bodies encoded once: the client's own CPU (2 cores shared with the server) goes to sending them
    bodies = {
        "prompt": ("/v1/completions", json.dumps({"model": model, "prompt": big}).encode()),
        "inspect": ("/v1/inspect/attention", json.dumps({"text": text}).encode()),
    }
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=base, timeout=60) as c:
        i = 0
        while not stop.is_set():
            path, content = bodies[kinds[(i + w) % len(kinds)]]
            r = c.post(path, content=content, headers=headers)
            counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
            i += 1


def stream_beside_hostile(
    base: str, model: str, hostile: int, rounds: int, max_tokens: int, kinds: tuple[str, ...]
) -> dict:
    alone, beside = [], []
    manager = multiprocessing.Manager()
    counts = manager.dict()
    with httpx.Client(base_url=base, timeout=120) as c:
        _stream_tpot(c, model, max_tokens)  # warm-up
        for _ in range(rounds):
            alone += [t for t in (_stream_tpot(c, model, max_tokens) for _ in range(3)) if t]
            stop = manager.Event()
            procs = [
                multiprocessing.Process(
                    target=_hostile, args=(base, model, stop, counts, w, kinds), daemon=True
                )
                for w in range(hostile)
            ]
            for p in procs:
                p.start()
            time.sleep(2)  # every hostile client is sending
            beside += [t for t in (_stream_tpot(c, model, max_tokens) for _ in range(3)) if t]
            stop.set()
            for p in procs:
                p.join(60)
    a, b = statistics.median(alone), statistics.median(beside)
    return {
        "hostile_clients": hostile,
        "hostile_kinds": list(kinds),
        "hostile_statuses": dict(counts),
        "alone_ms_per_token": round(a, 3),
        "beside_ms_per_token": round(b, 3),
        "beside_range": [round(min(beside), 3), round(max(beside), 3)],
        "ratio": round(b / a, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", help="model preset for the random-weight model")
    ap.add_argument("--idle", type=int, default=300, help="idle sockets in the idle flood")
    ap.add_argument("--slow-bodies", type=int, default=200, help="never-ending bodies in the slow flood")
    ap.add_argument("--seconds", type=float, default=5, help="probing time during each flood")
    ap.add_argument("--hostile", type=int, default=4, help="clients sending oversized requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--kinds", default="prompt,inspect", help="what the hostile clients send: prompt (~1 MB), inspect"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="server on the first core, clients on the others (default with 2+ cores)",
    )
    ap.add_argument(
        "--decode-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server decodes in a process of its own (`yuyan serve`'s default); --no-decode-process: "
        "in a thread of the HTTP process, as before",
    )
    ap.add_argument("--server-args", default="", help="more `yuyan serve` options, e.g. '--http-nice 5'")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _make_model(Path(tmp), args.preset)
        port = free_port()
        if args.pin:  # the server (a child) inherits core 0; this process and its clients take the rest
            os.sched_setaffinity(0, {cores[0]})
        proc = start_server(
            model_dir,
            port,
            "--max-connections",
            "64",
            "--max-body-bytes",
            str(2 << 20),
            "--header-timeout-s",
            str(HEADER_TIMEOUT_S),
            "--body-timeout-s",
            str(BODY_TIMEOUT_S),
            "--decode-process" if args.decode_process else "--no-decode-process",
            *args.server_args.split(),
        )
        if args.pin:
            os.sched_setaffinity(0, set(cores[1:]))
        base = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            idle = idle_flood(base, name, port, args.idle, args.seconds) if args.idle else {}
            slow = (
                slow_body_flood(base, name, port, args.slow_bodies, args.seconds) if args.slow_bodies else {}
            )
            stream = stream_beside_hostile(
                base, name, args.hostile, args.rounds, args.max_tokens, tuple(args.kinds.split(","))
            )
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        json.dumps(
            {
                "bench": "serve_hostile",
                "model": f"random {args.preset} preset",
                "pinned": bool(args.pin),
                "decode_process": bool(args.decode_process),
                "server_args": args.server_args,
                "idle_flood": idle,
                "slow_body_flood": slow,
                "stream": stream,
                "reference_alone_ms_per_token": stream["alone_ms_per_token"],
                "ours_beside_hostile_ms_per_token": stream["beside_ms_per_token"],
                "ratio": stream["ratio"],
            }
        )
    )


if __name__ == "__main__":
    main()
