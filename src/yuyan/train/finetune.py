"""The fine-tuning recipe, top to bottom: load a model → data task → (LoRA) (head) → the one `fit` loop → save.

One recipe for every fine-tuning family (options, not copied recipes): `task` is lm (next-token loss on a text
corpus, through token shards like pre-training), sft (loss on assistant/completion tokens only) or classify
(a linear head over the last/mean hidden state; the [classify] section of `FinetuneConfig`: pooling,
dropout, class weights, length-bucketed batches, a bounded val sample, GPT-1's auxiliary LM loss; best/ by
val accuracy); `lora` switches full fine-tuning to LoRA adapters. The model comes from any `yuyan.load`
spec (our checkpoint or an imported Hugging Face folder), or, with `pretrain_minutes`, from pre-training the
demo model (and a tokenizer) on the classification data's own training texts first
(`pretrain_on_task_text`). Resume, periodic evaluation, best/final checkpoints and torchrun all come from
`yuyan.train.loop.fit`; the checkpoints hold a plain model (LoRA merged in, the head as extra tensors)
that every other command opens, and `save_adapter` also writes the adapter alone to OUT/adapter.
`run_docstring_finetune` is the embedded demo: the stdlib docstring task, scored by ROUGE-L and BLEU
before and after.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from yuyan.errors import UserError
from yuyan.model.lora import LoRAConfig, apply_lora, count_params, merge_lora, save_adapter
from yuyan.train.config import (
    HIGHER_IS_BETTER,
    CheckpointSection,
    ClassifySection,
    EvalSection,
    FinetuneConfig,
    TrainConfig,
    TrainSection,
)
from yuyan.train.loop import fit

TASKS = ("lm", "sft", "classify")
PRETRAIN_EVAL_EVERY, PRETRAIN_PATIENCE = 100, 3  # pretrain_on_task_text: best/ by val loss, early stopping


def default_train_config(task: str = "sft") -> FinetuneConfig:
    """Fine-tuning defaults: short, gentle schedule; evaluation every 50 steps; no time-based checkpoints.
    For classify, the recipe's (the sweep in BENCHMARKS.md, "Classification vs TF-IDF (issue 20)"): best/
    by val accuracy, early stopping, and the [classify] section's defaults."""
    cfg = FinetuneConfig(
        train=TrainSection(
            batch_size=8, lr=3e-4, min_lr=3e-5, warmup=10, max_steps=300, weight_decay=0.0, log_every=10
        ),
        eval=EvalSection(every=50, batches=8),
        checkpoint=CheckpointSection(every_minutes=10.0, keep_last=1),
    )
    if task == "classify":
        cfg.train.batch_size, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup = 32, 1e-3, 1e-4, 50
        cfg.eval.best_metric, cfg.eval.patience = "accuracy", 8
    return cfg


def classify_settings(cfg: TrainConfig, task: str) -> ClassifySection:
    """The [classify] settings of a run; any changed from the defaults with another task is refused (they
    cannot apply), as is a classification metric for eval.best_metric."""
    cs = cfg.classify if isinstance(cfg, FinetuneConfig) else ClassifySection()
    if task != "classify":
        changed = [f"classify.{k}" for k, v in asdict(cs).items() if v != getattr(ClassifySection(), k)]
        if changed:
            raise UserError(
                f"{', '.join(changed)} applies to --task classify only (this run is --task {task})"
            )
        if cfg.eval.best_metric in HIGHER_IS_BETTER:
            raise UserError(
                f"eval.best_metric {cfg.eval.best_metric} (--best-metric) is a classification metric; "
                f"--task {task} reports loss"
            )
    return cs


