"""The trade-off report behind `tlserve report`: points, Pareto front, budgets, chart, page.

Every model variant a profile measured (`ModelProfile`) and every backbone a
linear probe scored (`CompareBackbonesResponse`) becomes one `Point`: accuracy,
batch-1 p50 latency, size, memory. From a list of points this module finds the
Pareto front (nothing else is both more accurate and faster), recommends the
most accurate point within a latency, size and memory budget and says why, and
renders a PNG chart (accuracy against latency, marker area ∝ size) and one
self-contained HTML page holding the table and the chart:

    points = points_from_profile(tl.profile_model("pets"))
    rec = recommend(points, max_latency_seconds=0.005, max_size_bytes=20 << 20)
    files = write_report(points, "tlserve-report", title="pets", recommendation=rec)

Pure: no gRPC calls, only the generated messages. matplotlib (the `report`
extra) is imported when a chart is drawn and nowhere else, so the client's base
install stays grpcio + protobuf; the chart uses a `Figure` on the Agg canvas,
never pyplot's global state, so reports can be drawn from several threads.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO

from client.tlserve.v1 import tlserve_pb2 as pb

MODEL = "model"
BACKBONE = "backbone"
INSTALL_HINT = "pip install 'tlserve[report]'"
PNG_NAME = "report.png"
HTML_NAME = "report.html"

# How many passed-over points a recommendation names before "and N more".
_MAX_NAMED = 3


class ChartUnavailable(ImportError):
    """matplotlib, which only the chart needs, is not installed."""


# --- Points ----------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One thing on the chart and one row of the table: a model variant or a backbone probe.

    Figures the server did not report (proto zeros) are None here, so that "unknown"
    never passes for "free" in a budget. `accuracy` is a fraction (0.912): test-split
    top-1 for a model variant, validation accuracy of a linear probe on frozen
    features for a backbone. Latencies are batch-1 p50/p95 in seconds; throughput is
    at `batch_size`.
    """

    label: str
    kind: str  # MODEL or BACKBONE
    accuracy: float | None
    latency_seconds: float | None
    size_bytes: int | None = None
    peak_memory_bytes: int | None = None
    throughput_images_per_second: float | None = None
    parameter_count: int | None = None
    gflops: float | None = None
    device: str = ""
    # The label in two parts, for the table: "pets:3" and "onnx int8", or "resnet18" and "probe".
    name: str = ""
    variant: str = ""
    latency_p95_seconds: float | None = None
    batch_size: int | None = None
    # Where the accuracy comes from and anything else a reader needs to trust the row.
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _known(value: float) -> float | None:
    return value if value > 0 else None


def _known_int(value: int) -> int | None:
    return value if value > 0 else None


def variant_label(variant: pb.Variant) -> str:
    """"pytorch", "onnx fp32", "onnx fp16" or "onnx int8" (UNSPECIFIED runtime is ONNX,
    UNSPECIFIED precision FP32, as in the proto)."""
    precision = pb.Precision.Name(variant.precision) if variant.precision in pb.Precision.values() else ""
    precision = precision.removeprefix("PRECISION_").lower() if precision else str(variant.precision)
    if precision == "unspecified":
        precision = "fp32"
    if variant.runtime == pb.RUNTIME_PYTORCH:
        return "pytorch" if precision == "fp32" else f"pytorch {precision}"
    return f"onnx {precision}"


def model_name(ref: pb.ModelRef) -> str:
    return f"{ref.name}:{ref.version}" if ref.version else ref.name


def points_from_profile(profile: pb.ModelProfile) -> list[Point]:
    """One point per profiled variant of a model, labelled "pets:3 onnx int8"."""
    name = model_name(profile.model)
    points = []
    for v in profile.variants:
        variant = variant_label(v.variant)
        if v.accuracy_measured:
            note = f"top-1 measured on {v.test_image_count} test images" if v.test_image_count else "top-1 measured"
        elif v.test_top1_accuracy:
            note = "top-1 stored at " + ("training" if v.variant.runtime == pb.RUNTIME_PYTORCH else "export")
        else:
            note = "accuracy unknown"
        points.append(Point(
            label=f"{name} {variant}",
            kind=MODEL,
            accuracy=_known(v.test_top1_accuracy),
            latency_seconds=_known(v.latency_p50_seconds),
            size_bytes=_known_int(v.size_bytes),
            peak_memory_bytes=_known_int(v.peak_memory_bytes),
            throughput_images_per_second=_known(v.throughput_images_per_second),
            parameter_count=_known_int(v.parameter_count),
            gflops=_known(v.gflops),
            device=v.device,
            name=name,
            variant=variant,
            latency_p95_seconds=_known(v.latency_p95_seconds),
            batch_size=_known_int(v.batch_size),
            note=note,
        ))
    return points


