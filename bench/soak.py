"""Soak: concurrent Predict client processes with fine-tuning and metadata traffic, for minutes.

The server must answer without errors (RESOURCE_EXHAUSTED from its bounded queue
apart), and its memory and open files must stay flat after warm-up.

    .venv/bin/python bench/soak.py --quick     # 64 clients, 90 s of load: about 2 min in all on 2 CPU cores
    .venv/bin/python bench/soak.py             # 64 clients, 5 min of load
    .venv/bin/python bench/soak.py --test      # the test suite's short version: 8 clients, 15 s

In order:

1. `common.start_server`: a real tlserve server (a child process, as an operator runs it, on
   port 0 with its own temporary home), its per-model queue bounded by
   `--max-queue-size` (default: half the clients, so that a burst overflows it and
   Predict answers RESOURCE_EXHAUSTED on purpose: the rejection path soaks too).
2. `make_model`: a procedural shapes dataset (RegisterDataset), FineTune (resnet18 at
   64 px, feature extraction on random weights: cheap on 2 cores, and neither speed
   nor leaks depend on the weights), ExportModel FP32.
3. `soak`: for `seconds`, at once:
   - `clients` Predict clients, each a separate process (`ClientProcess`: this file
     with `--client`) holding one channel and making one call at a time in a loop,
     each with a deadline; half send a 96 × 96 JPEG (decode and resize on the
     server), half a uint8 tensor at the model's size (the fast path). A client
     answered RESOURCE_EXHAUSTED backs off `REJECTED_BACKOFF_S`, as a client
     honouring the server's push-back would;
   - `FineTuneLoop` (a thread here): one small FineTune job at a time (1 epoch),
     followed to its end through WatchJob, its model version deleted (DeleteModel)
     so the store stays the same size, then a pause and the next;
   - `MetadataLoop` (a thread here): ListModels, GetModel, ListJobs, GetServerInfo,
     ListDatasets in turn, one every `metadata_interval_s`;
   - `Sampler` (a thread here): the server process's resident memory (VmRSS of
     /proc/PID/status) and open file descriptors (entries of /proc/PID/fd) every second.
4. `summarise`: the first `warmup_fraction` of the run (the model loading into the
   prediction cache, the first job, the allocator's arenas filling) is warm-up.
   Throughput and latency count the calls that end after it. Flatness compares the
   window right after warm-up with the window at the end (each a tenth of the
   measured time, at least 3 samples): RSS the median of each, file descriptors the
   minimum of each (a running job's pipes come and go; a leak raises the floor).
   `errors` counts every failed call of every kind (Predict, metadata, jobs) except
   RESOURCE_EXHAUSTED, which is counted apart as `resource_exhausted`.

The clients share the machine's cores with the server, as in bench/predict.py. The
output is a table per segment of the run and ends with one `name: value` line per
figure (`final_lines`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Light imports only: every client process imports this module (no numpy, torch or PIL
# at the top; the server-side helpers import them where they are used).
from bench import common  # noqa: E402
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb  # noqa: E402

FIGURES = (
    "predict_per_second",
    "predict_p50_ms",
    "predict_p99_ms",
    "errors",
    "resource_exhausted",
    "rss_growth_after_warmup_percent",
    "fds_growth_after_warmup",
    "jobs_succeeded",
    "metadata_calls",
)
PREDICT = "/tlserve.v1.TLServe/Predict"
JPEG_SIDE = 96  # the JPEG clients' images: resized to the model's size on the server
REJECTED_BACKOFF_S = 0.05  # a client's pause after RESOURCE_EXHAUSTED (or any failure) before its next call
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclasses.dataclass(frozen=True)
class Settings:
    clients: int = 64
    seconds: float = 300.0  # of load, warm-up included
    warmup_fraction: float = 0.2
    backbone: str = "resnet18"
    image_size: int = 64
    images_per_class: int = 12  # procedural shapes, 3 classes
    predict_deadline_s: float = 10.0
    max_queue_size: int = 0  # the server's --max-queue-size (0: half the clients)
    metadata_interval_s: float = 0.1
    job_gap_s: float = 2.0  # between one fine-tune job's end and the next one's start
    sample_interval_s: float = 1.0
    segments: int = 4  # rows of the table after warm-up

    @property
    def warmup_s(self) -> float:
        return self.seconds * self.warmup_fraction

    @property
    def queue_size(self) -> int:
        return self.max_queue_size or max(1, self.clients // 2)


SETTINGS = {
    "full": Settings(),
    "quick": Settings(seconds=90.0),
    "test": Settings(clients=8, seconds=15.0, images_per_class=8, segments=2),
}


# -- the server and its model ----------------------------------------------------------------


def finetune_request(dataset_id: str, model_name: str, settings: Settings, epochs: int) -> pb.FineTuneRequest:
    return pb.FineTuneRequest(
        dataset=dataset_id, model_name=model_name, backbone=settings.backbone,
        weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()), strategy=pb.STRATEGY_FEATURE_EXTRACTION,
        image_size=settings.image_size, seed=1, training=pb.TrainingOptions(epochs=epochs, batch_size=16),
    )


def make_model(tl, settings: Settings, data_root: Path) -> tuple[pb.Model, str]:
    """The model the clients call, and the dataset id the fine-tune traffic reuses:
    shapes → RegisterDataset → FineTune → ExportModel FP32."""
    from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

    folder = data_root / f"shapes{settings.image_size}"
    write_image_folder(folder, TARGET_SHAPES[:3], settings.images_per_class, size=settings.image_size, seed=5)
    dataset = tl.register_dataset(folder.name, folder.name)
    request = finetune_request(dataset.id, "soak", settings, epochs=1)
    ref = common.wait_for_model(tl, tl.fine_tune(request), settings.backbone, timeout=900)
    tl.export_model(ref, precision=pb.PRECISION_FP32, timeout=900)
    return tl.get_model(ref), dataset.id


def write_requests(folder: Path, model: str, size: int) -> dict[str, Path]:
    """One serialised PredictRequest per input kind, in files the clients read (so
    that they import neither numpy nor PIL): a JPEG to decode and resize, and a
    uint8 (size, size, 3) tensor at the model's size."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = JPEG_SIDE
    gradient = np.linspace(0, 255, side, dtype=np.float32)[None, :, None] * np.ones((side, 1, 3), np.float32)
    pixels = np.clip(gradient + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    tensor = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    images = {
        "jpeg": pb.ImageInput(encoded=buffer.getvalue()),
        "tensor": pb.ImageInput(tensor=pb.Tensor(shape=[size, size, 3], dtype=pb.DATA_TYPE_UINT8,
                                                 data=tensor.tobytes())),
    }
    paths = {}
    for kind, image in images.items():
        paths[kind] = folder / f"predict-{kind}.bin"
        paths[kind].write_bytes(pb.PredictRequest(model=pb.ModelRef(name=model), images=[image], top_k=1)
                                .SerializeToString())
    return paths


# -- the Predict clients: one process each ------------------------------------------------------


def client_main(args: argparse.Namespace) -> int:
    """A client process: one channel; says `ready` once connected, reads the start
    and stop times (time.monotonic: one clock for every process on Linux), calls
    Predict one at a time until the stop, and prints one JSON line: the end time
    (seconds from the start) and latency of every answered call, and the end time
    and status code of every failed one, with the first message of each code."""
    import grpc

    request = Path(args.request).read_bytes()
    with grpc.insecure_channel(args.client, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        # Serialised once: the client's own CPU goes to calls, not to protobuf.
        predict = channel.unary_unary(PREDICT, request_serializer=None,
                                      response_deserializer=pb.PredictResponse.FromString)
        print("ready", flush=True)
        go = json.loads(sys.stdin.readline())
        start, stop = go["start"], go["stop"]
        time.sleep(max(0.0, start - time.monotonic()))
        ends: list[float] = []
        latencies_ms: list[float] = []
        failures: list[tuple[float, str]] = []
        messages: dict[str, str] = {}
        while (t0 := time.monotonic()) < stop:
            try:
                response = predict(request, timeout=args.deadline)
            except grpc.RpcError as e:
                code = e.code().name
                failures.append((round(time.monotonic() - start, 4), code))
                messages.setdefault(code, e.details() or "")
                time.sleep(REJECTED_BACKOFF_S)
                continue
            t1 = time.monotonic()
            if len(response.predictions) != 1 or not response.predictions[0].top_k:
                failures.append((round(t1 - start, 4), "BAD_RESPONSE"))
                messages.setdefault("BAD_RESPONSE", str(response)[:200])
                continue
            ends.append(round(t1 - start, 4))
            latencies_ms.append(round((t1 - t0) * 1e3, 3))
    print(json.dumps({"ends": ends, "latencies_ms": latencies_ms, "failures": failures, "messages": messages}),
          flush=True)
    return 0


class ClientProcess:
    """A Predict client in its own process (this file with `--client`)."""

    def __init__(self, address: str, request: Path, deadline: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", address, "--request", str(request), "--deadline", str(deadline)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a Predict client did not connect (exit {self.proc.poll()}): {line!r}")

    def go(self, start: float, stop: float) -> None:
        self.proc.stdin.write(json.dumps({"start": start, "stop": stop}) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a Predict client exited with {self.proc.wait()} before its result")
        self.proc.wait(60)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the other traffic and the sampler (threads of this process) --------------------------------


def read_proc(pid: int) -> tuple[int, int]:
    """(resident bytes, open file descriptors) of process `pid`, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024  # the kernel writes kB
            break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """(seconds from `start`, RSS bytes, open fds) of `pid` every `interval` until stopped."""

    def __init__(self, pid: int, start: float, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.start_time, self.interval = pid, start, interval
        self.samples: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = self.start_time
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):  # the server gone: the run fails elsewhere
                rss, fds = read_proc(self.pid)
                self.samples.append((time.monotonic() - self.start_time, rss, fds))
            next_at += self.interval
            self.stopping.wait(max(0.0, next_at - time.monotonic()))


class MetadataLoop(threading.Thread):
    """The read-only RPCs a dashboard or a backend makes, one every `interval` in turn,
    until stopped; records (seconds from `start`, method, status code name)."""

    def __init__(self, address: str, model: str, start: float, interval: float) -> None:
        super().__init__(daemon=True)
        self.address, self.model, self.start_time, self.interval = address, model, start, interval
        self.calls: list[tuple[float, str, str]] = []
        self.messages: dict[str, str] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        import tlserve.client as tlclient

        with tlclient.Client(self.address, timeout=30) as tl:
            methods = [
                ("ListModels", tl.list_models), ("GetModel", lambda: tl.get_model(self.model)),
                ("ListJobs", tl.list_jobs), ("GetServerInfo", tl.get_server_info), ("ListDatasets", tl.list_datasets),
            ]
            i = 0
            while not self.stopping.is_set():
                name, call = methods[i % len(methods)]
                i += 1
                try:
                    call()
                    code = "OK"
                except tlclient.TLServeError as e:
                    code = e.code.name
                    self.messages.setdefault(f"{name} {code}", e.message)
                self.calls.append((time.monotonic() - self.start_time, name, code))
                self.stopping.wait(self.interval)


class FineTuneLoop(threading.Thread):
    """One FineTune job at a time, followed through WatchJob to its end; a succeeded
    job's model version is deleted, so the store does not grow; `gap` seconds, then the
    next, until `stop` (seconds from `start`). A job is not started where the previous
    one's duration would take it past `stop` (the load would end while it trains); the
    job in flight at `stop` is followed to its end."""

    def __init__(self, address: str, request: pb.FineTuneRequest, start: float, stop: float, gap: float) -> None:
        super().__init__(daemon=True)
        self.address, self.request, self.start_time, self.stop, self.gap = address, request, start, stop, gap
        self.jobs: list[dict] = []
        self.failure: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        import tlserve.client as tlclient

        try:
            with tlclient.Client(self.address, timeout=60) as tl:
                while not self.stopping.is_set():
                    began = time.monotonic() - self.start_time
                    last = self.jobs[-1]["end"] - self.jobs[-1]["start"] if self.jobs else 0.0
                    if began + last > self.stop:
                        self.stopping.wait(self.gap)
                        continue
                    job = tl.fine_tune(self.request)
                    for _ in tl.watch_job(job.id, timeout=900):
                        pass  # the stream ends at a terminal state
                    job = tl.get_job(job.id)
                    record = {"start": began, "end": time.monotonic() - self.start_time,
                              "state": pb.JobState.Name(job.state).removeprefix("JOB_STATE_"), "error": job.error,
                              # the server's own times: waiting for a worker, then the worker's run
                              "queued": seconds_between(job.create_time, job.start_time),
                              "ran": seconds_between(job.start_time, job.end_time)}
                    if job.state == pb.JOB_STATE_SUCCEEDED:
                        tl.delete_model(job.model)
                    self.jobs.append(record)
                    self.stopping.wait(self.gap)
        except BaseException as e:  # reported as an error of the run, with its reason
            self.failure = e


def seconds_between(a, b) -> float:
    """Seconds from protobuf Timestamp `a` to `b` (0 where either is unset)."""
    if not (a.seconds or a.nanos) or not (b.seconds or b.nanos):
        return 0.0
    return (b.seconds - a.seconds) + (b.nanos - a.nanos) / 1e9


# -- the figures ------------------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (0 for fewer than 2)."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(v for _, v in points)
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def flatness(samples: list[tuple[float, int, int]], warmup: float, end: float, interval: float) -> dict[str, float]:
    """RSS and fds right after warm-up against the end: the window [warmup, warmup + w)
    against [end - w, end], w a tenth of the measured time and at least 3 samples' worth;
    RSS the median of a window, fds its minimum."""
    w = max(3 * interval, (end - warmup) / 10)
    first = [s for s in samples if warmup <= s[0] < warmup + w]
    last = [s for s in samples if end - w <= s[0] <= end]
    after = [s for s in samples if warmup <= s[0] <= end]
    if not first or not last:
        nan = float("nan")
        return {"rss_after_warmup_mb": nan, "rss_end_mb": nan, "rss_growth_after_warmup_percent": nan,
                "fds_after_warmup": nan, "fds_end": nan, "fds_growth_after_warmup": nan}
    rss_first = statistics.median(s[1] for s in first)
    rss_last = statistics.median(s[1] for s in last)
    fds_first, fds_last = min(s[2] for s in first), min(s[2] for s in last)
    return {
        "rss_after_warmup_mb": rss_first / 2**20, "rss_end_mb": rss_last / 2**20,
        "rss_max_mb": max(s[1] for s in samples) / 2**20,
        "rss_slope_mb_per_minute": slope_per_minute([(s[0], s[1] / 2**20) for s in after]),
        "rss_growth_after_warmup_percent": 100 * (rss_last - rss_first) / rss_first,
        "fds_after_warmup": fds_first, "fds_end": fds_last, "fds_max": max(s[2] for s in samples),
        "fds_growth_after_warmup": fds_last - fds_first,
    }


def summarise(clients: list[dict], samples: list[tuple[float, int, int]], metadata: list[tuple[float, str, str]],
              jobs: list[dict], settings: Settings) -> tuple[dict[str, float], list[list]]:
    """The figures and the table's rows (warm-up, then `settings.segments` equal
    segments of the rest) from the clients' results, the samples, the metadata calls
    and the jobs, all timed in seconds from the start."""
    warmup, end = settings.warmup_s, settings.seconds
    calls = [(t, ms) for c in clients for t, ms in zip(c["ends"], c["latencies_ms"])]
    failures = [(t, code) for c in clients for t, code in c["failures"]]
    measured = sorted(ms for t, ms in calls if warmup <= t < end)
    rejected = sum(code == "RESOURCE_EXHAUSTED" for _, code in failures)
    predict_errors = len(failures) - rejected
    metadata_errors = sum(code != "OK" for *_, code in metadata)
    succeeded = sum(j["state"] == "SUCCEEDED" for j in jobs)
    figures: dict[str, float] = {
        "clients": len(clients), "seconds": end, "warmup_seconds": warmup,
        "predictions_answered": len(calls), "predict_errors": predict_errors,
        "resource_exhausted_percent": 100 * rejected / max(1, len(calls) + len(failures)),
        "metadata_errors": metadata_errors, "jobs_started": len(jobs), "jobs_failed": len(jobs) - succeeded,
        "job_seconds_max": max((j["end"] - j["start"] for j in jobs), default=0.0),
        **flatness(samples, warmup, end, settings.sample_interval_s),
        "predict_per_second": len(measured) / (end - warmup),
        "predict_p50_ms": common.percentile(measured, 50), "predict_p99_ms": common.percentile(measured, 99),
        "errors": predict_errors + metadata_errors + len(jobs) - succeeded,
        "resource_exhausted": rejected, "jobs_succeeded": succeeded, "metadata_calls": len(metadata),
    }
    step = (end - warmup) / settings.segments
    bounds = [(0.0, warmup)] + [(warmup + i * step, warmup + (i + 1) * step) for i in range(settings.segments)]
    rows = []
    for i, (a, b) in enumerate(bounds):
        last = i == len(bounds) - 1  # calls answered after the stop count in the last segment

        def inside(t: float, a: float = a, b: float = b, last: bool = last) -> bool:
            return a <= t < b or (last and t >= b)

        lat = sorted(ms for t, ms in calls if inside(t))
        window = [s for s in samples if inside(s[0])]
        rows.append([
            f"{a:.0f}–{b:.0f}" + (" (warm-up)" if i == 0 else ""), len(lat) / (b - a) if b > a else 0.0,
            common.percentile(lat, 50), common.percentile(lat, 99),
            sum(inside(t) and c == "RESOURCE_EXHAUSTED" for t, c in failures),
            sum(inside(t) and c != "RESOURCE_EXHAUSTED" for t, c in failures),
            sum(inside(t) for t, *_ in metadata), sum(inside(j["end"]) for j in jobs),
            statistics.median(s[1] for s in window) / 2**20 if window else float("nan"),
            f"{min(s[2] for s in window)}–{max(s[2] for s in window)}" if window else "",
        ])
    return figures, rows


def final_lines(figures: dict[str, float]) -> list[str]:
    """`name: value`, any other figures first, then the required ones in FIGURES order."""
    return common.final_lines(figures, FIGURES)


# -- the run ----------------------------------------------------------------------------------


def soak(server, model: pb.Model, dataset_id: str, requests: dict[str, Path], settings: Settings, say) -> dict:
    """The load of step 3 against a started server; the raw records for `summarise`."""
    clients: list[ClientProcess] = []
    threads: list[threading.Thread] = []
    try:
        t = time.monotonic()
        kinds = list(requests)
        for i in range(settings.clients):
            clients.append(ClientProcess(server.address, requests[kinds[i % len(kinds)]], settings.predict_deadline_s))
        for client in clients:
            client.wait_ready()
        say(f"{settings.clients} Predict client processes connected in {time.monotonic() - t:.1f} s")
        start = time.monotonic() + 0.5
        stop = start + settings.seconds
        for client in clients:
            client.go(start, stop)
        sampler = Sampler(server.proc.pid, start, settings.sample_interval_s)
        metadata = MetadataLoop(server.address, model.name, start, settings.metadata_interval_s)
        finetune = FineTuneLoop(server.address, finetune_request(dataset_id, "soak-finetune", settings, epochs=1),
                                start, settings.seconds, settings.job_gap_s)
        threads = [sampler, metadata, finetune]
        time.sleep(max(0.0, start - time.monotonic()))
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, stop - time.monotonic()))
        sampler.stopping.set()
        metadata.stopping.set()
        finetune.stopping.set()
        results = [client.result() for client in clients]
        t = time.monotonic()
        for thread in threads:
            thread.join(900)
        say(f"load stopped; the last fine-tune job followed to its end in {time.monotonic() - t:.1f} s")
        return {"clients": results, "samples": sampler.samples, "metadata": metadata.calls,
                "metadata_messages": metadata.messages, "jobs": finetune.jobs, "finetune_failure": finetune.failure}
    finally:
        for client in clients:
            client.kill()
        for thread in threads:
            thread.stopping.set()


def machine() -> dict[str, str]:
    import grpc
    import onnxruntime

    return {
        "cpu": common.cpu_name(), "cores": str(os.cpu_count()), "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__, "python": platform.python_version(),
    }


def main(args: argparse.Namespace) -> int:
    import tlserve.client as tlclient

    mode = "test" if args.test else "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    for name in ("clients", "seconds", "max_queue_size"):
        if getattr(args, name):
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    say = print
    say(f"# tlserve soak ({mode}), {datetime.datetime.now().isoformat(timespec='seconds')}")
    say(common.table(["machine", ""], [[k, v] for k, v in machine().items()]))
    say("\nsettings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())
        + f", queue size {settings.queue_size}\n")
    workdir = Path(tempfile.mkdtemp(prefix="tlserve-bench-soak-", dir=args.tmp))
    server = None
    try:
        data_root = workdir / "data"
        data_root.mkdir()
        server = common.start_server(workdir / "home", data_root, "--max-queue-size", str(settings.queue_size))
        t = time.monotonic()
        with tlclient.Client(server.address, timeout=120) as tl:
            model, dataset_id = make_model(tl, settings, data_root)
        say(f"model {model.name}:{model.version} ({settings.backbone} at {settings.image_size} px): fine-tuned and "
            f"exported in {time.monotonic() - t:.0f} s")
        requests = write_requests(workdir, model.name, settings.image_size)
        rss_before, fds_before = read_proc(server.proc.pid)
        raw = soak(server, model, dataset_id, requests, settings, say)
        time.sleep(2 * settings.sample_interval_s)  # the clients' connections closed
        rss_after, fds_after = read_proc(server.proc.pid)
        with tlclient.Client(server.address, timeout=10) as tl:
            health = tl.health()
        exit_code = server.terminate()
        server = None
    except BaseException:
        if server is not None:
            print("server log (tail):\n" + "\n".join(server.log().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    figures, rows = summarise(raw["clients"], raw["samples"], raw["metadata"], raw["jobs"], settings)
    say(f"\n## {settings.clients} Predict clients, fine-tuning and metadata traffic for {settings.seconds:.0f} s "
        f"(warm-up {settings.warmup_s:.0f} s)")
    say(common.table(["seconds", "predict/s", "p50 ms", "p99 ms", "RESOURCE_EXHAUSTED", "errors", "metadata calls",
                      "jobs ended", "server RSS MB (median)", "server fds (min–max)"], rows, digits=1))
    messages = {code: m for c in raw["clients"] for code, m in c["messages"].items()} | raw["metadata_messages"]
    for code, message in messages.items():
        say(f"first {code}: {message}")
    for i, job in enumerate(raw["jobs"], 1):
        say(f"fine-tune job {i}: {job['state']}, from {job['start']:.1f} to {job['end']:.1f} s (queued "
            f"{job['queued']:.1f} s, ran {job['ran']:.1f} s in its worker)" + (f": {job['error']}" if job["error"] else ""))
    failure = raw["finetune_failure"]
    if failure is not None:
        say(f"the fine-tune traffic stopped: {failure!r}")
    say(f"server idle before the load: RSS {rss_before / 2**20:.1f} MB, {fds_before} fds (model not yet loaded "
        f"for prediction); after it: RSS {rss_after / 2**20:.1f} MB, {fds_after} fds; health {health}, "
        f"exit code {exit_code} after SIGTERM\n")
    figures.update({
        "rss_idle_before_mb": rss_before / 2**20, "rss_idle_after_mb": rss_after / 2**20,
        "fds_idle_before": fds_before, "fds_idle_after": fds_after, "server_exit_code": exit_code,
    })
    figures["errors"] += (failure is not None) + (exit_code != 0)
    for line in final_lines(figures):
        say(line)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90 s of load (about 2 min in all on 2 cores)")
    parser.add_argument("--test", action="store_true", help="the test suite's short version: 8 clients, 15 s")
    parser.add_argument("--seconds", type=float, default=0, help="seconds of load, warm-up included (default: per mode)")
    parser.add_argument("--clients", type=int, default=0, help="Predict client processes (default: per mode)")
    parser.add_argument("--max-queue-size", type=int, default=0, help="the server's per-model queue (default: clients / 2)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary home goes (default: the system's)")
    client = parser.add_argument_group("Predict client (internal: one process of the load)")
    client.add_argument("--client", default="", metavar="ADDRESS", help=argparse.SUPPRESS)
    client.add_argument("--request", default="", help=argparse.SUPPRESS)
    client.add_argument("--deadline", type=float, default=10.0, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    sys.exit(client_main(arguments) if arguments.client else main(arguments))
