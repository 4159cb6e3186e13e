"""Classification head composed around a Transformer: a linear layer over one pooled hidden state.

`Classifier(model, labels, pooling, dropout=p)` holds the transformer as `model` and a `score` linear layer
(d_model -> n_labels), with dropout p on the pooled state while training. Texts are encoded as their tokens plus the end-of-text token, right-padded;
`pooling="last"` reads the final hidden state of the last real token (with right padding and causal
attention the pads never influence it), `pooling="mean"` averages the hidden states of the real tokens.
A checkpoint stores the transformer as usual and the head as `extra_tensors` (`score.weight`,
`score.bias`) with meta {"task": "classify", "labels": [...], "pooling": ..., "dropout": p} (plus
"label_values", the data's values behind the names, when `finetune --labels` named them), so any tool
that ignores the head still opens the model. `Classifier.from_pretrained(spec)` and `predict(texts)` serve the saved
model; `classification_metrics` gives accuracy, macro-F1 and the confusion matrix. For training,
`forward_with_lm` (or `forward(..., with_lm=True)`) also returns GPT-1's auxiliary next-token loss on the
same texts from the same pass (`classify.lm_weight`); it adds nothing to the head or the checkpoint.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from yuyan.errors import UserError
from yuyan.model.loss import IGNORE_INDEX, linear_cross_entropy, tied_lookup

POOLINGS = ("last", "mean")


def encode_for_classify(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids (text + EOT) per text, cut to max_len; returns (ids, how many were truncated)."""
    ids, cut, _ = encode_for_classify_rows(tokenizer, texts, max_len)
    return ids, len(cut)


def encode_for_classify_rows(
    tokenizer, texts: list[str], max_len: int
) -> tuple[list[list[int]], list[int], int]:
    """Like encode_for_classify, but returns (ids, the indices of the texts that were cut, the longest
    text's token count with EOT), for a truncation report that names rows."""
    eot = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    out, cut, longest = [], [], 0
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        ids = ids + eot
        longest = max(longest, len(ids))
        if len(ids) > max_len:
            ids = ids[: max_len - len(eot)] + eot
            cut.append(i)
        out.append(ids if ids else eot or [0])
    return out, cut, longest


def lm_targets(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, T) for right-padded rows: input_ids[b, t + 1] where t + 1 < lengths[b],
    IGNORE_INDEX elsewhere (a row's last real token and its pads)."""
    B, T = input_ids.shape
    nxt = torch.cat([input_ids[:, 1:], input_ids.new_full((B, 1), IGNORE_INDEX)], 1)
    real = torch.arange(1, T + 1, device=input_ids.device)[None, :] < lengths[:, None]  # (B, T)
    return torch.where(real, nxt, IGNORE_INDEX)


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids (B, T), lengths (B,))."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return x, torch.tensor([len(s) for s in seqs], dtype=torch.long)


