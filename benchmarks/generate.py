"""Decode speed: yuyan's engine against transformers' `generate` on the same GPT-2 124M-shaped weights.

Random weights (nothing is downloaded), fp32, CPU, a 32-token prompt and 128 new tokens, greedy, no
end-of-text stop. Decode tokens/s = batch * 127 / (time(128 new tokens) - time(1 new token)), so prefill
is excluded. Also prints the memory-bandwidth roofline (parameter bytes read per step over a measured copy
bandwidth, and over a measured read-only bandwidth, since decoding only reads weights) and our fraction of
it, whether the decode kernel (yuyan/generate/kernels.py) ran, the int8 (`quantize_int8`) speed-up over
fp32, and greedy speculative decoding (`--speculative K`: K tokens drafted by the int8 copy, verified by
the fp32 model, so the tokens are the fp32 greedy ones; checked in the run), and bf16 decoding
(`decode_layout(model, "bf16")`: bf16 weights and KV cache, the bf16 decode kernel up to BF16_ROWS rows,
torch's bf16 GEMM above) with the choice `--dtype auto` makes on this machine and why.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--repeats 2] [--threads 2] [--speculative 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import torch

from yuyan.generate import GenerationConfig, generate
from yuyan.generate.kernels import decode_layout, decode_precision, skinny_linear_op
from yuyan.model.flops import num_params
from yuyan.model.hf import hf_to_ours
from yuyan.model.presets import preset
from yuyan.model.quantize import quantize_int8
from yuyan.model.transformer import Transformer


def bandwidths(mb: int = 512) -> tuple[float, float]:
    """Bytes per second (best of 5) moved by a large copy (read + write counted) and read by a large sum
    (reading only, as decoding reads weights)."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    nbytes = a.numel() * 4
    return 2 * nbytes / best(lambda: b.copy_(a)), nbytes / best(a.sum)


def decode_rates(runs: dict, batch: int, new: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each runner: best time of `new` tokens minus best time of 1 (prefill + first
    token). The runners take turns in every repeat, so a busy machine slows them alike."""
    best = {(k, n): float("inf") for k in runs for n in (new, 1)}
    for run in runs.values():
        run(2)  # warm-up
    for _ in range(repeats):
        for k, run in runs.items():
            for n in (new, 1):
                t = time.perf_counter()
                run(n)
                best[k, n] = min(best[k, n], time.perf_counter() - t)
    return {k: batch * (new - 1) / (best[k, new] - best[k, 1]) for k in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument(
        "--speculative",
        type=int,
        default=4,
        help="also time greedy speculation with K int8 draft tokens (0: off)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    cfg = preset("gpt2")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
        )
    ).eval()
    ours = Transformer(cfg).eval()
    ours.load_state_dict(
        hf_to_ours(hf.state_dict(), ours, "gpt2", "benchmark"), strict=False
    )  # lm_head is tied
    n_params = num_params(ours)
    # bytes read per decode step at batch 1: every weight once (the tied embedding once, as the lm_head),
    # except the embedding tables' single looked-up rows
    bytes_per_step = 4 * (n_params - ours.embed_positions.weight.numel())
    bw, read_bw = bandwidths()
    g = torch.Generator().manual_seed(1)
    result = {
        "bench": "generate",
        "model": "gpt2-124M-shape random fp32",
        "params": n_params,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "roofline_tok_s_b1": round(bw / bytes_per_step, 1),
        "read_bandwidth_GBps": round(read_bw / 1e9, 1),
        "decode_kernel": skinny_linear_op() is not None,  # False: torch's matmuls (YUYAN_DECODE_KERNEL=0)
    }
    int8 = quantize_int8(_copy(ours, cfg))
    bf16 = decode_layout(_copy(ours, cfg), "bf16")
    auto = decode_precision(ours, "auto")
    result["auto_dtype"] = auto.name
    result["auto_reason"] = auto.reason
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), generator=g)
        run_ours = partial(_run_ours, ours, prompts)
        run_hf = partial(_run_hf, hf, prompts)
        same = [c[0].token_ids for c in run_ours(16)] == run_hf(16)[:, args.prompt_tokens :].tolist()
        runs = {
            "ours": run_ours,
            "hf": run_hf,
            "int8": partial(_run_ours, int8, prompts),
            "bf16": partial(_run_ours, bf16, prompts),
        }
        # bf16 rounds every product, so its greedy tokens drift from fp32's: the share of the first 32 kept
        a, b = [c[0].token_ids for c in run_ours(32)], [c[0].token_ids for c in runs["bf16"](32)]
        agree = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
        if args.speculative:
            runs["spec"] = partial(_run_ours, ours, prompts, speculative=args.speculative)
            spec_same = [c[0].token_ids for c in runs["spec"](args.new_tokens)] == [
                c[0].token_ids for c in run_ours(args.new_tokens)
            ]
        rates = decode_rates(runs, batch, args.new_tokens, args.repeats)
        r_ours, r_hf, r_int8 = rates["ours"], rates["hf"], rates["int8"]
        result[f"b{batch}"] = {
            "ours_tok_s": round(r_ours, 1),
            "hf_tok_s": round(r_hf, 1),
            "ratio": round(r_ours / r_hf, 2),
            "int8_tok_s": round(r_int8, 1),
            "int8_speedup": round(r_int8 / r_ours, 2),
            "greedy_tokens_match_hf": same,
            "bf16_tok_s": round(rates["bf16"], 1),
            "bf16_speedup": round(rates["bf16"] / r_ours, 2),
            "bf16_ratio_to_hf": round(rates["bf16"] / r_hf, 2),
            "bf16_first32_greedy_agree_fp32": round(agree / (32 * batch), 2),
        }
        if args.speculative:  # the same fp32 greedy tokens, drafted by the int8 copy and verified
            result[f"b{batch}"].update(
                {
                    f"speculative{args.speculative}_tok_s": round(rates["spec"], 1),
                    "speculative_ratio_to_hf": round(rates["spec"] / r_hf, 2),
                    "speculative_tokens_equal_ours": spec_same,
                }
            )
        if batch == 1:
            result["b1"]["fraction_of_roofline"] = round(r_ours / (bw / bytes_per_step), 2)
            result["b1"]["fraction_of_read_roofline"] = round(r_ours / (read_bw / bytes_per_step), 2)
    print(json.dumps(result))


def _run_ours(model: Transformer, prompts: torch.Tensor, new: int, speculative: int = 0):
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=new, temperature=0, stop_token_ids=[], speculative=speculative)
    )
    return generate(model, None, prompts.tolist(), cfg)


def _run_hf(hf, prompts: torch.Tensor, new: int):
    with torch.inference_mode():
        return hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


def _copy(model: Transformer, cfg) -> Transformer:
    m = Transformer(cfg).eval()
    m.load_state_dict(model.state_dict())
    return m


if __name__ == "__main__":
    main()
