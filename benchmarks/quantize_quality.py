"""Quality cost of int8 weights: bits per byte of held-out text, fp32 model against its `quantize_int8` copy.

A small GPT (4 layers, d_model 128, vocab 2048) is trained for a few hundred steps on standard-library
Python (nothing is downloaded), then both versions score the same held-out files with
`yuyan.evaluate.perplexity`. With `--model CHECKPOINT` (e.g. the 5-minute demo's `runs/demo/final`) it
scores that trained model on the standard-library validation split instead. Prints one JSON line.

    .venv/bin/python benchmarks/quantize_quality.py [--steps 300]
    .venv/bin/python benchmarks/quantize_quality.py --model runs/demo/final --val-chars 200000
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

from yuyan.evaluate.perplexity import perplexity
from yuyan.model.flops import num_params
from yuyan.model.quantize import quantize_int8
from yuyan.model.transformer import ModelConfig, Transformer
from yuyan.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--val-chars", type=int, default=200_000, help="score this much held-out text")
    ap.add_argument("--model", help="a trained checkpoint directory to score instead of training one")
    args = ap.parse_args()
    if args.model:
        return score_checkpoint(args.model, args.val_chars)
    torch.manual_seed(0)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train_texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[:120]]
    val_text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files[120:135])
    val_texts = [val_text[: args.val_chars]]
    tok = Tokenizer.train(train_texts, vocab_size=2048)
    ids = torch.tensor([i for t in train_texts for i in tok.encode(t) + [tok.eot_id]])
    kw = dict(vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4, d_model=128)
    if args.family == "llama":
        kw.update(ffn="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False, n_kv_head=2)
    model = Transformer(ModelConfig(**kw))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - 129, (16,))
        x = torch.stack([ids[s : s + 128] for s in starts])
        y = torch.stack([ids[s + 1 : s + 129] for s in starts])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / args.steps))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(
                f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True
            )
    info = {"family": args.family, "train_steps": args.steps, "train_seconds": round(time.time() - t0, 1)}
    print(json.dumps(compare(model.eval(), tok, val_texts, info)))


def compare(model: Transformer, tok: Tokenizer, texts: list[str], info: dict) -> dict:
    """Bits per byte of `texts` under the fp32 model, then under its int8 copy (quantised in place)."""
    n_params = num_params(model)
    fp32 = perplexity(model, tok, texts)
    quantize_int8(model)
    int8 = perplexity(model, tok, texts)
    fp, q = fp32["bits_per_byte"], int8["bits_per_byte"]
    return {
        "bench": "quantize_quality",
        **info,
        "params": n_params,
        "val_bytes": fp32["bytes"],
        "fp32_bits_per_byte": round(fp, 6),
        "int8_bits_per_byte": round(q, 6),
        "delta_bits_per_byte": round(q - fp, 6),
        "relative": round(q / fp - 1, 6),
    }


def score_checkpoint(path: str, val_chars: int) -> None:
    from yuyan.data.corpus import iter_documents
    from yuyan.model.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    texts, total = [], 0
    for d in iter_documents("stdlib", split="val"):  # whole documents up to val_chars characters
        if total >= val_chars:
            break
        texts.append(d.text[: val_chars - total])
        total += len(texts[-1])
    print(json.dumps(compare(ck.model.eval(), ck.tokenizer, texts, {"model": path})))


if __name__ == "__main__":
    main()
