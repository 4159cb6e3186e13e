"""What the training loop trains: next-token prediction over token shards, SFT, classification, docstrings.

Each task implements the training loop's `Task` protocol (`batch`, `loss`, `evaluate`, `state_dict`,
`load_state_dict`; yuyan.train.loop), so pre-training and fine-tuning share the one loop with its resume,
evaluation and checkpoints. Readers validate the data and COUNT every problem in a `DataReport` (empty
lines, bad JSON, over-long examples that were truncated, a messages list with no assistant turn, val labels
unseen in training); a missing column or a file with no usable example is a `UserError` naming the fix.

- LM: next-token prediction over token shards (pre-training, and `finetune --task lm`); perplexity and
  bits per byte on the val split.
- SFT: JSONL of {"messages": [...]} (rendered by `Tokenizer.apply_chat_template`) or {"prompt",
  "completion"} (rendered as a user turn and an assistant turn, or as plain concatenation with
  `template="plain"`). Loss only on the assistant/completion tokens: labels are -100 elsewhere, batches are
  right-padded with pad tokens whose labels are -100 (no cross-example attention, unlike naive packing).
- Classification: CSV, TSV or JSONL with text and label columns (names or 0-based indices; one reader,
  yuyan.data.tables, with header detection); label values may be given names (`name_labels`);
  optional class weights in the loss, length-bucketed batches (`LengthBuckets`: every example once
  per epoch, little padding), periodic evaluation on a fixed sample of the val split and the whole
  split at the end.
- Docstring: from the stdlib corpus (split like the corpus), pairs (function source without its docstring
  -> first line of its docstring) extracted with `ast`, in a deterministic order.
Without a separate validation file, a deterministic 10% of the examples (lowest sha256 of their content)
is held out.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from yuyan.data.tables import read_table
from yuyan.errors import UserError
from yuyan.model.heads import classification_metrics, encode_for_classify_rows, pad_batch
from yuyan.model.loss import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the cross-entropy's skip label
DOCSTRING_PROMPT = "\n# Summary:"  # the docstring task's prompt ends with this; the completion follows


# ---------------------------------------------------------------------------------------------- language model


class LMTask:
    """Next-token prediction over token shards: loss, perplexity and bits per byte on the val split.

    `shards` is anything with `get_batch(split, batch_size, block_size, generator, device) -> (x, y)`,
    `iter_sequential(split, batch_size, block_size)` yielding (x, y) and `bytes_per_token(split)`
    (yuyan.data.shards.TokenShards).
    """

    metric_names = ("loss", "ppl", "bpb")  # what evaluate() reports that eval.best_metric may name

    def __init__(
        self,
        shards,
        block_size: int,
        eval_batches: int = 20,
        eval_batch_size: int = 16,
        eval_seed: int = 1234,
    ):
        self.shards, self.block_size = shards, block_size
        self.eval_batches, self.eval_batch_size, self.eval_seed = eval_batches, eval_batch_size, eval_seed

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.shards.get_batch(split, batch_size, self.block_size, generator, "cpu")
        return {"input_ids": x, "labels": y}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["labels"])  # fused lm_head + cross-entropy

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        if full:
            batches = self.shards.iter_sequential("val", self.eval_batch_size, self.block_size)
        else:  # the same fixed windows every time, so evaluations compare
            g = torch.Generator().manual_seed(self.eval_seed)
            batches = (
                self.shards.get_batch("val", self.eval_batch_size, self.block_size, g, "cpu")
                for _ in range(self.eval_batches)
            )
        nats, count = 0.0, 0
        for x, y in batches:
            logits = model(x.to(dev))
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum")
            nats += float(nll)
            count += y.numel()
        model.train(was_training)
        if count == 0:
            raise UserError(
                f"the validation split has fewer than {self.block_size + 1} tokens; use a larger corpus "
                "or a smaller --model.block_size"
            )
        loss = nats / count
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "bpb": loss / math.log(2) / self.shards.bytes_per_token("val"),
            "tokens": float(count),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class DataReport:
    """Counts of data problems met while reading, with a few example locations for each."""

    source: str
    examples: int = 0
    counts: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # advice on the problems counted (what to do about them)

    def note(self, advice: str) -> None:
        self.notes.append(advice)

    def add(self, problem: str, location: str) -> None:
        self.counts[problem] += 1
        self.where.setdefault(problem, [])
        if len(self.where[problem]) < 3:
            self.where[problem].append(location)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.examples} examples"]
        for k, n in sorted(self.counts.items()):
            parts.append(f"{n} {k.replace('_', ' ')} (e.g. {', '.join(self.where.get(k, []))})")
        return "; ".join(parts + self.notes)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "examples": self.examples,
            **{k: int(v) for k, v in self.counts.items()},
        }


def read_records(
    path: str | os.PathLike, report: DataReport, columns: Sequence[str] = ()
) -> list[tuple[str, dict]]:
    """(location, record) pairs from a JSONL, CSV or TSV file (yuyan.data.tables.read_table: header
    detection by `columns`); empty lines, bad JSON and ragged rows are counted and skipped."""
    return read_table(path, report, columns)


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big")


def split_holdout(items: list, keys: list[str], val_frac: float = 0.1) -> tuple[list, list]:
    """Deterministic held-out split: the ceil(val_frac * n) items with the smallest content hash."""
    if len(items) < 2:
        return items, []
    n_val = max(1, math.ceil(val_frac * len(items)))
    order = sorted(range(len(items)), key=lambda i: (_hash(keys[i]), i))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ---------------------------------------------------------------------------------------------- SFT


def render_sft(tokenizer, rec: dict, template: str = "chat") -> tuple[list[int], list[int]]:
    """One record -> (ids, mask) with mask 1 on the tokens to learn. Raises ValueError(problem) on bad data."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("bad_messages")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise ValueError("no_assistant_turn")
        try:
            return tokenizer.apply_chat_template(msgs)
        except UserError:
            raise ValueError("bad_messages") from None
    if "prompt" in rec and "completion" in rec:
        prompt, completion = rec["prompt"], rec["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError("empty_completion")
        if template == "plain":
            head = tokenizer.encode(prompt)
            body = tokenizer.encode(completion) + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
            return head + body, [0] * len(head) + [1] * len(body)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        )
    raise ValueError("missing_fields")


