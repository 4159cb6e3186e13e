"""`yuyan demo`, the main job: embedded corpus → tokenizer → shards → pre-train for a time budget → results.

Everything runs on the Python standard library's own sources (no download): a byte-level BPE tokenizer is
trained on the train split, the corpus is tokenized into shards, the `demo` preset is trained for a
wall-clock budget (5 minutes by default; the schedule is fitted to it), then the held-out bits per byte and
perplexity are measured on the whole validation split, three code prompts are completed, and a loss curve
and an attention heatmap are drawn. A re-run reuses the tokenizer and shards and resumes (or reuses) the
checkpoint. The settings live in `demo_config()`; configs/demo.toml holds the same values for `yuyan train`.
"""

from __future__ import annotations

import os
from pathlib import Path

from yuyan.errors import UserError
from yuyan.train.config import (
    CheckpointSection,
    DataSection,
    EvalSection,
    ModelSection,
    TrainConfig,
    TrainSection,
)

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]
ATTENTION_TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
)


def demo_config(minutes: float = 5.0, out: str = "runs/demo", corpus: str = "stdlib") -> TrainConfig:
    """The demo's training settings (the winners of the sweeps in BENCHMARKS.md, "Pre-training demo sweep"
    and "Demo recipe sweep"). The precision is measured (bf16 where it pays); a wider model for bf16's extra
    speed lost to the same model taking more steps, so the model does not depend on the choice."""
    return TrainConfig(
        model=ModelSection(preset="demo"),
        data=DataSection(corpus=corpus, vocab_size=4096),
        train=TrainSection(
            batch_size=32,
            grad_accum=1,
            lr=6e-3,
            min_lr=6e-4,
            warmup=50,
            schedule="cosine",
            weight_decay=0.1,
            betas=[0.9, 0.95],
            grad_clip=1.0,
            max_steps=0,
            max_time=minutes * 60.0,
            seed=1337,
            optimizer="muon",  # Muon + AdamW: BENCHMARKS.md, "Demo recipe sweep" (issue 21)
            muon_lr=0.02,
            precision="auto",
            log_every=20,
        ),
        eval=EvalSection(every=250, batches=8, final_full=True),
        checkpoint=CheckpointSection(dir=out, every_steps=0, every_minutes=1.0, keep_last=1, save_best=False),
    )


def run_demo(
    minutes: float = 5.0,
    out: str | os.PathLike = "runs/demo",
    corpus: str = "stdlib",
    overrides: dict[str, str] | None = None,
) -> dict:
    """Run the whole demo; returns the summary (metrics, completions, files written)."""
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    from yuyan.config import apply_overrides
    from yuyan.model import load
    from yuyan.model.flops import num_params
    from yuyan.train.pretrain import train

    if minutes <= 0:
        raise UserError(f"--minutes must be positive, got {minutes}")
    console = Console(stderr=True)
    t0 = time.perf_counter()
    cfg = apply_overrides(demo_config(minutes, str(out), corpus), overrides or {})
    out = Path(cfg.checkpoint.dir)
    console.print(
        f"[bold]yuyan demo[/]: corpus {cfg.data.corpus}, training budget {cfg.train.max_time / 60:.1f} min, "
        f"output in {out}"
    )
    result = train(cfg, resume=True)
    final = result["final"]

    lm = load(result["final_dir"])
    model, tok = lm.model, lm.tokenizer
    torch.manual_seed(0)
    from yuyan.generate import GenerationConfig, SamplingParams, generate

    gen = generate(
        model,
        tok,
        PROMPTS,
        GenerationConfig(max_new_tokens=64, sampling=SamplingParams(temperature=0.7, top_k=40, seed=0)),
    )
    completions = [c[0].text for c in gen]
    samples = out / "samples.txt"
    text = "".join(f"### prompt {p!r}\n{p}{c}\n\n" for p, c in zip(PROMPTS, completions, strict=False))
    tmp = samples.with_name(".samples.txt.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, samples)

    from yuyan.interpret.attention import render_attention

    att = render_attention(
        model, tok, ATTENTION_TEXT, out / "attention", layers=[model.config.n_layer - 1], title="demo model"
    )

    files = {
        "tokenizer": Path(result["tokenizer_dir"]) / "tokenizer.json",
        "token shards": Path(result["shards_dir"]),
        "checkpoint (resumable)": Path(result["checkpoint"]),
        "final model": Path(result["final_dir"]),
        "training config": out / "train_config.toml",
        "metrics": Path(result["metrics"]),
        "loss curve": Path(result["plot"]),
        "completions": samples,
        "attention heatmap": Path(att["pngs"][0]),
        "attention explorer": Path(att["html"]),
    }
    for p, c in zip(PROMPTS, completions, strict=False):
        console.rule(f"completion of {p!r}")
        console.print(p + c, markup=False, highlight=False)
    table = Table(title="yuyan demo", show_header=False)
    table.add_row("held-out bits per byte", f"{final['bpb']:.4f}")
    table.add_row("held-out perplexity", f"{final['ppl']:.2f} (per token; loss {final['loss']:.4f} nats)")
    table.add_row("parameters", f"{num_params(model) / 1e6:.2f}M")
    precision = result["precision"]
    table.add_row("precision", f"{precision['precision']} ({precision['reason']})")
    opt = result.get("optimizer") or {"name": cfg.train.optimizer}
    ns = opt.get("newton_schulz")
    table.add_row(
        "optimizer", opt["name"] + (f" (Newton-Schulz in {ns['precision']}: {ns['reason']})" if ns else "")
    )
    table.add_row(
        "training", f"{result['step']} steps, {result['tokens']:,} tokens, {result['elapsed']:.0f} s"
    )
    table.add_row("total time", f"{time.perf_counter() - t0:.0f} s")
    for name, path in files.items():
        table.add_row(name, str(path))
    console.print(table)
    # the headline on stdout, for scripts
    print(f"held-out bits per byte: {final['bpb']:.4f}  perplexity: {final['ppl']:.2f}  (files in {out})")
    return {
        "final": final,
        "completions": dict(zip(PROMPTS, completions, strict=False)),
        "files": {k: str(v) for k, v in files.items()},
        "step": result["step"],
        "tokens": result["tokens"],
        "elapsed": result["elapsed"],
        "params": num_params(model),
        "precision": precision,
        "optimizer": cfg.train.optimizer,
        "optimizer_choice": opt,
    }
