"""The `tlserve` command line: every tlserve RPC as a subcommand, over the sync `Client`.

    tlserve backbones --family resnet
    tlserve datasets upload ./flowers --name flowers
    tlserve finetune --dataset flowers --model-name flowers --backbone resnet18 --watch
    tlserve predict flowers:1 rose.jpg tulip.jpg --top-k 3
    tlserve --json models            # machine-readable: protobuf JSON, field names as in the proto

The file reads top to bottom: formatting (sizes, percentages, times), the table
and progress-bar renderers, one function per subcommand, the argument parser,
and `main`, which maps every `TLServeError` to one line on stderr and exit 1
(usage errors exit 2, as argparse does). `tlserve serve ...` hands the rest of
the command line to the server's own `main`, imported only then, so that the
client install needs no server dependencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timezone
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from client import report
from client._client import Client
from client._common import (
    TLServeError,
    enum_choices,
    enum_label,
    format_model_ref,
    parse_model_ref,
    parse_weights,
)
from client.tlserve.v1 import tlserve_pb2 as pb

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


# --- Subcommands ---------------------------------------------------------------------
# Each takes (client, args) and returns the exit status.


def cmd_health(tl: Client, args: argparse.Namespace) -> int:
    status = tl.health(args.service, timeout=args.timeout)
    emit(args, {"status": status}, lambda: status)
    return 0 if status == "SERVING" else 1


def cmd_info(tl: Client, args: argparse.Namespace) -> int:
    info = tl.get_server_info(timeout=args.timeout)

    def human() -> str:
        devices = [
            f"{d.name} ({d.description}, {human_bytes(d.memory_total_bytes)})" if d.description else d.name
            for d in info.devices
        ]
        return render_fields([
            ("address", tl.address),
            ("version", info.version),
            ("torch", info.torch_version),
            ("torchvision", info.torchvision_version),
            ("onnxruntime", info.onnxruntime_version),
            ("providers", ", ".join(info.onnxruntime_providers) or "-"),
            ("devices", ", ".join(devices) or "-"),
            ("max message", human_bytes(info.max_receive_message_bytes)),
            ("started", timestamp(info.start_time)),
        ])

    emit(args, info, human)
    return 0


BACKBONE_HEADERS = ["name", "family", "input size", "params (M)", "GFLOPs", "top-1", "top-5", "file size", "cached"]


def backbone_row(b: pb.Backbone) -> list[Any]:
    return [
        b.name,
        b.family,
        b.input_size,
        millions(b.parameter_count),
        gflops(b.gflops),
        percent(b.imagenet_top1_accuracy),
        percent(b.imagenet_top5_accuracy),
        human_bytes(b.file_size_bytes),
        "yes" if b.cached else "no",
    ]


def cmd_backbones(tl: Client, args: argparse.Namespace) -> int:
    response = tl.list_backbones(args.family or "", cached_only=args.cached, timeout=args.timeout)

    def human() -> str:
        table = render_table(BACKBONE_HEADERS, [backbone_row(b) for b in response.backbones])
        return f"{table}\n\nweights cache: {response.weights_cache_dir}" if response.weights_cache_dir else table

    emit(args, response, human)
    return 0


def _split_from_args(args: argparse.Namespace) -> pb.SplitOptions | None:
    values = (args.val_fraction, args.test_fraction, args.seed)
    if all(v is None for v in values):
        return None
    return pb.SplitOptions(val_fraction=args.val_fraction or 0, test_fraction=args.test_fraction or 0, seed=args.seed or 0)


def cmd_datasets_list(tl: Client, args: argparse.Namespace) -> int:
    datasets = all_pages(lambda **kw: tl.list_datasets(timeout=args.timeout, **kw), "datasets")
    rows = [
        [d.id, d.name, len(d.class_names), d.image_count, split_counts(d), human_bytes(d.size_bytes),
         len(d.warnings), timestamp(d.create_time)]
        for d in datasets
    ]
    headers = ["id", "name", "classes", "images", "train/val/test", "size", "warnings", "created"]
    emit(args, {"datasets": [to_dict(d) for d in datasets]},
         lambda: render_table(headers, rows) if rows else "no datasets")
    return 0


def cmd_datasets_upload(tl: Client, args: argparse.Namespace) -> int:
    bar = Progress(fmt=lambda n: human_bytes(n))
    try:
        ds = tl.upload_dataset(
            args.path, args.name, split=_split_from_args(args),
            progress=lambda done, total: bar.update(done, total, label="upload"), timeout=args.timeout,
        )
    finally:
        bar.close()
    emit(args, ds, lambda: dataset_text(ds))
    return 0


def cmd_datasets_register(tl: Client, args: argparse.Namespace) -> int:
    ds = tl.register_dataset(args.path, args.name, split=_split_from_args(args), timeout=args.timeout)
    emit(args, ds, lambda: dataset_text(ds))
    return 0


def cmd_datasets_show(tl: Client, args: argparse.Namespace) -> int:
    ds = tl.get_dataset(args.dataset, timeout=args.timeout)
    emit(args, ds, lambda: dataset_text(ds))
    return 0


def cmd_datasets_delete(tl: Client, args: argparse.Namespace) -> int:
    response = tl.delete_dataset(args.dataset, timeout=args.timeout)
    emit(args, response, lambda: f"deleted dataset {args.dataset}")
    return 0


def cmd_finetune(tl: Client, args: argparse.Namespace) -> int:
    job = tl.fine_tune(
        dataset=args.dataset,
        model_name=args.model_name,
        backbone=args.backbone,
        weights=args.weights,
        strategy=args.strategy,
        trainable_groups=args.trainable_groups,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        patience=args.patience,
        devices=args.devices,
        seed=args.seed,
        image_size=args.image_size,
        timeout=args.timeout,
    )
    if args.json:
        # With --watch the job is the first line of a JSON-lines stream of events.
        print(json.dumps(to_dict(job), separators=(",", ":")) if args.watch else json.dumps(to_dict(job), indent=2))
    else:
        print(f"{job.id} {state_name(job.state)}: {job.request.backbone or args.backbone} on "
              f"{job.request.dataset or args.dataset} -> model {job.request.model_name or args.model_name}")
    if args.watch:
        return watch(tl, job.id, args)
    return 0


def cmd_jobs_list(tl: Client, args: argparse.Namespace) -> int:
    jobs = all_pages(lambda **kw: tl.list_jobs(args.state, timeout=args.timeout, **kw), "jobs")
    rows = [
        [j.id, state_name(j.state), j.request.dataset, j.request.backbone,
         format_model_ref(j.model) if j.model.name else j.request.model_name,
         f"{j.progress.epoch}/{j.progress.total_epochs}",
         percent(j.progress.val_accuracy) if j.progress.epoch else "-", timestamp(j.create_time)]
        for j in jobs
    ]
    headers = ["id", "state", "dataset", "backbone", "model", "epoch", "val acc", "created"]
    emit(args, {"jobs": [to_dict(j) for j in jobs]}, lambda: render_table(headers, rows) if rows else "no jobs")
    return 0


def cmd_jobs_show(tl: Client, args: argparse.Namespace) -> int:
    job = tl.get_job(args.job, timeout=args.timeout)
    emit(args, job, lambda: job_text(job))
    return 0


def event_detail(ev: pb.JobEvent) -> str:
    parts = []
    if ev.train_loss:
        parts.append(f"loss {ev.train_loss:.4f}")
    if ev.val_accuracy:
        parts.append(f"val acc {percent(ev.val_accuracy)}")
    if ev.images_per_second:
        parts.append(f"{ev.images_per_second:.0f} img/s")
    if ev.HasField("eta"):
        parts.append(f"eta {duration(ev.eta.ToTimedelta().total_seconds())}")
    return "  ".join(parts)


def event_label(ev: pb.JobEvent) -> str:
    if ev.phase == pb.JOB_PHASE_TRAINING and ev.total_epochs:
        return f"epoch {ev.epoch}/{ev.total_epochs}"
    if ev.phase:
        return enum_label(pb.JobPhase, ev.phase).replace("_", " ")
    return state_name(ev.state).lower()


def watch(tl: Client, job_id: str, args: argparse.Namespace) -> int:
    """Follows a job until it ends; exit 0 only when it SUCCEEDED."""
    bar = Progress()
    try:
        for ev in tl.watch_job(job_id, timeout=args.timeout):
            if args.json:
                print(json.dumps(to_dict(ev), separators=(",", ":")), flush=True)
            else:
                bar.update(ev.step, ev.total_steps, label=event_label(ev), detail=event_detail(ev))
    finally:
        bar.close()
    # The job itself has the final word: state, the model it published, its error.
    job = tl.get_job(job_id, timeout=args.timeout)
    succeeded = job.state == pb.JOB_STATE_SUCCEEDED
    if not args.json:
        outcome = f"{job_id} {state_name(job.state)}"
        if job.model.name:
            outcome += f": model {job.model.name}:{job.model.version}"
        if job.error:
            outcome += f": {job.error}"
        print(outcome, file=sys.stdout if succeeded else sys.stderr)
    return 0 if succeeded else 1


def cmd_watch(tl: Client, args: argparse.Namespace) -> int:
    return watch(tl, args.job, args)


def cmd_cancel(tl: Client, args: argparse.Namespace) -> int:
    job = tl.cancel_job(args.job, timeout=args.timeout)
    emit(args, job, lambda: f"{job.id} {state_name(job.state)}")
    return 0


def cmd_export(tl: Client, args: argparse.Namespace) -> int:
    artifact = tl.export_model(
        args.model, precision=args.precision, input_format=args.input_format,
        include_embedding=args.embedding, max_accuracy_drop_points=args.max_accuracy_drop,
        timeout=timeout_of(args, long=True),
    )

    def human() -> str:
        fields = [
            ("model", format_model_ref(artifact.model)),
            ("format", enum_label(pb.ArtifactFormat, artifact.format)),
            ("precision", enum_label(pb.Precision, artifact.precision)),
            ("input format", enum_label(pb.InputFormat, artifact.input_format)),
            ("size", human_bytes(artifact.size_bytes)),
            ("sha256", artifact.sha256),
            ("opset", artifact.opset),
            ("embedding", "yes" if artifact.has_embedding else "no"),
            ("parity", f"{artifact.parity.images_compared} images, max |logit diff| "
                       f"{artifact.parity.max_abs_logit_diff:.2e}, top-1 agreement {percent(artifact.parity.top1_agreement)}"),
            ("test top-1", percent(artifact.test_top1_accuracy)),
            ("delta vs fp32", f"{artifact.accuracy_delta_points:+.2f} points"),
        ]
        return render_fields(fields)

    emit(args, artifact, human)
    return 0


def cmd_download(tl: Client, args: argparse.Namespace) -> int:
    bar = Progress(fmt=lambda n: human_bytes(n))
    label = os.path.basename(args.output)
    try:
        artifact = tl.download_model(
            args.model, args.output, precision=args.precision, format=args.format,
            input_format=args.input_format,
            progress=lambda done, total: bar.update(done, total, label=label), timeout=args.timeout,
        )
    finally:
        bar.close()
    emit(args, artifact,
         lambda: f"saved {args.output} ({human_bytes(artifact.size_bytes)}, sha256 {artifact.sha256[:16]}...)")
    return 0


def cmd_predict(tl: Client, args: argparse.Namespace) -> int:
    images = []
    for path in args.images:
        with open(path, "rb") as f:
            images.append(f.read())
    response = tl.predict(
        args.model, images, top_k=args.top_k, precision=args.precision, runtime=args.runtime,
        timeout=args.timeout,
    )

    def human() -> str:
        rows = []
        for path, prediction in zip(args.images, response.predictions):
            for rank, score in enumerate(prediction.top_k, 1):
                rows.append([path if rank == 1 else "", rank, score.label, percent(score.probability)])
        served = (f"{format_model_ref(response.model)} ({enum_label(pb.Runtime, response.runtime)}, "
                  f"{enum_label(pb.Precision, response.precision)})")
        return f"model {served}\n" + render_table(["image", "rank", "label", "probability"], rows)

    emit(args, response, human)
    return 0


def cmd_models_list(tl: Client, args: argparse.Namespace) -> int:
    models = all_pages(lambda **kw: tl.list_models(timeout=args.timeout, **kw), "models")
    rows = [
        [m.name, m.version, m.backbone, len(m.class_names),
         percent(m.val_metrics.top1_accuracy) if m.val_metrics.image_count else "-",
         percent(m.test_metrics.top1_accuracy) if m.test_metrics.image_count else "-",
         millions(m.parameter_count), gflops(m.gflops),
         ",".join(enum_label(pb.Precision, a.precision) for a in m.artifacts) or "-",
         timestamp(m.create_time)]
        for m in models
    ]
    headers = ["name", "version", "backbone", "classes", "val top-1", "test top-1", "params (M)", "GFLOPs",
               "exported", "created"]
    emit(args, {"models": [to_dict(m) for m in models]},
         lambda: render_table(headers, rows) if rows else "no models")
    return 0


def cmd_models_show(tl: Client, args: argparse.Namespace) -> int:
    model = tl.get_model(args.model, timeout=args.timeout)
    emit(args, model, lambda: model_text(model))
    return 0


def cmd_models_delete(tl: Client, args: argparse.Namespace) -> int:
    response = tl.delete_model(args.model, all_versions=args.all_versions, timeout=args.timeout)
    emit(args, response,
         lambda: "deleted " + (", ".join(f"{r.name}:{r.version}" for r in response.deleted) or "nothing"))
    return 0


REPORT_HEADERS = report.TABLE_HEADERS


def profile_rows(profile: pb.ModelProfile) -> list[list[Any]]:
    """Rows (REPORT_HEADERS) of one model's profile, its Pareto members marked."""
    return report.table_rows(report.points_from_profile(profile))


