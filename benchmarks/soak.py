"""Server under load and hostile input: a soak of concurrent clients and a fuzz run from the OpenAPI schema.

`soak()`: N client threads for S seconds, each looping over streamed completions, non-streamed chats,
streams cancelled midway, non-streamed requests abandoned midway (client timeout) and malformed requests
(bad JSON, wrong types, unknown model, oversized bodies, too many tokens); meanwhile a prober times
GET /health. It counts 5xx answers (must be 0), hung requests (no answer within the hard timeout, must
be 0), and checks that the scheduler is idle afterwards (no leaked rows). `fuzz()`: the schemathesis run
of tests/test_serve_fuzz.py (the server's own OpenAPI schema, valid and invalid requests, half of the
bodies aimed at the served model so that generation really runs) with more examples: no 5xx, and every
response conforms to the schema.

`python benchmarks/soak.py` starts `yuyan serve` in a subprocess on a demo-sized model (random weights, a
tokenizer trained in-process), runs a 64-client x 60 s soak, then the fuzz, reads the server's
RSS before and after (from /proc), and prints one JSON line. The reference figure is the server's idle
/health latency before the soak; the ratio is its p95 under saturation over that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HARD_TIMEOUT = 60.0  # a request without an answer after this long is "hung"

BAD_BODIES = [
    b"{not json",
    b"[" * 20000,
    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(),
    json.dumps({"model": "no-such-model", "prompt": "x"}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**6}).encode(),
    json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": 1}]}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "n": 10**4}).encode(),
    b'{"model": "tiny", "prompt": "x", "temperature": Infinity}',
    b"\xff\xfe\x00garbage",
]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def soak(
    base: str,
    model: str,
    clients: int = 16,
    seconds: float = 10.0,
    headers: dict | None = None,
    max_tokens: int = 16,
    seed: int = 0,
    oversize: int = 2 << 20,
) -> dict:
    """Run the mixed workload; return counts and /health latencies (ms)."""
    headers = dict(headers or {})
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {
        "requests": 0,
        "by_status": {},
        "server_errors": 0,
        "hung": 0,
        "client_errors": 0,
        "cancelled": 0,
        "stream_incomplete": 0,
        "kinds": {},
    }
    health_ms: list[float] = []
    stop_probe = threading.Event()

    def record(kind: str, status: int | None, hung: bool = False) -> None:
        with lock:
            stats["requests"] += 1
            stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
            if status is not None:
                stats["by_status"][str(status)] = stats["by_status"].get(str(status), 0) + 1
                if status >= 500:
                    stats["server_errors"] += 1
            if hung:
                stats["hung"] += 1

    def prompt(rng: random.Random) -> str:
        return "".join(
            rng.choice(["def ", "x", " = ", "语言", "(", ")", "\n", "return ", "1"]) for _ in range(8)
        )

    def worker(wid: int) -> None:
        rng = random.Random(seed * 1000 + wid)
        with httpx.Client(base_url=base, headers=headers, timeout=HARD_TIMEOUT) as c:
            i = wid
            while time.monotonic() < deadline:
                kind = ["stream", "chat", "stream_cancel", "abandon", "malformed"][i % 5]
                i += 1
                body = {
                    "model": model,
                    "prompt": prompt(rng),
                    "max_tokens": rng.randint(1, max_tokens),
                    "temperature": rng.choice([0, 0.7, 1.0]),
                    "seed": rng.randint(0, 99),
                }
                try:
                    if kind in ("stream", "stream_cancel"):
                        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            lines = 0
                            done = False
                            for line in r.iter_lines():
                                if line.startswith("data: "):
                                    lines += 1
                                    done = line == "data: [DONE]"
                                if kind == "stream_cancel" and lines >= 2:
                                    break  # closing the response mid-stream disconnects the client
                            if kind == "stream" and r.status_code == 200 and not done:
                                with lock:
                                    stats["stream_incomplete"] += 1
                            record(kind, r.status_code)
                    elif kind == "chat":
                        msgs = [{"role": "user", "content": prompt(rng)}]
                        r = c.post(
                            "/v1/chat/completions",
                            json={"model": model, "messages": msgs, "max_tokens": body["max_tokens"]},
                        )
                        record(kind, r.status_code)
                    elif kind == "abandon":
                        try:
                            r = c.post(
                                "/v1/completions",
                                json={**body, "max_tokens": max_tokens},
                                timeout=rng.choice([0.01, 0.05, 0.2]),
                            )
                            record(kind, r.status_code)
                        except httpx.TimeoutException:
                            record(kind, None)
                            with lock:
                                stats["cancelled"] += 1
                    else:
                        if rng.random() < 0.1:
                            content = b'{"model": "' + b"x" * oversize + b'"}'
                        else:
                            content = rng.choice(BAD_BODIES)
                        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                        r = c.post(path, content=content, headers={"Content-Type": "application/json"})
                        record(kind, r.status_code)
                except httpx.TimeoutException:
                    record(kind, None, hung=True)
                except httpx.HTTPError:
                    with lock:
                        stats["client_errors"] += 1
                    record(kind, None)

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=HARD_TIMEOUT) as c:
            while not stop_probe.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    health_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    with lock:
                        stats["health_failures"] = stats.get("health_failures", 0) + 1
                stop_probe.wait(0.1)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * HARD_TIMEOUT)
    stop_probe.set()
    prober.join(HARD_TIMEOUT)
    stats["threads_left"] = sum(t.is_alive() for t in threads)
    # the scheduler must be idle once the clients are gone (cancelled rows freed, nothing stuck waiting)
    idle = None
    for _ in range(100):
        h = httpx.get(base + "/health", timeout=10).json()
        if h.get("active_rows", 0) == 0 and h.get("waiting", 0) == 0:
            idle = h
            break
        time.sleep(0.1)
    stats["idle_after"] = idle is not None
    stats["health_ms"] = {
        "n": len(health_ms),
        "p50": _percentile(health_ms, 0.5),
        "p95": _percentile(health_ms, 0.95),
        "max": max(health_ms, default=float("nan")),
    }
    return stats


def fuzz(examples: int) -> dict:
    """The schemathesis run of tests/test_serve_fuzz.py (the server's OpenAPI schema, positive and
    negative generation, its coverage phase) with `examples` per operation and mode: its requests by
    status and whether it passed (no 5xx, every response conforming to the schema)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "YUYAN_FUZZ_EXAMPLES": str(examples)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "tests/test_serve_fuzz.py",
            "-k",
            "schemathesis or fuzz_ran",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((x for x in p.stdout.splitlines() if "schemathesis run:" in x), "")
    by_status = json.loads(line.split("schemathesis run:", 1)[1]) if line else {}
    return {"passed": p.returncode == 0, "requests": sum(by_status.values()), "by_status": by_status}


