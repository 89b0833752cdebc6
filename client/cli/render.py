"""What the command line prints: sizes, percentages and times, tables and field
lists, progress bars, and the text of a dataset, job or model; `emit` chooses
between that and protobuf JSON (`--json`)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timezone
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from tlserve.client import report
from tlserve.client._common import enum_label, format_model_ref
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Export (ONNX + parity check, INT8 calibration) and profiling do real work on
# the server: minutes, not the 30 s a lookup gets.
LONG_TIMEOUT_SECONDS = 600.0
TERMINAL_STATES = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


# --- Formatting ----------------------------------------------------------------


# Sizes in 1024 steps with the labels torchvision's docs use ("44.7 MB"); the report's own.
human_bytes = report.format_bytes


def percent(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


def millions(count: int) -> str:
    return f"{count / 1e6:.1f}"


def gflops(value: float) -> str:
    return f"{value:.2f}"


def duration(seconds: float) -> str:
    """A short duration: "45s", "3m20s", "1h02m"."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def timestamp(ts: Any) -> str:
    """A protobuf Timestamp in local time, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def state_name(state: int) -> str:
    return enum_label(pb.JobState, state).upper()


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data; proto field names, zero values included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# --- Tables ----------------------------------------------------------------------

# A cell that reads as a number (optionally with a unit) is right-aligned.
_NUMERIC = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?( ?(%|[KMGT]?B|ms|s|x|img/s))?$")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An aligned plain-text table; columns whose cells are all numbers
    (or "-") are right-aligned, the rest left-aligned."""
    cells = [[str(v) for v in row] for row in rows]
    columns = list(zip(*([list(headers)] + cells))) if cells else [(h,) for h in headers]
    widths = [max(len(v) for v in col) for col in columns]
    right = [
        bool(cells) and all(_NUMERIC.match(v) or v in ("-", "") for v in col[1:])
        for col in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in cells])


