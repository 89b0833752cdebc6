"""Prediction benchmarks: ONNX Runtime against PyTorch in-process, Predict over gRPC
against in-process ONNX Runtime, dynamic batching on and off, FP16/INT8 against FP32.

    .venv/bin/python bench/predict.py --quick      # resnet18 only: a few minutes on 2 CPU cores
    .venv/bin/python bench/predict.py              # resnet18, mobilenet_v3_large, efficientnet_b0

For each backbone (224 × 224 unless --image-size says otherwise):

1. `make_model`: a real tlserve server (a child process, as an operator runs it) gets
   a procedural shapes dataset, fine-tunes the backbone on it (feature extraction
   on random weights: pretrained weights can't be downloaded here, and speed does not
   depend on the weights) and exports it to ONNX in FP32, FP16 and INT8 through
   ExportModel, which measures each variant's test accuracy.
2. `bench_inprocess`: the exported FP32 graph in an ONNX Runtime session against the
   PyTorch model in eager mode (`torch.inference_mode`, default threads), at batch 1,
   8 and 32, in this process. The two sides alternate; the ratio is the median
   PyTorch time ÷ the median ONNX Runtime time (> 1: ONNX Runtime is faster).
3. `bench_grpc`: Predict from a separate client process (`LoadClient`: one asyncio
   loop and one channel, C calls in flight, the request serialised once) at
   concurrency 1, 8 and 32, with raw uint8 tensors already at the model's input size
   (the server's fast path: no decode, no resize) and with JPEG camera frames
   (640 × 480; decode share reported), once with dynamic batching on (the server's
   defaults) and once off (`--max-batch-size 1`). Each measurement is `paired_rounds`
   rounds, and each round is paired with an in-process ONNX Runtime measurement at
   batch C (the ceiling of what batching can reach) run right before or after it
   (`paired_load`): at concurrency 1 the overhead is the gRPC p50 minus the
   in-process p50 of its round, at concurrency C the ratio is gRPC images/s ÷
   in-process images/s of its round; the figures are medians over rounds, with the
   rounds' quartiles (`*_q1`, `*_q3`: how far this machine's speed moved them).
   A round counts its steady window, as perf_analyzer does: the load runs a ramp
   before it and goes on until it has closed (`*_whole_rounds`: counted from the
   first call to the last answer instead).
   `bench_perf_analyzer`: where Triton's perf_analyzer is installed
   (`scripts/get_perf_analyzer.sh`), it calls the KServe v2 ModelInfer of the same
   server at concurrency 1 and 8, against in-process ONNX Runtime right before and after;
   then, at concurrency 1, NAME@nhwc (an FP32 export taking uint8 NHWC pixels, made
   for it) to show what sending pixels instead of float tensors saves.
4. `bench_precisions`: FP16 and INT8 against FP32: in-process speed at batch 1 and
   8 and file size of the benchmark-size model, and the test accuracy ExportModel
   measured on a second model of the same backbone trained in full at 32 px
   (`make_accuracy_model`: random features at 224 px are at chance on the shapes).

The client process and the server share the machine's cores, as they do in the
Triton comparison the targets come from. The output ends with one `name: value`
line per figure (`final_lines`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb  # noqa: E402

FIGURES = (
    "ort_vs_torch_ratio_b1",
    "ort_vs_torch_ratio_b8",
    "grpc_vs_inprocess_ratio_c8",
    "grpc_overhead_ms_c1",
    "batching_gain_c8",
    "p99_ms_c8",
)
PREDICT = "/tlserve.v1.TLServe/Predict"
CAMERA_FRAME = (640, 480)  # width, height of the JPEG inputs
ACCURACY_SPLITS = {"train": 300, "val": 20, "test": 100}  # images per class of the accuracy model
ACCURACY_LEARNING_RATE = 3e-3  # AdamW, every layer at this rate (`make_accuracy_model`)


@dataclasses.dataclass(frozen=True)
class Settings:
    backbones: tuple[str, ...]
    image_size: int = 224
    train_per_class: int = 12  # procedural images per class for the model (3 classes)
    batches: tuple[int, ...] = (1, 8, 32)
    concurrencies: tuple[int, ...] = (1, 8, 32)
    inprocess_seconds: float = 2.0  # per side and batch size, split into alternating rounds
    rounds: int = 4  # in-process ORT against PyTorch: alternating rounds
    load_seconds: float = 10.0  # per gRPC measurement (all its rounds), after a warm-up
    warmup_seconds: float = 1.0
    min_ramp_seconds: float = 0.25  # each gRPC round's unrecorded start: at least this (`paired_load`)
    paired_rounds: int = 8  # gRPC rounds, each next to an in-process one: short, so drift cancels
    paired_inprocess_seconds: float = 0.6  # the in-process side of each gRPC round


SETTINGS = {
    "quick": Settings(backbones=("resnet18",)),
    "full": Settings(
        backbones=("resnet18", "mobilenet_v3_large", "efficientnet_b0"),
        train_per_class=16, inprocess_seconds=4.0, rounds=6, load_seconds=16.0, warmup_seconds=2.0,
    ),
}


# -- the model, through a real server ---------------------------------------------------


def export_all(tl, ref: pb.ModelRef) -> dict[int, pb.ModelArtifact | str]:
    """Each precision's artifact, or, where ExportModel refused to publish it (its parity
    or accuracy check failed: FAILED_PRECONDITION), the server's reason."""
    import tlserve.client as tlclient

    out: dict[int, pb.ModelArtifact | str] = {}
    for precision in (pb.PRECISION_FP32, pb.PRECISION_FP16, pb.PRECISION_INT8):
        try:
            out[precision] = tl.export_model(ref, precision=precision, timeout=1800)
        except tlclient.TLServeError as e:
            if e.code.name != "FAILED_PRECONDITION" or precision == pb.PRECISION_FP32:
                raise
            out[precision] = e.message
    return out


