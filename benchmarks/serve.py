"""Serving throughput: aggregate tokens/s with 1, 4 and 16 concurrent streaming clients, and time to first token.

Starts `yuyan serve` in a subprocess on a demo-sized model (random weights, a tokenizer trained in-process;
or --model DIR) and, for each concurrency level, runs that many client threads, each streaming completions
(`stream: true`, usage included) back to back for --seconds. Aggregate tokens/s = completion tokens of the
finished requests / wall time; TTFT = time from sending to the first streamed text. The reference is one
client (no batching possible); the ratio is 16 clients' throughput over it (goal: >= 4x, continuous
batching). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.soak import _make_model, _percentile, free_port, start_server  # noqa: E402


def run_level(
    base: str, model: str, clients: int, seconds: float, max_tokens: int, prompt_words: int
) -> dict:
    lock = threading.Lock()
    tokens, ttft, done = [0], [], [0]
    deadline = time.monotonic() + seconds

    def worker(w: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            i = 0
            while time.monotonic() < deadline:
                body = {
                    "model": model,
                    "prompt": " ".join(f"w{(w * 7 + i + k) % 50}" for k in range(prompt_words)),
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "seed": w * 1000 + i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                i += 1
                t0 = time.perf_counter()
                first = None
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if first is None and obj["choices"] and obj["choices"][0]["text"]:
                            first = time.perf_counter() - t0
                        if obj.get("usage"):
                            with lock:
                                tokens[0] += obj["usage"]["completion_tokens"]
                                done[0] += 1
                if first is not None:
                    with lock:
                        ttft.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": done[0],
        "tokens": tokens[0],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "ttft_p50_ms": round(1000 * _percentile(ttft, 0.5), 1),
        "ttft_p95_ms": round(1000 * _percentile(ttft, 0.95), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: a random demo-preset model)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--levels", default="1,4,16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else _make_model(Path(tmp), args.preset)
        port = free_port()
        proc = start_server(model_dir, port, "--max-batch", "16")
        base = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            run_level(base, name, 2, 2, 8, args.prompt_words)  # warm-up
            levels = [
                run_level(base, name, int(n), args.seconds, args.max_tokens, args.prompt_words)
                for n in args.levels.split(",")
            ]
        finally:
            proc.terminate()
            proc.wait(30)
    ref, top = levels[0], levels[-1]
    print(
        json.dumps(
            {
                "bench": "serve",
                "model": args.model or f"random {args.preset} preset",
                "max_tokens": args.max_tokens,
                "levels": levels,
                "reference_1_client_tokens_per_s": ref["tokens_per_s"],
                f"ours_{top['clients']}_clients_tokens_per_s": top["tokens_per_s"],
                "ratio": round(top["tokens_per_s"] / max(ref["tokens_per_s"], 1e-9), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