def render_fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """"key: value" lines with the values aligned; an empty value shows as "-"."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k + ':':<{width + 1}} {v if v != '' else '-'}" for k, v in pairs)


# --- Progress bars ------------------------------------------------------------------


def render_progress(
    done: int, total: int, *, label: str = "", detail: str = "", width: int = 24,
    fmt: Callable[[int], str] = str,
) -> str:
    """One progress line: "label [#####-----]  45% 12/27 detail"; no bar when total is unknown."""
    parts = [label] if label else []
    if total > 0:
        fraction = min(1.0, done / total)
        filled = int(fraction * width)
        parts.append(f"[{'#' * filled}{'-' * (width - filled)}] {int(fraction * 100):3d}% {fmt(done)}/{fmt(total)}")
    else:
        parts.append(fmt(done))
    if detail:
        parts.append(detail)
    return " ".join(parts)


class Progress:
    """A progress bar on a stream (stderr by default).

    On a terminal it redraws one line with "\\r", at most every `min_interval`
    seconds; elsewhere (a log, a pipe) it prints a plain line when the label
    changes or the bar passes another tenth, so logs stay short.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        min_interval: float = 0.1,
        width: int = 24,
        fmt: Callable[[int], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval
        self.width = width
        self.fmt = fmt
        self.clock = clock
        self._last_draw = -math.inf
        self._last_key: tuple[str, int] | None = None
        self._drawn = 0  # length of the line on screen, to blank out leftovers

    def update(self, done: int, total: int, *, label: str = "", detail: str = "") -> None:
        line = render_progress(done, total, label=label, detail=detail, width=self.width, fmt=self.fmt)
        if self.tty:
            now = self.clock()
            if now - self._last_draw < self.min_interval and not (total and done >= total):
                return
            self._last_draw = now
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        else:
            tenth = min(10, done * 10 // total) if total > 0 else -1
            key = (label, tenth)
            if key == self._last_key:
                return
            self._last_key = key
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = 0

    def __call__(self, done: int, total: int) -> None:
        """The SDK's progress callback signature."""
        self.update(done, total)


# --- Output helpers -------------------------------------------------------------------


def emit(args: argparse.Namespace, message: Message | dict[str, Any], human: Callable[[], str]) -> None:
    """Prints one JSON document with --json, else the human rendering."""
    if args.json:
        data = to_dict(message) if isinstance(message, Message) else message
        print(json.dumps(data, indent=2))
    else:
        print(human())


def all_pages(fetch: Callable[..., Any], field: str) -> list[Any]:
    """Every item of a paged List call."""
    items: list[Any] = []
    token, seen = "", set()
    while True:
        response = fetch(page_token=token)
        items.extend(getattr(response, field))
        token = response.next_page_token
        if not token or token in seen:  # a repeated token would loop forever
            return items
        seen.add(token)


def timeout_of(args: argparse.Namespace, long: bool = False) -> float | None:
    if args.timeout is not None:
        return args.timeout
    return LONG_TIMEOUT_SECONDS if long else None


def split_counts(ds: pb.Dataset) -> str:
    return "/".join(str(s.image_count) for s in ds.splits) or "-"


def dataset_text(ds: pb.Dataset) -> str:
    fields = [
        ("id", ds.id),
        ("name", ds.name),
        ("source", ds.source),
        ("created", timestamp(ds.create_time)),
        ("classes", f"{len(ds.class_names)}: {', '.join(ds.class_names[:10])}"
                    + (" ..." if len(ds.class_names) > 10 else "")),
        ("images", ds.image_count),
        ("size", human_bytes(ds.size_bytes)),
        ("splits", ", ".join(f"{enum_label(pb.Split, s.split)} {s.image_count}" for s in ds.splits)
                   + (" (generated)" if ds.generated_splits else "")),
        ("warnings", len(ds.warnings)),
    ]
    text = render_fields(fields)
    for w in ds.warnings[:10]:
        kind = enum_label(pb.DatasetWarning.Kind, w.kind)
        other = f" (= {w.other_path})" if w.other_path else ""
        text += f"\n  {kind}: {w.path}{other} {w.detail}".rstrip()
    return text


def job_text(job: pb.Job) -> str:
    p = job.progress
    fields = [
        ("id", job.id),
        ("state", state_name(job.state)),
        ("dataset", job.request.dataset),
        ("model", format_model_ref(job.model) if job.model.name else job.request.model_name),
        ("backbone", job.request.backbone),
        ("strategy", enum_label(pb.Strategy, job.decision.strategy or job.request.strategy)),
        ("progress", f"epoch {p.epoch}/{p.total_epochs}, step {p.step}/{p.total_steps}"),
        ("val accuracy", percent(p.val_accuracy) if p.epoch else "-"),
        ("created", timestamp(job.create_time)),
        ("started", timestamp(job.start_time)),
        ("ended", timestamp(job.end_time)),
        ("attempts", job.attempts),
    ]
    if job.decision.reason:
        fields.append(("decision", job.decision.reason))
    if job.error:
        fields.append(("error", job.error))
    return render_fields(fields)


def artifact_row(a: pb.ModelArtifact) -> list[Any]:
    return [
        enum_label(pb.ArtifactFormat, a.format),
        enum_label(pb.Precision, a.precision),
        enum_label(pb.InputFormat, a.input_format),
        human_bytes(a.size_bytes),
        percent(a.test_top1_accuracy) if a.test_top1_accuracy else "-",
        f"{a.accuracy_delta_points:+.2f}" if a.precision not in (0, pb.PRECISION_FP32) else "-",
        a.sha256[:12],
    ]


ARTIFACT_HEADERS = ["format", "precision", "input", "size", "test top-1", "delta (pts)", "sha256"]


def model_text(m: pb.Model) -> str:
    fields = [
        ("model", f"{m.name}:{m.version}"),
        ("backbone", m.backbone),
        ("created", timestamp(m.create_time)),
        ("job", m.job_id or "-"),
        ("dataset", m.lineage.dataset_id or "-"),
        ("strategy", enum_label(pb.Strategy, m.lineage.strategy)),
        ("classes", f"{len(m.class_names)}: {', '.join(m.class_names[:10])}"
                    + (" ..." if len(m.class_names) > 10 else "")),
        ("params (M)", millions(m.parameter_count)),
        ("GFLOPs", gflops(m.gflops)),
        ("val top-1", percent(m.val_metrics.top1_accuracy) if m.val_metrics.image_count else "-"),
        ("test top-1", percent(m.test_metrics.top1_accuracy) if m.test_metrics.image_count else "-"),
    ]
    text = render_fields(fields)
    if m.artifacts:
        text += "\n\n" + render_table(ARTIFACT_HEADERS, [artifact_row(a) for a in m.artifacts])
    return text