@dataclass
class FinetuneOptions:
    task: str = "sft"  # lm | sft | classify
    data: str = ""  # lm: a corpus spec (file, folder, glob, JSONL, stdlib); sft/classify: JSONL or CSV
    val_data: str = ""  # "": a deterministic 10% of `data` is held out
    lora: LoRAConfig | None = None  # None: full fine-tuning
    save_adapter: bool = False
    text_field: str = "text"
    label_field: str = "label"
    # classify: pre-train a tokenizer and the demo model on the training texts for this many minutes first
    # (0: fine-tune `model`); see pretrain_on_task_text
    pretrain_minutes: float = 0.0
    # with pretrain_minutes: more unlabelled text to pre-train on besides the training texts (a corpus spec)
    pretrain_corpus: str | None = None
    template: str = "chat"  # sft prompt/completion records: chat (role tokens) | plain (concatenation)
    labels: list[str] | None = None  # classify: class names (yuyan.data.tasks.name_labels); None: the data's
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint meta


def build_task(lm, opts: FinetuneOptions, out: Path, cfg: TrainConfig):
    """The data task for `opts.task`, built from the loaded model's tokenizer and context length."""
    from yuyan.data.tasks import ClassifyTask, LMTask, SFTTask

    tok, block = lm.tokenizer, lm.model.config.block_size
    if opts.labels is not None and opts.task != "classify":
        raise UserError(f"--labels names classification classes; --task {opts.task} has none: drop it")
    if opts.task == "sft":
        return SFTTask.from_files(opts.data, tok, block, opts.val_data or None, opts.template)
    if opts.task == "classify":
        cs = classify_settings(cfg, opts.task)
        return ClassifyTask.from_files(
            opts.data,
            tok,
            block,
            opts.val_data or None,
            opts.text_field,
            opts.label_field,
            label_names=opts.labels,
            class_weights=cs.class_weights,
            bucket=cs.bucket,
            val_examples=cs.val_examples,
            lm_weight=cs.lm_weight,
        )
    if opts.task == "lm":
        from yuyan.data.shards import TokenShards, prepare

        shards_dir = out / "data"
        prepare(
            opts.data, tok, shards_dir, text_field=opts.text_field, progress=False
        )  # a no-op when up to date
        return LMTask(
            TokenShards(shards_dir),
            block,
            eval_batches=cfg.eval.batches,
            eval_batch_size=cfg.train.batch_size,
        )
    raise UserError(f"unknown task {opts.task!r}; choose one of {', '.join(TASKS)}")


def _spec_str(model: str | os.PathLike) -> str:
    """A model spec as recorded in an adapter: local folders as absolute paths, hf:NAME as it is."""
    p = Path(model)
    return str(p.resolve()) if p.exists() else str(model)


def make_exporter(opts: FinetuneOptions):
    """export(trained module) -> (plain Transformer, extra tensors, meta) for every checkpoint."""
    from yuyan.model.heads import Classifier

    def export(m: nn.Module):
        core = m.model if isinstance(m, Classifier) else m
        if opts.lora is not None:
            core = merge_lora(copy.deepcopy(core))  # the training model keeps its adapters
        if isinstance(m, Classifier):
            return core, m.head_tensors(), m.head_meta()
        return core, {}, {"task": opts.task}

    return export