def _stored_profile(model: pb.Model, args: argparse.Namespace) -> pb.ModelProfile | None:
    """The model's stored profile when it answers what this report asks, else None (measure again):
    not with --remeasure, nor when it lacks measured accuracy that --measure-accuracy asks for,
    was taken at another --batch-size, or misses an ONNX precision exported since."""
    stored = model.profile
    if args.remeasure or not stored.variants:
        return None
    if args.measure_accuracy and not all(v.accuracy_measured for v in stored.variants):
        return None
    if args.batch_size and any(v.batch_size != args.batch_size for v in stored.variants):
        return None
    exported = {a.precision or pb.PRECISION_FP32 for a in model.artifacts if a.format != pb.ARTIFACT_FORMAT_PYTORCH}
    profiled = {v.variant.precision or pb.PRECISION_FP32 for v in stored.variants
                if v.variant.runtime != pb.RUNTIME_PYTORCH}
    if exported - profiled:
        return None
    profile = pb.ModelProfile()
    profile.CopyFrom(stored)
    profile.model.name, profile.model.version = model.name, model.version
    return profile


def _report_budget(args: argparse.Namespace) -> report.Budget:
    mib = 1024 * 1024
    return report.Budget(
        max_latency_seconds=args.max_latency_ms / 1e3 if args.max_latency_ms is not None else None,
        max_size_bytes=int(args.max_size_mb * mib) if args.max_size_mb is not None else None,
        max_memory_bytes=int(args.max_memory_mb * mib) if args.max_memory_mb is not None else None,
    )