def points_from_comparison(resp: pb.CompareBackbonesResponse) -> list[Point]:
    """One point per compared backbone, labelled "resnet18 (probe)"; size is its FP32 weights."""
    points = []
    for r in resp.results:
        details = [f"weights {r.weights}" if r.weights else "default weights"]
        if r.image_size:
            details.append(f"{r.image_size} px")
        if r.feature_dim:
            details.append(f"{r.feature_dim}-d features")
        if resp.val_image_count:
            details.append(f"probe scored on {resp.val_image_count} val images")
        points.append(Point(
            label=f"{r.backbone} (probe)",
            kind=BACKBONE,
            # A probe always reports its accuracy, even 0: it is what the call measures.
            accuracy=r.probe_accuracy,
            latency_seconds=_known(r.latency_p50_seconds),
            size_bytes=_known_int(r.file_size_bytes),
            parameter_count=_known_int(r.parameter_count),
            gflops=_known(r.gflops),
            device=r.device,
            name=r.backbone,
            variant="probe",
            note=", ".join(details),
        ))
    return points


# --- Pareto front ------------------------------------------------------------------


def _dominates(a: Point, b: Point) -> bool:
    """a is at least as accurate and as fast as b, and strictly better in one."""
    assert a.accuracy is not None and b.accuracy is not None
    assert a.latency_seconds is not None and b.latency_seconds is not None
    no_worse = a.accuracy >= b.accuracy and a.latency_seconds <= b.latency_seconds
    better = a.accuracy > b.accuracy or a.latency_seconds < b.latency_seconds
    return no_worse and better


def _plottable(p: Point) -> bool:
    return p.accuracy is not None and p.latency_seconds is not None


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats on both accuracy (higher) and latency (lower),
    fastest first. Points with equal accuracy and latency are both on the front when
    nothing beats them; a point without accuracy or latency never is."""
    candidates = [p for p in points if _plottable(p)]
    front = [p for p in candidates if not any(_dominates(q, p) for q in candidates)]
    return sorted(front, key=lambda p: (p.latency_seconds, -(p.accuracy or 0.0)))


def fronts(points: Iterable[Point]) -> dict[str, list[Point]]:
    """The Pareto front of each kind of point. Model variants (test top-1 of a fine-tuned
    model) and backbone probes (validation top-1 of a linear probe) measure different
    things, so neither may dominate the other."""
    points = list(points)
    kinds = dict.fromkeys(p.kind for p in points)
    return {kind: pareto_front(p for p in points if p.kind == kind) for kind in kinds}


def front_members(points: Sequence[Point]) -> list[Point]:
    """Every point on its own kind's front (see `fronts`)."""
    return [p for front in fronts(points).values() for p in front]


# --- Formatting -------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Sizes in 1024 steps with torchvision's labels ("44.7 MB"); the CLI prints sizes with it too."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_ms(seconds: float) -> str:
    """"3.1 ms", "0.42 ms"."""
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 1 else f"{ms:.1f} ms"


def _accuracy_text(p: Point) -> str:
    assert p.accuracy is not None
    return f"{p.accuracy * 100:.1f}% " + ("top-1" if p.kind == MODEL else "probe accuracy")


def _budget_number(value: float) -> str:
    return f"{value:g}"


