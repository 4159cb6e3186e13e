"""Demo preset sweep: held-out bits per byte on the stdlib val split for model/data settings at a compute budget.

Each configuration trains for the number of steps a *quiet* 2-core machine does in `--seconds` (steps =
seconds x 85 GFLOP/s / (flops_per_token x batch x context); 85 GFLOP/s is the fp32 rate demo-sized GPTs
trained at on a quiet 2-vCPU AMD EPYC Zen 4 VM, 2026-11-28), so results do not depend on how busy the
machine is while sweeping. Tokenizers and shards are built once per vocabulary size with yuyan's own
pipeline under --work. One JSON line per configuration.

  python benchmarks/demo_sweep.py --seconds 60 --configs 'base;context=128,batch=32;lr=6e-3;vocab=8192'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GFLOPS = 85e9
BASE = dict(vocab=4096, d_model=128, n_layer=4, n_head=4, context=256, batch=16, lr=3e-3)


def data_for(vocab: int, work: Path):
    from yuyan.data.corpus import iter_documents
    from yuyan.data.shards import TokenShards, prepare
    from yuyan.tokenizer import Tokenizer

    tdir = work / f"tok{vocab}"
    if not (tdir / "tokenizer.json").exists():
        Tokenizer.train((d.text for d in iter_documents("stdlib", split="train")), vocab_size=vocab).save(
            tdir
        )
    tok = Tokenizer.load(tdir)
    prepare("stdlib", tok, work / f"data{vocab}", progress=False)
    return tok, TokenShards(work / f"data{vocab}")


def run(name: str, settings: dict, seconds: float, work: Path) -> dict:
    from yuyan.config import apply_overrides
    from yuyan.data.tasks import LMTask
    from yuyan.model.flops import flops_per_token, num_params
    from yuyan.model.transformer import ModelConfig, Transformer
    from yuyan.train import TrainConfig, fit

    s = {**BASE, **settings}
    tok, shards = data_for(int(s["vocab"]), work)
    torch.manual_seed(1337)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size,
            block_size=int(s["context"]),
            n_layer=int(s["n_layer"]),
            n_head=int(s["n_head"]),
            d_model=int(s["d_model"]),
        )
    )
    B, T = int(s["batch"]), int(s["context"])
    steps = int(seconds * GFLOPS / flops_per_token(model, T, training=True) / (B * T))
    lr = float(s["lr"])
    cfg = apply_overrides(
        TrainConfig(),
        {
            "train.batch_size": str(B),
            "train.lr": str(lr),
            "train.min_lr": str(lr / 10),
            "train.warmup": "50",
            "train.max_steps": str(steps),
            "train.max_time": "0",
            "train.log_every": "50",
            "train.device": "cpu",
            "eval.every": "0",
            "checkpoint.every_minutes": "0",
        },
    )
    t = time.perf_counter()
    r = fit(
        model, tok, LMTask(shards, T, eval_batch_size=32), cfg, work / "runs" / f"{name}-{int(time.time())}"
    )
    return {
        "name": name,
        **s,
        "seconds_equiv": seconds,
        "params_m": round(num_params(model) / 1e6, 2),
        "steps": r["step"],
        "tokens": r["tokens"],
        "bpb": round(r["final"]["bpb"], 4),
        "ppl": round(r["final"]["ppl"], 2),
        "wall_s": round(time.perf_counter() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="quiet-machine training seconds to emulate")
    ap.add_argument(
        "--configs",
        default="base;context=128,batch=32;lr=6e-3;d_model=96",
        help="';'-separated configurations, each 'base' or key=value,... over " + json.dumps(BASE),
    )
    ap.add_argument("--work", default="runs/demo-sweep")
    args = ap.parse_args()
    work = Path(args.work)
    for spec in args.configs.split(";"):
        settings = {} if spec == "base" else dict(kv.split("=") for kv in spec.split(","))
        print(json.dumps(run(spec, settings, args.seconds, work)), flush=True)


if __name__ == "__main__":
    main()
