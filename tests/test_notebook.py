"""notebooks/from_theory_to_practice.ipynb runs top to bottom and shows what it claims.

The notebook is executed with nbclient in a kernel of this interpreter (a kernelspec installed into a
temporary prefix, found through JUPYTER_PATH: it works in a fresh clone whose `make test` made .venv, with
no network and nothing written to the user's Jupyter folders). Every cell must succeed; the figures must be
inline PNGs; the numbers the notebook prints must say what its text says: the hand-computed embeddings,
attention head, multi-head attention, FFN and block match the library's layers (max diff < 1e-5), a random
model's loss sits at ln V, training takes it well below, and the LoRA fine-tune raises ROUGE-L. The
committed file carries no outputs (readable diffs), and its code uses only yuyan's public names.
"""

from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # dev dependencies: make test installs them
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "from_theory_to_practice.ipynb"
KERNEL = "yuyan-notebook-test"


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"code cell {i} has stored outputs; strip them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"


def test_notebook_uses_only_public_names():
    """No `_name` imported from yuyan, and no `obj._name` attribute anywhere in the notebook's code."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in code_cells(nb):
        src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("yuyan"):
                assert not any(a.name.startswith("_") for a in node.names), ast.unparse(node)
                assert not any(part.startswith("_") for part in node.module.split(".")), ast.unparse(node)
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not any(p.startswith("_") for p in a.name.split(".")), ast.unparse(node)
            if isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"private attribute in the notebook: {ast.unparse(node)}"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a run in a fresh kernel of this Python (outputs kept in memory only)."""
    tmp = tmp_path_factory.mktemp("notebook")
    kernelspec.install(kernel_name=KERNEL, prefix=str(tmp / "prefix"))
    mp = pytest.MonkeyPatch()
    # the kernel process inherits this environment: where to find the spec, and where the notebook writes
    mp.setenv("JUPYTER_PATH", str(tmp / "prefix" / "share" / "jupyter"))
    mp.setenv("YUYAN_NOTEBOOK_OUT", str(tmp / "out"))
    mp.setenv("YUYAN_NOTEBOOK_FAST", "1")  # the smaller budgets: the suite has to fit in 15 min on 2 cores
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            kernel_name=KERNEL,
            timeout=600,  # per cell
            startup_timeout=120,
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        mp.undo()
    return nb


def text_of(nb) -> str:
    parts = []
    for cell in code_cells(nb):
        for out in cell.outputs:
            if out.output_type == "stream":
                parts.append(out.text)
    return "".join(parts)


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected"
    return cells[0]


def pngs(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


# one run in fast mode: 35 s on a quiet 2-vCPU Intel Xeon (full budgets: 11 min on the same machine at load 5-7)
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_notebook_runs_and_shows_its_figures(executed):
    assert sys.executable  # the kernel is this interpreter (the spec's argv is sys.executable)
    for cell in code_cells(executed):
        assert not any(out.output_type == "error" for out in cell.outputs)
    for tag in ("loss-plot", "attention-heatmap", "logit-lens", "attribution"):
        assert pngs(tagged(executed, tag)) >= 1, f"the {tag} cell shows no inline PNG"
    assert sum(pngs(c) for c in code_cells(executed)) >= 6


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_notebook_numbers(executed):
    text = text_of(executed)
    checks = dict(re.findall(r"CHECK (.+?): max diff = ([0-9.e+-]+)", text))
    for name in (
        "embeddings",
        "attention probabilities (layer 0, head 0)",
        "one head by hand vs the layer",
        "multi-head attention",
        "FFN",
        "whole block",
        "cross-entropy by hand vs the fused loss",
        "trained model, last layer, head 0 by hand vs the layer",
    ):
        assert name in checks, f"the notebook did not print its check {name!r}"
        assert float(checks[name]) < 1e-5, (name, checks[name])

    random_loss, ln_v = map(
        float, re.search(r"LOSS random model: ([\d.]+) nats/token; ln V = ([\d.]+)", text).groups()
    )
    assert ln_v == pytest.approx(math.log(4096), abs=1e-3)
    assert abs(random_loss - ln_v) < 0.1  # a fresh model predicts almost uniformly
    trained = float(re.search(r"LOSS trained model: ([\d.]+)", text).group(1))
    assert trained < ln_v - 2.0  # a minute of pre-training: far below the uniform bound

    before, after = map(float, re.search(r"ROUGE-L before: ([\d.]+)  after: ([\d.]+)", text).groups())
    assert after > before
    accuracy = float(re.search(r"ACCURACY on held-out patterns: ([\d.]+)", text).group(1))
    assert accuracy >= 0.75  # 20 reviews of two sentence patterns it never saw
    # integrated gradients: the attributions add up to f(input) - f(baseline)
    total, delta = map(
        float,
        re.search(r"attributions add up to ([-\d.]+), f\(input\) - f\(baseline\) = ([-\d.]+)", text).groups(),
    )
    assert total == pytest.approx(delta, abs=0.05)
