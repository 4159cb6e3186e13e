"""Every matplotlib figure in one place (Agg backend, PNG files).

Each function takes plain data (lists, arrays, tensors) and a path, writes the PNG atomically and returns
the path. Every figure is drawn inside `figure_fonts` (one font set-up: DejaVu Sans with a CJK-capable
fallback font when one is installed). Nothing here knows about models or training.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ---------------------------------------------------------------- fonts: one set-up for every figure
# DejaVu Sans (matplotlib's default) has no CJK glyphs. Every figure is drawn with the family list
# [DejaVu Sans, a CJK-capable font]: matplotlib (>= 3.6) takes each glyph from the first font that has it,
# so Latin text looks as before and 前台 is drawn by the CJK font. Debian's fonts-noto-cjk (installed by
# `make test`) gives Noto Sans CJK SC; without any CJK font, CJK text is written as \\uXXXX escapes and a
# warning says what to install.
BASE_FONT = "DejaVu Sans"
CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "AR PL UMing CN",
    "AR PL UKai CN",
    "Arial Unicode MS",
)
CJK_HINTS = ("CJK", "Han Sans", "Hei", "Ming", "Song")
NO_CJK_FONT = (
    "no CJK font is installed, so CJK text in figures is written as \\uXXXX escapes; install one "
    "(Debian/Ubuntu: apt-get install fonts-noto-cjk)"
)
_cjk_font: list[str | None] = []  # the font found, once per process


def _find_cjk_font() -> str | None:
    from matplotlib import font_manager

    fm = font_manager.fontManager

    def pick() -> str | None:
        installed = {f.name for f in fm.ttflist}
        for name in CJK_FONT_NAMES:
            if name in installed:
                return name
        return next((n for n in sorted(installed) if any(k in n for k in CJK_HINTS)), None)

    found = pick()
    if found is None:  # matplotlib's font cache predates the font's installation: add the files it lacks
        for path in font_manager.findSystemFonts():
            if any(k.replace(" ", "") in Path(path).name for k in CJK_HINTS):
                with contextlib.suppress(Exception):  # an unreadable font file is not ours to fix
                    fm.addfont(path)
        found = pick()
    return found


def cjk_font() -> str | None:
    """Name of an installed font that draws CJK characters, or None (looked up once per process)."""
    if not _cjk_font:
        _cjk_font.append(_find_cjk_font())
    return _cjk_font[0]


def font_family() -> list[str]:
    """The font.family every figure uses: DejaVu Sans, then the CJK-capable font when one is installed."""
    cjk = cjk_font()
    return [BASE_FONT, cjk] if cjk else [BASE_FONT]


def has_cjk(texts) -> bool:
    """Whether any of the texts holds a character DejaVu Sans cannot draw (CJK and beyond)."""
    return any(ord(c) >= 0x2E80 for t in texts for c in str(t))


def figure_fonts(texts=()):
    """The context every figure is drawn in: font.family = font_family(). When `texts` (the figure's
    labels) hold CJK and no CJK font is installed, a warning says what to install."""
    if has_cjk(texts) and cjk_font() is None:
        warnings.warn(NO_CJK_FONT, stacklevel=3)
    return plt.rc_context({"font.family": font_family()})


def token_labels(tokens: list[str], cjk: bool | None = None, max_len: int = 12) -> list[str]:
    """Axis labels for token pieces: whitespace made visible (· for space, \\n, \\t), `$` escaped (no mathtext),
    and, when no CJK font is installed, characters the default font lacks written as \\uXXXX."""
    cjk = cjk_font() is not None if cjk is None else cjk
    out = []
    for t in tokens:
        s = (
            t.replace("\n", "\\n")
            .replace("\t", "\\t")
            .replace("\r", "\\r")
            .replace(" ", "·")
            .replace("$", r"\$")
        )
        s = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c for c in s)  # controls
        if not cjk:
            s = "".join(
                c if ord(c) < 0x2E80 else (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
                for c in s
            )
        s = s or "∅"
        out.append(s if len(s) <= max_len else s[: max_len - 1] + "…")
    return out


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure to PNG through a temp file and a rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def drawable(text: str) -> str:
    """`text` as the installed fonts can draw it: unchanged with a CJK font, else with \\uXXXX escapes for
    the characters DejaVu Sans lacks (never a row of empty boxes)."""
    if cjk_font() is not None:
        return text
    return "".join(
        c if ord(c) < 0x2E80 else (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        for c in text
    )


def plot_loss_curve(
    train_steps, train_loss, val_steps, val_loss, path: str | os.PathLike, title: str = "loss"
) -> Path:
    """Training and validation loss (nats/token) against optimizer step, log-scaled loss axis."""
    with figure_fonts([title]):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        if len(train_steps):
            ax.plot(list(train_steps), list(train_loss), label="train", linewidth=1.2, alpha=0.85)
        if len(val_steps):
            ax.plot(list(val_steps), list(val_loss), "o-", label="val", linewidth=1.5, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        if len(train_loss) or len(val_loss):
            ax.set_yscale("log")
        ax.set_title(drawable(title))
        ax.grid(True, alpha=0.3, which="both")
        ax.legend()
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix, labels: list[str], path: str | os.PathLike, title: str = "confusion matrix"
) -> Path:
    """Counts of (true label, predicted label) as a heatmap with the count written in each cell; the axes
    are labelled with the class names (CJK ones drawn by the CJK font, see figure_fonts)."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    n = len(labels)
    names = [drawable(str(lab)).replace("$", r"\$") for lab in labels]
    size = max(3.5, 0.6 * n + 2)
    with figure_fonts([*map(str, labels), title]):
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = m.max() if m.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > top / 2 else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(drawable(title))
    return save_figure(fig, path)