def make_model(tl, backbone: str, settings: Settings, data_root: Path) -> tuple[pb.Model, dict[int, pb.ModelArtifact]]:
    """The speed model: dataset → FineTune (feature extraction, random weights) →
    ExportModel FP32/FP16/INT8 at the benchmark's input size."""
    from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

    folder = data_root / f"shapes{settings.image_size}"
    if not folder.exists():
        write_image_folder(folder, TARGET_SHAPES[:3], settings.train_per_class, size=settings.image_size, seed=5)
    dataset = tl.register_dataset(folder.name, folder.name)
    request = pb.FineTuneRequest(
        dataset=dataset.id, model_name=backbone.replace("_", "-"), backbone=backbone,
        weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()), strategy=pb.STRATEGY_FEATURE_EXTRACTION,
        image_size=settings.image_size, seed=1, training=pb.TrainingOptions(epochs=3, batch_size=16),
    )
    ref = common.wait_for_model(tl, tl.fine_tune(request), backbone)
    artifacts = export_all(tl, ref)
    return tl.get_model(ref), artifacts


def make_accuracy_model(tl, backbone: str, data_root: Path, epochs: int) -> tuple[pb.Model, dict[int, pb.ModelArtifact]]:
    """The accuracy model. Random features at 224 px don't tell the shapes apart and a
    CPU can't train a 224 px network from scratch in a benchmark's minutes, so the
    accuracy cost of FP16 and INT8 is measured on the same backbone trained in full at
    32 px, on a test split of ACCURACY_SPLITS["test"] images per class.

    A from-scratch recipe, not the fine-tuning defaults (those suit pretrained weights:
    SGD with smaller rates for lower layers, augmentation, label smoothing, and with
    them this model stayed at chance): AdamW at one rate for every layer, no
    augmentation, all epochs run. Measured on this benchmark's 2 CPU cores, 15 epochs:
    40 images per class 0.36 test top-1 (chance 0.33), 150 0.50, 300 0.59 at rate 1e-3,
    0.70 at 3e-3 (85 s), 0.44 at 1e-2."""
    from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

    folder = data_root / "shapes32-accuracy"
    if not folder.exists():
        write_image_folder(folder, TARGET_SHAPES[:3], 0, size=32, seed=11, splits=ACCURACY_SPLITS)
    dataset = tl.register_dataset(folder.name, folder.name)
    training = pb.TrainingOptions(
        epochs=epochs, batch_size=16, optimizer=pb.OPTIMIZER_ADAMW, learning_rate=ACCURACY_LEARNING_RATE,
        layer_lr_decay=1.0, label_smoothing=0.0, head_dropout=0.0, early_stopping=pb.EarlyStopping(patience=0),
    )
    request = pb.FineTuneRequest(
        dataset=dataset.id, model_name=f"{backbone.replace('_', '-')}-32px", backbone=backbone,
        weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()), strategy=pb.STRATEGY_FULL,
        image_size=32, seed=1, training=training, augmentation=pb.AugmentationOptions(enabled=False),
    )
    ref = common.wait_for_model(tl, tl.fine_tune(request), f"{backbone} at 32 px")
    artifacts = export_all(tl, ref)
    return tl.get_model(ref), artifacts


