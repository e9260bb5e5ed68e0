"""Display numbers for the review pages: the confusion matrix as a heat map, and an
embedding model's recall@k curve beside its base's and its champion's.

As in ``apps.training.charts``, this computes geometry only; the templates
(``promotions/_heatmap.html``, ``training/_line_chart.html``) draw the SVG, so every label
is autoescaped. Nothing here queries the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from apps.training.charts import LineChart, SeriesData, line_chart

MAX_GRID = 560  # the matrix itself fits in this many pixels square
MIN_CELL, MAX_CELL = 6.0, 44.0
CHAR_WIDTH = 6.5  # average glyph width of the 11px axis labels
MAX_LABEL_CHARS = 24
TITLE_ROOM = 24
# Colour ramp from an empty cell to a full row, as RGB.
LOW = (247, 249, 252)
HIGH = (31, 79, 168)


@dataclass(frozen=True)
class HeatCell:
    x: float
    y: float
    size: float
    fill: str
    count: int
    share: float
    true_label: str
    pred_label: str
    diagonal: bool

    @property
    def title(self) -> str:
        return (
            f"true {self.true_label} → predicted {self.pred_label}: {self.count} "
            f"({self.share:.0%} of the row)"
        )

    @property
    def cx(self) -> float:
        return round(self.x + self.size / 2, 2)

    @property
    def cy(self) -> float:
        return round(self.y + self.size / 2, 2)

    @property
    def dark(self) -> bool:
        return self.share >= 0.5


@dataclass(frozen=True)
class AxisLabel:
    pos: float
    text: str
    full: str


@dataclass(frozen=True)
class HeatMap:
    chart_id: str
    title: str
    width: float
    height: float
    left: float
    top: float
    cell: float
    cells: list[HeatCell]
    x_labels: list[AxisLabel]
    y_labels: list[AxisLabel]
    show_counts: bool

    @property
    def grid(self) -> float:
        return self.cell * len(self.y_labels)

    @property
    def right(self) -> float:
        return self.left + self.grid

    @property
    def bottom(self) -> float:
        return self.top + self.grid

    @property
    def x_label_y(self) -> float:
        return self.top - 6

    @property
    def y_label_x(self) -> float:
        return self.left - 6

    @property
    def x_title_x(self) -> float:
        return self.left + self.grid / 2

    @property
    def y_title_y(self) -> float:
        return self.top + self.grid / 2


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def _mix(share: float) -> str:
    share = min(max(share, 0.0), 1.0)
    r, g, b = (round(lo + (hi - lo) * share) for lo, hi in zip(LOW, HIGH, strict=True))
    return f"rgb({r}, {g}, {b})"


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value)
    return 0


def confusion_heatmap(
    *, chart_id: str, title: str, labels: Sequence[Any], matrix: Any
) -> HeatMap | None:
    """The heat map of ``matrix[true][pred]``, shaded by each row's share; None if malformed."""
    names = [str(label) for label in labels]
    n = len(names)
    if n == 0 or not isinstance(matrix, list) or len(matrix) != n:
        return None
    if not all(isinstance(row, list) and len(row) == n for row in matrix):
        return None
    counts = [[_count(v) for v in row] for row in matrix]
    cell = max(MIN_CELL, min(MAX_CELL, MAX_GRID / n))
    longest = max(len(_shorten(name)) for name in names)
    margin = TITLE_ROOM + longest * CHAR_WIDTH + 8
    left = margin
    top = margin
    cells: list[HeatCell] = []
    for i, row in enumerate(counts):
        total = sum(row)
        for j, value in enumerate(row):
            share = value / total if total else 0.0
            cells.append(
                HeatCell(
                    x=round(left + j * cell, 2),
                    y=round(top + i * cell, 2),
                    size=round(cell, 2),
                    fill=_mix(share),
                    count=value,
                    share=share,
                    true_label=names[i],
                    pred_label=names[j],
                    diagonal=i == j,
                )
            )
    centres = [round(k * cell + cell / 2, 2) for k in range(n)]
    return HeatMap(
        chart_id=chart_id,
        title=title,
        width=round(left + n * cell + 16, 2),
        height=round(top + n * cell + 16, 2),
        left=round(left, 2),
        top=round(top, 2),
        cell=round(cell, 2),
        cells=cells,
        x_labels=[
            AxisLabel(pos=round(left + c, 2), text=_shorten(name), full=name)
            for c, name in zip(centres, names, strict=True)
        ],
        y_labels=[
            AxisLabel(pos=round(top + c, 2), text=_shorten(name), full=name)
            for c, name in zip(centres, names, strict=True)
        ],
        show_counts=cell >= 22,
    )


def _curve_points(curve: Any) -> list[tuple[float, float]]:
    if not isinstance(curve, list):
        return []
    return [
        (float(k), float(v))
        for k, v in enumerate(curve, start=1)
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]


def recall_curve_chart(
    *, chart_id: str, title: str, curves: Sequence[tuple[str, str, Any]]
) -> LineChart | None:
    """recall@k against k for each ``(name, label, curve)`` (``curve[k-1]`` is recall@k);
    curves without points are left out, None when none has any."""
    series = [
        SeriesData(name=name, label=label, points=_curve_points(curve))
        for name, label, curve in curves
    ]
    series = [s for s in series if s.points]
    if not series:
        return None
    return line_chart(
        chart_id=chart_id,
        title=title,
        x_label="k",
        y_label="recall@k",
        series=series,
        y_range=(0.0, 1.0),
    )