# --- Budgets and the recommendation ------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Limits a recommended point must fit; None means no limit on that figure."""

    max_latency_seconds: float | None = None
    max_size_bytes: int | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_latency_seconds", "max_size_bytes", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.max_latency_seconds, self.max_size_bytes, self.max_memory_bytes))

    def describe(self) -> str:
        """"5 ms, 20 MB and 512 MB peak memory"; "" without limits."""
        parts = []
        if self.max_latency_seconds is not None:
            parts.append(f"{_budget_number(self.max_latency_seconds * 1e3)} ms")
        if self.max_size_bytes is not None:
            parts.append(f"{_budget_number(self.max_size_bytes / 2**20)} MB")
        if self.max_memory_bytes is not None:
            parts.append(f"{_budget_number(self.max_memory_bytes / 2**20)} MB peak memory")
        if len(parts) <= 1:
            return "".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def misses(self, p: Point) -> list[str]:
        """How p breaks this budget, one phrase per limit ("needs 6.3 ms"); [] when it fits.
        An unknown figure breaks a limit on it: it can't be shown to fit."""
        out = []
        if self.max_latency_seconds is not None:
            if p.latency_seconds is None:
                out.append("has no latency measured")
            elif p.latency_seconds > self.max_latency_seconds:
                out.append(f"needs {format_ms(p.latency_seconds)}")
        if self.max_size_bytes is not None:
            if p.size_bytes is None:
                out.append("has no size known")
            elif p.size_bytes > self.max_size_bytes:
                out.append(f"is {format_bytes(p.size_bytes)}")
        if self.max_memory_bytes is not None:
            if p.peak_memory_bytes is None:
                out.append("has no peak memory measured")
            elif p.peak_memory_bytes > self.max_memory_bytes:
                out.append(f"peaks at {format_bytes(p.peak_memory_bytes)}")
        return out

    def excess(self, p: Point) -> float:
        """The worst ratio of a figure to its limit (1.3 = 30% over); inf when a limited figure is unknown."""
        pairs = [
            (p.latency_seconds, self.max_latency_seconds),
            (p.size_bytes, self.max_size_bytes),
            (p.peak_memory_bytes, self.max_memory_bytes),
        ]
        worst = 0.0
        for value, limit in pairs:
            if limit is None:
                continue
            if value is None:
                return math.inf
            worst = max(worst, value / limit)
        return worst


@dataclass(frozen=True)
class Recommendation:
    """The point chosen (None when nothing fits) and the sentence that says why."""

    point: Point | None
    reason: str
    budget: Budget = field(default_factory=Budget)
    # More accurate points passed over, each with how it broke the budget.
    passed_over: tuple[tuple[Point, tuple[str, ...]], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.point.label if self.point else None,
            "point": self.point.to_dict() if self.point else None,
            "reason": self.reason,
            "budget": asdict(self.budget),
            "passed_over": [{"label": p.label, "misses": list(m)} for p, m in self.passed_over],
        }


def _noun(points: Sequence[Point]) -> str:
    kinds = {p.kind for p in points}
    return {frozenset({MODEL}): "variant", frozenset({BACKBONE}): "backbone"}.get(frozenset(kinds), "candidate")


def _figures(p: Point) -> str:
    """"91.2% top-1 at 3.1 ms p50, 11.2 MB" (and peak memory when limited)."""
    text = _accuracy_text(p)
    if p.latency_seconds is not None:
        text += f" at {format_ms(p.latency_seconds)} p50"
    if p.size_bytes is not None:
        text += f", {format_bytes(p.size_bytes)}"
    return text


def _miss_text(p: Point, misses: Sequence[str]) -> str:
    """"pets:3 onnx fp32 (92.0%) needs 6.3 ms"; "resnet50 (probe, 88.0%) is 97.8 MB"."""
    label = p.label
    if p.accuracy is not None:
        acc = f"{p.accuracy * 100:.1f}%"
        label = f"{label[:-1]}, {acc})" if label.endswith(")") else f"{label} ({acc})"
    return f"{label} " + " and ".join(misses)


def _rank_key(p: Point) -> tuple[float, float, float]:
    """Most accurate first; ties → faster, then smaller; unknowns last."""
    return (
        -(p.accuracy if p.accuracy is not None else -math.inf),
        p.latency_seconds if p.latency_seconds is not None else math.inf,
        p.size_bytes if p.size_bytes is not None else math.inf,
    )