def artifact_file(home: Path, model: pb.Model, precision: int) -> Path:
    from tlserve.service.store.models import model_dir

    name = pb.Precision.Name(precision).removeprefix("PRECISION_").lower()
    return home / "artifacts" / model_dir(model.name, model.version) / f"model-{name}-float_nchw.onnx"


# -- in-process ---------------------------------------------------------------------------


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_calls(fn, seconds: float, min_calls: int = 3) -> list[float]:
    """Per-call seconds of `fn()` repeated for about `seconds`."""
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_inprocess(home: Path, model: pb.Model, reference: InProcess, settings: Settings) -> dict:
    import torch

    from tlserve.service import backbones

    built = backbones.load_published(
        pt_path(home, model), model.backbone, len(model.class_names), backbones.Preprocessing.from_proto(model.preprocessing),
    )
    rows = {}
    for batch in settings.batches:
        x = reference.input(batch)
        xt = torch.from_numpy(x)

        def run_ort() -> None:
            reference.run_once(batch)

        def run_torch() -> None:
            with torch.inference_mode():
                built.model(xt)

        run_ort(), run_torch()  # warm-up
        ort_times: list[float] = []
        torch_times: list[float] = []
        per_round = settings.inprocess_seconds / settings.rounds
        for r in range(settings.rounds):
            order = (run_ort, run_torch) if r % 2 == 0 else (run_torch, run_ort)
            for fn in order:
                (ort_times if fn is run_ort else torch_times).extend(timed_calls(fn, per_round))
        ort_p50, torch_p50 = statistics.median(ort_times), statistics.median(torch_times)
        rows[batch] = {
            "ort_p50_ms": ort_p50 * 1e3, "torch_p50_ms": torch_p50 * 1e3,
            "ort_images_per_second": batch / ort_p50, "torch_images_per_second": batch / torch_p50,
            "ratio": torch_p50 / ort_p50,
        }
    return rows


def pt_path(home: Path, model: pb.Model) -> Path:
    from tlserve.service.store.models import model_dir

    return home / "artifacts" / model_dir(model.name, model.version) / "model.pt"


def bench_precisions(home: Path, model: pb.Model, artifacts: dict[int, pb.ModelArtifact | str],
                     accuracy: dict[int, pb.ModelArtifact | str], settings: Settings) -> dict:
    """Speed and size of the benchmark-size model's variants; accuracy from the 32 px one's.
    A variant ExportModel refused has NaN for what it could not measure, and the reason."""
    size = settings.image_size
    nan = float("nan")
    rows = {}
    for precision, artifact in artifacts.items():
        measured = accuracy[precision]
        row = {"size_bytes": nan, "p50_ms_b1": nan, "p50_ms_b8": nan, "test_top1": nan, "delta_points": nan,
               "parity_agreement": nan, "refused": []}
        if isinstance(measured, str):
            row["refused"].append(f"accuracy model: {measured}")
        else:
            row.update(test_top1=measured.test_top1_accuracy, delta_points=measured.accuracy_delta_points,
                       parity_agreement=measured.parity.top1_agreement)
        rows[precision] = row
        if isinstance(artifact, str):
            row["refused"].append(f"speed model: {artifact}")
            continue
        row["size_bytes"] = artifact.size_bytes
        session = ort_session(artifact_file(home, model, precision))
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
            session.run(["logits"], {"input": x})
            row[f"p50_ms_b{batch}"] = statistics.median(
                timed_calls(lambda: session.run(["logits"], {"input": x}), settings.inprocess_seconds / 2)
            ) * 1e3
        rows[precision] = row
    return rows


# -- over gRPC, from another process --------------------------------------------------------


