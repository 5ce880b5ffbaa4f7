"""Matplotlib plots (Agg backend) rendered straight to PNG data URIs for inline ``<img>``."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medshield.report.view import Figure, ci

DPI = 90  # small files; the page scales the images to its width
Point = tuple[float, float, float]
"""(value, ci_low, ci_high)."""
Series = dict[str, list[tuple[float, Point]]]
"""Line label -> [(x, point)]."""


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_figure(fig: Any, alt: str, caption: str = "", layout: bool = True) -> Figure:
    """Encode a matplotlib figure as a PNG data URI and close it (``layout``: apply
    ``tight_layout`` first; off for figures that place their own legends beside the axes)."""
    buffer = io.BytesIO()
    if layout:
        fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Figure(src=f"data:image/png;base64,{data}", alt=alt, caption=caption)


def to_file(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as a PNG file and close it."""
    fig.savefig(path, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def _errors(points: Sequence[Point]) -> list[list[float]]:
    """Error-bar lengths; a percentile interval need not contain its point estimate (e.g. an
    AUC), and matplotlib refuses negative lengths, so those are drawn as 0."""
    return [[max(0.0, v - lo) for v, lo, _ in points], [max(0.0, hi - v) for v, _, hi in points]]


def panels(
    groups: dict[str, list[dict[str, Any]]],
    names: Sequence[str],
    x: Callable[[dict[str, Any]], float],
    value: Callable[[dict[str, Any], str], Any],
) -> dict[str, Series]:
    """Panels for :func:`lines` from result points: one panel per metric name, one line per
    labelled group of points; ``value(point, name)`` is a metric dict, points whose metric is
    undefined are left out, and so are empty lines and panels."""
    out: dict[str, Series] = {}
    for name in names:
        series: Series = {}
        for label, points in groups.items():
            line = [(x(p), v) for p in points if (v := ci(value(p, name))) is not None]
            if line:
                series[label] = line
        if series:
            out[name] = series
    return out


def lines(
    panels: dict[str, Series],
    xlabel: str,
    title: str,
    categorical: bool = False,
) -> Figure | None:
    """Small multiples: one panel per metric, one line with 95% CI bars per series (None when
    there is no panel).

    With ``categorical`` the x values are evenly spaced and labelled (e.g. noise ratios 0, 0.05,
    0.1, 0.5 stay legible).
    """
    if not panels:
        return None
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = (6.0, 3.8) if len(panels) == 1 else (4.2 * cols, 3.0 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    xs = sorted({x for series in panels.values() for line in series.values() for x, _ in line})
    position = {x: i for i, x in enumerate(xs)} if categorical else {x: x for x in xs}
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, line in series.items():
            line = sorted(line, key=lambda p: p[0])
            points = [p for _, p in line]
            ax.errorbar(
                [position[x] for x, _ in line],
                [v for v, _, _ in points],
                yerr=_errors(points),
                marker="o",
                ms=4,
                capsize=3,
                label=label,
            )
        if categorical:
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        bounds = [b for line in series.values() for _, point in line for b in point]
        if all(0 <= b <= 1 for b in bounds):  # rates: a fixed scale keeps small gaps small
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return to_figure(fig, alt=title, caption=title)


def bars_figure(
    categories: list[str], series: dict[str, list[Point | None]], xlabel: str, title: str
) -> Any:
    """A matplotlib figure of grouped horizontal bars: a group per category (its name on the
    y axis, read horizontally however many there are), a bar per series, 95% CI whiskers and
    each value written beside its bar, so that a rate of 0 (no bar) still shows: a tick in the
    series' colour at 0 and the label ``0.00``."""
    plt = pyplot()
    n = max(1, len(series))
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.22 * len(categories) * n + 0.12 * len(categories)))
    for i, (label, points) in enumerate(series.items()):
        keep = [(j, p) for j, p in enumerate(points) if p is not None]
        ys = [j + (i - (n - 1) / 2) * height for j, _ in keep]
        colour = f"C{i % 10}"
        ax.barh(
            ys,
            [p[0] for _, p in keep],
            height,
            xerr=_errors([p for _, p in keep]),
            capsize=2,
            error_kw={"elinewidth": 0.8},
            color=colour,
            label=label,
        )
        zeros = [y for y, (_, p) in zip(ys, keep, strict=True) if p[0] == 0]
        if zeros:
            ax.plot(
                [0] * len(zeros), zeros, ls="", marker="|", ms=9, mew=2, color=colour, gid="zeros"
            )
        for y, (_, (value, _low, high)) in zip(ys, keep, strict=True):
            ax.text(max(value, high) + 0.012, y, f"{value:.2f}", va="center", fontsize=6.5)
    ax.set_yticks(range(len(categories)), categories, fontsize=8)
    ax.invert_yaxis()  # the first category on top, as in the tables
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_xlim(-0.02, 1.12)  # room for the ticks that mark zeros
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return fig


def bars(
    categories: list[str],
    series: dict[str, list[Point | None]],
    xlabel: str,
    title: str,
    caption: str = "",
) -> Figure:
    """:func:`bars_figure` as an inline PNG."""
    return to_figure(bars_figure(categories, series, xlabel, title), alt=title, caption=caption)


MARKERS = "osD^vP*Xhp<>"


def scatter_figure(
    points: list[tuple[str, str, Point, Point]], xlabel: str, ylabel: str, title: str
) -> Any:
    """A matplotlib figure with one marker per ``(series, group, x, y)`` point and 95% CI bars
    on both axes: a colour per series (e.g. method), a marker shape per group (e.g. task), the
    diagonal, and the legends beside the axes so that dozens of points stay readable."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    series = list(dict.fromkeys(p[0] for p in points))
    groups = list(dict.fromkeys(p[1] for p in points))
    colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")

    def colour(name: str) -> Any:
        return colours(series.index(name) % colours.N)

    def marker(name: str) -> str:
        return MARKERS[groups.index(name) % len(MARKERS)]

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for s, g, x, y in points:
        ax.errorbar(
            x[0],
            y[0],
            xerr=_errors([x]),
            yerr=_errors([y]),
            fmt=marker(g),
            color=colour(s),
            capsize=2,
            markersize=5,
            alpha=0.85,
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    legend = ax.legend(
        handles=[Line2D([], [], color=colour(s), marker="o", ls="", label=s) for s in series],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    if len(groups) > 1:
        ax.add_artist(legend)
        ax.legend(
            handles=[
                Line2D([], [], color="grey", marker=marker(g), ls="", label=g) for g in groups
            ],
            fontsize=7,
            loc="lower left",
            bbox_to_anchor=(1.02, 0.0),
        )
    fig.subplots_adjust(left=0.09, right=0.7, top=0.92, bottom=0.11)
    return fig


def scatter(
    points: list[tuple[str, str, Point, Point]], xlabel: str, ylabel: str, title: str
) -> Figure:
    """:func:`scatter_figure` as an inline PNG."""
    return to_figure(scatter_figure(points, xlabel, ylabel, title), alt=title, layout=False)
