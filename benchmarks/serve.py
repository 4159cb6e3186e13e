"""Serving throughput: aggregate tokens/s with 1, 4 and 16 concurrent streaming clients, and time to first token.

Starts `yuyan serve` in a subprocess on a demo-sized model (random weights, a tokenizer trained in-process;
or --model DIR) and, for each concurrency level, runs that many client threads, each streaming completions
(`stream: true`, usage included) back to back for --seconds. Aggregate tokens/s = completion tokens of the
finished requests / wall time; TTFT = time from sending to the first streamed text. The reference is one
client (no batching possible); the ratio is 16 clients' throughput over it (goal: >= 4x, continuous
batching). Prints one JSON line.

`--mode prefix` measures prefix caching instead: 16 clients send at once a completion (max_tokens 1, greedy,
token-id prompts) sharing a --prefix-tokens prefix with 8 tokens of their own, first to a server started with
`--prefix-cache-tokens 0`, then to one with the cache on (each warmed with an unrelated prompt first), in
--repeats rounds, each with a new prefix (so the cache starts cold for it: the first request computes the
prefix, the other 15 reuse it); each client opens its connection before a barrier releases them all, and
its clock starts at the send. The figures are the mean and last time to first token (a 1-token completion's
latency) of the 16 in the best round; the ratio is uncached over cached mean (goal: >= 3x); every round's
tokens and logprobs must agree between the servers. The random model's context is 1024 here.

`--mode structured` measures structured output's cost: one streamed completion (batch 1) of --max-tokens
under a JSON Schema `response_format` against the same request without it; the overhead is the per-token
time's relative increase (goal: <= 10% of a decode step).

    .venv/bin/python benchmarks/serve.py [--mode throughput|prefix|structured] [--model DIR]
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


def prefix_round(base: str, model: str, prompts: list[list[int]]) -> tuple[list[float], list[tuple]]:
    """Send every prompt at once (max_tokens 1, greedy); each one's latency and (token, logprob).

    Each client thread opens its connection (a /health call) before a barrier releases them all, so the
    figure is the server's time, not the cost of building an HTTP client (~10 ms of CPU each, on the
    same cores as the server)."""
    times: list[float] = [0.0] * len(prompts)
    got: list[tuple] = [()] * len(prompts)
    errors: list[str] = []
    ready = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        body = {"model": model, "prompt": prompts[i], "max_tokens": 1, "temperature": 0, "logprobs": 1}
        with httpx.Client(base_url=base, timeout=600) as c:
            c.get("/health")
            ready.wait()
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            times[i] = time.perf_counter() - t0
        if r.status_code != 200:
            errors.append(f"the server answered {r.status_code}: {r.text[:300]}")
            return
        lp = r.json()["choices"][0]["logprobs"]
        got[i] = (lp["tokens"][0], lp["token_logprobs"][0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(errors[0])
    return times, got


def prefix_mode(args, model_dir: Path) -> dict:
    import random

    rng = random.Random(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rounds = []  # each round a new shared prefix, so the cache starts cold for it
    for _ in range(args.repeats):
        shared = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
        rounds.append([shared + [rng.randrange(vocab) for _ in range(8)] for _ in range(args.clients)])
    warm = [[rng.randrange(vocab) for _ in range(24)]]
    out = {}
    for label, tokens in (("uncached", "0"), ("cached", str(args.prefix_cache_tokens))):
        port = free_port()
        proc = start_server(
            model_dir, port, "--max-batch", "16", "--dtype", args.dtype, "--prefix-cache-tokens", tokens
        )
        base = f"http://127.0.0.1:{port}"
        try:
            name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            prefix_round(base, name, warm)
            # the round with the lowest mean (the others met other work on the machine); its tokens
            results = [prefix_round(base, name, prompts) for prompts in rounds]
            times = min((r[0] for r in results), key=sum)
            got = [x for r in results for x in r[1]]  # every round's, to compare the two servers
            cache = httpx.get(base + "/health", timeout=10).json()["prefix_cache"]
        finally:
            proc.terminate()
            proc.wait(30)
        out[label] = {
            "ttft_mean_s": round(sum(times) / len(times), 3),
            "ttft_last_s": round(max(times), 3),
            "prefix_cache": cache,
            "got": got,
        }
    a, b = out["uncached"].pop("got"), out["cached"].pop("got")
    return {
        "bench": "serve-prefix",
        "model": args.model or f"random {args.preset} preset",
        "dtype": args.dtype,
        "clients": args.clients,
        "prefix_tokens": args.prefix_tokens,
        **out,
        "same_tokens": [t for t, _ in a] == [t for t, _ in b],
        "max_abs_logprob_diff": max(abs(x[1] - y[1]) for x, y in zip(a, b, strict=True)),
        "ratio": round(out["uncached"]["ttft_mean_s"] / out["cached"]["ttft_mean_s"], 2),
    }


def stream_rate(base: str, body: dict) -> tuple[float, int]:
    """(seconds per output token after the first, tokens) of one streamed completion."""
    first = last = None
    tokens = 0
    with httpx.stream(
        "POST",
        base + "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=600,
    ) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise SystemExit(f"the stream failed: {obj['error']}")
            if obj["choices"] and obj["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return (last - first) / max(1, tokens - 1), tokens


def structured_mode(args, model_dir: Path) -> dict:
    """Per-token time of one streamed completion (batch 1) with and without a JSON Schema grammar, for two
    schemas that cannot end before max_tokens: `long_string`, a string of at least 4000 characters (its
    counted repetition makes llguidance's mask ~3x dearer per token than an open string's), and
    `string_array`, an array of plain strings that never closes because every token holding `]` is banned
    (logit_bias -100, in both runs of that pair). The end of text is banned in every run.
    Runs alternate; each figure is the best of --repeats."""
    from yuyan.model import load

    tok = load(model_dir).tokenizer
    closers = {str(i): -100 for i in range(tok.vocab_size) if "]" in tok.decode([i])}
    port = free_port()
    proc = start_server(model_dir, port, "--max-batch", "16", "--dtype", args.dtype)
    base = f"http://127.0.0.1:{port}"
    schemas = {
        "long_string": ({"type": "string", "minLength": 4000}, {}),
        "string_array": ({"type": "array", "items": {"type": "string"}}, closers),
    }
    out: dict = {}
    try:
        name = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        eot = httpx.post(base + "/tokenize", json={"model": name, "prompt": "<|endoftext|>"}, timeout=10)
        eot_id = eot.json()["tokens"][0] if eot.status_code == 200 else 0
        body = {"model": name, "prompt": "The answer:", "max_tokens": args.max_tokens, "temperature": 1.0}
        stream_rate(base, {**body, "max_tokens": 8, "seed": 0})  # warm-up
        for label, (schema, ban) in schemas.items():
            bias = {str(eot_id): -100, **ban}
            fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
            best = {"plain": float("inf"), "json_schema": float("inf")}
            counts = {}
            for r in range(args.repeats):
                for kind, extra in (("plain", {}), ("json_schema", {"response_format": fmt})):
                    t, n = stream_rate(base, {**body, "seed": r, "logit_bias": bias, **extra})
                    best[kind] = min(best[kind], t)
                    counts[kind] = n
            out[label] = {
                "schema": schema,
                "banned_tokens": len(bias),
                "tokens": counts,
                "plain_ms_per_token": round(1000 * best["plain"], 3),
                "json_schema_ms_per_token": round(1000 * best["json_schema"], 3),
                "overhead": round(best["json_schema"] / best["plain"] - 1, 4),
            }
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "bench": "serve-structured",
        "model": args.model or f"random {args.preset} preset",
        "vocab": tok.vocab_size,
        "dtype": args.dtype,
        **out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["throughput", "prefix", "structured"], default="throughput")
    ap.add_argument("--repeats", type=int, default=3, help="structured and prefix modes: runs of each kind")
    ap.add_argument("--clients", type=int, default=16, help="prefix mode: requests sent at once")
    ap.add_argument("--prefix-tokens", type=int, default=512, help="prefix mode: the shared prefix")
    ap.add_argument("--prefix-cache-tokens", type=int, default=4096, help="prefix mode: the cached server's")
    ap.add_argument("--dtype", default="fp32", help="prefix mode: the servers' --dtype")
    ap.add_argument("--model", help="checkpoint folder (default: a random demo-preset model)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument(
        "--server-args", default="", help="throughput mode: more `yuyan serve` options (--no-decode-process)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # the prefix mode's prompts need a context longer than the demo preset's 128 tokens
        longer = {"block_size": 1024} if args.mode == "prefix" else {}
        model_dir = Path(args.model) if args.model else _make_model(Path(tmp), args.preset, **longer)
        if args.mode == "prefix":
            print(json.dumps(prefix_mode(args, model_dir)))
            return
        if args.mode == "structured":
            print(json.dumps(structured_mode(args, model_dir)))
            return
        port = free_port()
        proc = start_server(model_dir, port, "--max-batch", "16", *args.server_args.split())
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
                "server_args": args.server_args,
                "levels": levels,
                "reference_1_client_tokens_per_s": ref["tokens_per_s"],
                f"ours_{top['clients']}_clients_tokens_per_s": top["tokens_per_s"],
                "ratio": round(top["tokens_per_s"] / max(ref["tokens_per_s"], 1e-9), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