def camera_jpeg(seed: int = 0) -> bytes:
    """A 640 × 480 JPEG with enough texture to cost what a photo costs to decode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = CAMERA_FRAME
    gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    noise = rng.normal(0, 40, (h, w, 3)).astype(np.float32)
    pixels = np.clip(gradient + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def predict_request_bytes(model: str, kind: str, size: int) -> bytes:
    if kind == "tensor":
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = pb.ImageInput(tensor=pb.Tensor(shape=[size, size, 3], dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()))
    else:
        image = pb.ImageInput(encoded=camera_jpeg())
    return pb.PredictRequest(model=pb.ModelRef(name=model), images=[image], top_k=1).SerializeToString()


async def _load_rounds(address: str, request: bytes, commands) -> None:
    """The load client's loop: one channel for the whole session (as a backend service
    keeps its connection); each command {"concurrency", "seconds", "warmup"} runs
    `concurrency` callers, each with one call in flight, and prints one JSON line."""
    import grpc

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        # Serialised once: the client's own CPU cost stays out of the server's figures.
        predict = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=pb.PredictResponse.FromString)
        for command in commands:
            result = await _load(predict, request, command["concurrency"], command["seconds"], command["warmup"],
                                 command.get("ramp", 0.0))
            print(json.dumps(result), flush=True)


async def _load(predict, request: bytes, concurrency: int, seconds: float, warmup: float, ramp: float = 0.0) -> dict:
    """`concurrency` callers, each with one call in flight, for `warmup` seconds
    (unrecorded), then `ramp` + `seconds` more. Recorded: every call that ends after the
    warm-up (`latencies_ms`, `ends_s` from the recorded start); `wall_s` runs from that
    start until the last call ends (the drain included). The window [ramp, ramp +
    seconds) is the steady part: load continues across both of its edges."""
    import grpc

    latencies: list[float] = []
    ends: list[float] = []
    errors: dict[str, int] = {}
    recording = False
    start = 0.0

    async def caller(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await predict(request, timeout=30)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                continue
            if recording:
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                ends.append(t1 - start)

    if warmup > 0:
        await asyncio.gather(*(caller(time.perf_counter() + warmup) for _ in range(concurrency)))
    recording = True
    start = time.perf_counter()
    await asyncio.gather(*(caller(start + ramp + seconds) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "wall_s": wall, "errors": errors, "ramp_s": ramp, "window_s": seconds,
            "latencies_ms": [round(t * 1e3, 3) for t in latencies], "ends_s": [round(t, 5) for t in ends]}


class LoadClient:
    """A separate client process (this file with `--load`) holding one channel to the
    server; `run` sends it one measurement and returns its latencies."""

    def __init__(self, address: str, model: str, kind: str, image_size: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--load", address, "--model", model, "--input", kind,
             "--image-size", str(image_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def run(self, concurrency: int, seconds: float, warmup: float = 0.0, ramp: float = 0.0) -> dict:
        command = {"concurrency": concurrency, "seconds": seconds, "warmup": warmup, "ramp": ramp}
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load client exited with {self._proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(30)


class InProcess:
    """The reference: the exported FP32 graph in an ONNX Runtime session in this
    process, with the server's session options, on random inputs."""

    def __init__(self, path: Path, image_size: int) -> None:
        self._session = ort_session(path)
        self._inputs: dict[int, np.ndarray] = {}
        self._size = image_size

    def input(self, batch: int) -> np.ndarray:
        """The random (batch, 3, S, S) input for `batch`, made (and run once, a warm-up) on first use."""
        x = self._inputs.get(batch)
        if x is None:
            x = self._inputs[batch] = np.random.default_rng(0).standard_normal(
                (batch, 3, self._size, self._size), dtype=np.float32)
            self._session.run(["logits"], {"input": x})
        return x

    def run_once(self, batch: int) -> None:
        self._session.run(["logits"], {"input": self.input(batch)})

    def run(self, batch: int, seconds: float) -> list[float]:
        """Per-call seconds at `batch` for about `seconds` (after the warm-up)."""
        self.input(batch)
        return timed_calls(lambda: self.run_once(batch), seconds, min_calls=2)


