"""The report's charts, each described once and drawn twice: as a PNG (matplotlib), for
pasting into a post-mortem, and as an interactive chart in ``report.html`` — drag across a
chart to zoom into those seconds (every chart follows; double-click zooms out), hover to read
each series' value at that second in the legend, click a legend entry to hide its series.

The interactive charts are drawn by uPlot, vendored in ``static/`` (the npm package ``uplot``
1.6.32, MIT licence in ``static/uPlot.LICENSE``) and inlined into the page with the data and
``static/charts.js``, so the page opens with no network: one file to attach to a ticket or
open on an air-gapped bastion. uPlot rather than hand-written SVG: 51 kB that draw on canvas
(a soak's 10 000 seconds × a dozen series stay fluid where that many SVG nodes crawl), with
zoom, a live legend, log and asinh scales and gaps at missing values done and tested
upstream; hand-written, those would be a few hundred lines of our own to get right.

A ``Chart`` names its series (values per second of the run, ``None`` where nothing was
measured: lines break there) and how to draw them; a ``Frame`` is what every chart of one
run shares: the x axis (seconds from T0), the countdown band, the T0 line and the run's
actions.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "COLOURS",
    "PALETTE",
    "UPLOT_VERSION",
    "Chart",
    "Frame",
    "Series",
    "draw_pngs",
    "figures",
    "page_assets",
]

UPLOT_VERSION = "1.6.32"
#: matplotlib's tab10, by name, so the PNG and the interactive chart use the same colours.
COLOURS = {
    "blue": "#1f77b4",
    "orange": "#ff7f0e",
    "green": "#2ca02c",
    "red": "#d62728",
    "purple": "#9467bd",
    "brown": "#8c564b",
    "pink": "#e377c2",
    "grey": "#7f7f7f",
    "olive": "#bcbd22",
    "cyan": "#17becf",
}
#: Colours for series that have no colour of their own (request kinds, items), in turn.
PALETTE = tuple(COLOURS.values())

Style = Literal["line", "step", "bars", "points"]


@dataclass(frozen=True)
class Series:
    """One series: a value per second of the run (``None``: not measured, the line breaks)."""

    label: str
    values: Sequence[float | None]
    colour: str
    style: Style = "line"  # step: the value holds for the second; points: markers only
    width: float = 1.2
    dash: bool = False
    #: A wide pale line to compare the others against (the shape's target).
    faint: bool = False
    #: Drawn against the right-hand axis (``Chart.y2_label``).
    right: bool = False
    #: ``points``: a word beside the first point on the PNG (on the page, the legend says it).
    note: str = ""


@dataclass(frozen=True)
class Chart:
    name: str  # plots/<name>.png, and the figure's id on the page
    title: str
    caption: str
    y_label: str
    series: Sequence[Series]
    scale: Literal["linear", "log", "symlog"] = "linear"
    y2_label: str = ""
    #: Bars stacked on one another (the legend and hover show each series' own value).
    stacked: bool = False
    #: Name the shape's windows along the top (and the T0 rendezvous).
    name_windows: bool = False
    legend_columns: int = 1


@dataclass(frozen=True)
class Frame:
    """What every chart of a run shares."""

    x: Sequence[float]  # seconds from T0 (or from the start, for a shape without T0)
    x_label: str
    t0: bool  # draw the opening (x = 0) as a dashed line
    bands: Sequence[tuple[float, float]] = ()  # greyed stretches: the countdown
    events: Sequence[tuple[float, str]] = ()  # the run's actions (a reserve released …)
    windows: Sequence[tuple[float, str]] = ()  # (start, name)


# -- PNG -----------------------------------------------------------------------------------
def draw_pngs(charts: Sequence[Chart], frame: Frame, folder: Path) -> dict[str, Path]:
    """Each chart as ``folder/<name>.png``; returns the paths by chart name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for chart in charts:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        _draw(ax, chart, frame)
        path = folder / f"{chart.name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made[chart.name] = path
    return made


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _draw(ax: Any, chart: Chart, frame: Frame) -> None:
    x = list(frame.x)
    right = ax.twinx() if any(s.right for s in chart.series) else None
    bottom = [0.0] * len(x)
    for s in chart.series:
        on = right if s.right and right is not None else ax
        values = _nan(s.values)
        style: dict[str, Any] = {"color": s.colour, "label": s.label}
        if s.style == "bars":
            on.bar(
                x,
                values,
                width=1.0,
                align="edge",
                alpha=1.0 if chart.stacked else 0.6,
                **style,
                bottom=bottom if chart.stacked else None,
            )
            if chart.stacked:
                bottom = [b + (0.0 if math.isnan(v) else v) for b, v in zip(bottom, values)]
            continue
        if s.style == "points":
            points = [(t, v) for t, v in zip(x, values) if not math.isnan(v)]
            on.plot([t for t, _ in points], [v for _, v in points], marker="v", ls="none", ms=9, **style)
            if s.note and points:
                on.annotate(
                    s.note, points[0], textcoords="offset points", xytext=(3, 8), fontsize=7, color=s.colour
                )
            continue
        line = {
            "lw": 4 if s.faint else s.width,
            "alpha": 0.6 if s.faint else 1.0,
            "ls": "--" if s.dash else "-",
        }
        if s.style == "step":
            on.step(x, values, where="post", **style, **line)
        else:
            on.plot(x, values, **style, **line)
    if chart.scale == "log":
        ax.set_yscale("log")
    elif chart.scale == "symlog":
        ax.set_yscale("symlog", linthresh=10)
    ax.set_title(chart.title, loc="left", fontsize=11)
    ax.set_xlabel(frame.x_label)
    ax.set_ylabel(chart.y_label)
    ax.grid(alpha=0.3)
    for start, end in frame.bands:
        ax.axvspan(start, end, color="0.92", zorder=0)
    if frame.t0:
        ax.axvline(0, color="k", lw=0.8, ls="--")
    for t, what in frame.events:
        ax.axvline(t, color=COLOURS["purple"], lw=0.8, ls=":")
        ax.annotate(
            what,
            (t, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color=COLOURS["purple"],
            rotation=90,
            va="top",
            ha="right",
        )
    if chart.name_windows:
        for start, name in frame.windows:
            ax.annotate(
                name,
                (start, 0.99),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="0.35",
                va="top",
                ha="left",
            )
        if frame.t0:
            ax.annotate(
                " T0 rendezvous", (0, 0.86), xycoords=("data", "axes fraction"), fontsize=8, ha="left"
            )
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        right.set_ylabel(chart.y2_label)
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8, ncol=chart.legend_columns)