def _comparison_note(comparison: pb.CompareBackbonesResponse) -> str:
    return (f"Backbone probes: dataset {comparison.dataset_id}, {comparison.class_count} classes "
            f"(chance {percent(comparison.chance_accuracy)}), {comparison.train_image_count} training and "
            f"{comparison.val_image_count} validation images.")


def cmd_report(tl: Client, args: argparse.Namespace) -> int:
    """Profiles (stored, or measured now), optional backbone probes, one table, a recommendation
    within the budget, and report.png + report.html under --out. Exit 1 when the chart was
    wanted and matplotlib is missing (the table is still printed)."""
    if not args.compare_backbones and (args.backbones or args.weights or args.max_images_per_class
                                       or args.image_size):
        print("tlserve: error: --backbones, --weights, --max-images-per-class and --image-size "
              "go with --compare-backbones DATASET", file=sys.stderr)
        return 2
    budget = _report_budget(args)
    long_timeout = timeout_of(args, long=True)
    chatty = not args.json and sys.stderr.isatty()  # profiling takes minutes: say what is going on

    profiles: list[pb.ModelProfile] = []
    if args.models or not args.compare_backbones:
        if args.models:
            models = [tl.get_model(ref, timeout=args.timeout) for ref in args.models]
        else:
            models = all_pages(lambda **kw: tl.list_models(latest_only=True, timeout=args.timeout, **kw), "models")
        for m in models:
            profile = _stored_profile(m, args)
            if profile is None:
                if chatty:
                    print(f"profiling {m.name}:{m.version} ...", file=sys.stderr, flush=True)
                profile = tl.profile_model(
                    pb.ModelRef(name=m.name, version=m.version), batch_size=args.batch_size,
                    measure_accuracy=args.measure_accuracy, timeout=long_timeout,
                )
            profiles.append(profile)
    comparison: pb.CompareBackbonesResponse | None = None
    if args.compare_backbones:
        if chatty:
            print(f"comparing backbones on {args.compare_backbones} ...", file=sys.stderr, flush=True)
        comparison = tl.compare_backbones(
            args.compare_backbones, args.backbones, max_images_per_class=args.max_images_per_class,
            weights=args.weights, image_size=args.image_size, timeout=long_timeout,
        )

    model_points = [pt for p in profiles for pt in report.points_from_profile(p)]
    backbone_points = report.points_from_comparison(comparison) if comparison is not None else []
    points = model_points + backbone_points
    front = report.front_members(points)
    # Deployable variants and backbones to fine-tune are different choices: one recommendation
    # each; the first is the one on the chart.
    recommendations = [
        report.recommend(pool, max_latency_seconds=budget.max_latency_seconds,
                         max_size_bytes=budget.max_size_bytes, max_memory_bytes=budget.max_memory_bytes)
        for pool in (model_points, backbone_points) if pool and budget.given
    ]
    recommendation = recommendations[0] if recommendations else None
    backbone_recommendation = recommendations[1] if len(recommendations) > 1 else None

    title_parts = [", ".join(format_model_ref(p.model) for p in profiles)] if profiles else []
    if comparison is not None:
        title_parts.append(f"backbone probes on {args.compare_backbones}")
    title = "tlserve report: " + "; ".join(title_parts)
    notes = []
    if comparison is not None:
        notes.append(_comparison_note(comparison))
    if backbone_recommendation is not None:
        notes.append(f"Among the backbone probes: {backbone_recommendation.reason}")

    def human_table() -> str:
        if not points:
            return "no backbones compared" if comparison is not None else "no models to report"
        lines = [render_table(REPORT_HEADERS, report.table_rows(points, front))]
        if recommendation is not None:
            lines += ["", f"recommendation: {recommendation.reason}"]
        if backbone_recommendation is not None:
            lines.append(f"among the backbone probes: {backbone_recommendation.reason}")
        return "\n".join(lines)

    if not args.json:
        print(human_table(), flush=True)  # before the files: the measurements outlive a write error
    files: report.ReportFiles | None = None
    chart_error = ""
    if points and not args.no_chart:
        try:
            files = report.write_report(
                points, args.out, title=title, recommendation=recommendation,
                budget=budget if budget.given else None, notes=notes,
                chance_accuracy=comparison.chance_accuracy if comparison is not None else None,
            )
        except report.ChartUnavailable as err:
            chart_error = f"{err} (or --no-chart for the table alone)"
    if args.json:
        print(json.dumps({
            "profiles": [to_dict(p) for p in profiles],
            "comparison": to_dict(comparison) if comparison is not None else None,
            "points": [dict(p.to_dict(), pareto=p in front) for p in points],
            "budget": dataclasses.asdict(budget),
            "recommendation": recommendation.to_dict() if recommendation else None,
            "backbone_recommendation": backbone_recommendation.to_dict() if backbone_recommendation else None,
            "files": {"png": files.png, "html": files.html} if files else None,
            "chart_error": chart_error or None,
        }, indent=2))
    elif files is not None:
        print(f"\nchart: {files.png}\npage:  {files.html}")
    if chart_error:
        print(f"tlserve: error: {chart_error}", file=sys.stderr)
        return 1
    return 0


