"""The tlserve demo, end to end on this machine: `make demo`.

Starts a real server (`tlserve serve`) on free ports with its home in ./var/demo
(emptied first),
talks to it through the `tlserve` command line as a user would, then stops it
with SIGTERM and checks that it drained and exited cleanly. Each step prints
the command it runs.

The story: generate two procedural image datasets (no downloads) — a source
task of six shapes and a few-shot target task of four other shapes, eight
training images each. Train a source model from scratch, then transfer it to
the target task, and also train the target task from scratch; print both test
accuracies side by side. Then export the transferred model to ONNX (FP32, checked
against PyTorch on real images, and INT8 with its accuracy cost measured),
download it, and classify a few test images through Predict. Last, the
trade-off report: every variant of the transferred model profiled on this
machine (latency, throughput, peak memory, size, measured test accuracy), the
most accurate variant within a size budget, and a linear-probe comparison of two
candidate backbones on the target dataset; the chart and page are written under
the demo's home and their paths printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

from service.training.synthetic import SOURCE_SHAPES, TARGET_SHAPES, write_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The demo's own home, made anew each run so the demo can run again and again.
HOME = pathlib.Path(os.environ.get("TLSERVE_HOME", ROOT / "var")) / "demo"
TLSERVE = str(pathlib.Path(sys.executable).with_name("tlserve"))
DATA = HOME / "demo-data"
REPORT = HOME / "report"

# About four minutes on a 2-core CPU: enough source images (150 per class) for resnet18
# at 32 px to learn the shapes from scratch (about 50 % on 6 classes), which transfer needs.
BACKBONE = "resnet18"
IMAGE_SIZE = "32"
SOURCE_SPLITS = {"train": 150, "val": 10, "test": 10}  # images per class
TARGET_SPLITS = {"train": 8, "val": 5, "test": 40}  # few-shot: eight to learn from


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def start_server() -> tuple[subprocess.Popen, dict]:
    ready_file = HOME / "demo.ready.json"
    ready_file.unlink(missing_ok=True)
    command = [
        TLSERVE, "serve", "--home", str(HOME),
        "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        "--ready-file", str(ready_file), "--log-format", "text",
    ]
    print("$", shlex.join(command), flush=True)
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while not ready_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.exit(f"demo: the server did not start (exit code {server.poll()})")
        time.sleep(0.1)
    return server, json.loads(ready_file.read_text())


def cli(address: str, *args: str) -> None:
    command = [TLSERVE, "--address", address, *args]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def cli_json(address: str, *args: str) -> dict:
    command = [TLSERVE, "--address", address, "--json", *args]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def make_datasets() -> tuple[pathlib.Path, pathlib.Path]:
    shutil.rmtree(DATA, ignore_errors=True)
    source = write_image_folder(DATA / "source", SOURCE_SHAPES, 0, size=48, seed=1, splits=SOURCE_SPLITS)
    target = write_image_folder(DATA / "target", TARGET_SHAPES, 0, size=48, seed=2, splits=TARGET_SPLITS)
    for name, root, splits in (("source", source, SOURCE_SPLITS), ("target", target, TARGET_SPLITS)):
        print(f"{name}: {root} ({', '.join(f'{n} {s}' for s, n in splits.items())} images per class)")
    return source, target


def finetune(address: str, dataset: str, model: str, weights: str, strategy: str, epochs: int, *extra: str) -> None:
    cli(address, "finetune", "--dataset", dataset, "--model-name", model, "--backbone", BACKBONE,
        "--weights", weights, "--strategy", strategy, "--epochs", str(epochs), "--image-size", IMAGE_SIZE,
        "--seed", "0", *extra, "--watch")


def test_accuracy(address: str, model: str) -> tuple[float, str]:
    shown = cli_json(address, "models", "show", model)
    decision = shown.get("decision", {})
    return shown["test_metrics"]["top1_accuracy"], decision.get("strategy", "")


def sample_images(target: pathlib.Path) -> list[pathlib.Path]:
    """The first test image of each target class."""
    return [sorted((target / "test" / shape).iterdir())[0] for shape in TARGET_SHAPES]


def show_metrics(metrics_address: str) -> None:
    url = f"http://{metrics_address}/metrics"
    print("$ curl", url, "| grep -E 'tlserve_grpc_requests_total|batch_size_images_(count|sum)|predict_images_total'", flush=True)
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(("tlserve_grpc_requests_total", "tlserve_inference_batch_size_images_count",
                                "tlserve_inference_batch_size_images_sum", "tlserve_predict_images_total")):
                print(line)


def stop_server(server: subprocess.Popen) -> None:
    print(f"$ kill -TERM {server.pid}", flush=True)
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    if code != 0:
        sys.exit(f"demo: the server exited with {code}")
    print("server drained and exited with code 0")


def main() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    banner("start the server")
    server, ready = start_server()
    try:
        address = ready["grpc_address"]
        banner("is it serving? (grpc.health.v1)")
        cli(address, "health")
        banner("what does it run on?")
        cli(address, "info")
        banner("which backbones can it fine-tune? (torchvision metadata)")
        cli(address, "backbones")
        banner("make a source task and a few-shot target task (procedural shapes)")
        source, target = make_datasets()
        banner("upload both datasets")
        cli(address, "datasets", "upload", str(source), "--name", "shapes-source")
        cli(address, "datasets", "upload", str(target), "--name", "shapes-target")
        banner("train the source model from scratch")
        # Every epoch runs (the best is kept): from random weights the first epochs'
        # validation accuracy on 60 images is noise, and early stopping can end the
        # job there.
        finetune(address, "shapes-source", "shapes-source", "none", "full", 15, "--patience", "0")
        banner("transfer it to the few-shot target task (AUTO picks the strategy)")
        finetune(address, "shapes-target", "target-transfer", "model:shapes-source", "auto", 10)
        banner("the same target task from scratch, for comparison")
        finetune(address, "shapes-target", "target-scratch", "none", "full", 10)
        banner("test accuracy")
        source_accuracy, _ = test_accuracy(address, "shapes-source")
        transfer, strategy = test_accuracy(address, "target-transfer")
        scratch, _ = test_accuracy(address, "target-scratch")
        print(f"source task, {len(SOURCE_SHAPES)} shapes, from scratch: {source_accuracy:6.1%}  (chance {1 / len(SOURCE_SHAPES):.1%})")
        print(f"few-shot target task, {len(TARGET_SHAPES)} shapes, {TARGET_SPLITS['train']} training images each:")
        print(f"  {'transfer from the source model':<32} {transfer:6.1%}  ({strategy})")
        print(f"  {'from scratch':<32} {scratch:6.1%}")
        print(f"  {'chance':<32} {1 / len(TARGET_SHAPES):6.1%}")
        print(f"  {'transfer minus scratch':<32} {100 * (transfer - scratch):+5.1f} points")
        print("(A source model trained for two minutes on a CPU is a modest start; with ImageNet weights\n"
              " in the weights cache, `--weights DEFAULT` is the usual starting point.)")
        banner("export the transferred model to ONNX (parity checked against PyTorch on validation images)")
        cli(address, "export", "target-transfer", "--precision", "fp32", "--embedding")
        cli(address, "export", "target-transfer", "--precision", "int8")
        banner("download the FP32 graph")
        cli(address, "download", "target-transfer", "--precision", "fp32", "-o", str(HOME / "target-transfer.onnx"))
        banner("classify a few test images (ONNX Runtime, dynamic batching)")
        cli(address, "predict", "target-transfer", *map(str, sample_images(target)), "--top-k", "2")
        cli(address, "predict", "target-transfer", *map(str, sample_images(target)), "--top-k", "1",
            "--precision", "int8")
        banner("what did those calls cost? (Prometheus)")
        show_metrics(ready["metrics_address"])
        banner("compare candidate backbones before fine-tuning (linear probes on frozen features)")
        print("(No ImageNet weights can be downloaded here, so the probes run on randomly initialised\n"
              " backbones: a baseline. With the weights cache provisioned, --weights DEFAULT is the real question.)")
        cli(address, "report", "--compare-backbones", "shapes-target", "--backbones", "mobilenet_v3_small,resnet18",
            "--weights", "NONE", "--image-size", IMAGE_SIZE, "--out", str(REPORT / "backbones"))
        banner("the trade-off report: every variant measured on this machine, best within 20 MB")
        cli(address, "report", "target-transfer", "target-scratch", "--measure-accuracy", "--max-size-mb", "20",
            "--out", str(REPORT))
    finally:
        banner("stop the server (SIGTERM: drain, then exit)")
        stop_server(server)
    banner("the report")
    print(f"chart: {REPORT / 'report.png'}")
    print(f"page:  {REPORT / 'report.html'}")


if __name__ == "__main__":
    main()
