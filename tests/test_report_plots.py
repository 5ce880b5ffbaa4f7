"""The report's bar charts: labels that read and values that show, zero included."""

from __future__ import annotations

import base64
import io

from PIL import Image

from medshield.report import plots

MODALITIES = ["chest_xray", "dermatology", "breast_ultrasound", "retinal_oct", "blood_cell"]


def test_bars_label_every_category_and_show_zero_values() -> None:
    series = {
        "ASR": [(0.5, 0.3, 0.7)] * len(MODALITIES),
        "over-defense": [(0.0, 0.0, 0.0), (0.2, 0.1, 0.3), None, (0.0, 0.0, 0.0), (0.0, 0.0, 0.1)],
    }
    fig = plots.bars_figure(MODALITIES, series, "rate", "per modality")
    [ax] = fig.axes
    try:
        labels = ax.get_yticklabels()
        assert [t.get_text() for t in labels] == MODALITIES  # horizontal bars: names on y
        assert all(t.get_rotation() == 0 for t in labels)
        values = [t.get_text() for t in ax.texts]
        # one label per bar drawn (the missing point has none): every zero reads 0.00
        assert values.count("0.50") == 5 and values.count("0.20") == 1
        assert values.count("0.00") == 3
        # and a tick in the series' colour marks each zero where no bar can be seen
        [zeros] = [line for line in ax.lines if line.get_gid() == "zeros"]
        assert len(zeros.get_xdata()) == 3 and set(zeros.get_xdata()) == {0}
        assert zeros.get_color() == "C1"  # over-defense's colour
        assert ax.get_xlim()[0] < 0  # the ticks are not hidden behind the axis
    finally:
        plots.pyplot().close(fig)


def test_bars_scale_with_the_number_of_categories() -> None:
    def height(n: int) -> int:
        figure = plots.bars([f"m{i}" for i in range(n)], {"a": [(0.5, 0.4, 0.6)] * n}, "rate", "t")
        png = base64.b64decode(figure.src.split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as im:
            assert im.width < 800  # fits the page without being scaled down
            return im.height

    assert height(9) > height(3)
