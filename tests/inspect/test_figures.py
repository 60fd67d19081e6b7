"""lmforge.inspect.figures: figures on their own Agg canvas (no pyplot), written atomically as PNG
files of the asked size; the confusion matrix with its counts in the cells."""

from __future__ import annotations

import struct
import subprocess
import sys

from lmforge.inspect.figures import new_figure, plot_confusion_matrix, save_png

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG)
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_new_figure_and_save_png(tmp_path):
    fig = new_figure(3, 2, dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    out = save_png(fig, tmp_path / "sub" / "f.png")  # parent folders are created
    assert out == tmp_path / "sub" / "f.png" and _png_size(out) == (150, 100)
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]  # no temporary left


def test_figures_never_import_pyplot():
    code = ("import sys; from lmforge.inspect.figures import new_figure; f = new_figure(1, 1); "
            "f.add_subplot().plot([1]); print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_confusion_matrix_labels_and_counts(tmp_path):
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
    out = plot_confusion_matrix(cm, ["neg", "neu", "pos"], tmp_path / "cm.png", title="val")
    w, h = _png_size(out)
    assert w == h == round(max(3.5, 0.6 * 3 + 2) * 110)
    # the cell texts: draw again and read them back from the figure
    from lmforge.inspect import figures
    seen = {}
    real = figures.save_png

    def keep(fig, path):
        seen["fig"] = fig
        return real(fig, path)

    figures.save_png = keep
    try:
        plot_confusion_matrix(cm, ["neg", "neu", "pos"], tmp_path / "cm2.png")
    finally:
        figures.save_png = real
    ax = seen["fig"].axes[0]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(v for row in cm for v in row)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["neg", "neu", "pos"]
    assert ax.get_title() == "confusion matrix" and ax.get_xlabel() == "predicted"
