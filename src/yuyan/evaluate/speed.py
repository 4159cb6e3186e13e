"""Compute cost and real-time response of a model: latency, throughput, memory, parameters, FLOPs.

Measured with the model's own static KV cache and greedy decoding over random prompts (the speed of a forward
pass does not depend on the token values): time to first token is the prefill of the prompt plus the choice of
the first token; decode tokens/s counts the tokens produced after it, over all rows of the batch. Each batch
size runs once to warm up (allocations, kernels) and then `repeats` times; the best run is reported (the
least disturbed by other jobs). The model is laid out for decoding first, as `generate` does
(`yuyan.generate.engine.decode_layout`: the decode kernel on CPU). Peak memory is the process's peak
resident set size (and CUDA's peak allocation on a GPU); FLOPs per token come from `yuyan.model.flops`.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from yuyan.errors import UserError
from yuyan.generate.kernels import decode_layout
from yuyan.model.flops import flops_per_token, num_params
from yuyan.model.kv_cache import KVCache
from yuyan.model.transformer import Transformer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _run(model: Transformer, batch: int, prompt_len: int, new_tokens: int, seed: int) -> tuple[float, float]:
    """One greedy generation: (seconds to first token, seconds for the remaining new_tokens - 1 steps)."""
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    cache = KVCache(model.config, batch, capacity=prompt_len + new_tokens, device=device, dtype=dtype)
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        _sync(device)
        t0 = time.perf_counter()
        h = model.hidden(prompt, cache=cache)
        nxt = model.logits(h[:, -1]).argmax(-1)  # (B,): logits of the last position only
        cache.advance(prompt_len)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            h = model.hidden(nxt[:, None], cache=cache)
            nxt = model.logits(h[:, -1]).argmax(-1)
            cache.advance(1)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # Linux reports KiB, macOS bytes


def speed(
    model: Transformer,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 2,
    seed: int = 0,
) -> dict:
    """{ttft_ms, decode_tok_s_b1, decode_tok_s_b8, ..., peak_rss_mb, params, flops_per_token, ...}.

    prompt_len defaults to 32 and new_tokens to 64, each shrunk to fit a shorter context.
    """
    c = model.config
    prompt_len = prompt_len or min(32, c.block_size // 4)
    new_tokens = new_tokens or min(64, c.block_size - prompt_len)
    if new_tokens < 2:
        raise UserError(f"--new-tokens {new_tokens} is too small to time decoding; pass 2 or more")
    if prompt_len < 1:
        raise UserError("--prompt-len must be at least 1")
    if prompt_len + new_tokens > c.block_size:
        raise UserError(
            f"prompt {prompt_len} + new tokens {new_tokens} exceed the model's context {c.block_size}; "
            "pass a smaller --prompt-len or --new-tokens"
        )
    was = model.training
    decode_layout(model.eval())  # the layout (decode kernel or column-major weights) that generation uses
    device = next(model.parameters()).device
    out: dict = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
    }
    for b in batch_sizes:
        _run(model, b, prompt_len, min(new_tokens, 8), seed)  # warm-up
        runs = [_run(model, b, prompt_len, new_tokens, seed + r) for r in range(max(1, repeats))]
        ttft = min(r[0] for r in runs)
        dec = min(r[1] for r in runs)
        out[f"ttft_ms_b{b}"] = 1000 * ttft
        out[f"decode_tok_s_b{b}"] = b * (new_tokens - 1) / dec
        out[f"ms_per_step_b{b}"] = 1000 * dec / (new_tokens - 1)
    first = batch_sizes[0]
    out["ttft_ms"] = out[f"ttft_ms_b{first}"]
    out["params"] = num_params(model)
    out["params_non_embedding"] = num_params(model, exclude_embeddings=True)
    out["flops_per_token"] = flops_per_token(model, seq_len=prompt_len + new_tokens)
    out["decode_gflop_s_b1"] = out.get("decode_tok_s_b1", 0.0) * out["flops_per_token"] / 1e9
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["peak_rss_mb"] = peak_rss_bytes() / 2**20
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    model.train(was)
    return out


__all__ = ["speed", "peak_rss_bytes"]
