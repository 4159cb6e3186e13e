"""Every matplotlib figure in one place (Agg backend, PNG files).

Each function takes plain data (lists, arrays, tensors) and a path, writes the PNG atomically and returns
the path. Nothing here knows about models or training.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure to PNG through a temp file and a rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_loss_curve(train_steps, train_loss, val_steps, val_loss, path: str | os.PathLike,
                    title: str = "loss") -> Path:
    """Training and validation loss (nats/token) against optimizer step, log-scaled loss axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if len(train_steps):
        ax.plot(list(train_steps), list(train_loss), label="train", linewidth=1.2, alpha=0.85)
    if len(val_steps):
        ax.plot(list(val_steps), list(val_loss), "o-", label="val", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if len(train_loss) or len(val_loss):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def plot_confusion_matrix(matrix, labels: list[str], path: str | os.PathLike, title: str = "confusion matrix") -> Path:
    """Counts of (true label, predicted label) as a heatmap with the count written in each cell."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    n = len(labels)
    size = max(3.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), [str(lab) for lab in labels], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(lab) for lab in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return save_figure(fig, path)