def pretrain_on_task_text(
    opts: FinetuneOptions, out: str | os.PathLike, resume: bool = False, tc: TrainSection | None = None
) -> dict:
    """Pre-train the demo model and its tokenizer on the texts of the classification data for
    `opts.pretrain_minutes` (yuyan.train.pretrain with `demo_config`), in OUT/pretrain. From the fine-tuning's
    train section `tc` it takes the clock (train.clock: the minutes are wall or CPU minutes, as the
    fine-tuning's max_time) and the seed (train.seed), so one seed and one kind of budget rule the whole run.

    The corpus (OUT/pretrain/corpus.jsonl) is the training rows' texts, plus the documents of
    `opts.pretrain_corpus` when given (unlabelled text of the same kind: more of it is what a small task's
    text lacks); the rows held out for validation (a deterministic 10% of --data, or --val-data) stay
    unseen, so the val metrics that pick best/ are honest. A task's text is small (a few thousand reviews are ~100k tokens, which the demo model
    passes over dozens of times in minutes), so the run keeps the checkpoint of lowest val loss (best/,
    evaluated every PRETRAIN_EVAL_EVERY steps) and stops after PRETRAIN_PATIENCE evaluations without a lower
    one; fine-tuning starts from that best/ (final/ when no evaluation ran). With resume, a finished
    pre-training is reused and an interrupted one continues.
    Returns {"model_dir" (the checkpoint fine-tuned), "steps", "early_stopped", "best", "texts", "corpus",
    "minutes"}.
    """
    from yuyan.data.tasks import DataReport, classification_split
    from yuyan.model.checkpoint import atomic_write_text
    from yuyan.train.demo import demo_config
    from yuyan.train.pretrain import train

    if opts.task != "classify":
        raise UserError(
            f"--pretrain-minutes applies to --task classify only (this run is --task {opts.task})"
        )
    if not opts.pretrain_minutes > 0:
        raise UserError(f"--pretrain-minutes must be > 0, got {opts.pretrain_minutes}")
    pdir = Path(out) / "pretrain"
    final, best = pdir / "final", pdir / "best"
    pick = best if (best / "model.safetensors").exists() else final
    rows, _ = classification_split(
        opts.data, opts.val_data or None, opts.text_field, opts.label_field, DataReport(opts.data)
    )
    info = {"corpus": str(pdir / "corpus.jsonl"), "texts": len(rows), "minutes": opts.pretrain_minutes}
    if resume and (final / "model.safetensors").exists():
        return {**info, "model_dir": str(pick), "steps": None, "early_stopped": None, "best": None}
    pdir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for _, t, _ in rows]
    if opts.pretrain_corpus:  # unlabelled text the user adds (their job to keep it free of test rows)
        from yuyan.data.corpus import iter_documents

        extra = [d.text for d in iter_documents(opts.pretrain_corpus) if d.text.strip()]
        lines += [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in extra]
        info["extra_documents"] = len(extra)
    atomic_write_text(pdir / "corpus.jsonl", "".join(lines))
    cfg = demo_config(minutes=opts.pretrain_minutes, out=str(pdir), corpus=info["corpus"])
    cfg.checkpoint.save_best, cfg.eval.every, cfg.eval.patience = True, PRETRAIN_EVAL_EVERY, PRETRAIN_PATIENCE
    if tc is not None:
        cfg.train.clock, cfg.train.seed = tc.clock, tc.seed
    res = train(cfg, resume=resume)
    if res["final_dir"] is None:
        raise UserError(f"pre-training was interrupted; continue with --resume (saved in {pdir})")
    pick = best if (best / "model.safetensors").exists() else final
    return {
        **info,
        "model_dir": str(pick),
        "steps": res["step"],
        "early_stopped": res["early_stopped"],
        "best": res["best"],
    }


def _base_model(
    model, opts: FinetuneOptions, out: Path, resume: bool, console, tc: TrainSection
) -> tuple[str, dict | None]:
    """The spec to fine-tune: `model`, or (opts.pretrain_minutes) the model pre-trained on the task's text,
    with pretrain_on_task_text's summary."""
    if not opts.pretrain_minutes:
        if model is None:
            raise UserError(
                "no model: pass --model M, or --pretrain-minutes M to pre-train one on the task's text"
            )
        return str(model), None
    if model is not None:
        raise UserError(
            "--pretrain-minutes pre-trains a new model and tokenizer on the task's text; drop --model "
            "(or drop --pretrain-minutes to fine-tune --model)"
        )
    unit = "CPU minutes" if tc.clock == "cpu" else "minutes"
    console.print(f"pre-training on the task's text for {opts.pretrain_minutes:g} {unit} in {out}/pretrain")
    pretrained = pretrain_on_task_text(opts, out, resume=resume, tc=tc)
    return pretrained["model_dir"], pretrained


