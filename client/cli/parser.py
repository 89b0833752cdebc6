"""The argument parser: global options, then one subparser per subcommand, each
bound to its `cmd_*` function."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from tlserve.client._common import enum_choices, parse_model_ref, parse_weights
from tlserve.client.cli.commands import (
    cmd_backbones,
    cmd_cancel,
    cmd_datasets_delete,
    cmd_datasets_list,
    cmd_datasets_register,
    cmd_datasets_show,
    cmd_datasets_upload,
    cmd_download,
    cmd_export,
    cmd_finetune,
    cmd_health,
    cmd_info,
    cmd_jobs_list,
    cmd_jobs_show,
    cmd_models_delete,
    cmd_models_list,
    cmd_models_show,
    cmd_predict,
    cmd_report,
    cmd_watch,
)
from tlserve.client.cli.render import DEFAULT_ADDRESS
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

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
    # Security: each also read from the environment, so a token never has to be on a command line.
    for flag, env, help in (
        ("--token", "TLSERVE_TOKEN", "bearer token for a server started with --auth-tokens-file"),
        ("--ca-file", "TLSERVE_CA_FILE", "connect over TLS, trusting the server certificate's CA in this PEM file"),
        ("--cert-file", "TLSERVE_CERT_FILE", "mutual TLS: this client's certificate (PEM)"),
        ("--key-file", "TLSERVE_KEY_FILE", "mutual TLS: the key of --cert-file (PEM)"),
    ):
        parser.add_argument(flag, default=argparse.SUPPRESS if suppress else os.environ.get(env) or None,
                            help=f"{help} (default: ${env})")
    parser.add_argument(
        "--tls", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="connect over TLS, trusting the system's CAs (implied by --ca-file or --cert-file)",
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
    p = sub.add_parser("token", help="make a bearer token and its line for the server's tokens file "
                       "(needs tlserve[server]; contacts no server)", add_help=False)
    p.add_argument("token_args", nargs=argparse.REMAINDER)

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
