"""Training throughput and model FLOPs utilisation: yuyan's training step vs transformers' GPT2LMHeadModel.

For each shape (the `demo` preset, and the 124M `gpt2` preset at a CPU-sized batch) both models are built
from the same config with random weights and trained on the same random token batches: ours through the
loop's own pieces (LMTask.loss, AdamW from build_optimizer, clipping, the configured autocast/compile),
transformers' through a plain torch loop (forward with labels, backward, clip, torch AdamW). Throughput is
tokens/s over timed steps after warm-up; MFU = flops_per_token x tokens/s / the measured peak fp32 matmul
FLOP/s of this machine (a large square matmul with the same threads). Prints one JSON line.

  python benchmarks/train.py                       # demo + 124M shapes
  python benchmarks/train.py --shapes demo --steps 20 --variants eager,bf16,compile
  python benchmarks/train.py --variants eager,auto        # fp32 vs what train.precision auto picks
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import yuyan  # noqa: F401  (first: it sets torch's huge-page allocation before any tensor exists)


def peak_matmul_flops(n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return sum(times[: max(1, len(times) * 3 // 4)]) / max(1, len(times) * 3 // 4)  # drop the slowest quarter


def ours_step(cfg, batches, variant: str):
    from yuyan.data.tasks import LMTask
    from yuyan.model.transformer import Transformer
    from yuyan.train.config import TrainSection
    from yuyan.train.loop import autocast_context, resolve_precision
    from yuyan.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(cfg).train()
    # what `yuyan train` would run: eager is fp32; bf16 and auto go through the loop's own resolution (auto
    # measures; both pick attention's format by a timed kernel)
    precision = {"eager": "fp32", "compile": "fp32", "bf16": "bf16", "auto": "auto"}[variant]
    tc = TrainSection(precision=precision, batch_size=batches[0][0].shape[0])
    chosen = resolve_precision(tc, torch.device("cpu"), model, None)
    print(json.dumps({"variant": variant, **chosen.to_dict()}), file=sys.stderr)
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), "cpu")
    run = torch.compile(model) if variant == "compile" else model
    task = LMTask(None, cfg.block_size)
    it = iter(batches * 1000)
    params = [p for p in model.parameters() if p.requires_grad]
    mode = chosen.name

    def step():
        x, y = next(it)
        with autocast_context(torch.device("cpu"), mode):
            loss = task.loss(run, {"input_ids": x, "labels": y})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, mode


def hf_step(cfg, batches, variant: str, bf16: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hc = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hc).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    run = torch.compile(model) if variant == "compile" else model
    it = iter(batches * 1000)
    mode = bf16  # transformers: plain bf16 autocast where ours runs bf16 (auto: what auto chose)

    def step():
        x, _ = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode):
            loss = run(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="demo,gpt2", help="comma list of: demo, gpt2")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (0: 8 for demo, 2 for gpt2)")
    ap.add_argument(
        "--variants",
        default="eager",
        help="comma list of: eager (fp32), bf16, auto (train.precision auto), compile (ours and HF alike)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating timing rounds per model (median reported)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from yuyan.model.flops import flops_per_token, num_params
    from yuyan.model.presets import preset

    shapes = {  # CPU-sized batches: the demo's own, and a 124M model at batch 2 x context 256
        "demo": (preset("demo"), 16, 8, 3),
        "gpt2": (preset("gpt2", block_size=256), 2, 2, 1),
    }
    peak = peak_matmul_flops()
    result = {
        "benchmark": "train",
        "threads": torch.get_num_threads(),
        "peak_matmul_gflops": round(peak / 1e9, 1),
        "runs": [],
    }
    for name in args.shapes.split(","):
        cfg, batch, steps, warm = shapes[name]
        steps = args.steps or steps
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g),) * 2 for _ in range(4)
        ]
        batches = [(x, torch.roll(x, -1, 1)) for x, _ in batches]
        tokens = batch * cfg.block_size
        for variant in args.variants.split(","):
            row = {"shape": name, "variant": variant, "batch": batch, "context": cfg.block_size}
            ours, ours_run, mode = ours_step(cfg, batches, variant)
            row["precision"] = mode
            hf, hf_run = hf_step(cfg, batches, variant, bf16=mode == "bf16")
            fpt = flops_per_token(ours, cfg.block_size, training=True)
            row["params_m"] = round(num_params(ours) / 1e6, 2)
            row["flops_per_token_m"] = round(fpt / 1e6, 2)
            # alternate rounds (ours, theirs, ours, ...) so a machine shared with other jobs slows both alike
            secs = {"yuyan": [], "hf": []}
            for r in range(args.rounds):
                for who, step in (("yuyan", ours_run), ("hf", hf_run)):
                    secs[who].append(
                        time_steps(step, steps, (warm + (2 if variant == "compile" else 0)) if r == 0 else 1)
                    )
            for who in secs:
                tps = tokens / sorted(secs[who])[len(secs[who]) // 2]  # median round
                row[f"{who}_tok_s"] = round(tps, 1)
                row[f"{who}_mfu"] = round(fpt * tps / peak, 4)
            row["ratio"] = round(row["yuyan_tok_s"] / row["hf_tok_s"], 3)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            del ours, hf, ours_run, hf_run
    print(json.dumps(result))


if __name__ == "__main__":
    main()
