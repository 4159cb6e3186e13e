"""Privacy figures (issue 18): canary exposure vs repetition count for the demo model, the step-time cost
of DP fine-tuning, and ROUGE-L of a DP fine-tune (epsilon 8) against a plain one (epsilon infinite).

1. `insert_canaries` puts canaries repeated --repeats times (plus 2 never-inserted controls) into a copy of
   --corpus (default stdlib); the demo recipe (`demo_config`, the `demo` preset) pre-trains on that copy for
   --minutes; `canary_exposure` ranks each secret among --candidates; the plot goes to --plot.
2. The docstring task (stdlib functions -> first docstring line) fine-tunes the trained model, plain and DP
   alternately (--rounds rounds of --steps steps each, fresh copies of the model, same batch size), so drift
   on a shared machine hits both; the figure is the median over rounds of training seconds per step.
3. With --ft-steps > 0: a plain and a DP (epsilon 8, delta 1e-5) fine-tune of --ft-steps steps each, then
   greedy ROUGE-L on --eval-pairs held-out pairs.

Prints one JSON line.

    .venv/bin/python benchmarks/privacy.py [--minutes 5] [--steps 10 --rounds 3] [--ft-steps 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def ft_config(steps: int, batch: int, epsilon: float | None, seed: int = 0):
    from yuyan.train.finetune import default_train_config

    cfg = default_train_config()
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.device, cfg.train.seed = steps, batch, "cpu", seed
    cfg.train.precision, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup = "fp32", 5e-4, 5e-5, 0
    cfg.eval.every, cfg.eval.batches, cfg.eval.final_full = 0, 1, False
    cfg.checkpoint.every_minutes, cfg.train.log_every = 0.0, max(1, steps)
    cfg.privacy.epsilon = epsilon
    return cfg


def fine_tune(lm, task, cfg, out: Path) -> dict:
    from yuyan.train.loop import fit

    model = copy.deepcopy(lm.model).train()
    res = fit(model, lm.tokenizer, task, cfg, out, export=lambda m: (m, {}, {"task": "sft"}))
    return {
        "model": model.eval(),
        "elapsed": res["elapsed"],
        "steps": res["step"],
        "privacy": res.get("privacy"),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = sorted((r for r in rows if r["repeats"] > 0), key=lambda r: r["repeats"])
    controls = [r for r in rows if r["repeats"] == 0]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot([r["repeats"] for r in seen], [r["exposure"] for r in seen], "o-", label="inserted canaries")
    if controls:
        ax.scatter([0.7] * len(controls), [r["exposure"] for r in controls], marker="x", c="gray",
                   label="controls (never inserted)")  # fmt: skip
    ax.axhline(
        rows[0]["max_exposure"], ls="--", c="k", lw=0.8, label=f"max log2 N = {rows[0]['max_exposure']:.1f}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("repetitions in the training corpus")
    ax.set_ylabel("exposure (bits)")
    ax.set_title("Canary exposure, demo model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--minutes", type=float, default=5.0, help="demo pre-training budget")
    ap.add_argument("--repeats", default="1,10,100")
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10, help="fine-tuning steps per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ft-steps", type=int, default=0, help="ROUGE-L comparison steps (0: skip)")
    ap.add_argument("--eval-pairs", type=int, default=64)
    ap.add_argument("--plot", default="docs/privacy_exposure.png")
    ap.add_argument("--work", default="", help="working folder (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from yuyan.data.tasks import DocstringTask, docstring_pairs
    from yuyan.evaluate.memorization import canary_exposure, insert_canaries
    from yuyan.model import load
    from yuyan.train.demo import demo_config
    from yuyan.train.finetune import docstring_scores
    from yuyan.train.pretrain import train

    work = Path(args.work or tempfile.mkdtemp(prefix="yuyan-privacy-"))
    t0 = time.perf_counter()
    desc = insert_canaries(args.corpus, work / "data", [int(x) for x in args.repeats.split(",")], seed=0)
    cfg = demo_config(args.minutes, str(work / "demo"), corpus=desc["corpus"])
    demo = train(cfg)
    lm = load(demo["final_dir"])
    rows = canary_exposure(lm, work / "data" / "canaries.json", candidates=args.candidates)
    plot(rows, Path(args.plot))

    block = lm.model.config.block_size
    task = DocstringTask.build(lm.tokenizer, block)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for r in range(args.rounds):
        for mode, eps in (("plain", None), ("dp", 8.0)):
            res = fine_tune(lm, task, ft_config(args.steps, args.batch, eps, seed=r), work / f"t-{mode}-{r}")
            times[mode].append(res["elapsed"] / res["steps"])
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])

    quality = None
    if args.ft_steps > 0:
        pairs = [
            p
            for p in docstring_pairs("val", limit=4 * args.eval_pairs)
            if len(lm.tokenizer.encode(p["prompt"])) + 24 <= block
        ][: args.eval_pairs]
        quality = {
            "eval_pairs": len(pairs),
            "before": docstring_scores(lm.model, lm.tokenizer, pairs)["rouge_l"],
        }
        for name, eps in (("eps_inf", None), ("eps_8", 8.0)):
            res = fine_tune(lm, task, ft_config(args.ft_steps, args.batch, eps), work / f"q-{name}")
            quality[name] = docstring_scores(res["model"], lm.tokenizer, pairs)["rouge_l"]
            if res["privacy"]:
                quality["eps_8_spent"] = res["privacy"]["epsilon"]
                quality["noise_multiplier"] = res["privacy"]["noise_multiplier"]

    print(json.dumps({
        "benchmark": "privacy", "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "demo_minutes": args.minutes, "demo_steps": demo["step"], "demo_val_bpb": demo["final"].get("bpb"),
        "exposure": [{k: r[k] for k in ("repeats", "exposure", "rank", "greedy_extracts")} for r in rows],
        "candidates": args.candidates, "plot": args.plot,
        "step_s_plain": plain, "step_s_dp": dp, "dp_over_plain": dp / plain, "batch": args.batch,
        "step_s_rounds": times, "rouge_l": quality, "seconds": time.perf_counter() - t0,
    }))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