def finetune(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    opts: FinetuneOptions,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> dict:
    """Fine-tune `model` (any yuyan.load spec) as `opts` says; write OUT/{final,best,checkpoints,...}.
    With opts.pretrain_minutes (classify), `model` is None: it is pre-trained first in OUT/pretrain.

    Returns fit()'s summary plus "data" (the DataReport counts), "trainable_params", "total_params",
    "adapter_dir", "pretrain" (None without it) and, for classify, "confusion_png".
    """
    from rich.console import Console

    from yuyan.model import load
    from yuyan.model.heads import Classifier

    if opts.task not in TASKS:
        raise UserError(f"unknown task {opts.task!r}; choose one of {', '.join(TASKS)}")
    if not opts.data:
        raise UserError("no training data: pass --data FILE")
    cfg = cfg or default_train_config(opts.task)
    cs = classify_settings(cfg, opts.task)
    out = Path(out)
    console = Console(stderr=True, quiet=quiet)
    model, pretrained = _base_model(model, opts, out, resume, console, cfg.train)
    lm = load(model)
    task = build_task(lm, opts, out, cfg)
    report = getattr(task, "report", None)
    if report is not None:
        console.print(f"data: {report.summary()}")

    net: nn.Module = lm.model
    if opts.task == "classify":
        net = Classifier(
            lm.model, task.labels, cs.pooling, lm.tokenizer, task.label_values, dropout=cs.dropout
        )
        if lm.meta.get("task") == "classify" and lm.meta.get("labels") == task.labels:
            net.load_head(lm.extra_tensors)  # continue training a saved head
        if not lm.model.lm_head_weight_tied() and cs.lm_weight == 0:
            # unused by the head: keep it out of the optimizer (and out of DDP's unused-parameter check);
            # with classify.lm_weight the auxiliary LM loss uses it, and GPT-1 fine-tunes every parameter
            lm.model.lm_head.weight.requires_grad_(False)
    if opts.lora is not None:
        lc = opts.lora
        # freezes the base; a classifier head (outside lm.model) stays trainable
        apply_lora(lm.model, lc.rank, lc.alpha, lc.dropout, lc.targets)
    elif opts.save_adapter:
        raise UserError("--save-adapter needs LoRA: add --lora-rank R")
    trainable, total = count_params(net)
    console.print(
        f"fine-tuning {model} ({opts.task}, {f'LoRA r={opts.lora.rank}' if opts.lora else 'full'}): "
        f"{trainable:,} of {total:,} parameters trainable"
    )

    meta = {
        "finetune": {
            "base_model": str(model),
            "task": opts.task,
            "data": opts.data,
            "lora": asdict(opts.lora) if opts.lora else None,
            **({"classify": asdict(cs)} if opts.task == "classify" else {}),
            **({"pretrain": pretrained} if pretrained else {}),
            **opts.extra,
        },
        "data_report": report.to_dict() if report is not None else {},
    }
    result = fit(net, lm.tokenizer, task, cfg, out, resume=resume, meta=meta, export=make_exporter(opts))
    result.update(
        data=report.to_dict() if report is not None else {},
        trainable_params=trainable,
        total_params=total,
        adapter_dir=None,
        confusion_png=None,
        pretrain=pretrained,
    )

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes the extra files
        return result
    if opts.save_adapter and not result["interrupted"]:
        extra = net.head_tensors() if isinstance(net, Classifier) else {}
        hmeta = net.head_meta() if isinstance(net, Classifier) else {"task": opts.task}
        result["adapter_dir"] = str(
            save_adapter(
                lm.model, out / "adapter", base_model=_spec_str(model), extra_tensors=extra, meta=hmeta
            )
        )
    if opts.task == "classify" and getattr(task, "last_confusion", None) is not None:
        from yuyan.plots import plot_confusion_matrix

        result["confusion_png"] = str(
            plot_confusion_matrix(
                task.last_confusion, task.labels, out / "confusion_matrix.png", title="val confusion"
            )
        )
    summary = {k: v for k, v in result.items() if k != "config"}
    tmp = out / ".finetune_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / "finetune_summary.json")
    return result


# ---------------------------------------------------------------------------------------------- the demo task


def docstring_scores(
    lm_model, tokenizer, pairs: list[dict], max_new_tokens: int = 24, batch_size: int = 16
) -> dict:
    """Greedy completions for docstring prompts, scored against the first docstring lines."""
    from yuyan.evaluate.text_metrics import bleu, rouge
    from yuyan.generate import GenerationConfig, SamplingParams, generate

    gc = GenerationConfig(
        max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0), stop=["\n"]
    )
    preds: list[str] = []
    for i in range(0, len(pairs), batch_size):
        chunk = [p["prompt"] for p in pairs[i : i + batch_size]]
        preds += [c[0].text.split("\n")[0].strip() for c in generate(lm_model, tokenizer, chunk, gc)]
    refs = [p["completion"].strip() for p in pairs]
    return {
        "rouge_l": rouge(preds, refs)["rougeL"],
        "bleu": bleu(preds, refs, tokenize="13a")["bleu"],
        "examples": [
            {"name": p.get("name"), "reference": r, "prediction": q}
            for p, r, q in list(zip(pairs, refs, preds, strict=True))[:8]
        ],
    }