# --- Parser --------------------------------------------------------------------------


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wraps a parser so that its ValueError becomes an argparse usage error (exit 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    convert.__name__ = parse.__name__
    return convert


def _csv(text: str) -> list[str]:
    """"a, b,,c" → ["a", "b", "c"]."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


model_arg = _arg_type(parse_model_ref)
weights_arg = _arg_type(parse_weights)
positive_float = _arg_type(_positive_float)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--address/--timeout/--json, accepted before or after the subcommand.

    Subparsers get them with SUPPRESS defaults so that an option given before
    the subcommand is not overwritten by the subparser's default.
    """
    address = os.environ.get("TLSERVE_ADDRESS", DEFAULT_ADDRESS)
    parser.add_argument(
        "--address", default=argparse.SUPPRESS if suppress else address,
        help=f"server host:port (default: $TLSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS if suppress else None, metavar="SECONDS",
        help="deadline of each call (default: 30 s for lookups, 600 s for export and report, none for streams)",
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output: one JSON document (one object per line for streams)",
    )


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, help="fraction of each class for validation (server default 0.15)")
    p.add_argument("--test-fraction", type=float, help="fraction of each class for test (server default 0.15)")
    p.add_argument("--seed", type=int, help="seed of the split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlserve", description="Client of the tlserve transfer-learning service."
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[..., int] | None, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("serve", help="run the tlserve server (needs tlserve[server]); options go to the server",
                       add_help=False)
    p.add_argument("server_args", nargs=argparse.REMAINDER)

    p = command("health", cmd_health, "grpc.health.v1 status of the server")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    command("info", cmd_info, "server version, devices and runtime providers")

    p = command("backbones", cmd_backbones, "backbones the server can fine-tune")
    p.add_argument("--family", help="only this family, e.g. resnet")
    p.add_argument("--cached", action="store_true", help="only backbones whose weights are cached")

    p = command("datasets", cmd_datasets_list, "list datasets, or upload/register/show/delete one")
    ds = p.add_subparsers(dest="datasets_command", metavar="ACTION")
    q = command("upload", cmd_datasets_upload, "upload a .zip/.tar/.tar.gz archive or a directory", ds)
    q.add_argument("path")
    q.add_argument("--name", required=True)
    _add_split_options(q)
    q = command("register", cmd_datasets_register, "register a directory under the server's data root", ds)
    q.add_argument("path", help="directory relative to the server's data root")
    q.add_argument("--name", required=True)
    _add_split_options(q)
    command("list", cmd_datasets_list, "list datasets", ds)
    command("show", cmd_datasets_show, "show a dataset", ds).add_argument("dataset", help="id or name")
    command("delete", cmd_datasets_delete, "delete a dataset", ds).add_argument("dataset", help="id or name")

    p = command("finetune", cmd_finetune, "start a fine-tuning job")
    p.add_argument("--dataset", required=True, help="dataset id or name")
    p.add_argument("--model-name", required=True, help="name of the model to publish")
    p.add_argument("--backbone", required=True, help="torchvision model name (see `tlserve backbones`)")
    p.add_argument("--weights", type=weights_arg, metavar="DEFAULT|none|file:PATH|model:NAME[:V]",
                   help="starting weights (default: the backbone's DEFAULT weights)")
    p.add_argument("--strategy", choices=list(enum_choices(pb.Strategy, "STRATEGY_")))
    p.add_argument("--trainable-groups", type=int, help="PARTIAL: layer groups trained below the head")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of the head")
    p.add_argument("--optimizer", choices=list(enum_choices(pb.Optimizer, "OPTIMIZER_")))
    p.add_argument("--patience", type=int, metavar="EPOCHS",
                   help="early stopping: epochs without a better val accuracy before the job stops (default 5; 0 runs every epoch)")
    p.add_argument("--devices", type=int, help="devices to train on; >1 runs DDP")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int, help="input resolution (default: the weights' crop size)")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends")

    p = command("jobs", cmd_jobs_list, "list jobs, or show one")
    p.add_argument("--state", choices=list(enum_choices(pb.JobState, "JOB_STATE_")), help="only jobs in this state")
    js = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    command("list", cmd_jobs_list, "list jobs", js).add_argument(
        "--state", choices=list(enum_choices(pb.JobState, "JOB_STATE_")), default=argparse.SUPPRESS)
    command("show", cmd_jobs_show, "show a job", js).add_argument("job")

    command("watch", cmd_watch, "follow a job; exit 0 when it succeeds").add_argument("job")
    command("cancel", cmd_cancel, "cancel a queued or running job").add_argument("job")

    precisions = list(enum_choices(pb.Precision, "PRECISION_"))
    input_formats = list(enum_choices(pb.InputFormat, "INPUT_FORMAT_"))
    p = command("export", cmd_export, "export a model version to ONNX")
    p.add_argument("model", type=model_arg, metavar="MODEL[:V]")
    p.add_argument("--precision", choices=precisions)
    p.add_argument("--input-format", choices=input_formats)
    p.add_argument("--embedding", action="store_true", help="add the penultimate embedding as a second output")
    p.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                   help="refuse a variant losing more test accuracy than this vs FP32, in percentage points")

    p = command("download", cmd_download, "download a model artifact")
    p.add_argument("model", type=model_arg, metavar="MODEL[:V]")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--precision", choices=precisions)
    p.add_argument("--format", choices=list(enum_choices(pb.ArtifactFormat, "ARTIFACT_FORMAT_")))
    p.add_argument("--input-format", choices=input_formats)

    p = command("predict", cmd_predict, "classify image files")
    p.add_argument("model", type=model_arg, metavar="MODEL[:V]")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--precision", choices=precisions)
    p.add_argument("--runtime", choices=list(enum_choices(pb.Runtime, "RUNTIME_")))

    p = command("models", cmd_models_list, "list model versions, or show/delete one")
    ms = p.add_subparsers(dest="models_command", metavar="ACTION")
    command("list", cmd_models_list, "list model versions", ms)
    command("show", cmd_models_show, "show a model version", ms).add_argument(
        "model", type=model_arg, metavar="MODEL[:V]")
    q = command("delete", cmd_models_delete, "delete a model version", ms)
    q.add_argument("model", type=model_arg, metavar="MODEL[:V]")
    q.add_argument("--all-versions", action="store_true", help="with MODEL alone: delete every version")

    p = command("report", cmd_report,
                "trade-offs per model variant (latency, size, memory, accuracy): a table, a chart and a page")
    p.add_argument("models", nargs="*", type=model_arg, metavar="MODEL[:V]",
                   help="models to report (default: the latest version of each; none with --compare-backbones)")
    p.add_argument("--remeasure", action="store_true",
                   help="profile again even where the model has a stored profile")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="batch size of the throughput figure (server default 32); a stored profile taken at "
                        "another batch size is measured again")
    p.add_argument("--measure-accuracy", action="store_true",
                   help="measure each variant's test accuracy while profiling (else the figures stored at "
                        "training and export time)")
    g = p.add_argument_group("backbone comparison (linear probes on frozen features, before fine-tuning)")
    g.add_argument("--compare-backbones", metavar="DATASET", help="dataset id or name to probe the backbones on")
    g.add_argument("--backbones", type=_csv, default=[], metavar="A,B,C",
                   help="candidate backbones (default: the server's small set)")
    g.add_argument("--weights", type=str.upper, choices=["DEFAULT", "NONE"], default="",
                   help="DEFAULT: each backbone's pretrained weights from the server's cache (the default); "
                        "NONE: random initialisation")
    g.add_argument("--max-images-per-class", type=int, default=0, metavar="N",
                   help="cap on training images per class for the probes (default: all)")
    g.add_argument("--image-size", type=int, default=0, metavar="N",
                   help="input side in pixels (default: each backbone's own)")
    g = p.add_argument_group("budget (recommend the most accurate variant within it)")
    g.add_argument("--max-latency-ms", type=positive_float, metavar="MS", help="batch-1 p50 latency")
    g.add_argument("--max-size-mb", type=positive_float, metavar="MB", help="model file size (MiB)")
    g.add_argument("--max-memory-mb", type=positive_float, metavar="MB", help="peak memory while serving (MiB)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="tlserve-report", metavar="DIR",
                   help="directory for report.png and report.html (default: tlserve-report)")
    g.add_argument("--no-chart", action="store_true",
                   help="print the table only; write no files (needs no matplotlib)")
    return parser


