"""Points and the Pareto front: every measured variant or probed backbone as one
`Point` (accuracy, batch-1 p50 latency, size, memory), and the points nothing else
beats on both accuracy and latency."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

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
