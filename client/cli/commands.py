"""One function per subcommand: `cmd_*(tl, args)` calls the RPC through the sync
`Client`, prints what came back, and returns the exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from tlserve.client import report
from tlserve.client._client import Client
from tlserve.client._common import enum_label, format_model_ref
from tlserve.client.cli.render import (
    Progress,
    all_pages,
    dataset_text,
    duration,
    emit,
    gflops,
    human_bytes,
    job_text,
    millions,
    model_text,
    percent,
    render_fields,
    render_table,
    split_counts,
    state_name,
    timeout_of,
    timestamp,
    to_dict,
)
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

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