# ---------------------------------------------------------------- interpretability (yuyan.interpret)


def save_figure_fixed(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Like save_figure but keeps the figure's exact size (figsize x dpi pixels), for predictable images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def attention_figsize(n_head: int, n_tokens: int) -> tuple[float, float, int]:
    """(width, height, columns) in inches of the head grid drawn by plot_attention_heads."""
    import math

    cols = min(4, math.ceil(math.sqrt(n_head)))  # 4 heads: 2x2, 12 heads: 4x3
    rows = -(-n_head // cols)
    cell = min(6.0, max(2.6, 0.16 * n_tokens + 1.0))
    return cols * cell, rows * cell + 0.6, cols


def plot_attention_heads(
    weights, tokens: list[str], path: str | os.PathLike, title: str = "attention", dpi: int = 100
) -> Path:
    """One layer's attention as a grid of heads: weights (H, T, T), rows = queries, columns = keys.

    The image is exactly attention_figsize(H, T)[:2] x dpi pixels.
    """
    import numpy as np
    from matplotlib.colors import PowerNorm

    w = np.asarray(weights, dtype=float)
    H, T = w.shape[0], w.shape[-1]
    width, height, cols = attention_figsize(H, T)
    labels = token_labels(tokens)
    fs = max(3.5, min(9.0, 50.0 * (width / cols) / max(T, 1)))  # label size that fits a cell's row
    with figure_fonts(tokens):
        fig, axes = plt.subplots(-(-H // cols), cols, figsize=(width, height), squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= H:
                ax.axis("off")
                continue
            # square-root colour scale: the weak but structured weights of small models stay visible
            ax.imshow(w[h], cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=fs)
            ax.set_yticks(range(T), labels, fontsize=fs)
            ax.tick_params(length=0)
        fig.suptitle(title)
        fig.tight_layout()
    return save_figure_fixed(fig, path, dpi)


def plot_logit_lens(
    row_names: list[str],
    tokens: list[str],
    top_tokens: list[list[str]],
    top_probs,
    path: str | os.PathLike,
    title: str = "logit lens",
    dpi: int = 100,
) -> Path:
    """Grid layer x position: colour = probability of the top prediction, text = that token.

    row_names: one per layer (bottom = embeddings, top = final layer); tokens: the input tokens (columns);
    top_tokens[l][t] / top_probs (L, T): each layer's most likely next token at each position.
    """
    import numpy as np

    p = np.asarray(top_probs, dtype=float)
    L, T = p.shape
    cells = token_labels([s for row in top_tokens for s in row], max_len=8)
    with figure_fonts([*tokens, *(s for row in top_tokens for s in row)]):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * T + 2), max(2.5, 0.45 * L + 1.6)))
        im = ax.imshow(p, cmap="Blues", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
        for i in range(L):
            for j in range(T):
                ax.text(
                    j,
                    i,
                    cells[i * T + j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if p[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(T), token_labels(tokens), rotation=90, fontsize=8)
        ax.set_yticks(range(L), row_names, fontsize=8)
        ax.set_xlabel("input token (prediction is for the next position)")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="top-1 probability")
        ax.set_title(title)
        fig.tight_layout()
    return save_figure_fixed(fig, path, dpi)


def plot_attribution_bars(
    tokens: list[str], scores, path: str | os.PathLike, title: str = "attribution", dpi: int = 100
) -> Path:
    """One bar per input token: positive scores (pushing toward the target) red, negative blue."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    T = len(s)
    with figure_fonts(tokens):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * T + 1.5), 3.6))
        ax.bar(range(T), s, color=["#c0392b" if v >= 0 else "#2e86c1" for v in s])
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(T), token_labels(tokens), rotation=90, fontsize=8)
        ax.set_ylabel("attribution")
        ax.set_title(title)
        fig.tight_layout()
    return save_figure_fixed(fig, path, dpi)