def paired_load(client: LoadClient, reference: InProcess, concurrency: int, batch: int, settings: Settings) -> dict:
    """`settings.paired_rounds` rounds, each a gRPC measurement at `concurrency` next to an
    in-process one at `batch` (alternately first and second): the machine's speed
    drifts over seconds here (shared cores), and the two sides of a round see the same
    machine. Per round: gRPC p50 minus in-process p50, and gRPC images/s ÷ in-process
    images/s; the figures are the medians over rounds, with their quartiles (`*_iqr`)
    to say how far the rounds spread.

    Steady state, as perf_analyzer measures: each round's load starts, runs a ramp
    (twice the steady latency, concurrency ÷ in-process throughput, at least
    `min_ramp_seconds`: the first burst of calls queues and the batches settle), then
    the round's window, and goes on until the window has closed; images/s counts the
    calls that end inside the window, and the latencies are theirs. Counted from a
    round's first call to its last answer instead (`ratio_whole`), a round also holds
    its ramp and its drain, when the last calls finish with nothing behind them and the
    cores run out of work: at concurrency 8 (p50 ~150 ms) ~10 % of a 1.25-s round, a
    cost of stopping the benchmark's load that a steadily loaded server does not pay."""
    client.run(concurrency, 0.0, warmup=settings.warmup_seconds)
    first_ref = reference.run(batch, settings.paired_inprocess_seconds)
    # Steady latency at this concurrency is about concurrency ÷ in-process throughput.
    ramp = max(settings.min_ramp_seconds, 2 * concurrency * statistics.median(first_ref) / batch)
    window = settings.load_seconds / settings.paired_rounds
    latencies: list[float] = []
    errors: dict[str, int] = {}
    calls = 0
    added_ms: list[float] = []
    ratios: list[float] = []
    ratios_whole: list[float] = []
    reference_times: list[float] = []
    for r in range(settings.paired_rounds):
        first = r % 2 == 0
        ref = (first_ref if r == 0 else reference.run(batch, settings.paired_inprocess_seconds)) if first else None
        got = client.run(concurrency, window, ramp=ramp)
        if not first:
            ref = reference.run(batch, settings.paired_inprocess_seconds)
        for code, n in got["errors"].items():
            errors[code] = errors.get(code, 0) + n
        reference_times.extend(ref)
        lat = sorted(ms for ms, end in zip(got["latencies_ms"], got["ends_s"]) if ramp <= end < ramp + window)
        if not lat:  # every call failed: counted in `errors`
            continue
        ref_p50 = statistics.median(ref)
        added_ms.append(statistics.median(lat) - ref_p50 * 1e3)
        ratios.append((len(lat) / window) / (batch / ref_p50))
        ratios_whole.append((len(got["latencies_ms"]) / got["wall_s"]) / (batch / ref_p50))
        latencies.extend(lat)
        calls += len(lat)
    latencies.sort()
    measured = window * len(ratios)
    return {
        "concurrency": concurrency, "calls": calls, "errors": errors, "ramp_s": ramp,
        "images_per_second": calls / measured if measured else 0.0,
        "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99),
        "inprocess_batch": batch, "inprocess_p50_ms": statistics.median(reference_times) * 1e3,
        "inprocess_images_per_second": batch / statistics.median(reference_times),
        "added_ms": statistics.median(added_ms) if added_ms else float("nan"),
        "ratio": statistics.median(ratios) if ratios else 0.0,
        "ratio_whole": statistics.median(ratios_whole) if ratios_whole else 0.0,
        "added_ms_iqr": quartiles(added_ms),
        "ratio_iqr": quartiles(ratios),
    }


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles, nearest rank as `common.percentile` (NaN for no values)."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    return common.percentile(ordered, 25), common.percentile(ordered, 75)


def spread(iqr: tuple[float, float]) -> str:
    return f"{iqr[0]:.2f}–{iqr[1]:.2f}"


def bench_grpc(address: str, model: str, reference: InProcess, settings: Settings, kinds=("tensor", "jpeg")) -> dict:
    results = {}
    for kind in kinds:
        client = LoadClient(address, model, kind, settings.image_size)
        try:
            for c in settings.concurrencies:
                if kind == "tensor" or c in (1, 8):
                    results[(kind, c)] = paired_load(client, reference, c, min(c, max(settings.batches)), settings)
        finally:
            client.close()
    return results


# -- perf_analyzer against the KServe endpoint ------------------------------------------------

PERF_ANALYZER = Path(__file__).resolve().parent.parent / "var" / "tools" / "perf_analyzer" / "perf_analyzer"