def run_docstring_finetune(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    minutes: float = 2.0,
    eval_pairs: int = 64,
    spec: str = "stdlib",
) -> dict:
    """Fine-tune `model_dir` on the docstring task of corpus `spec` (default the stdlib) for `minutes`; ROUGE-L and BLEU on held-out pairs.

    Returns {rouge_l_before, rouge_l_after, bleu_before, bleu_after, train_pairs, eval_pairs, steps, out_dir,
    final_dir, examples_before, examples_after}; also written to OUT/docstring_scores.json.
    """
    from yuyan.data.tasks import DocstringTask, docstring_pairs
    from yuyan.model import load

    out = Path(out_dir)
    lm = load(model_dir)
    block = lm.model.config.block_size
    pairs = [
        p
        for p in docstring_pairs("val", limit=4 * eval_pairs, spec=spec)
        if len(lm.tokenizer.encode(p["prompt"])) + 24 <= block
    ][:eval_pairs]
    if not pairs:
        raise UserError(
            "no held-out docstring pair fits the model's context; use a model with block_size >= 256"
        )
    before = docstring_scores(lm.model, lm.tokenizer, pairs)
    task = DocstringTask.build(lm.tokenizer, block, spec=spec)
    cfg = default_train_config()
    cfg.train.max_time, cfg.train.max_steps, cfg.train.lr, cfg.train.min_lr = (
        minutes * 60,
        100_000,
        5e-4,
        5e-5,
    )
    cfg.eval.every, cfg.checkpoint.every_minutes = 0, 0.0
    cfg.train.batch_size = 16
    lm.model.train()
    meta = {"finetune": {"base_model": str(model_dir), "task": "docstring"}}
    result = fit(lm.model, lm.tokenizer, task, cfg, out, meta=meta, export=lambda m: (m, {}, {"task": "sft"}))
    lm.model.eval()
    after = docstring_scores(lm.model, lm.tokenizer, pairs)
    scores = {
        "rouge_l_before": before["rouge_l"],
        "rouge_l_after": after["rouge_l"],
        "bleu_before": before["bleu"],
        "bleu_after": after["bleu"],
        "train_pairs": len(task.train),
        "eval_pairs": len(pairs),
        "steps": result["step"],
        "out_dir": str(out),
        "final_dir": result["final_dir"],
        "examples_before": before["examples"],
        "examples_after": after["examples"],
    }
    tmp = out / ".docstring_scores.json.tmp"
    tmp.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "docstring_scores.json")
    return scores


__all__ = [
    "finetune",
    "FinetuneOptions",
    "default_train_config",
    "build_task",
    "classify_settings",
    "pretrain_on_task_text",
    "make_exporter",
    "run_docstring_finetune",
    "docstring_scores",
    "TASKS",
]
