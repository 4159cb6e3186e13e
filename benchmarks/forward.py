"""Forward+backward training throughput: our Transformer vs transformers' GPT2LMHeadModel, same run.

Both models get the 124M GPT-2 config, the same random batch (default 4 x 256 tokens) and the same loss
(next-token cross entropy over every position); each timed step is forward, loss, backward and zeroing the
gradients. Steps alternate between the two models so that drift on a shared machine hits both alike.
Prints one JSON line: tokens/s of ours and of the reference, and the ratio (goal >= 1.2).

    .venv/bin/python benchmarks/forward.py [--batch 4 --seq 256 --steps 4 --warmup 1 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from yuyan.model.flops import num_params
from yuyan.model.hf import hf_to_ours
from yuyan.model.presets import preset
from yuyan.model.transformer import Transformer


def ours_step(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = model(x, targets=y)  # the training loss as the loop computes it: lm_head fused with cross entropy
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, x: torch.Tensor, y: torch.Tensor) -> float:
    # use_cache=False: training needs no KV cache (the default would build one); the same loss as ours
    logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--layers", type=int, default=12, help="fewer layers for a quick look (default: GPT-2's 12)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = preset("gpt2", n_layer=args.layers)
    ours = Transformer(cfg).train()
    hf_cfg = GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = GPT2LMHeadModel(hf_cfg).train()  # dropout 0 in both: ModelConfig's default
    assert num_params(ours) == sum(p.numel() for p in ref.parameters())
    # the same weights in both (the lm_head is tied), so the two losses must agree
    ours.load_state_dict(hf_to_ours(ref.state_dict(), ours, "gpt2", "benchmark"), strict=False)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    runs = {"ours": (ours_step, ours), "transformers": (hf_step, ref)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for name, (step, model) in runs.items():
            t0 = time.perf_counter()
            losses[name] = step(model, x, y)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    assert abs(losses["ours"] - losses["transformers"]) < 1e-4, losses
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = {
        k: tokens / min(v) for k, v in times.items()
    }  # least disturbed step: steadier on a shared machine
    print(
        json.dumps(
            {
                "benchmark": "forward_backward",
                "config": "gpt2-124M",
                "batch": args.batch,
                "seq": args.seq,
                "layers": args.layers,
                "threads": args.threads,
                "dtype": "float32",
                "steps": args.steps,
                "ours_tokens_per_s": round(tps["ours"], 1),
                "transformers_tokens_per_s": round(tps["transformers"], 1),
                "ratio": round(tps["ours"] / tps["transformers"], 3),
                "best_step_ratio": round(best["ours"] / best["transformers"], 3),
                "loss": {k: round(v, 6) for k, v in losses.items()},
                "step_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
