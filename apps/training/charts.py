"""Display numbers for the runs pages: line-chart geometry, progress bars, durations.

Like ``apps.datasets.charts``, this computes numbers only; the templates
(``training/_line_chart.html``) draw the SVG, so every label is autoescaped like any other
text on the page. Nothing here queries the database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

CHART_WIDTH = 880
PLOT_HEIGHT = 220
LEFT = 64  # room for the y tick labels and the rotated y-axis label
RIGHT = 16
BOTTOM = 44  # room for the x tick labels and the x-axis label
LEGEND_TOP = 8
LEGEND_ROW = 18
LEGEND_SWATCH = 18
LEGEND_GAP = 20
CHAR_WIDTH = 7.0  # average glyph width of the 12px UI font, to lay the legend out
MAX_LEGEND_CHARS = 48
# A polyline of more points than pixels draws nothing more; thin long curves to this many.
MAX_POINTS = 1000
# Series this sparse (per-epoch values) get a dot per point, each with its value as a tooltip.
MARKER_LIMIT = 60
TICKS = 5

# One colour per series, distinguishable side by side (Okabe-Ito based, darkened for white).
PALETTE = (
    "#2f6fde",
    "#e07000",
    "#0f9d74",
    "#c8372d",
    "#8a4fd0",
    "#8c6239",
    "#d1489a",
    "#138fa6",
)

Point = tuple[float, float]


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class SeriesData:
    """One curve to draw: ``name`` goes in ``data-name``, ``label`` in the legend."""

    name: str
    label: str
    points: Sequence[Point]
    color: str = ""


@dataclass(frozen=True)
class Tick:
    label: str
    pos: float


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    title: str


@dataclass(frozen=True)
class Series:
    name: str
    label: str
    shown_label: str
    color: str
    points: str  # "x,y x,y ..." in SVG coordinates
    count: int  # points drawn
    total: int  # points in the data (more than ``count`` when thinned)
    markers: list[Marker]
    legend_x: float
    legend_y: float

    @property
    def swatch_x2(self) -> float:
        return self.legend_x + LEGEND_SWATCH

    @property
    def text_x(self) -> float:
        return self.legend_x + LEGEND_SWATCH + 5

    @property
    def text_y(self) -> float:
        return self.legend_y + 4


@dataclass(frozen=True)
class LineChart:
    id: str
    title: str
    x_label: str
    y_label: str
    width: int
    height: int
    left: int
    top: int
    right: int
    bottom: int
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    series: list[Series] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(s.count for s in self.series)

    @property
    def x_label_x(self) -> float:
        return (self.left + self.right) / 2

    @property
    def x_label_y(self) -> int:
        return self.height - 6

    @property
    def y_label_y(self) -> float:
        return (self.top + self.bottom) / 2

    @property
    def tick_label_y(self) -> int:
        return self.bottom + 16

    @property
    def tick_label_x(self) -> int:
        return self.left - 6


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_LEGEND_CHARS else text[: MAX_LEGEND_CHARS - 1] + "…"


def nice_ticks(low: float, high: float, *, integer: bool = False) -> list[float]:
    """About ``TICKS`` round values covering [low, high] (1, 2, 2.5 or 5 times 10^n apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high <= low:
        pad = 1.0 if integer or low == 0 else abs(low) * 0.1
        low, high = low - pad, high + pad
    raw = (high - low) / TICKS
    magnitude = 10 ** math.floor(math.log10(raw))
    multiples = (1.0, 2.0, 5.0, 10.0) if integer else (1.0, 2.0, 2.5, 5.0, 10.0)
    step = next(m * magnitude for m in multiples if m * magnitude >= raw * 0.999)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(low / step + 1e-9) * step
    end = math.ceil(high / step - 1e-9) * step
    count = round((end - start) / step)
    return [start + i * step for i in range(count + 1)]


def _tick_label(value: float, step: float) -> str:
    # As many decimals as the step needs: 0.2 -> 1, 0.25 -> 2, 2.5 -> 1, 50 -> 0.
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    if decimals == 0:
        return f"{round(value):,}"
    return f"{value:,.{decimals}f}"


def _thin(points: Sequence[Point]) -> list[Point]:
    if len(points) <= MAX_POINTS:
        return list(points)
    stride = math.ceil(len(points) / MAX_POINTS)
    thinned = list(points[::stride])
    if thinned[-1] != points[-1]:  # always end where the curve ends
        thinned.append(points[-1])
    return thinned


def _value_text(value: float) -> str:
    return f"{value:.4g}"


def line_chart(
    *,
    chart_id: str,
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[SeriesData],
    x_integer: bool = True,
    x_from_zero: bool = False,
    y_range: tuple[float, float] | None = None,
) -> LineChart:
    """Lay out one line chart: legend on top, then the plot with axes and ticks.

    ``y_range`` fixes the y axis (0..1 for accuracy and F1, so runs compare at a glance);
    otherwise it spans the data with round ticks.
    """
    # Legend: items left to right, wrapped onto more rows when the width runs out.
    positions: list[Point] = []
    x, row = float(LEFT), 0
    for s in series:
        item = LEGEND_SWATCH + 5 + len(_shorten(s.label)) * CHAR_WIDTH
        if x > LEFT and x + item > CHART_WIDTH - RIGHT:
            x, row = float(LEFT), row + 1
        positions.append((x, LEGEND_TOP + LEGEND_ROW * row + LEGEND_ROW / 2))
        x += item + LEGEND_GAP
    legend_rows = row + 1 if series else 0
    top = LEGEND_TOP + LEGEND_ROW * legend_rows + 12
    bottom = top + PLOT_HEIGHT
    right = CHART_WIDTH - RIGHT

    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    x_low = min(xs, default=0.0)
    x_high = max(xs, default=1.0)
    if x_from_zero:
        x_low = min(x_low, 0.0)
    x_values = nice_ticks(x_low, x_high, integer=x_integer)
    if y_range is not None:
        y_values = nice_ticks(*y_range)
    else:
        y_values = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1 = x_values[0], x_values[-1]
    y0, y1 = y_values[0], y_values[-1]
    x_step = x_values[1] - x_values[0] if len(x_values) > 1 else 1.0
    y_step = y_values[1] - y_values[0] if len(y_values) > 1 else 1.0

    def px(value: float) -> float:
        return round(LEFT + (value - x0) / (x1 - x0) * (right - LEFT), 1)

    def py(value: float) -> float:
        return round(bottom - (value - y0) / (y1 - y0) * (bottom - top), 1)

    drawn: list[Series] = []
    for index, (s, (legend_x, legend_y)) in enumerate(zip(series, positions, strict=True)):
        points = _thin(sorted(s.points))
        coords = [(px(a), py(b)) for a, b in points]
        markers = (
            [
                Marker(x=cx, y=cy, title=f"{s.label}: {_value_text(b)} at {x_label} {a:g}")
                for (cx, cy), (a, b) in zip(coords, points, strict=True)
            ]
            if len(points) <= MARKER_LIMIT
            else []
        )
        drawn.append(
            Series(
                name=s.name,
                label=s.label,
                shown_label=_shorten(s.label) + ("" if points else " (no data yet)"),
                color=s.color or color(index),
                points=" ".join(f"{a:g},{b:g}" for a, b in coords),
                count=len(points),
                total=len(s.points),
                markers=markers,
                legend_x=legend_x,
                legend_y=legend_y,
            )
        )
    return LineChart(
        id=chart_id,
        title=title,
        x_label=x_label,
        y_label=y_label,
        width=CHART_WIDTH,
        height=bottom + BOTTOM,
        left=LEFT,
        top=top,
        right=right,
        bottom=bottom,
        x_ticks=[Tick(label=_tick_label(v, x_step), pos=px(v)) for v in x_values],
        y_ticks=[Tick(label=_tick_label(v, y_step), pos=py(v)) for v in y_values],
        series=drawn,
    )


# --- metric series ------------------------------------------------------------------------

# (name, step, epoch, value), as ``metric_points(...).values_list(...)`` yields them.
MetricRow = tuple[str, int, float | None, float]

LOSS_SERIES = (("train_loss", "train loss (per step)"), ("val_loss", "validation loss (per epoch)"))
VAL_SERIES = (("val_macro_f1", "validation macro-F1"), ("val_accuracy", "validation accuracy"))
# An embedding run's validation: its held-out queries ranked against every document.
RETRIEVAL_SERIES = (
    ("val_recall_at_1", "validation recall@1"),
    ("val_recall_at_5", "validation recall@5"),
    ("val_recall_at_10", "validation recall@10"),
    ("val_mrr_at_10", "validation MRR@10"),
)

# An autocomplete run's: next-word accuracy on held-out reply prefixes (a 0-1 score), and
# perplexity on its own chart (unbounded, lower is better).
AUTOCOMPLETE_SERIES = (("val_next_word_top1", "validation next-word top-1"),)
PERPLEXITY_SERIES = (("val_perplexity", "validation perplexity"),)


def group_points(rows: Iterable[MetricRow]) -> dict[str, list[MetricRow]]:
    grouped: dict[str, list[MetricRow]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    return grouped


def by_step(rows: Iterable[MetricRow]) -> list[Point]:
    return [(float(step), float(value)) for _, step, _, value in rows]


def by_epoch(rows: Iterable[MetricRow]) -> list[Point]:
    # Per-epoch metrics carry their epoch; a point without one keeps its step instead.
    return [
        (float(epoch) if epoch is not None else float(step), float(value))
        for _, step, epoch, value in rows
    ]


def run_charts(points: Mapping[str, list[MetricRow]]) -> list[LineChart]:
    """The run page's charts: losses against the step (validation loss is recorded at the
    step its epoch ended on) and validation scores against the epoch (an embedding run's:
    recall@1/5/10 and MRR@10; an autocomplete run's: next-word top-1, and its validation
    perplexity on a third chart)."""
    loss = line_chart(
        chart_id="loss-chart",
        title="Loss: training loss per logged step, validation loss at each epoch end",
        x_label="step",
        y_label="loss",
        series=[
            SeriesData(name=name, label=label, points=by_step(points.get(name, [])))
            for name, label in LOSS_SERIES
        ],
        x_from_zero=True,
    )
    series: tuple[tuple[str, str], ...]
    if any(name in points for name, _ in RETRIEVAL_SERIES):
        title, series = "Validation recall@k and MRR@10 per epoch", RETRIEVAL_SERIES
    elif any(name in points for name, _ in (*AUTOCOMPLETE_SERIES, *PERPLEXITY_SERIES)):
        title, series = "Validation next-word top-1 accuracy per epoch", AUTOCOMPLETE_SERIES
    else:
        title, series = "Validation accuracy and macro-F1 per epoch", VAL_SERIES
    val = line_chart(
        chart_id="val-chart",
        title=title,
        x_label="epoch",
        y_label="score",
        series=[
            SeriesData(name=name, label=label, points=by_epoch(points.get(name, [])))
            for name, label in series
        ],
        y_range=(0.0, 1.0),
    )
    if series != AUTOCOMPLETE_SERIES:
        return [loss, val]
    perplexity = line_chart(
        chart_id="perplexity-chart",
        title="Validation perplexity per epoch (lower is better)",
        x_label="epoch",
        y_label="perplexity",
        series=[
            SeriesData(name=name, label=label, points=by_epoch(points.get(name, [])))
            for name, label in PERPLEXITY_SERIES
        ],
    )
    return [loss, val, perplexity]


# --- progress and durations ---------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def elapsed(start: datetime | None, end: datetime | None, now: datetime) -> str:
    if start is None:
        return ""
    delta: timedelta = (end or now) - start
    return duration_text(delta.total_seconds())


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class ProgressView:
    """A run's ``progress`` JSON (written by the worker) read defensively for display."""

    phase: str
    epoch: int | None
    epochs: int | None
    step: int | None
    total_steps: int | None
    loss: float | None
    samples_per_second: float | None
    eta_seconds: float | None

    @property
    def percent(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return round(min(max(self.step / self.total_steps, 0.0), 1.0) * 100, 1)

    @property
    def eta(self) -> str:
        return duration_text(self.eta_seconds)


def progress_view(progress: Mapping[str, Any] | None) -> ProgressView | None:
    if not progress:
        return None
    phase = progress.get("phase")
    return ProgressView(
        phase=phase if isinstance(phase, str) else "",
        epoch=_int(progress.get("epoch")),
        epochs=_int(progress.get("epochs")),
        step=_int(progress.get("step")),
        total_steps=_int(progress.get("total_steps")),
        loss=_float(progress.get("loss")),
        samples_per_second=_float(progress.get("samples_per_second")),
        eta_seconds=_float(progress.get("eta_seconds")),
    )
