"""yuyan.plots' one font set-up: CJK text is drawn by a CJK font when one is installed (`make test` installs
Debian's fonts-noto-cjk), and is escaped with a warning when none is."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import pytest

from yuyan import plots

LABELS = ["正面", "负面"]


def _missing_glyph_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


@pytest.mark.skipif(plots.cjk_font() is None, reason="no CJK font installed (make fonts: fonts-noto-cjk)")
def test_cjk_labels_render_with_the_cjk_font(tmp_path):
    assert plots.font_family()[0] == "DejaVu Sans" and plots.font_family()[1] == plots.cjk_font()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = plots.plot_confusion_matrix([[3, 1], [0, 4]], LABELS, tmp_path / "cm.png", title="酒店评论")
        plots.plot_attribution_bars(["前台", "很", "好"], [0.5, -0.2, 0.1], tmp_path / "bars.png")
        plots.plot_loss_curve([1, 2], [3.0, 2.0], [], [], tmp_path / "loss.png", title="损失")
    assert png.stat().st_size > 0 and not _missing_glyph_warnings(caught), _missing_glyph_warnings(caught)
    assert not [w for w in caught if plots.NO_CJK_FONT in str(w.message)]
    # the labels are the characters themselves, not \uXXXX escapes
    assert plots.drawable("正面") == "正面" and plots.token_labels(["前台"]) == ["前台"]
    with plots.figure_fonts(LABELS):
        assert list(plt.rcParams["font.family"]) == plots.font_family()
    # without the set-up DejaVu Sans alone lacks the glyphs: the check above can fail
    with warnings.catch_warnings(record=True) as caught, plt.rc_context({"font.family": ["DejaVu Sans"]}):
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.set_title("正面")
        fig.savefig(tmp_path / "plain.png")
        plt.close(fig)
    assert _missing_glyph_warnings(caught)


def test_without_a_cjk_font_labels_are_escaped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_cjk_font", [None])
    assert plots.font_family() == ["DejaVu Sans"] and plots.drawable("正面ok") == "\\u6b63\\u9762ok"
    with pytest.warns(UserWarning, match="fonts-noto-cjk"):
        plots.plot_confusion_matrix([[1, 0], [0, 1]], LABELS, tmp_path / "cm.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Latin labels need no CJK font: no warning
        plots.plot_confusion_matrix([[1, 0], [0, 1]], ["neg", "pos"], tmp_path / "cm2.png")