# ------------------------------------------------------------------------------------------------ main
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _make_model(folder: Path, preset: str, **overrides) -> Path:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import small_texts

    from yuyan.model.checkpoint import save_checkpoint
    from yuyan.model.presets import preset as model_preset
    from yuyan.model.transformer import Transformer
    from yuyan.tokenizer import Tokenizer

    tok = Tokenizer.train(small_texts(), vocab_size=1024)
    torch.manual_seed(0)
    cfg = model_preset(preset, vocab_size=tok.vocab_size, **overrides)
    return save_checkpoint(folder / "tiny", Transformer(cfg), tok)


def start_server(model_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "yuyan",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            raise RuntimeError(f"server did not start:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument(
        "--fuzz-examples",
        type=int,
        default=200,
        help="schemathesis examples per operation and mode (0: none)",
    )
    ap.add_argument("--preset", default="demo", help="model preset for the random-weight model")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=1, help="soak rounds; RSS after each shows whether memory plateaus"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _make_model(Path(tmp), args.preset)
        port = free_port()
        proc = start_server(
            model_dir,
            port,
            "--max-tokens-limit",
            str(args.max_tokens),
            "--max-queue",
            "256",
            "--max-connections",
            str(4 * args.clients + 64),
        )
        base = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            idle = []
            for _ in range(50):
                t0 = time.perf_counter()
                httpx.get(base + "/health", timeout=10)
                idle.append((time.perf_counter() - t0) * 1000)
            # warm up (allocations, first batches), then take the starting RSS
            soak(base, name, clients=args.clients, seconds=3, max_tokens=args.max_tokens, seed=99)
            rss0 = _rss_kb(proc.pid)
            rss_rounds, errors_rounds, hung_rounds = [], [], []
            t0 = time.time()
            for _ in range(max(1, args.rounds)):
                s = soak(base, name, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens)
                time.sleep(2)
                rss_rounds.append(round(_rss_kb(proc.pid) / 1024, 1))
                errors_rounds.append(s["server_errors"])
                hung_rounds.append(s["hung"])
            soak_s = time.time() - t0
            rss1 = _rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    t0 = time.time()
    f = fuzz(args.fuzz_examples) if args.fuzz_examples > 0 else {}
    fuzz_s = time.time() - t0
    idle_p50 = statistics.median(idle)
    print(
        json.dumps(
            {
                "bench": "soak",
                "clients": args.clients,
                "seconds": args.seconds,
                "soak_wall_s": round(soak_s, 1),
                "requests": s["requests"],
                "by_status": s["by_status"],
                "server_errors_5xx": s["server_errors"],
                "hung": s["hung"],
                "threads_left": s["threads_left"],
                "stream_incomplete": s["stream_incomplete"],
                "idle_after": s["idle_after"],
                "health_failures": s.get("health_failures", 0),
                "rss_mb_before": round(rss0 / 1024, 1),
                "rss_mb_after_soak": round(rss1 / 1024, 1),
                "rss_mb_after_each_round": rss_rounds,
                "server_errors_5xx_each_round": errors_rounds,
                "hung_each_round": hung_rounds,
                "health_ms_saturated": {
                    k: round(v, 2) if isinstance(v, float) else v for k, v in s["health_ms"].items()
                },
                "health_ms_idle_p50": round(idle_p50, 2),
                "ratio_health_p95_saturated_over_idle": round(s["health_ms"]["p95"] / idle_p50, 2),
                "fuzz_requests": f.get("requests"),
                "fuzz_by_status": f.get("by_status"),
                "fuzz_passed_no_5xx_all_conform": f.get("passed"),
                "fuzz_wall_s": round(fuzz_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