class Classifier(nn.Module):
    """A transformer plus a linear head over its last-token (or mean) final hidden state."""

    def __init__(
        self,
        model: nn.Module,
        labels: list[str],
        pooling: str = "last",
        tokenizer=None,
        label_values: list[str] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not known; choose one of {', '.join(POOLINGS)}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"classifier dropout must be in [0, 1), got {dropout}")
        if len(labels) < 2:
            raise UserError(f"classification needs at least 2 labels, got {labels}; check the label column")
        self.model, self.labels, self.pooling, self.tokenizer = model, list(labels), pooling, tokenizer
        # the label value in the data behind each class name (`finetune --labels neg,pos` over 0/1 labels)
        self.label_values = list(label_values) if label_values is not None else list(self.labels)
        if len(self.label_values) != len(self.labels):
            raise UserError(f"{len(self.label_values)} label values for {len(self.labels)} labels {labels}")
        self.drop = nn.Dropout(dropout)  # no parameters: checkpoints are unchanged
        p = next(model.parameters())
        self.score = nn.Linear(model.config.d_model, len(labels), device=p.device, dtype=p.dtype)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    @property
    def config(self):
        return self.model.config

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, with_lm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) right-padded, lengths (B,) -> logits (B, n_labels); with_lm: forward_with_lm's
        (logits, lm_loss). The switch is here, not only in a method of its own, because training calls the
        model through its wrappers (DDP, FSDP, torch.compile), and only a forward call goes through them."""
        if with_lm:
            return self.forward_with_lm(input_ids, lengths)
        return self._head(self.model.hidden(input_ids), lengths)

    def forward_with_lm(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, n_labels), the mean next-token cross-entropy over the real tokens) from one pass
        through the transformer: GPT-1's auxiliary objective (`classify.lm_weight`). Position t counts where
        t + 1 < length (it predicts a real token), so pads are neither inputs that count nor targets. The LM
        loss is the model's fused one (model/loss.py: no (B, T, V) logits), 0 for a batch with no next token
        at all (every text a lone EOT), where the mean over no tokens would be nan."""
        m = self.model
        # tied embeddings: the lookup's gradient joins the fused loss's, as in Transformer.forward
        emb, tie = tied_lookup(input_ids, m.embed_tokens, m.lm_head) or (None, None)
        h = m.hidden(input_ids, inputs_embeds=emb)  # (B, T, d_model)
        targets = lm_targets(input_ids, lengths)  # (B, T)
        lm = linear_cross_entropy(h, m.lm_head, targets, softcap=m.config.logit_softcap, tie=tie)
        lm = torch.where((lengths > 1).any(), lm, torch.zeros_like(lm))  # no sync with the device
        return self._head(h, lengths), lm

    def _head(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, d_model) -> logits (B, n_labels), pooled as self.pooling says."""
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, d_model)
        else:
            keep = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(
                h.dtype
            )  # (B, T)
            pooled = (h * keep[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.score(self.drop(pooled))

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"score.weight": self.score.weight.detach(), "score.bias": self.score.bias.detach()}

    def head_meta(self) -> dict:
        meta = {"task": "classify", "labels": self.labels, "pooling": self.pooling, "dropout": self.drop.p}
        if self.label_values != self.labels:
            meta["label_values"] = self.label_values
        return meta

    def name_of(self, label: str) -> str | None:
        """The class name for a label as the data writes it: a class name, or the value behind one
        ("1" for "pos" after `--labels neg,pos`); None for a label the head does not know."""
        label = str(label).strip()
        if label in self.labels:
            return label
        if label in self.label_values:
            return self.labels[self.label_values.index(label)]
        return None

    def load_head(self, extra: dict[str, torch.Tensor]) -> None:
        w, b = extra.get("score.weight"), extra.get("score.bias")
        if w is None or b is None or tuple(w.shape) != tuple(self.score.weight.shape):
            raise UserError(
                f"the checkpoint's classifier head does not fit {len(self.labels)} labels "
                f"x d_model {self.config.d_model}; re-train with yuyan finetune --task classify"
            )
        with torch.no_grad():
            self.score.weight.copy_(w)
            self.score.bias.copy_(b)

    @classmethod
    def from_language_model(cls, lm) -> Classifier:
        """A Classifier from a loaded LanguageModel whose checkpoint holds a classification head."""
        if lm.meta.get("task") != "classify" or "score.weight" not in lm.extra_tensors:
            raise UserError(
                f"{lm.path} has no classification head; fine-tune one with "
                "`yuyan finetune --task classify --data FILE` or use prompting"
            )
        clf = cls(
            lm.model,
            lm.meta["labels"],
            lm.meta.get("pooling", "last"),
            lm.tokenizer,
            lm.meta.get("label_values"),
            dropout=lm.meta.get("dropout", 0.0),
        )
        clf.load_head(lm.extra_tensors)
        return clf.eval()

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, device: torch.device | str | None = None) -> Classifier:
        from yuyan.model import load

        return cls.from_language_model(load(spec, device))

    @torch.no_grad()
    def predict(self, texts: list[str] | str, batch_size: int = 32) -> list[tuple[str, dict[str, float]]]:
        """Label and per-label probabilities for each text."""
        if self.tokenizer is None:
            raise UserError("this classifier has no tokenizer; build it with Classifier.from_pretrained")
        if isinstance(texts, str):
            texts = [texts]
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        ids, _ = encode_for_classify(self.tokenizer, texts, self.config.block_size)
        out = []
        for i in range(0, len(ids), batch_size):
            x, n = pad_batch(ids[i : i + batch_size], self.tokenizer.pad_id or 0)
            probs = F.softmax(self(x.to(dev), n.to(dev)).float(), -1).cpu()  # (b, n_labels)
            for row in probs:
                out.append(
                    (
                        self.labels[int(row.argmax())],
                        {lab: float(p) for lab, p in zip(self.labels, row, strict=True)},
                    )
                )
        self.train(was)
        return out

    @torch.no_grad()
    def predict_ids(self, ids: list[list[int]]) -> list[tuple[str, dict[str, float]]]:
        """predict() for texts already encoded (encode_for_classify), in one batch."""
        was = self.training
        self.eval()
        x, n = pad_batch(ids, (self.tokenizer.pad_id or 0) if self.tokenizer is not None else 0)
        dev = next(self.parameters()).device
        probs = F.softmax(self(x.to(dev), n.to(dev)).float(), -1).cpu()  # (B, n_labels)
        self.train(was)
        return [
            (self.labels[int(row.argmax())], {lab: float(p) for lab, p in zip(self.labels, row, strict=True)})
            for row in probs
        ]


def classification_metrics(y_true: list[int], y_pred: list[int], n_labels: int) -> dict:
    """Accuracy, macro-F1 (over labels present in truth or predictions) and the confusion matrix
    (rows: true label, columns: predicted)."""
    cm = torch.zeros(n_labels, n_labels, dtype=torch.long)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[t, p] += 1
    tp = cm.diag().float()
    prec = tp / cm.sum(0).clamp(min=1)
    rec = tp / cm.sum(1).clamp(min=1)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(tp))
    present = (cm.sum(0) + cm.sum(1)) > 0
    n = max(len(y_true), 1)
    return {
        "accuracy": float(tp.sum()) / n,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": cm.tolist(),
    }


__all__ = [
    "Classifier",
    "classification_metrics",
    "encode_for_classify",
    "encode_for_classify_rows",
    "lm_targets",
    "pad_batch",
    "POOLINGS",
]