def recommend(
    points: Iterable[Point],
    *,
    max_latency_seconds: float | None = None,
    max_size_bytes: int | None = None,
    max_memory_bytes: int | None = None,
) -> Recommendation:
    """The most accurate point that fits every given budget (ties → lower latency, then
    smaller), and a sentence saying which budgets it meets with its figures and which more
    accurate points were passed over and why. When nothing fits, the sentence names the
    closest miss. Points of unknown accuracy are never recommended; the sentence says so
    when that is what stands in the way.
    """
    budget = Budget(max_latency_seconds, max_size_bytes, max_memory_bytes)
    points = list(points)
    noun = _noun(points)
    if not points:
        return Recommendation(None, "No recommendation: there is nothing to choose from.", budget)
    known = sorted((p for p in points if p.accuracy is not None), key=_rank_key)
    unknown = [p for p in points if p.accuracy is None]
    unknown_fit = [p for p in unknown if not budget.misses(p)]
    within = f" within {budget.describe()}" if budget.given else ""
    if not known:
        return Recommendation(
            None,
            f"No recommendation: the accuracy of every {noun} is unknown "
            f"({', '.join(p.label for p in unknown[:_MAX_NAMED])}"
            f"{', …' if len(unknown) > _MAX_NAMED else ''}); measure it to choose by accuracy.",
            budget,
        )

    passed: list[tuple[Point, tuple[str, ...]]] = []
    chosen = None
    for p in known:
        misses = budget.misses(p)
        if not misses:
            chosen = p
            break
        passed.append((p, tuple(misses)))

    if chosen is None:
        closest = min(known, key=lambda p: (budget.excess(p), _rank_key(p)))
        reason = (f"No {noun} with a known accuracy fits{within}; the closest is "
                  f"{_miss_text(closest, budget.misses(closest))}.")
        if unknown_fit:
            reason += " " + _unknown_sentence(unknown_fit, fits=True)
        return Recommendation(None, reason, budget, tuple(passed))

    superlative = f"the most accurate {noun}{within}" if budget.given else f"the most accurate {noun} (no budget given)"
    reason = f"{chosen.label}: {_figures(chosen)} — {superlative}"
    if passed:
        named = [_miss_text(p, m) for p, m in passed[:_MAX_NAMED]]
        more = len(passed) - _MAX_NAMED
        reason += "; " + "; ".join(named) + (f"; and {more} more" if more > 0 else "")
    reason += "."
    if unknown_fit:
        reason += " " + _unknown_sentence(unknown_fit, fits=budget.given)
    return Recommendation(chosen, reason, budget, tuple(passed))


def _unknown_sentence(points: Sequence[Point], *, fits: bool) -> str:
    names = ", ".join(p.label for p in points[:_MAX_NAMED]) + (", …" if len(points) > _MAX_NAMED else "")
    verb = "fits" if len(points) == 1 else "fit"
    where = f"{names} {verb} too" if fits else names
    return f"Not considered, accuracy unknown: {where}."


# --- Table ------------------------------------------------------------------------

TABLE_HEADERS = ["name", "variant", "device", "p50 ms", "p95 ms", "img/s", "batch", "peak mem", "size",
                 "params (M)", "GFLOPs", "accuracy", "pareto", "note"]


