"""Helpers for tests/test_train.py: an in-memory token source and a training worker run as a subprocess.

`python tests/_train_worker.py OUT_DIR '{"train.max_steps": "40", ...}' [--resume]` trains a tiny GPT on a
synthetic, learnable token stream (a repeated random pattern with noise) through `yuyan.train.fit`, so the
same code path runs in one process, under torchrun (DDP/FSDP) or as a victim of SIGKILL.
"""

from __future__ import annotations

import json
import sys

import torch


class ArrayShards:
    """TokenShards' sampling interface over two in-memory 1-D token tensors."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, bytes_per_token: float = 3.0):
        self.data, self.bpt = {"train": train, "val": val}, bytes_per_token
        self.meta = {}

    def get_batch(self, split, batch_size, block_size, generator, device="cpu"):
        d = self.data[split]
        ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([d[i : i + block_size] for i in ix.tolist()])
        y = torch.stack([d[i + 1 : i + 1 + block_size] for i in ix.tolist()])
        return x.to(device), y.to(device)

    def iter_sequential(self, split, batch_size, block_size):
        d = self.data[split]
        n = (len(d) - 1) // block_size
        for s in range(0, n, batch_size):
            rows = range(s, min(s + batch_size, n))
            yield (
                torch.stack([d[r * block_size : (r + 1) * block_size] for r in rows]),
                torch.stack([d[r * block_size + 1 : (r + 1) * block_size + 1] for r in rows]),
            )

    def bytes_per_token(self, split):
        return self.bpt


def synthetic_shards(vocab: int = 64, n: int = 12000, seed: int = 0) -> ArrayShards:
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, vocab, (37,), generator=g)
    data = pattern.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.1
    data[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    cut = int(n * 0.9)
    return ArrayShards(data[:cut], data[cut:])


def tiny_tokenizer():
    from yuyan.tokenizer import Tokenizer

    return Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)


def run(out_dir: str, overrides: dict, resume: bool = False) -> dict:
    from yuyan.config import apply_overrides
    from yuyan.data.tasks import LMTask
    from yuyan.model.transformer import ModelConfig, Transformer
    from yuyan.train import TrainConfig, fit

    base = {
        "train.batch_size": "4",
        "train.max_steps": "40",
        "train.warmup": "5",
        "train.lr": "3e-3",
        "train.log_every": "1",
        "eval.every": "10",
        "eval.batches": "2",
        "train.device": "cpu",
        "checkpoint.every_minutes": "0",
    }
    overrides = dict(overrides)
    dropout = float(overrides.pop("dropout", 0.05))  # 0 for DDP parity: masks depend on each rank's RNG
    cfg = apply_overrides(TrainConfig(), {**base, **overrides})
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    # the model's vocabulary covers the tokenizer saved with it; the synthetic stream uses ids < 64
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, d_model=32, dropout=dropout
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-32 model gains nothing from threads, and they suffer on a busy machine
    try:
        return fit(
            model,
            tok,
            LMTask(synthetic_shards(), 32, eval_batches=2, eval_batch_size=4),
            cfg,
            out_dir,
            resume=resume,
        )
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = run(sys.argv[1], json.loads(sys.argv[2]), resume="--resume" in sys.argv[3:])
    print(json.dumps(res))
