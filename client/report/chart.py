"""The PNG chart: accuracy against latency, marker area ∝ size, the Pareto front and
the budget drawn in; matplotlib on a `Figure` with the Agg canvas (never pyplot)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

from tlserve.client.report.points import BACKBONE, INSTALL_HINT, MODEL, ChartUnavailable, Point, _plottable, fronts
from tlserve.client.report.budget import Budget, format_bytes, format_ms

# --- Chart ------------------------------------------------------------------------

_MIN_AREA = 20.0  # pt², so that the smallest model still shows
_MAX_AREA = 1600.0  # pt² of the largest point (a circle about 45 pt across)
_MODEL_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_BACKBONE_COLOR = "#555555"
_FRONT_COLOR = "#222222"
_BUDGET_COLOR = "#d62728"


def _matplotlib() -> tuple[Any, Any, Any]:
    """(Figure, FigureCanvasAgg, ticker), or ChartUnavailable with the install command."""
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ChartUnavailable(f"the chart needs matplotlib, which is not installed: {INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg, ticker


def render_png(
    points: Sequence[Point],
    path: str | os.PathLike[str] | BinaryIO,
    *,
    title: str,
    budget: Budget | None = None,
    recommended: Point | None = None,
    chance_accuracy: float | None = None,
    width_px: int = 1200,
    height_px: int = 750,
    dpi: int = 100,
) -> None:
    """Draws accuracy (%) against batch-1 p50 latency (ms) to a PNG of exactly
    width_px × height_px: marker area ∝ size, the Pareto front as a step line with its
    points ringed, model variants as filled markers coloured per model, backbone probes as
    hollow diamonds, every point labelled, the latency budget as a dashed line and the
    recommended point circled. Points without accuracy or latency are left out.
    """
    if width_px < 200 or height_px < 150 or dpi <= 0:
        raise ValueError(f"chart too small: {width_px}x{height_px} px at {dpi} dpi (at least 200x150)")
    Figure, FigureCanvasAgg, ticker = _matplotlib()
    width_in, height_in = width_px / dpi, height_px / dpi
    # Text and markers are sized in points: a small canvas (or a high dpi) gets them smaller,
    # down to half, so that the axes keep their room next to the legends.
    scale = max(0.5, min(1.0, width_in / 12, height_in / 7.5))
    small, normal = 8 * scale, 10 * scale
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [p for p in points if _plottable(p)]
    kinds = {p.kind for p in shown}
    ax.set_title(title, parse_math=False, fontsize=normal * 1.2)
    ax.set_xlabel("p50 latency, batch 1 (ms)", fontsize=normal)
    ylabel = {frozenset({MODEL}): "test top-1 accuracy (%)", frozenset({BACKBONE}): "probe accuracy (%)"}
    ax.set_ylabel(ylabel.get(frozenset(kinds), "accuracy (%): test top-1 / probe"), fontsize=normal)
    ax.tick_params(labelsize=normal * 0.9)
    ax.grid(True, which="major", alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "nothing to plot: no point has both an accuracy and a latency",
                ha="center", va="center", transform=ax.transAxes, fontsize=normal)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.savefig(path, dpi=dpi, format="png")
        return

    sizes = [p.size_bytes for p in shown if p.size_bytes]
    largest = max(sizes) if sizes else 0

    def area(size: int | None) -> float:
        if not size or not largest:
            return _MIN_AREA * scale**2
        return max(_MIN_AREA, _MAX_AREA * size / largest) * scale**2

    def xy(p: Point) -> tuple[float, float]:
        assert p.latency_seconds is not None and p.accuracy is not None
        return p.latency_seconds * 1e3, p.accuracy * 100

    latencies = [xy(p)[0] for p in shown]
    if budget is not None and budget.max_latency_seconds is not None:
        latencies.append(budget.max_latency_seconds * 1e3)
    if max(latencies) / min(latencies) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))

    handles: list[Any] = []
    colors: dict[str, str] = {}
    for p in shown:
        if p.kind == MODEL and p.name not in colors:
            colors[p.name] = _MODEL_COLORS[len(colors) % len(_MODEL_COLORS)]
    for p in shown:
        x, y = xy(p)
        if p.kind == MODEL:
            marker = "s" if p.variant.startswith("pytorch") else "o"
            ax.scatter([x], [y], s=area(p.size_bytes), marker=marker, color=colors[p.name], alpha=0.75,
                       edgecolors="white", linewidths=0.8, zorder=3)
        else:
            ax.scatter([x], [y], s=area(p.size_bytes), marker="D", facecolors="none",
                       edgecolors=_BACKBONE_COLOR, linewidths=1.6, zorder=3)
    for name, color in colors.items():
        handles.append(ax.scatter([], [], s=60 * scale**2, marker="o", color=color, alpha=0.75,
                                  label=f"{name} (model)"))
    if any(p.kind == BACKBONE for p in shown):
        handles.append(ax.scatter([], [], s=60 * scale**2, marker="D", facecolors="none", edgecolors=_BACKBONE_COLOR,
                                  linewidths=1.6, label="backbone probe (frozen features)"))

    for kind, front in fronts(shown).items():
        if not front:
            continue
        fx = [xy(p)[0] for p in front]
        fy = [xy(p)[1] for p in front]
        probes = kind == BACKBONE
        (line,) = ax.step(fx, fy, where="post", color=_FRONT_COLOR, linewidth=1.2, linestyle="--" if probes else "-",
                          zorder=2, label="Pareto front (probes)" if probes else "Pareto front")
        ax.scatter(fx, fy, s=[area(p.size_bytes) + 60 * scale**2 for p in front], facecolors="none",
                   edgecolors=_FRONT_COLOR, linewidths=1.4, zorder=4)
        handles.append(line)

    for i, p in enumerate(shown):
        # Alternate the side of the label so that neighbours overlap less.
        radius = math.sqrt(area(p.size_bytes)) / 2  # pt: scatter sizes are areas in pt²
        ax.annotate(p.label, xy(p), xytext=(radius + 3, (4 if i % 2 == 0 else -10) * scale), textcoords="offset points",
                    fontsize=small, zorder=5, parse_math=False)

    if budget is not None and budget.max_latency_seconds is not None:
        handles.append(ax.axvline(budget.max_latency_seconds * 1e3, color=_BUDGET_COLOR, linestyle="--",
                                  linewidth=1.2, label=f"latency budget {format_ms(budget.max_latency_seconds)}"))
    if recommended is not None and _plottable(recommended):
        x, y = xy(recommended)
        ax.scatter([x], [y], s=area(recommended.size_bytes) * 1.6 + 300 * scale**2, facecolors="none",
                   edgecolors=_BUDGET_COLOR, linewidths=2.2, zorder=6)
        # The legend's ring at a marker's size, not the (possibly large) ring drawn.
        handles.append(ax.scatter([], [], s=120 * scale**2, facecolors="none", edgecolors=_BUDGET_COLOR,
                                  linewidths=2.2, label="recommended"))
    ax.margins(x=0.12, y=0.12)
    if chance_accuracy:
        # Only where it falls inside the points' range: far below good probes it would
        # squash them into a line.
        low, high = ax.get_ylim()
        if low <= chance_accuracy * 100 <= high:
            handles.append(ax.axhline(chance_accuracy * 100, color="#999999", linestyle=":", linewidth=1,
                                      label=f"chance ({chance_accuracy * 100:.1f}%)"))
            ax.set_ylim(low, high)

    # Legends outside the axes, on the right; constrained layout makes room for them.
    fig.legend(handles=handles, loc="outside right upper", fontsize=small, frameon=False)
    if sizes:
        references = sorted({min(sizes), sorted(sizes)[len(sizes) // 2], largest})
        size_handles = [
            ax.scatter([], [], s=area(s), marker="o", facecolors="#cccccc", edgecolors="#888888",
                       label=format_bytes(s))
            for s in references
        ]
        # Spacing in font sizes (8 pt), so that the largest circle (~45 pt) clears its neighbours.
        fig.legend(handles=size_handles, title="marker area ∝ size", loc="outside right lower",
                   fontsize=small, title_fontsize=small, frameon=False, labelspacing=2.2, handleheight=2.5,
                   handletextpad=2.0, borderpad=2.2)
    fig.savefig(path, dpi=dpi, format="png")
