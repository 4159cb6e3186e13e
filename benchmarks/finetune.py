"""LoRA against full fine-tuning on the 124M `gpt2` preset, and the docstring task before/after fine-tuning.

Part 1 (cost): for each mode (full, LoRA r=8 on q_proj/v_proj) a fresh subprocess builds the 124M preset
with random weights, wraps it (or not) with `apply_lora`, and runs AdamW training steps (build_optimizer,
the loop's optimizer) on random token batches through the SFT task's loss. It reports trainable parameters,
the median step time after warm-up and the process's peak resident memory (`ru_maxrss`; torch allocations
are invisible to tracemalloc, and a separate process per mode keeps the peaks apart). The reference is full
fine-tuning; ratios are LoRA / full.

Part 2 (quality, optional with --docstring MODEL_DIR): `run_docstring_finetune` on a small pre-trained model
(e.g. the demo's final checkpoint) for --minutes, ROUGE-L and BLEU of the first docstring line on held-out
stdlib functions before and after.

    .venv/bin/python benchmarks/finetune.py [--steps 4] [--batch 2 --seq 128] [--device cpu]
    .venv/bin/python benchmarks/finetune.py --docstring runs/demo/final --minutes 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(mode: str, steps: int, batch: int, seq: int, device: str, rank: int) -> dict:
    import torch

    from yuyan.data.tasks import masked_lm_loss
    from yuyan.model.lora import apply_lora, count_params
    from yuyan.model.presets import preset
    from yuyan.model.transformer import Transformer
    from yuyan.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(preset("gpt2")).to(device)
    if mode == "lora":
        apply_lora(model, rank=rank, alpha=2 * rank, targets=["q_proj", "v_proj"])
    trainable, total = count_params(model)
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), torch.device(device).type)
    model.train()
    g = torch.Generator().manual_seed(0)
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # step 0 warms up (allocations, optimizer state creation)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g).to(device)
        b = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        t0 = time.perf_counter()
        loss = masked_lm_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {
        "mode": mode,
        "trainable_params": trainable,
        "total_params": total,
        "step_s": times[len(times) // 2],
        "tokens_per_s": batch * seq / times[len(times) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(mode: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--device",
        args.device,
        "--rank",
        str(args.rank),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--docstring", default="", help="a small pre-trained model folder for the docstring task")
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.device, args.rank)))
        return
    result: dict = {
        "bench": "finetune",
        "preset": "gpt2 (124M, random weights)",
        "device": args.device,
        "batch": args.batch,
        "seq": args.seq,
        "threads": os.cpu_count(),
    }
    if not args.skip_cost:
        full, lora = run_child("full", args), run_child("lora", args)
        result.update(
            full=full,
            lora=lora,
            ratio={
                "trainable_params": lora["trainable_params"] / full["trainable_params"],
                "step_time": lora["step_s"] / full["step_s"],
                "peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
                **(
                    {"peak_cuda": lora["peak_cuda_mb"] / full["peak_cuda_mb"]}
                    if "peak_cuda_mb" in full
                    else {}
                ),
            },
        )
    if args.docstring:
        from yuyan.train.finetune import run_docstring_finetune

        with tempfile.TemporaryDirectory() as tmp:
            s = run_docstring_finetune(args.docstring, os.path.join(tmp, "ft"), args.minutes)
        result["docstring"] = {
            k: s[k]
            for k in (
                "rouge_l_before",
                "rouge_l_after",
                "bleu_before",
                "bleu_after",
                "train_pairs",
                "eval_pairs",
                "steps",
            )
        }
        result["docstring"]["minutes"] = args.minutes
        result["docstring"]["examples_after"] = s["examples_after"][:3]
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
