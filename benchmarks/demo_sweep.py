"""Demo recipe sweep: held-out bits per byte on the stdlib val split for model, data and optimizer settings at
a compute budget.

Each configuration trains for the number of steps a *quiet* machine does in `--seconds` (steps = seconds x
rate / (flops_per_token x batch x context)), so results do not depend on how busy the machine is while
sweeping. The rate is `--gflops` (default 85 GFLOP/s: demo-sized GPTs in fp32 on a quiet 2-vCPU AMD EPYC
Zen 4 VM, 2026-11-28); `--rate-check` instead times a few training steps of the base configuration here and
prints the rate it measured, to pass as `--gflops` (measure it on a quiet machine: the figure is what sets
the budget). Tokenizers and shards are built once per vocabulary size with yuyan's own pipeline under
--work. One JSON line per configuration.

A configuration is 'base' or comma-separated key=value settings: the short keys of BASE (vocab, d_model,
n_layer, n_head, context, batch, lr), or any `section.key` setting of `yuyan train`, passed through
apply_overrides (model.qk_norm=true, model.ffn=relu2_mlp, model.logit_softcap=30, train.optimizer=muon,
train.muon_lr=0.02, train.precision=bf16, ...). Values are separated by '/' inside one setting where a
comma would split it (train.betas=0.9/0.95).

  python benchmarks/demo_sweep.py --seconds 60 --configs 'base;context=128,batch=32;train.optimizer=muon'
  python benchmarks/demo_sweep.py --rate-check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

BASE = dict(vocab=4096, d_model=128, n_layer=4, n_head=4, context=128, batch=32, lr=6e-3)
SHORT = {"d_model", "n_layer", "n_head"}  # short keys that are ModelConfig fields


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


def build(settings: dict, steps: int = 1):
    """(settings merged over BASE, the model, the TrainConfig) for one configuration of `steps` steps."""
    from yuyan.config import apply_overrides
    from yuyan.model.transformer import ModelConfig, Transformer
    from yuyan.train import TrainConfig

    s = {**BASE, **settings}
    dotted = {k: str(v).replace("/", ",") for k, v in s.items() if "." in k}
    unknown = sorted(k for k in s if "." not in k and k not in BASE)
    if unknown:
        raise SystemExit(f"unknown sweep keys {unknown}: use {sorted(BASE)} or section.key settings")
    B, T, lr = int(s["batch"]), int(s["context"]), float(s["lr"])
    base_train = {
        "train.batch_size": str(B),
        "train.lr": str(lr),
        "train.min_lr": str(lr / 10),
        "train.warmup": "50",
        "train.max_steps": str(steps),
        "train.max_time": "0",
        "train.log_every": "50",
        "train.device": "cpu",
        "train.precision": "fp32",
        "eval.every": "0",
        "checkpoint.every_minutes": "0",
    }
    cfg = apply_overrides(TrainConfig(), {**base_train, **dotted})
    model_fields = {k: int(s[k]) for k in SHORT}
    model_fields.update(cfg.model.overrides())  # model.* settings
    torch.manual_seed(1337)
    tok_vocab = model_fields.pop("vocab_size", None)
    model = Transformer(ModelConfig(vocab_size=tok_vocab or int(s["vocab"]), block_size=T, **model_fields))
    return s, model, cfg


def run(name: str, settings: dict, seconds: float, gflops: float, work: Path) -> dict:
    from yuyan.data.tasks import LMTask
    from yuyan.model.flops import flops_per_token, num_params
    from yuyan.train import fit

    s, model, _ = build(settings)
    tok, shards = data_for(int(s["vocab"]), work)
    B, T = int(s["batch"]), int(s["context"])
    steps = int(seconds * gflops * 1e9 / flops_per_token(model, T, training=True) / (B * T))
    s, model, cfg = build(settings, steps)
    t = time.perf_counter()
    out = work / "runs" / f"run-{int(time.time())}"
    r = fit(model, tok, LMTask(shards, T, eval_batch_size=32), cfg, out)
    return {
        "name": name,
        **s,
        "seconds_equiv": seconds,
        "gflops": gflops,
        "params_m": round(num_params(model) / 1e6, 2),
        "steps": r["step"],
        "tokens": r["tokens"],
        "bpb": round(r["final"]["bpb"], 4),
        "ppl": round(r["final"]["ppl"], 2),
        "wall_s": round(time.perf_counter() - t, 1),
    }


def rate_check(settings: dict, steps: int = 30) -> dict:
    """GFLOP/s of training steps of `settings` here (forward, fused loss, backward, optimizer): the median
    of three timed blocks after a warm-up, with the configuration's optimizer and precision."""
    from yuyan.model.flops import flops_per_token
    from yuyan.train.optim import build_optimizer

    s, model, cfg = build(settings)
    tc = cfg.train
    B, T = int(s["batch"]), int(s["context"])
    opt = build_optimizer(
        model, tc.lr, tc.weight_decay, tuple(tc.betas), optimizer=tc.optimizer, muon_lr=tc.muon_lr
    )
    x = torch.randint(0, model.config.vocab_size, (B, T + 1))
    bf16 = tc.precision == "bf16"

    def block(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(x[:, :-1], targets=x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    block(5)
    per_step = sorted(block(steps // 3) / (steps // 3) for _ in range(3))[1]
    flops = flops_per_token(model, T, training=True) * B * T
    return {"rate_check": s, "step_s": round(per_step, 4), "gflops": round(flops / per_step / 1e9, 1)}


def parse(spec: str) -> dict:
    return {} if spec == "base" else dict(kv.split("=", 1) for kv in spec.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="quiet-machine training seconds to emulate")
    ap.add_argument("--gflops", type=float, default=85.0, help="quiet-machine training rate, GFLOP/s")
    ap.add_argument("--rate-check", action="store_true", help="time each configuration's step here instead")
    ap.add_argument(
        "--configs",
        default="base;train.optimizer=muon;model.qk_norm=true",
        help="';'-separated configurations, each 'base' or key=value,... over " + json.dumps(BASE),
    )
    ap.add_argument("--work", default="runs/demo-sweep")
    args = ap.parse_args()
    work = Path(args.work)
    for spec in args.configs.split(";"):
        if args.rate_check:
            print(json.dumps({"name": spec, **rate_check(parse(spec))}), flush=True)
        else:
            print(json.dumps(run(spec, parse(spec), args.seconds, args.gflops, work)), flush=True)


if __name__ == "__main__":
    main()
