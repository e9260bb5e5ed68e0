"""Server-side chart geometry: the numbers a template needs to draw an SVG, nothing else.

The template (``datasets/_label_chart.html``) does the drawing, so every label is escaped
by Django's autoescaping like any other text on the page.
"""

from __future__ import annotations

from dataclasses import dataclass

ROW_HEIGHT = 18
BAR_HEIGHT = 13
CHART_WIDTH = 880
COUNT_WIDTH = 64  # room right of the longest bar for its count
CHAR_WIDTH = 7.2  # average glyph width of the 12px UI font, to size the label column
MAX_LABEL_CHARS = 40
TOP = 4


@dataclass(frozen=True)
class Bar:
    label: str
    shown_label: str  # shortened to fit the label column; the full label is in <title>
    count: int
    share: float  # of all rows, 0..1
    y: int
    width: float
    text_y: float  # baseline of the label and count text, centred on the bar
    count_x: float  # where the count text starts, just right of the bar

    @property
    def percent(self) -> str:
        return f"{self.share * 100:.1f}%"


@dataclass(frozen=True)
class LabelChart:
    bars: list[Bar]
    width: int
    height: int
    label_width: int
    bar_area: int
    total: int

    @property
    def bar_height(self) -> int:
        return BAR_HEIGHT

    @property
    def label_x(self) -> int:
        return self.label_width - 8

    @property
    def smallest(self) -> Bar | None:
        return self.bars[-1] if self.bars else None

    @property
    def largest(self) -> Bar | None:
        return self.bars[0] if self.bars else None

    @property
    def imbalance(self) -> float | None:
        """Largest over smallest class: 1.0 is perfectly balanced."""
        if not self.bars or self.bars[-1].count == 0:
            return None
        return self.bars[0].count / self.bars[-1].count


def _shorten(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def label_chart(labels: dict[str, int]) -> LabelChart:
    """Horizontal bars, most frequent label first, scaled to the largest count."""
    ordered = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(count for _, count in ordered)
    longest = max((len(_shorten(label)) for label, _ in ordered), default=0)
    label_width = int(min(max(longest * CHAR_WIDTH + 12, 80), MAX_LABEL_CHARS * CHAR_WIDTH + 12))
    bar_area = CHART_WIDTH - label_width - COUNT_WIDTH
    top = ordered[0][1] if ordered else 0
    bars = []
    for i, (label, count) in enumerate(ordered):
        y = TOP + i * ROW_HEIGHT
        # A label with rows is never drawn as nothing: at least one pixel wide.
        width = round(max(bar_area * count / top, 1.0), 1) if top else 0.0
        bars.append(
            Bar(
                label=label,
                shown_label=_shorten(label),
                count=count,
                share=count / total if total else 0.0,
                y=y,
                width=width,
                text_y=y + BAR_HEIGHT / 2 + 4,
                count_x=round(label_width + width + 6, 1),
            )
        )
    return LabelChart(
        bars=bars,
        width=CHART_WIDTH,
        height=TOP * 2 + len(bars) * ROW_HEIGHT,
        label_width=label_width,
        bar_area=bar_area,
        total=total,
    )