# --- main ----------------------------------------------------------------------------


def _split_serve(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(global options, server args) when the subcommand is `serve`, else None.

    Done before argparse because the server's own options (--grpc-address,
    --help, ...) must pass through untouched.
    """
    with_value = {"--address", "--timeout"}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in with_value:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            return (argv[:i], argv[i + 1:]) if token == "serve" else None
    return None


def serve(server_args: list[str]) -> int:
    try:
        from service.__main__ import main as serve_main
    except ImportError as err:
        print(f"tlserve: error: the server is not installed ({err}); install tlserve[server]", file=sys.stderr)
        return 2
    return serve_main(server_args)


def error_line(err: TLServeError, address: str) -> str:
    message = " ".join(err.message.split())  # one line, whatever the server sent
    if err.code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach a tlserve server at {address}: {message}"
    return f"tlserve: error: {err.code.name}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    served = _split_serve(argv)
    if served is not None:
        return serve(served[1])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "serve":  # only reached through odd spellings _split_serve misses
        return serve(args.server_args)
    try:
        with Client(args.address, timeout=args.timeout if args.timeout is not None else 30.0) as tl:
            return args.func(tl, args)
    except TLServeError as err:
        print(error_line(err, args.address), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `tlserve ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as err:  # a local file that can't be read, a bad archive name
        print(f"tlserve: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tlserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
