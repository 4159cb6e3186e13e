"""The pre-training recipe, top to bottom: config → tokenizer → token shards → model → `fit`.

`train(config)` is what `yuyan train --config FILE.toml` and `yuyan.train(...)` run. What exists is reused:
a tokenizer folder with tokenizer.json, a shards folder with meta.json, and (with resume) the newest
checkpoint. Under torchrun only rank 0 builds the tokenizer and shards; the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from yuyan.config import load_config
from yuyan.data.tasks import LMTask
from yuyan.errors import UserError
from yuyan.model.flops import num_params
from yuyan.train import distributed as D
from yuyan.train.config import TrainConfig
from yuyan.train.loop import fit


def load_train_config(
    path: str | os.PathLike | None = None, overrides: dict[str, str] | None = None
) -> TrainConfig:
    """A TrainConfig from an optional TOML file plus `{"train.lr": "3e-4"}`-style overrides."""
    cfg = load_config(TrainConfig, path, overrides)
    cfg.validate()
    return cfg


def prepare_tokenizer(cfg: TrainConfig, out: Path, info: D.DistInfo):
    """Load the configured tokenizer, or train one on the corpus's train split (rank 0) and save it."""
    from yuyan.tokenizer import Tokenizer

    tok_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        if cfg.data.tokenizer:
            raise UserError(
                f"no tokenizer.json in {tok_dir}; train one with `yuyan tokenizer train` or leave "
                "data.tokenizer empty to train one here"
            )
        if info.is_main:
            from yuyan.data.corpus import iter_documents

            docs = (d.text for d in iter_documents(cfg.data.corpus, split="train"))
            Tokenizer.train(docs, vocab_size=cfg.data.vocab_size, show_progress=False).save(tok_dir)
        D.barrier(info)
    return Tokenizer.load(tok_dir), tok_dir


def prepare_shards(cfg: TrainConfig, tokenizer, out: Path, info: D.DistInfo):
    """Open the configured shards, or tokenize the corpus into <out>/data (rank 0; a no-op when up to date)."""
    from yuyan.data.shards import TokenShards, prepare

    if cfg.data.shards:
        shards_dir = Path(cfg.data.shards)
    else:
        shards_dir = out / "data"
        if info.is_main:
            prepare(cfg.data.corpus, tokenizer, shards_dir)
        D.barrier(info)
    shards = TokenShards(shards_dir)
    shards.check_tokenizer(tokenizer)
    return shards, shards_dir


def build_model(cfg: TrainConfig, vocab_size: int):
    from yuyan.model.presets import preset
    from yuyan.model.transformer import Transformer

    over = cfg.model.overrides()
    over.setdefault("vocab_size", vocab_size)
    try:
        mcfg = preset(cfg.model.preset, **over)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from None
    if mcfg.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {vocab_size}; raise it"
        )
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed only
    return Transformer(mcfg)


def train(
    config: TrainConfig | str | os.PathLike | None = None,
    overrides: dict[str, str] | None = None,
    resume: bool = False,
) -> dict:
    """Pre-train a model as the config says; returns fit()'s summary plus the tokenizer and shards paths.

    config: a TrainConfig, or a TOML file path (None: the defaults); overrides: {"train.max_steps": "200"}.
    """
    if isinstance(config, TrainConfig):
        from yuyan.config import apply_overrides

        cfg = apply_overrides(config, overrides or {})
    else:
        cfg = load_train_config(config, overrides)
    cfg.validate()
    info = D.init(cfg.distributed, cfg.train.device)
    out = Path(cfg.checkpoint.dir)
    tokenizer, tok_dir = prepare_tokenizer(cfg, out, info)
    shards, shards_dir = prepare_shards(cfg, tokenizer, out, info)
    model = build_model(cfg, tokenizer.vocab_size)
    task = LMTask(
        shards, model.config.block_size, eval_batches=cfg.eval.batches, eval_batch_size=cfg.train.batch_size
    )
    if info.is_main:
        from rich.console import Console

        n = num_params(model)
        Console(stderr=True).print(
            f"model: {cfg.model.preset} {n / 1e6:.2f}M parameters "
            f"(d_model {model.config.d_model}, {model.config.n_layer} layers, vocab "
            f"{model.config.vocab_size}, context {model.config.block_size}); "
            f"world size {info.world_size} ({info.strategy}) on {info.device}"
        )
    meta = {
        "corpus": cfg.data.corpus,
        "corpus_fingerprint": shards.meta.get("corpus_fingerprint"),
        "params": num_params(model),
    }
    result = fit(model, tokenizer, task, cfg, out, resume=resume, meta=meta)
    return {
        **result,
        "tokenizer_dir": str(tok_dir),
        "shards_dir": str(shards_dir),
        "config": dataclasses.asdict(cfg),
    }