def table_rows(points: Sequence[Point], front: Sequence[Point] | None = None) -> list[list[str]]:
    """One row per point under TABLE_HEADERS; "-" for unknown figures, "yes" for Pareto members
    (of `front`, by default the front of these points)."""
    front = front_members(points) if front is None else front
    on_front = {id(p) for p in points if p in front}

    def opt(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    return [
        [
            p.name or p.label,
            p.variant or p.kind,
            p.device or "-",
            opt(None if p.latency_seconds is None else p.latency_seconds * 1e3, ".2f"),
            opt(None if p.latency_p95_seconds is None else p.latency_p95_seconds * 1e3, ".2f"),
            opt(p.throughput_images_per_second, ".1f"),
            opt(p.batch_size, "d"),
            "-" if p.peak_memory_bytes is None else format_bytes(p.peak_memory_bytes),
            "-" if p.size_bytes is None else format_bytes(p.size_bytes),
            opt(None if p.parameter_count is None else p.parameter_count / 1e6, ".1f"),
            opt(p.gflops, ".2f"),
            "-" if p.accuracy is None else f"{p.accuracy * 100:.2f}%",
            "yes" if id(p) in on_front else "",
            p.note,
        ]
        for p in points
    ]


def default_notes(points: Sequence[Point]) -> list[str]:
    """What the figures mean, for the page under the table."""
    devices = sorted({p.device for p in points if p.device})
    notes = []
    if devices:
        notes.append(f"Measured on the server's {', '.join(devices)}.")
    notes.append("p50/p95: median and 95th-percentile time of one batch-1 call on that device; "
                 "img/s: throughput at the batch size shown.")
    if any(p.kind == MODEL for p in points):
        notes.append("Model accuracy: top-1 on the dataset's held-out test split (the note says whether this "
                     "report measured it or it was stored at training or export time).")
    if any(p.kind == BACKBONE for p in points):
        notes.append("Probe accuracy: a linear classifier trained on frozen features of a candidate backbone, "
                     "scored on the validation split: the trade-off before fine-tuning, which usually adds "
                     "accuracy on top. Its size is the backbone's FP32 weights.")
    notes.append("Pareto front: the points that no other point beats on both accuracy and latency.")
    if any(p.accuracy is None for p in points):
        notes.append("Rows without accuracy are not on the chart.")
    return notes


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


# --- Page -------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.generated { color: #666; font-size: 0.9em; margin-top: 0; }
.recommendation { background: #f3f8f3; border-left: 4px solid #2ca02c; padding: 0.6em 1em; margin: 1em 0; }
.recommendation.none { background: #fbf3f3; border-left-color: #d62728; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.note { white-space: normal; color: #555; }
tr.front td { font-weight: 600; }
tr.recommended td { background: #fff4d6; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.notes { color: #444; font-size: 0.9em; }
""".strip()

# TABLE_HEADERS columns rendered right-aligned.
_NUMERIC_COLUMNS = {"p50 ms", "p95 ms", "img/s", "batch", "peak mem", "size", "params (M)", "GFLOPs", "accuracy"}


def render_html(
    points: Sequence[Point],
    *,
    title: str,
    png: bytes | None = None,
    recommendation: Recommendation | None = None,
    notes: Sequence[str] = (),
    generated: datetime | None = None,
) -> str:
    """One self-contained HTML page: the title, when it was generated, the recommendation,
    the chart (embedded as a data: URI), the table of every point with Pareto members
    marked, and notes (`default_notes` after the given ones). No external URL, no script;
    every string is escaped."""
    e = html.escape
    generated = generated or datetime.now(timezone.utc)
    front = front_members(points)
    front_ids = {id(p) for p in front}
    rows = table_rows(points, front)
    chosen = recommendation.point if recommendation else None

    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="generated">Generated {e(generated.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"))}</p>',
    ]
    if recommendation is not None:
        css = "recommendation" if chosen is not None else "recommendation none"
        out.append(f'<p class="{css}"><strong>Recommendation.</strong> {e(recommendation.reason)}</p>')
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<p><img alt="{e("accuracy against p50 latency: " + title)}" '
                   f'src="data:image/png;base64,{data}"></p>')
    out.append("<table>")
    out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADERS) + "</tr></thead>")
    out.append("<tbody>")
    for p, row in zip(points, rows):
        classes = []
        if id(p) in front_ids or p in front:
            classes.append("front")
        if chosen is not None and p == chosen:
            classes.append("recommended")
        attr = f' class="{" ".join(classes)}"' if classes else ""
        cells = []
        for header, value in zip(TABLE_HEADERS, row):
            cls = ' class="num"' if header in _NUMERIC_COLUMNS else ' class="note"' if header == "note" else ""
            cells.append(f"<td{cls}>{e(value)}</td>")
        out.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    out.append("</tbody>")
    out.append("</table>")
    all_notes = [*notes, *default_notes(points)]
    out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in all_notes) + "</ul>")
    out.append("</body>")
    out.append("</html>")
    return "\n".join(out) + "\n"


# --- Both files --------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    png: str
    html: str


def write_report(
    points: Sequence[Point],
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    recommendation: Recommendation | None = None,
    budget: Budget | None = None,
    notes: Sequence[str] = (),
    chance_accuracy: float | None = None,
    width_px: int = 1200,
    height_px: int = 750,
    dpi: int = 100,
) -> ReportFiles:
    """Writes report.png and report.html (the PNG embedded) into out_dir, created if
    missing, and returns their paths. The budget drawn defaults to the recommendation's.
    Raises ChartUnavailable, before writing anything, without matplotlib."""
    _matplotlib()
    if budget is None and recommendation is not None:
        budget = recommendation.budget
    buffer = io.BytesIO()
    render_png(points, buffer, title=title, budget=budget,
               recommended=recommendation.point if recommendation else None,
               chance_accuracy=chance_accuracy, width_px=width_px, height_px=height_px, dpi=dpi)
    png = buffer.getvalue()
    page = render_html(points, title=title, png=png, recommendation=recommendation, notes=notes)
    os.makedirs(out_dir, exist_ok=True)
    png_path = os.path.join(out_dir, PNG_NAME)
    html_path = os.path.join(out_dir, HTML_NAME)
    _write_atomic(png_path, png)
    _write_atomic(html_path, page.encode("utf-8"))
    return ReportFiles(png=png_path, html=html_path)


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
