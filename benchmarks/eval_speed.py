"""`yuyan eval speed` figures against Hugging Face transformers on the same model shape, in one run.

Ours: `yuyan.evaluate.speed.speed` (static KV cache, greedy) on a model with random weights (speed does not
depend on the values). Reference: `transformers` GPT2LMHeadModel / LlamaForCausalLM with the same config
and our weights (`yuyan.model.hf.ours_to_hf`), `generate(do_sample=False)`: time to first token is a
`max_new_tokens=1` call (prefill + one token); decode tokens/s counts the remaining tokens of a full call,
forced to its length with `min_new_tokens`. Both take the best of `--repeats` runs after a warm-up. Prints
one JSON line with both figures and ours/reference ratios (> 1: ours is faster; for TTFT, < 1 is better).

    .venv/bin/python benchmarks/eval_speed.py --preset gpt2 [--prompt 32 --new 64 --repeats 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def hf_reference(model, family: str, prompt_len: int, new_tokens: int, batches, repeats: int) -> dict:
    from types import SimpleNamespace

    import transformers

    from yuyan.model.hf import ours_config_to_hf, ours_to_hf

    no_tokens = SimpleNamespace(bos_id=None, eot_id=None, pad_id=None)  # generation is forced to full length
    cfg_dict = ours_config_to_hf(model.config, family, no_tokens)
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    cfg = (transformers.GPT2Config if family == "gpt2" else transformers.LlamaConfig)(**cfg_dict)
    ref = cls(cfg).eval()
    ref.load_state_dict(ours_to_hf(model, family), strict=False)
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batches:
            x = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=g)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
            ref.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            ttft, full = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ref.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
                ttft.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ref.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                full.append(time.perf_counter() - t0)
            out[f"ttft_ms_b{b}"] = 1000 * min(ttft)
            out[f"decode_tok_s_b{b}"] = b * (new_tokens - 1) / max(min(full) - min(ttft), 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from yuyan.evaluate.speed import speed
    from yuyan.model.hf import hf_family
    from yuyan.model.presets import preset
    from yuyan.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(preset(a.preset)).eval()
    batches = tuple(int(x) for x in a.batches.split(","))
    ours = speed(model, a.prompt, a.new, batches, a.repeats)  # first, so peak RSS is ours alone
    ref = hf_reference(model, hf_family(model.config), a.prompt, a.new, batches, a.repeats)
    ratios = {}
    for k in ref:
        ratios[k] = ours[k] / ref[k]
    keep = ("params", "flops_per_token", "peak_rss_mb", "weights_mb", "threads", "device")
    print(
        json.dumps(
            {
                "benchmark": "eval_speed",
                "preset": a.preset,
                "prompt_len": a.prompt,
                "new_tokens": a.new,
                "ours": {
                    k: round(v, 3) if isinstance(v, float) else v
                    for k, v in ours.items()
                    if k.startswith(("ttft_ms_b", "decode_tok_s")) or k in keep
                },
                "reference_transformers": {k: round(v, 3) for k, v in ref.items()},
                "ratio_ours_over_reference": {k: round(v, 3) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
