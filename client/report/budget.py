"""Budgets and the recommendation: the most accurate point within a latency, size
and memory budget and why; the report's table rows and notes; number formatting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tlserve.client.report.points import _MAX_NAMED, BACKBONE, MODEL, Point, front_members

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