# -- the page ------------------------------------------------------------------------------
def _static(name: str) -> str:
    return (resources.files("loadtests") / "static" / name).read_text(encoding="utf-8")


def _inline(text: str) -> str:
    """Text safe inside a <script> or <style> element (nothing in it can close the element)."""
    if "</script" in text.lower() or "</style" in text.lower():
        raise ValueError("inlined code must not close its element")
    return text


def page_assets() -> str:
    """The ``<style>`` and ``<script>`` elements the interactive charts need, inlined."""
    return (
        f"<style>{_inline(_static('uPlot.min.css'))}</style>\n"
        f"<script>{_inline(_static('uPlot.iife.min.js'))}</script>\n"
    )


def _chart_data(chart: Chart) -> dict[str, Any]:
    out = asdict(chart)
    out["series"] = [
        {**asdict(s), "values": [None if v is None or math.isnan(v) else v for v in s.values]}
        for s in chart.series
    ]
    return out


def figures(charts: Sequence[Chart], frame: Frame, pngs: Mapping[str, Path]) -> str:
    """One ``<figure>`` per chart (the interactive chart, its caption and its PNG), then the
    data and the code that draws them; put ``page_assets()`` in the page's head."""
    parts = []
    for chart in charts:
        png = pngs.get(chart.name)
        image = (
            f"<details><summary>PNG, for a post-mortem (plots/{html.escape(chart.name)}.png)</summary>"
            f'<img alt="{html.escape(chart.caption)}" src="data:image/png;base64,'
            f'{base64.b64encode(png.read_bytes()).decode()}"></details>'
            if png is not None
            else ""
        )
        parts.append(
            f'<figure class="chart" id="chart-{html.escape(chart.name)}">'
            f'<div class="chart-title">{html.escape(chart.title)}</div><div class="plot"></div>'
            f"<figcaption>{html.escape(chart.caption)}</figcaption>{image}</figure>"
        )
    data = {"frame": asdict(frame), "charts": [_chart_data(c) for c in charts]}
    payload = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    return (
        "".join(parts)
        + f'\n<script type="application/json" id="run-charts">{payload}</script>\n'
        + f"<script>{_inline(_static('charts.js'))}</script>\n"
    )
