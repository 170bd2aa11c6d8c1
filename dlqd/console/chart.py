"""The overview's 24-hour chart, drawn on the server: bars of SVG rectangles.

Pure geometry from the hourly counts; the template writes the ``<rect>``s
with presentation attributes (no inline style: the console's CSP allows none).
Each hour is one stacked bar (replayed, failed, parked) with a ``<title>``
that a browser shows on hover and a screen reader reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

WIDTH = 720
HEIGHT = 160
TOP = 12  # room above the tallest bar
BOTTOM = 20  # the hour labels
LEFT = 44  # the scale
OUTCOMES = ("replayed", "failed", "parked")


@dataclass(frozen=True, slots=True)
class Segment:
    outcome: str
    y: float
    height: float


@dataclass(frozen=True, slots=True)
class Bar:
    hour: datetime
    x: float
    width: float
    counts: dict[str, int]
    segments: list[Segment]
    label: str | None  # every sixth hour is labelled

    @property
    def title(self) -> str:
        counts = ", ".join(f"{self.counts[o]:,} {o}" for o in OUTCOMES)
        return f"{self.hour:%Y-%m-%d %H:00} UTC: {counts}"


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    baseline: float
    left: int
    scale: int  # the count at the top of the scale
    bars: list[Bar]
    totals: dict[str, int]


def _nice(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value``."""
    if value <= 1:
        return 1
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def hourly_chart(hours: list[dict[str, Any]]) -> Chart:
    """One bar per hour of ``hours`` (rows with ``hour`` and a count per outcome)."""
    baseline = HEIGHT - BOTTOM
    plot = baseline - TOP
    peak = max((sum(int(h[o]) for o in OUTCOMES) for h in hours), default=0)
    scale = _nice(peak)
    slot = (WIDTH - LEFT) / max(1, len(hours))
    bars: list[Bar] = []
    for index, hour in enumerate(hours):
        counts = {o: int(hour[o]) for o in OUTCOMES}
        y = float(baseline)
        segments: list[Segment] = []
        for outcome in OUTCOMES:
            height = plot * counts[outcome] / scale
            if counts[outcome] and height < 1:
                height = 1.0  # a single failure is still visible
            y -= height
            segments.append(Segment(outcome, round(y, 2), round(height, 2)))
        at: datetime = hour["hour"]
        bars.append(
            Bar(
                at,
                round(LEFT + index * slot + 1, 2),
                round(max(1.0, slot - 2), 2),
                counts,
                segments,
                f"{at:%H}:00" if at.hour % 6 == 0 else None,
            )
        )
    totals = {o: sum(b.counts[o] for b in bars) for o in OUTCOMES}
    return Chart(WIDTH, HEIGHT, baseline, LEFT, scale, bars, totals)