def sft_examples(
    records: list[tuple[str, dict]], tokenizer, max_len: int, report: DataReport, template: str = "chat"
) -> list[tuple[list[int], list[int]]]:
    """Render and truncate to max_len tokens (the model sees max_len - 1 inputs); count problems."""
    out = []
    for loc, rec in records:
        try:
            ids, mask = render_sft(tokenizer, rec, template)
        except ValueError as e:
            report.add(str(e), loc)
            continue
        if len(ids) > max_len:
            report.add("truncated", loc)
            ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) == 0:  # nothing left to learn (the assistant part was cut off)
            report.add("no_target_tokens_after_truncation", loc)
            continue
        out.append((ids, mask))
    report.examples += len(out)
    return out


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids = ids[:-1], labels = ids[1:] where the mask is 1, else -100; right-padded.

    Row b: input_ids (B, T), labels (B, T); labels[b, t] is the token after input_ids[b, t] when that token
    is an assistant/completion token, else -100 (so pads and prompts carry no loss).
    """
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor(mask[1:], dtype=torch.bool)
        n = len(ids) - 1
        x[b, :n] = t[:-1]
        y[b, :n] = torch.where(m, t[1:], torch.full_like(t[1:], IGNORE))
    return {"input_ids": x, "labels": y}


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    if reduction == "mean":  # the training loss: fused lm_head + cross-entropy
        return model(batch["input_ids"], targets=batch["labels"])
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction=reduction
    )


class SFTTask:
    """Supervised fine-tuning: next-token loss on assistant/completion tokens only."""

    metric_names = ("loss", "ppl")

    def __init__(
        self,
        train: list,
        val: list,
        pad_id: int,
        report: DataReport | None = None,
        eval_batch_size: int = 16,
        eval_batches: int = 8,
    ):
        if not train:
            raise UserError(
                "no usable training examples"
                + (f" ({report.summary()})" if report else "")
                + '; see the SFT format: {"messages": [...]} or {"prompt", "completion"}'
            )
        self.train, self.val, self.pad_id, self.report = train, val or train[:1], pad_id, report
        self.eval_batch_size, self.eval_batches = eval_batch_size, eval_batches

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        tokenizer,
        block_size: int,
        val_path: str | None = None,
        template: str = "chat",
        val_frac: float = 0.1,
    ) -> SFTTask:
        report = DataReport(str(path))
        sft_columns = ("prompt", "completion")  # a CSV/TSV's columns; JSONL may hold messages instead
        recs = read_records(path, report, sft_columns)
        if val_path:
            val_recs = read_records(val_path, report, sft_columns)
        else:
            recs, val_recs = split_holdout(recs, [json.dumps(r, sort_keys=True) for _, r in recs], val_frac)
        train = sft_examples(recs, tokenizer, block_size + 1, report, template)
        val = sft_examples(val_recs, tokenizer, block_size + 1, report, template)
        return cls(train, val, tokenizer.pad_id or 0, report)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        data = self.train if split == "train" else self.val
        idx = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        return collate_sft([data[i] for i in idx], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_lm_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        data = self.val if full else self.val[: self.eval_batch_size * self.eval_batches]
        nats, count = 0.0, 0
        for i in range(0, len(data), self.eval_batch_size):
            b = {
                k: v.to(dev) for k, v in collate_sft(data[i : i + self.eval_batch_size], self.pad_id).items()
            }
            nats += float(masked_lm_loss(model, b, reduction="sum"))
            count += int((b["labels"] != IGNORE).sum())
        model.train(was)
        loss = nats / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(count)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- classification


def read_classification(
    path: str | os.PathLike, text_field: str, label_field: str, report: DataReport
) -> list[tuple[str, str, str]]:
    """(location, text, label) triples from CSV, TSV or JSONL (yuyan.data.tables.read_table: columns by
    name or 0-based index, header detected); a missing column is an error, empty text/label is counted."""
    recs = read_records(path, report, (text_field, label_field))
    if recs:
        missing = [f for f in (text_field, label_field) if f not in recs[0][1]]
        if missing:  # JSONL: a CSV/TSV's columns were checked by the reader
            raise UserError(
                f"{path} has no field {missing[0]!r} (its first record has {sorted(recs[0][1])}); "
                f"pass --text-field / --label-field to name the text and label fields"
            )
    out = []
    for loc, r in recs:
        if text_field not in r or label_field not in r:
            report.add("missing_fields", loc)
            continue
        text, label = r[text_field], r[label_field]
        if text is None or not str(text).strip() or label is None or str(label).strip() == "":
            report.add("empty_text_or_label", loc)
            continue
        out.append((loc, str(text), str(label).strip()))
    return out


def label_order(values) -> list[str]:
    """Distinct label values in class order: by number when every one is an integer (2 before 10), else
    as text."""
    distinct = set(values)
    if distinct and all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def name_labels(values: list[str], names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(class names in class order, data value -> class name) for `finetune --labels`.

    names None: the values name themselves (label_order). `["neg", "pos"]`: the values are those names
    (the list fixes the order), or integers 0..K-1 meaning names[value]. `["1=neg", "2=pos"]`: explicit
    VALUE=NAME pairs. Anything else is a UserError saying which form fits."""
    found = label_order(values)
    if names is None:
        return found, {v: v for v in found}
    names = [n.strip() for n in names]
    pairs = [n.partition("=") for n in names]
    if any(sep for _, sep, _ in pairs):
        if not all(sep and v.strip() and k.strip() for v, sep, k in pairs):
            raise UserError(f"--labels {','.join(names)}: write every item as VALUE=NAME, e.g. 0=neg,1=pos")
        mapping = {v.strip(): k.strip() for v, _, k in pairs}
        order = list(dict.fromkeys(mapping.values()))
        unmapped = [v for v in found if v not in mapping]
        if unmapped:
            raise UserError(
                f"--labels maps {sorted(mapping)}, but the data also has label {unmapped[0]!r}; map every value"
            )
    else:
        order = names
        if any(not n for n in names):
            raise UserError(f"--labels {','.join(names)} has an empty name")
        if set(found) <= set(names):
            mapping = {v: v for v in found}
        elif all(v.isdigit() and int(v) < len(names) for v in found):
            mapping = {v: names[int(v)] for v in found}
        else:
            raise UserError(
                f"--labels names {len(names)} classes {names}, but the data's labels are {found[:8]}: they "
                f"are neither those names nor integers 0..{len(names) - 1}; map them as VALUE=NAME, e.g. "
                f"--labels {','.join(f'{v}={n}' for v, n in zip(found, names, strict=False))}"
            )
    if len(set(order)) != len(order):
        raise UserError(f"--labels gives a name twice: {order}; each class needs its own name")
    return order, mapping