def bench_perf_analyzer(tool: Path, address: str, model: str, reference: InProcess, settings: Settings,
                        concurrencies=(1, 8)) -> dict[int, dict]:
    """Triton's perf_analyzer (C++; `scripts/get_perf_analyzer.sh`) calling the KServe v2
    ModelInfer of the same server unchanged, batch 1 per request, random input of the
    datatype and shape the model's metadata gives, at each concurrency until three of its windows
    (2 s or more each) agree within 30 %; a concurrency that never settles
    is reported without a figure. The in-process reference at batch C runs right
    before and right after."""
    rows = {}
    window_ms = int(max(2.0, settings.load_seconds / settings.paired_rounds) * 1000)
    for c in concurrencies:
        batch = min(c, max(settings.batches))
        before = reference.run(batch, settings.paired_inprocess_seconds)
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "pa.csv"
            # Stable: three windows within 30 % of each other (its default, 10 %, is
            # rarely reached at concurrency 8 on a shared 2-core machine).
            out = subprocess.run(
                [str(tool), "-m", model, "-i", "grpc", "-u", address, "--concurrency-range", str(c),
                 "--measurement-interval", str(window_ms), "--max-trials", "10", "--stability-percentage", "30",
                 "-f", str(csv_path)],
                capture_output=True, text=True, timeout=600,
            )
            if out.returncode != 0 or not csv_path.exists():
                tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
                print(f"perf_analyzer at concurrency {c} gave no figure (exit {out.returncode}): {tail[0]}")
                continue
            header, values = csv_path.read_text().splitlines()[:2]
        after = reference.run(batch, settings.paired_inprocess_seconds)
        row = dict(zip(header.split(","), (float(v) for v in values.split(","))))
        ref_p50 = statistics.median(before + after)
        rows[c] = {
            "images_per_second": row["Inferences/Second"], "p50_ms": row["p50 latency"] / 1e3,
            "p99_ms": row["p99 latency"] / 1e3, "inprocess_p50_ms": ref_p50 * 1e3,
            "inprocess_images_per_second": batch / ref_p50,
            "ratio": row["Inferences/Second"] / (batch / ref_p50),
            "added_ms": row["p50 latency"] / 1e3 - ref_p50 * 1e3,
            "server_queue_ms": row["Server Queue"] / 1e3, "server_compute_ms": row["Server Compute Infer"] / 1e3,
        }
    return rows


# -- report -----------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    return common.table(headers, rows, digits=2)


def final_lines(figures: dict[str, float]) -> list[str]:
    """`name: value`, any other figures first, then the required ones in FIGURES order."""
    return common.final_lines(figures, FIGURES)


def headline_figures(inprocess: dict, on: dict, off: dict) -> dict[str, float]:
    """The required figures from one backbone's measurements. The gRPC figures are the
    medians over rounds paired with in-process ones (`paired_load`); batching on ÷ off
    compares the two servers' paired ratios, so drift between them cancels too."""
    return {
        "ort_vs_torch_ratio_b1": inprocess[1]["ratio"],
        "ort_vs_torch_ratio_b8": inprocess[8]["ratio"],
        "grpc_vs_inprocess_ratio_c8": on[("tensor", 8)]["ratio"],
        "grpc_overhead_ms_c1": on[("tensor", 1)]["added_ms"],
        "batching_gain_c8": on[("tensor", 8)]["ratio"] / off[("tensor", 8)]["ratio"],
        "p99_ms_c8": on[("tensor", 8)]["p99_ms"],
        "grpc_vs_inprocess_ratio_c8_q1": on[("tensor", 8)]["ratio_iqr"][0],
        "grpc_vs_inprocess_ratio_c8_q3": on[("tensor", 8)]["ratio_iqr"][1],
        "grpc_vs_inprocess_ratio_c8_whole_rounds": on[("tensor", 8)]["ratio_whole"],
        "grpc_overhead_ms_c1_q1": on[("tensor", 1)]["added_ms_iqr"][0],
        "grpc_overhead_ms_c1_q3": on[("tensor", 1)]["added_ms_iqr"][1],
    }


def machine() -> dict[str, str]:
    import onnxruntime
    import torch

    from tlserve.service.config import Settings
    from tlserve.service.inference.sessions import cpu_lanes
    from tlserve.service.training.data import available_cpus

    return {
        "cpu": common.cpu_name(), "cores": str(available_cpus()), "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()), "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        # The servers run with the defaults, TLSERVE_* in the environment applied.
        "server cpu lanes": str(cpu_lanes(Settings.parse([], os.environ))),
    }


