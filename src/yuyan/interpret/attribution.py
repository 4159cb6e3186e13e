"""Input attribution: which input tokens drove a decision (a classifier's label or the next token).

The decision is a scalar f: the log-probability of the target label (a `yuyan.model.heads.Classifier`) or of
the target next token (a language model), as a function of the input token embeddings.

* Integrated gradients (Sundararajan et al., 2017): attr_t = sum_d (x - x')_td * integral_0^1 df/dx_td at
  x' + a (x - x') da, with the integral taken by the trapezoid rule over n steps; x' is zeros or the pad
  token's embedding at every position (positions are not attributed: the model adds them itself). The
  attributions add up to f(x) - f(x') (completeness), which `delta` reports. The model takes token ids, so the
  path runs through `Transformer.hidden(..., inputs_embeds=...)`.
* Occlusion (LIME-style ablation): drop each token (or replace it with the pad token) and measure
  f(original) - f(occluded): positive = the token supports the target.

Rendered as coloured HTML (red supports, blue opposes) and bar charts (PNG).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path

import torch

from yuyan.errors import UserError
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


class Decision:
    """f(embeddings (N, T, d)) -> (N,) log-probability of one target, plus what it is about.

    Build with `Decision.next_token(...)` or `Decision.classifier(...)`. `ids` are the input tokens,
    `occludable` the positions occlusion may touch (the text, not a structural end-of-text marker).
    """

    def __init__(
        self,
        ids: list[int],
        fn: Callable[[torch.Tensor, int], torch.Tensor],
        target: str,
        embed: torch.nn.Embedding,
        occludable: list[int],
        kind: str,
        target_id: int,
    ):
        self.ids, self.fn, self.target, self.embed, self.occludable, self.kind = (
            ids,
            fn,
            target,
            embed,
            occludable,
            kind,
        )
        self.target_id = target_id  # the token id (next-token) or label index (classifier)

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.fn(embeds, embeds.shape[1])

    @classmethod
    def next_token(
        cls, model: Transformer, tokenizer: Tokenizer, text: str, target: str | int | None = None
    ) -> Decision:
        """log p(target | text) for the token after the text; target: a token string, an id, or None (argmax)."""
        ids = tokenizer.encode(text)[-model.config.block_size :]
        if not ids:
            raise UserError("the text is empty; pass --text with at least one token")
        dev = next(model.parameters()).device

        def f(e: torch.Tensor, T: int) -> torch.Tensor:
            h = model.hidden(None, inputs_embeds=e)  # (N, T, d)
            return model.logits(h[:, -1]).float().log_softmax(-1)  # (N, V)

        if target is None:
            with torch.no_grad():
                tid = int(f(model.embed_tokens(torch.tensor([ids], device=dev)), len(ids))[0].argmax())
        elif isinstance(target, int):
            tid = target
        else:
            t = tokenizer.encode(target)
            if not t:
                raise UserError("--target is empty; pass the next token to explain, e.g. --target ' the'")
            tid = t[0]
        if not 0 <= tid < model.config.vocab_size:
            raise UserError(f"target token id {tid} is outside the vocabulary of {model.config.vocab_size}")
        from yuyan.interpret.attention import piece

        return cls(
            ids,
            lambda e, T: f(e, T)[:, tid],
            piece(tokenizer, tid),
            model.embed_tokens,
            list(range(len(ids))),
            "next-token",
            tid,
        )

    @classmethod
    def classifier(cls, clf, text: str, target: str | None = None) -> Decision:
        """log p(label | text) of a `yuyan.model.heads.Classifier`; target: a label name or None (predicted)."""
        from yuyan.model.heads import encode_for_classify

        model = clf.model
        (ids,), _ = encode_for_classify(clf.tokenizer, [text], model.config.block_size)

        def f(e: torch.Tensor, T: int) -> torch.Tensor:
            h = model.hidden(None, inputs_embeds=e)  # (N, T, d): one length for the whole batch
            pooled = h[:, T - 1] if clf.pooling == "last" else h.mean(1)
            return clf.score(pooled).float().log_softmax(-1)  # (N, n_labels)

        if target is None:
            with torch.no_grad():
                dev = next(model.parameters()).device
                lab = int(f(model.embed_tokens(torch.tensor([ids], device=dev)), len(ids))[0].argmax())
        elif target in clf.labels:
            lab = clf.labels.index(target)
        else:
            raise UserError(f"unknown label {target!r}; the classifier's labels are {clf.labels}")
        eot = clf.tokenizer.eot_id
        occ = [i for i, t in enumerate(ids) if not (i == len(ids) - 1 and t == eot)]
        return cls(
            ids, lambda e, T: f(e, T)[:, lab], clf.labels[lab], model.embed_tokens, occ, "classifier", lab
        )


def _baseline(decision: Decision, x: torch.Tensor, baseline: str, pad_id: int | None) -> torch.Tensor:
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "pad":
        if pad_id is None:
            raise UserError("the tokenizer has no pad token; use --baseline zeros")
        return decision.embed.weight[pad_id].detach().expand_as(x).clone()
    raise UserError(f"unknown baseline {baseline!r}; choose zeros or pad")


def _path(
    decision: Decision, x: torch.Tensor, x0: torch.Tensor, alphas: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """f and the per-token gradient . (x - x0) at points x0 + a (x - x0): values (n,), contrib (n, T) float64."""
    vals, contrib = [], []
    diff = x - x0  # (1, T, d)
    for k in range(0, len(alphas), batch_size):
        a = alphas[k : k + batch_size].to(x.dtype)[:, None, None]  # (n, 1, 1)
        p = (x0 + a * diff).detach().requires_grad_(True)  # (n, T, d) points on the straight path
        out = decision(p)  # (n,)
        (g,) = torch.autograd.grad(out.sum(), p)  # rows are independent: each gets its own gradient
        vals.append(out.detach().double().cpu())
        contrib.append((g.detach() * diff).sum(-1).double().cpu())
    return torch.cat(vals), torch.cat(contrib)


def integrated_gradients(
    decision: Decision,
    steps: int = 64,
    baseline: str = "zeros",
    pad_id: int | None = None,
    batch_size: int = 16,
    tol: float = 0.01,
    max_points: int | None = None,
) -> dict:
    """{attributions (T,), f_input, f_baseline, delta (sum(attr) - (f_input - f_baseline)), points, ...}.

    The path integral uses the trapezoid rule on `steps` equal intervals. A trained model can switch its
    decision within a tiny stretch of the path, which equal steps miss; then the intervals whose trapezoid
    disagrees most with the actual change of f are split in four (the rule stays the trapezoid, on a finer
    non-uniform grid) until |delta| <= tol |f_input - f_baseline| or max_points (default 16 x steps) are used.
    """
    if steps < 1:
        raise UserError("--steps must be at least 1")
    dev = decision.embed.weight.device
    with torch.no_grad():
        x = decision.embed(torch.tensor([decision.ids], device=dev))  # (1, T, d)
    x0 = _baseline(decision, x, baseline, pad_id)
    max_points = max_points or 16 * (steps + 1)
    alphas = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    vals, contrib = _path(decision, x, x0, alphas, batch_size)
    gap = float(vals[-1] - vals[0])
    while True:
        da = alphas[1:] - alphas[:-1]  # (n,)
        s = contrib.sum(-1)  # directional derivative along the path at each point
        err = 0.5 * da * (s[:-1] + s[1:]) - (vals[1:] - vals[:-1])  # per-interval trapezoid error
        if abs(float(err.sum())) <= tol * max(abs(gap), 1e-8) or len(alphas) >= max_points:
            break
        order = err.abs().argsort(descending=True)
        budget = min(64, (max_points - len(alphas)) // 3)
        worst = order[: max(1, min(budget, int((err.abs() > 0.1 * tol * max(abs(gap), 1e-8)).sum())))]
        new = alphas[worst][:, None] + da[worst][:, None] * torch.tensor(
            [0.25, 0.5, 0.75], dtype=torch.float64
        )
        v2, c2 = _path(decision, x, x0, new.flatten(), batch_size)
        alphas, idx = torch.cat([alphas, new.flatten()]).sort()
        vals, contrib = torch.cat([vals, v2])[idx], torch.cat([contrib, c2])[idx]
    da = (alphas[1:] - alphas[:-1])[:, None]  # (n, 1)
    attr = (0.5 * da * (contrib[:-1] + contrib[1:])).sum(0)  # (T,) trapezoid per token
    f_in, f_base = float(vals[-1]), float(vals[0])
    return {
        "attributions": attr.float(),
        "f_input": f_in,
        "f_baseline": f_base,
        "delta": float(attr.sum()) - (f_in - f_base),
        "steps": steps,
        "points": len(alphas),
        "baseline": baseline,
    }


@torch.no_grad()
def occlusion(decision: Decision, mode: str = "drop", pad_id: int | None = None) -> dict:
    """{effects (T,): f(original) - f(without token t) (0 where not occludable), f_input, mode}."""
    if mode not in ("drop", "replace"):
        raise UserError(f"unknown occlusion mode {mode!r}; choose drop or replace")
    if mode == "replace" and pad_id is None:
        raise UserError("the tokenizer has no pad token; use occlusion mode drop")
    ids = decision.ids
    dev = decision.embed.weight.device
    f_in = float(decision(decision.embed(torch.tensor([ids], device=dev)))[0])
    variants = []
    for i in decision.occludable:
        variants.append(ids[:i] + ids[i + 1 :] if mode == "drop" else ids[:i] + [pad_id] + ids[i + 1 :])
    effects = torch.zeros(len(ids))
    if variants and len(variants[0]) > 0:  # all variants have one length: one batch
        vals = decision(decision.embed(torch.tensor(variants, device=dev))).float().cpu()
        effects[decision.occludable] = f_in - vals
    return {"effects": effects, "f_input": f_in, "mode": mode}


def attribution_html(tokens: list[str], rows: dict[str, torch.Tensor], title: str) -> str:
    """Tokens shaded by each method's scores (red supports the target, blue opposes), one line per method."""
    parts = []
    for name, scores in rows.items():
        m = float(scores.abs().max()) or 1.0
        spans = []
        for t, s in zip(tokens, scores.tolist(), strict=True):
            a = min(1.0, abs(s) / m)
            rgb = "200,40,40" if s >= 0 else "40,90,200"
            spans.append(
                f'<span style="background:rgba({rgb},{a:.3f})" title="{s:+.4f}">{html.escape(t)}</span>'
            )
        parts.append(f"<h3>{html.escape(name)}</h3><div class='t'>{''.join(spans)}</div>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:16px}} .t{{white-space:pre-wrap;font-family:ui-monospace,monospace;
line-height:1.9;border:1px solid #ddd;padding:8px}} .t span{{border-radius:3px;padding:1px 0}}</style></head><body>
<h2>{html.escape(title)}</h2><p>Red: the token pushes toward the target; blue: against it. Hover for the score.</p>
{"".join(parts)}</body></html>
"""


def render_attribution(
    decision: Decision,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    steps: int = 64,
    baseline: str = "zeros",
    mode: str = "drop",
) -> dict:
    """Integrated gradients and occlusion for one decision: attribution.html, attribution_ig.png,
    attribution_occlusion.png and attribution.json."""
    import json

    from yuyan.evaluate.report import atomic_write_text
    from yuyan.interpret.attention import piece
    from yuyan.plots import plot_attribution_bars

    pad = tokenizer.pad_id
    ig = integrated_gradients(decision, steps, baseline, pad)
    occ = occlusion(decision, mode, pad)
    tokens = [piece(tokenizer, i) for i in decision.ids]
    out = Path(out_dir)
    what = f"{decision.kind} target {decision.target!r}"
    page = atomic_write_text(
        out / "attribution.html",
        attribution_html(
            tokens,
            {
                f"integrated gradients ({steps} steps, {baseline} baseline)": ig["attributions"],
                f"occlusion ({mode})": occ["effects"],
            },
            f"attribution: {what}",
        ),
    )
    png_ig = plot_attribution_bars(
        tokens, ig["attributions"], out / "attribution_ig.png", title=f"integrated gradients: {what}"
    )
    png_occ = plot_attribution_bars(
        tokens, occ["effects"], out / "attribution_occlusion.png", title=f"occlusion ({mode}): {what}"
    )
    data = {
        "kind": decision.kind,
        "target": decision.target,
        "tokens": tokens,
        "integrated_gradients": ig["attributions"].tolist(),
        "occlusion": occ["effects"].tolist(),
        "f_input": ig["f_input"],
        "f_baseline": ig["f_baseline"],
        "completeness_delta": ig["delta"],
    }
    js = atomic_write_text(out / "attribution.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    return {
        "tokens": tokens,
        "ig": ig,
        "occlusion": occ,
        "html": page,
        "pngs": [png_ig, png_occ],
        "json": js,
        "target": decision.target,
    }


__all__ = ["Decision", "integrated_gradients", "occlusion", "attribution_html", "render_attribution"]
