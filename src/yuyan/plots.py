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