def main(args: argparse.Namespace) -> int:
    settings = SETTINGS["quick" if args.quick else "full"]
    if args.image_size:
        settings = dataclasses.replace(settings, image_size=args.image_size)
    if args.backbones:
        settings = dataclasses.replace(settings, backbones=tuple(args.backbones.split(",")))
    say = print
    say(f"# tlserve prediction benchmarks ({'--quick' if args.quick else 'full'}), "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    say(table(["machine", ""], [[k, v] for k, v in machine().items()]))
    say("\nsettings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()) + "\n")
    import tlserve.client as tlclient

    workdir = Path(tempfile.mkdtemp(prefix="tlserve-bench-predict-", dir=args.tmp))
    figures: dict[str, float] = {}
    try:
        data_root = workdir / "data"
        data_root.mkdir()
        for backbone in settings.backbones:
            home = workdir / backbone / "home"
            home.parent.mkdir()
            server = common.start_server(home, data_root)
            try:
                with tlclient.Client(server.address, timeout=120) as tl:
                    t0 = time.perf_counter()
                    model, artifacts = make_model(tl, backbone, settings, data_root)
                    say(f"## {backbone} at {settings.image_size} px: fine-tuned and exported in "
                        f"{time.perf_counter() - t0:.0f} s")
                    t0 = time.perf_counter()
                    accuracy_model, accuracy = make_accuracy_model(tl, backbone, data_root, args.accuracy_epochs)
                    say(f"accuracy model: {backbone} trained at 32 px, test top-1 "
                        f"{accuracy_model.test_metrics.top1_accuracy:.3f} on "
                        f"{accuracy_model.test_metrics.image_count} images (chance 0.333), "
                        f"exported in {time.perf_counter() - t0:.0f} s")
                say("\n### 1. in-process: ONNX Runtime (FP32) against PyTorch eager")
                reference = InProcess(artifact_file(home, model, pb.PRECISION_FP32), settings.image_size)
                inprocess = bench_inprocess(home, model, reference, settings)
                say(table(["batch", "ORT p50 ms", "torch p50 ms", "ORT img/s", "torch img/s", "torch ÷ ORT time"],
                          [[b, r["ort_p50_ms"], r["torch_p50_ms"], r["ort_images_per_second"],
                            r["torch_images_per_second"], r["ratio"]] for b, r in inprocess.items()]))
                on = bench_grpc(server.address, model.name, reference, settings)
                perf = perf_nhwc = None
                if args.perf_analyzer.exists():
                    perf = bench_perf_analyzer(args.perf_analyzer, server.address, model.name, reference, settings)
                    # The same through NAME@nhwc: uint8 pixels, a quarter of the bytes.
                    try:
                        with tlclient.Client(server.address, timeout=120) as tl:
                            tl.export_model(model.name, version=model.version, precision="fp32",
                                            input_format="uint8_nhwc", timeout=1800)
                    except tlclient.TLServeError as e:
                        if e.code.name != "FAILED_PRECONDITION":
                            raise
                        say(f"uint8 NHWC export not published ({e.message}): perf_analyzer on @nhwc skipped")
                    else:
                        perf_nhwc = bench_perf_analyzer(args.perf_analyzer, server.address, f"{model.name}@nhwc",
                                                        reference, settings, concurrencies=(1,))
            except BaseException:
                print("server log (tail):\n" + "\n".join(server.log().splitlines()[-40:]), file=sys.stderr)
                raise
            finally:
                server.terminate()
            server = common.start_server(home, data_root, "--max-batch-size", "1")
            try:
                off = bench_grpc(server.address, model.name, reference, settings, kinds=("tensor",))
            finally:
                server.terminate()

            say("\n### 2. Predict over gRPC from another process (one image per call), rounds paired with "
                "in-process ONNX Runtime at batch C")
            rows = []
            for label, runs in (("on", on), ("off", off)):
                for (kind, c), r in runs.items():
                    rows.append([kind, label, c, r["images_per_second"], r["p50_ms"], r["p99_ms"],
                                 r["inprocess_images_per_second"], r["inprocess_p50_ms"], r["ratio"],
                                 spread(r["ratio_iqr"]), r["ratio_whole"], r["added_ms"], spread(r["added_ms_iqr"]),
                                 r["ramp_s"], sum(r["errors"].values())])
            say(table(["input", "batching", "concurrency", "img/s", "p50 ms", "p99 ms", "in-process img/s",
                       "in-process p50 ms", "÷ in-process (median of rounds)", "its quartiles",
                       "÷ in-process, whole rounds", "p50 added ms (median of rounds)", "its quartiles",
                       "ramp s", "errors"], rows))
            say("(steady windows of each round, load running across both edges; \"whole rounds\" counts from a "
                "round's first call to its last answer, its ramp and drain included)")
            if perf is None:
                say(f"\nperf_analyzer: not found at {args.perf_analyzer} (scripts/get_perf_analyzer.sh fetches it); skipped")
            else:
                say("\nTriton's perf_analyzer (C++) on the KServe v2 ModelInfer of the same server, batch 1, "
                    f"FP32 NCHW input ({model.name}) and uint8 NHWC pixels ({model.name}@nhwc, the FP32 export "
                    "that normalises in its graph); in-process ONNX Runtime (FP32 NCHW) at batch C right before "
                    "and after")
                say(table(["input", "concurrency", "img/s", "p50 ms", "p99 ms", "in-process img/s",
                           "in-process p50 ms", "÷ in-process", "p50 added ms", "server queue ms",
                           "server compute ms"],
                          [[kind, c, r["images_per_second"], r["p50_ms"], r["p99_ms"],
                            r["inprocess_images_per_second"], r["inprocess_p50_ms"], r["ratio"], r["added_ms"],
                            r["server_queue_ms"], r["server_compute_ms"]]
                           for kind, rows in (("FP32", perf), ("UINT8", perf_nhwc or {})) for c, r in rows.items()]))
            jpeg, tensor = on[("jpeg", 1)]["p50_ms"], on[("tensor", 1)]["p50_ms"]
            say(f"JPEG {CAMERA_FRAME[0]}×{CAMERA_FRAME[1]} at concurrency 1: p50 {jpeg:.2f} ms against {tensor:.2f} ms "
                f"for a prepared tensor: decode and resize are {max(0.0, jpeg - tensor) / jpeg:.0%} of the call")

            say(f"\n### 3. FP16 and INT8 against FP32 (in-process ONNX Runtime, CPU; speed and size at "
                f"{settings.image_size} px, accuracy of the 32 px model on its test split)")
            precisions = bench_precisions(home, model, artifacts, accuracy, settings)
            fp32 = precisions[pb.PRECISION_FP32]
            say(table(["precision", "size MB", "p50 ms b1", "p50 ms b8", "speed-up b8 vs FP32", "test top-1",
                       "Δ points vs FP32"],
                      [[pb.Precision.Name(p).removeprefix("PRECISION_"), r["size_bytes"] / 1e6, r["p50_ms_b1"],
                        r["p50_ms_b8"], fp32["p50_ms_b8"] / r["p50_ms_b8"], r["test_top1"], r["delta_points"]]
                       for p, r in precisions.items()]))
            for p, r in precisions.items():
                for reason in r["refused"]:
                    say(f"{pb.Precision.Name(p).removeprefix('PRECISION_')} not published for the {reason}")
            say("")
            found = headline_figures(inprocess, on, off)
            found["jpeg_decode_share_c1"] = max(0.0, jpeg - tensor) / jpeg
            found["int8_speedup_b8"] = fp32["p50_ms_b8"] / precisions[pb.PRECISION_INT8]["p50_ms_b8"]
            found["int8_accuracy_delta_points"] = precisions[pb.PRECISION_INT8]["delta_points"]
            found["fp16_speedup_b8"] = fp32["p50_ms_b8"] / precisions[pb.PRECISION_FP16]["p50_ms_b8"]
            if perf is not None:
                if 1 in perf:
                    found["perf_analyzer_overhead_ms_c1"] = perf[1]["added_ms"]
                if 8 in perf:
                    found["perf_analyzer_vs_inprocess_ratio_c8"] = perf[8]["ratio"]
                if perf_nhwc and 1 in perf_nhwc:
                    found["perf_analyzer_overhead_ms_c1_nhwc"] = perf_nhwc[1]["added_ms"]
            if backbone == settings.backbones[0]:
                figures.update(found)
            else:
                figures.update({f"{backbone}_{k}": v for k, v in found.items()})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for line in final_lines(figures):
        say(line)
    return 0


def load_main(args: argparse.Namespace) -> int:
    request = predict_request_bytes(args.model, args.input, args.image_size)
    asyncio.run(_load_rounds(args.load, request, (json.loads(line) for line in sys.stdin if line.strip())))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 only: a few minutes on 2 CPU cores")
    parser.add_argument("--backbones", default="", help="comma-separated torchvision names (default: per mode)")
    parser.add_argument("--image-size", type=int, default=0, help="input size in pixels (default 224)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary homes go (default: the system's)")
    parser.add_argument("--accuracy-epochs", type=int, default=15,
                        help="epochs of the 32 px accuracy model (more on a GPU: from scratch it needs them)")
    parser.add_argument("--perf-analyzer", type=Path, default=PERF_ANALYZER,
                        help="Triton's perf_analyzer, run against the KServe endpoint when it exists "
                             "(default: where scripts/get_perf_analyzer.sh puts it)")
    load = parser.add_argument_group("load client (internal: measurements read as JSON lines from stdin)")
    load.add_argument("--load", default="", metavar="ADDRESS", help=argparse.SUPPRESS)
    load.add_argument("--model", default="", help=argparse.SUPPRESS)
    load.add_argument("--input", choices=("tensor", "jpeg"), default="tensor", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    sys.exit(load_main(arguments) if arguments.load else main(arguments))