def truncation_advice(cut: int, total: int, block_size: int, longest: int) -> str:
    """What to do about texts longer than the model's context, for the data report."""
    return (
        f"{cut} of {total} texts are longer than the model's context of {block_size} tokens (the longest "
        f"has {longest}) and were cut to their first {block_size}: use a model with a longer context "
        f"(block_size), or one whose tokenizer was trained on text like this (`yuyan tokenizer train`; a "
        "tokenizer trained on code spends more tokens on prose)"
    )


def classification_split(
    path: str | os.PathLike,
    val_path: str | None,
    text_field: str,
    label_field: str,
    report: DataReport,
    val_frac: float = 0.1,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train rows, val rows) of (location, text, label): `val_path`'s rows, or else a deterministic
    `val_frac` of `path` held out (`split_holdout` on text and label)."""
    rows = read_classification(path, text_field, label_field, report)
    if val_path:
        return rows, read_classification(val_path, text_field, label_field, report)
    return split_holdout(rows, [f"{t}\t{lab}" for _, t, lab in rows], val_frac)


def parse_class_weights(spec: str, labels: list[str], counts: Counter) -> list[float] | None:
    """Loss weights per label from "none", "balanced" (n / (k * n_label), as scikit-learn's) or
    "LABEL=W,LABEL=W" (unnamed labels weigh 1); None for "none"."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    if spec == "balanced":
        n, k = sum(counts[lab] for lab in labels), len(labels)
        return [n / (k * counts[lab]) if counts[lab] else 1.0 for lab in labels]
    weights = dict.fromkeys(labels, 1.0)
    for part in spec.split(","):
        name, eq, w = part.strip().rpartition("=")
        if not eq or name not in weights:
            raise UserError(
                f"classify.class_weights {spec!r}: {part.strip()!r} is not LABEL=WEIGHT for a label of the "
                f"data ({', '.join(labels)}); or use none | balanced"
            )
        try:
            weights[name] = float(w)
        except ValueError:
            raise UserError(f"classify.class_weights: {w!r} (for {name!r}) is not a number") from None
        if not math.isfinite(weights[name]) or weights[name] <= 0:
            raise UserError(f"classify.class_weights: the weight of {name!r} must be > 0, got {w}")
    return [weights[lab] for lab in labels]


class LengthBuckets:
    """Training batches of similar length, every example exactly once per epoch.

    An epoch's order: a seeded permutation, cut into windows of `window` batches; each window sorted by
    length and cut into batches; the batches shuffled. Batches are read from that order as one stream, so a
    batch that meets an epoch's end is completed from the start of the next epoch's order (every batch is
    full, which DDP's slicing needs). The order depends only on (base seed, epoch, batch size), so the
    state is three integers and a resumed run draws what the uninterrupted run would have.
    """

    def __init__(self, lengths: list[int], window: int = 32):
        self.lengths, self.window = lengths, window
        self.base: int | None = None  # drawn from the run's generator at the first batch
        self.epoch, self.pos = 0, 0
        self._cache: tuple[int, int, list[int]] | None = None  # (epoch, batch size, order)

    def order(self, epoch: int, batch_size: int) -> list[int]:
        """Example indices of one epoch, batch after batch (a permutation of range(n))."""
        if self._cache is not None and self._cache[:2] == (epoch, batch_size):
            return self._cache[2]
        g = torch.Generator().manual_seed((self.base or 0) + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        span = batch_size * self.window
        batches = []
        for w in range(0, len(perm), span):
            chunk = sorted(perm[w : w + span], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        out = [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        self._cache = (epoch, batch_size, out)
        return out

    def next(self, batch_size: int, generator: torch.Generator) -> list[int]:
        if self.base is None:
            self.base = int(torch.randint(2**31, (1,), generator=generator))
        idx: list[int] = []
        while len(idx) < batch_size:
            order = self.order(self.epoch, batch_size)
            take = order[self.pos : self.pos + batch_size - len(idx)]
            idx += take
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict:
        return {"base": self.base, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.base, self.epoch, self.pos = state.get("base"), int(state["epoch"]), int(state["pos"])


class ClassifyTask:
    """Sequence classification with a `Classifier` (yuyan.model.heads): cross-entropy on the labels (with
    optional per-label weights); accuracy, macro-F1 and the confusion matrix on the val split.

    class_weights: one loss weight per label (None: all 1). bucket: draw training batches from
    `LengthBuckets` (each example once per epoch, batches of similar length) instead of uniformly at random.
    val_examples: periodic evaluations score a fixed, seeded sample of this many val examples (0: all); the
    final evaluation (`full=True`) scores the whole split. The val loss is the unweighted mean NLL.
    lm_weight: > 0 adds GPT-1's auxiliary objective to the training loss (Radford et al. 2018, sec. 3.2):
    lm_weight times the next-token loss on the same texts, from the same forward pass
    (`Classifier.forward_with_lm`); the val metrics stay the classification ones.
    """

    metric_names = ("loss", "accuracy", "macro_f1")

    def __init__(
        self,
        tokenizer,
        train: list[tuple[str, str]],
        val: list[tuple[str, str]],
        labels: list[str],
        block_size: int,
        report: DataReport | None = None,
        eval_batch_size: int = 32,
        locations: tuple[list[str], list[str]] | None = None,
        class_weights: list[float] | None = None,
        bucket: bool = False,
        val_examples: int = 0,
        lm_weight: float = 0.0,
    ):
        if not train:
            raise UserError("no usable training examples" + (f" ({report.summary()})" if report else ""))
        # where each train / val example came from ("file:line"), for the truncation report
        tlocs, vlocs = locations or (
            [f"train #{i}" for i in range(len(train))],
            [f"val #{i}" for i in range(len(val))],
        )
        self.labels, self.report, self.eval_batch_size = (
            labels,
            report or DataReport("memory"),
            eval_batch_size,
        )
        index = {lab: i for i, lab in enumerate(labels)}
        unseen = [(t, lab) for t, lab in val if lab not in index]
        for _, lab in unseen:
            self.report.add("val_labels_unseen_in_train", lab)
        vlocs = [loc for loc, (_, lab) in zip(vlocs, val, strict=True) if lab in index]
        val = [(t, lab) for t, lab in val if lab in index]
        self.pad_id = tokenizer.pad_id or 0
        ids, cut, longest = encode_for_classify_rows(tokenizer, [t for t, _ in train], block_size)
        vids, vcut, vlongest = (
            encode_for_classify_rows(tokenizer, [t for t, _ in val], block_size) if val else ([], [], 0)
        )
        for loc in [tlocs[i] for i in cut] + [vlocs[i] for i in vcut]:
            self.report.add("truncated", loc)
        if cut or vcut:
            self.report.note(
                truncation_advice(
                    len(cut) + len(vcut), len(train) + len(val), block_size, max(longest, vlongest)
                )
            )
        self.train = list(zip(ids, [index[lab] for _, lab in train], strict=True))
        self.val = list(zip(vids, [index[lab] for _, lab in val], strict=True)) or self.train[:1]
        self.report.examples = len(self.train) + len(val)
        self.last_confusion: list[list[int]] | None = None
        self.label_values = list(labels)  # the data's value behind each label (ClassifyTask.from_files)
        if class_weights is not None and len(class_weights) != len(labels):
            raise UserError(f"{len(class_weights)} class weights for {len(labels)} labels {labels}")
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.buckets = LengthBuckets([len(ids) for ids, _ in self.train]) if bucket else None
        self.lm_weight = lm_weight
        # the periodic sample: fixed (seeded), sorted by length so its batches pad little; the same for the
        # whole split at the end (the metrics do not depend on the order)
        g = torch.Generator().manual_seed(1234)
        pick = torch.randperm(len(self.val), generator=g).tolist()
        if 0 < val_examples < len(self.val):
            pick = pick[:val_examples]
        self.val_sample = sorted((self.val[i] for i in pick), key=lambda e: len(e[0]))
        self.val_sorted = sorted(self.val, key=lambda e: len(e[0]))

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        tokenizer,
        block_size: int,
        val_path: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        val_frac: float = 0.1,
        label_names: list[str] | None = None,
        class_weights: str = "none",
        bucket: bool = False,
        val_examples: int = 0,
        lm_weight: float = 0.0,
    ) -> ClassifyTask:
        """label_names: `finetune --labels` (see name_labels); the task's labels are then those names, and
        `label_values` the data's values behind them. class_weights as `parse_class_weights` reads them
        (by class name)."""
        report = DataReport(str(path))
        rows, val_rows = classification_split(path, val_path, text_field, label_field, report, val_frac)
        found = label_order(lab for _, _, lab in rows)
        if len(found) < 2:
            raise UserError(
                f"{path} has {len(found)} distinct label(s) {found} in its training part; "
                "classification needs at least 2"
            )
        labels, mapping = name_labels(found, label_names)
        rows = [(loc, t, mapping[lab]) for loc, t, lab in rows]
        val_rows = [(loc, t, mapping.get(lab, lab)) for loc, t, lab in val_rows]
        weights = parse_class_weights(class_weights, labels, Counter(lab for _, _, lab in rows))
        task = cls(
            tokenizer,
            [(t, lab) for _, t, lab in rows],
            [(t, lab) for _, t, lab in val_rows],
            labels,
            block_size,
            report,
            locations=([loc for loc, _, _ in rows], [loc for loc, _, _ in val_rows]),
            class_weights=weights,
            bucket=bucket,
            val_examples=val_examples,
            lm_weight=lm_weight,
        )
        by_name = {name: value for value, name in mapping.items()}
        task.label_values = [by_name.get(name, name) for name in labels]
        return task

    def _collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        x, n = pad_batch([ids for ids, _ in items], self.pad_id)
        return {"input_ids": x, "lengths": n, "labels": torch.tensor([y for _, y in items], dtype=torch.long)}

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        data = self.train if split == "train" else self.val
        if split == "train" and self.buckets is not None:
            idx = self.buckets.next(batch_size, generator)
        else:
            idx = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        return self._collate([data[i] for i in idx])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, n = batch["input_ids"], batch["lengths"]
        # a forward call either way (not model.forward_with_lm): `model` may be a DDP/FSDP/compiled wrapper
        logits, lm = model(x, n, with_lm=True) if self.lm_weight > 0 else (model(x, n), None)
        logits = logits.float()
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        loss = F.cross_entropy(logits, batch["labels"], weight=w)
        return loss if lm is None else loss + self.lm_weight * lm

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        data = self.val_sorted if full else self.val_sample
        nll, preds, truth = 0.0, [], []
        for i in range(0, len(data), self.eval_batch_size):
            b = {k: v.to(dev) for k, v in self._collate(data[i : i + self.eval_batch_size]).items()}
            logits = model(b["input_ids"], b["lengths"]).float()
            nll += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            preds += logits.argmax(-1).tolist()
            truth += b["labels"].tolist()
        model.train(was)
        m = classification_metrics(truth, preds, len(self.labels))
        self.last_confusion = m.pop("confusion")
        return {"loss": nll / max(len(truth), 1), **m, "examples": float(len(truth))}

    def state_dict(self) -> dict:
        return {"buckets": self.buckets.state_dict()} if self.buckets is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.buckets is not None and "buckets" in state:
            self.buckets.load_state_dict(state["buckets"])


# ---------------------------------------------------------------------------------------------- docstrings


def _docstring_pairs_from_source(src: str, max_code_chars: int) -> list[dict]:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    lines = src.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(node.body) < 2:  # no docstring, or nothing but the docstring
            continue
        first = doc.strip().splitlines()[0].strip()
        if not first or len(first) > 120:
            continue
        d = node.body[0]
        start = min([node.lineno] + [dec.lineno for dec in node.decorator_list]) - 1
        head = lines[start : d.lineno - 1]  # decorators and the def line(s)
        if d.lineno == node.lineno:  # `def f(): "doc"; ...` on one line: rare, skip
            continue
        body = lines[d.end_lineno : node.end_lineno]
        code = textwrap.dedent("".join(head + body)).rstrip()
        if len(code) > max_code_chars:  # keep whole lines: the signature and the start of the body
            code = code[
                : code.rfind("\n", 0, max_code_chars) if "\n" in code[:max_code_chars] else max_code_chars
            ]
            code = code.rstrip()
        out.append({"prompt": code + DOCSTRING_PROMPT, "completion": " " + first, "name": node.name})
    return out


def docstring_pairs(
    split: str = "train", limit: int | None = None, max_code_chars: int = 600, spec: str = "stdlib"
) -> list[dict]:
    """(function source without its docstring -> first docstring line) pairs from the corpus `split`,
    in corpus order; {"prompt": code + "\\n# Summary:", "completion": " " + first line, "name": ...}."""
    from yuyan.data.corpus import iter_documents

    out: list[dict] = []

    def files():  # whole files: a long text arrives as consecutive pieces of one source
        source, parts = None, []
        for doc in iter_documents(spec, split=split):
            if doc.piece == 0 and parts:
                yield "".join(parts)
                parts = []
            source = doc.source
            parts.append(doc.text)
        if parts and source is not None:
            yield "".join(parts)

    for text in files():
        out += _docstring_pairs_from_source(text, max_code_chars)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


class DocstringTask(SFTTask):
    """SFT on docstring pairs with the plain template: prompt tokens, then completion + EOT to learn."""

    @classmethod
    def build(
        cls,
        tokenizer,
        block_size: int,
        train_limit: int | None = 4000,
        val_limit: int = 200,
        spec: str = "stdlib",
    ) -> DocstringTask:
        report = DataReport(f"{spec} docstrings")
        recs = [(f"train:{p['name']}", p) for p in docstring_pairs("train", train_limit, spec=spec)]
        vals = [(f"val:{p['name']}", p) for p in docstring_pairs("val", val_limit, spec=spec)]
        if not recs or not vals:
            raise UserError(
                f"the corpus {spec!r} yielded no docstring pairs in its train and val splits; "
                "use Python sources with documented functions (the default: stdlib)"
            )
        train = sft_examples(recs, tokenizer, block_size + 1, report, template="plain")
        val = sft_examples(vals, tokenizer, block_size + 1, report, template="plain")
        return cls(train, val, tokenizer.pad_id or 0, report)


__all__ = [
    "DataReport",
    "read_records",
    "split_holdout",
    "render_sft",
    "sft_examples",
    "collate_sft",
    "SFTTask",
    "read_classification",
    "label_order",
    "name_labels",
    "truncation_advice",
    "classification_split",
    "parse_class_weights",
    "LengthBuckets",
    "ClassifyTask",
    "docstring_pairs",
    "DocstringTask",
    "IGNORE",
    "DOCSTRING_PROMPT",
]
