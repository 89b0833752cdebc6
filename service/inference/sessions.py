"""Sessions: a loaded model that maps one input batch to named outputs.

Two kinds, one interface (`input`, `outputs`, `run(x) -> {"logits", "embedding"?}`,
`close()`), both safe to call from several threads at once:

- `OnnxSession`: an ONNX Runtime InferenceSession on the providers that can run
  here (`hardware.onnxruntime_providers()`: TensorRT → CUDA → CPU), graph
  optimisation ALL, intra-op threads from `inference_threads` (0: ORT's default,
  one per physical core). Inputs and outputs are converted to and from float16 for
  a graph that takes or gives float16. `open_onnx_session` opens one warmed up and
  decides whether its threads keep spinning between runs (below).
- `TorchSession`: a published PyTorch state dict (`backbones.load_published`) for
  models not exported yet; FP32, under `torch.inference_mode`, on the GPU if there is one.

`LanedSession`: a model on the CPU opened twice, `wide` (every intra-op thread, for
a batch alone on the machine) and `narrow` (one thread; its runs go on side by side,
one per core: the batcher's lanes). `open_onnx_session(..., lanes=N)` opens one when
N > 1.

`warm_up(session, max_batch_size)` runs batch 1 and the largest batch once, so the
first requests do not pay for memory arenas, kernel selection or TensorRT engines.

Spinning between runs. ONNX Runtime's intra-op threads spin after a run, waiting
for the next one, before they sleep. For a model whose run is long that saves a
wake-up at the next run for little CPU; for one whose run takes about as long as the
server's own work per request (gRPC, preparation, response: 1-2 ms of Python), the
spinning threads take the cores that work needs, and a server on the CPU serves
fewer images, later. So a CPU session whose batch-1 run is under
`SPIN_MIN_RUN_SECONDS` is reopened with "session.force_spinning_stop" (threads spin
during a run, stop when it returns). Measured on 2 cores, Predict over gRPC
(mobilenet_v3_small at 64 px, 0.6 ms a run): 479 against 354 images/s at concurrency 8
and p50 3.2 against 4.0 ms at concurrency 1, server CPU 2.8 against 4.9 ms per image;
resnet18 at 224 px (28 ms a run) served ~8 % fewer images/s with it, so it keeps spinning.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import hardware
from tlserve.service.variant import Variant

if TYPE_CHECKING:
    from tlserve.service.config import Settings

_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int64)": np.dtype(np.int64),
}

# What a KServe / proto client calls each numpy dtype.
PROTO_DTYPES = {
    np.dtype(np.uint8): pb.DATA_TYPE_UINT8,
    np.dtype(np.float16): pb.DATA_TYPE_FLOAT16,
    np.dtype(np.float32): pb.DATA_TYPE_FLOAT32,
    np.dtype(np.int64): pb.DATA_TYPE_INT64,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A model input or output: name, numpy dtype, shape with -1 for a dynamic axis."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=PROTO_DTYPES.get(self.dtype, 0), shape=self.shape)


class Session(Protocol):
    input: TensorInfo
    outputs: tuple[TensorInfo, ...]
    providers: tuple[str, ...]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _dims(shape: Sequence) -> tuple[int, ...]:
    # ORT gives symbolic or unknown axes as strings or None.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def provider_options(
    providers: Sequence[str], *, input_name: str, sample_shape: Sequence[int], max_batch_size: int,
    fp16: bool, cache_dir: pathlib.Path | None,
) -> list[tuple[str, dict[str, str]]]:
    """Providers with their options: TensorRT gets an optimisation profile over batch
    1 … max_batch_size (its engine is built once per profile, then cached under
    `cache_dir`); CUDA grows its arena only by what is asked (the model cache budgets
    memory) and picks convolution algorithms by heuristics, since an exhaustive search
    would run again for every new batch size."""
    dims = "x".join(str(d) for d in sample_shape)
    out: list[tuple[str, dict[str, str]]] = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            options = {
                "device_id": "0",
                "trt_fp16_enable": "1" if fp16 else "0",
                "trt_profile_min_shapes": f"{input_name}:1x{dims}",
                "trt_profile_opt_shapes": f"{input_name}:{max_batch_size}x{dims}",
                "trt_profile_max_shapes": f"{input_name}:{max_batch_size}x{dims}",
            }
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                options |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache_dir),
                            "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache_dir)}
            out.append((provider, options))
        elif provider == "CUDAExecutionProvider":
            out.append((provider, {
                "device_id": "0",
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": "1",
            }))
        else:
            out.append((provider, {}))
    return out


class OnnxSession:
    def __init__(
        self,
        path: os.PathLike | str,
        *,
        threads: int = 0,
        max_batch_size: int = 32,
        providers: Sequence[str] | None = None,
        fp16: bool = False,
        sample_shape: Sequence[int] = (),
        cache_dir: pathlib.Path | None = None,
        spin_between_runs: bool = True,
    ) -> None:
        """`sample_shape` (the input's shape without the batch axis, e.g. (3, 224, 224))
        and `cache_dir` are for TensorRT's optimisation profile and engine cache;
        `spin_between_runs=False` stops the intra-op threads' spinning when a run ends."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        self.spin_between_runs = spin_between_runs
        if not spin_between_runs:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.log_severity_level = 3  # errors only: no per-node placement warnings in the server log
        providers = tuple(providers if providers is not None else hardware.onnxruntime_providers())
        self._session = ort.InferenceSession(
            str(path), sess_options=options,
            providers=provider_options(providers, input_name="input", sample_shape=sample_shape,
                                       max_batch_size=max_batch_size, fp16=fp16, cache_dir=cache_dir),
        )
        (spec,) = self._session.get_inputs()
        self.input = TensorInfo(spec.name, _ORT_DTYPES.get(spec.type, np.dtype(np.float32)), _dims(spec.shape))
        outputs = self._session.get_outputs()
        self._output_dtypes = [_ORT_DTYPES.get(o.type, np.dtype(np.float32)) for o in outputs]
        # Callers see float32 outputs whatever the graph computes in.
        self.outputs = tuple(
            TensorInfo(o.name, np.dtype(np.float32) if d == np.float16 else d, _dims(o.shape))
            for o, d in zip(outputs, self._output_dtypes)
        )
        self._output_names = [o.name for o in outputs]
        self.providers = tuple(self._session.get_providers())

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if x.dtype != self.input.dtype:
            x = x.astype(self.input.dtype)
        values = self._session.run(self._output_names, {self.input.name: x})
        return {
            name: value.astype(np.float32) if value.dtype == np.float16 else value
            for name, value in zip(self._output_names, values)
        }

    def close(self) -> None:
        self._session = None  # ORT frees the session's memory when the last reference goes


class TorchSession:
    def __init__(self, path: os.PathLike | str, *, backbone: str, num_classes: int, preprocessing: pb.Preprocessing,
                 device: str | None = None) -> None:
        import torch

        from tlserve.service import backbones

        built = backbones.load_published(path, backbone, num_classes, backbones.Preprocessing.from_proto(preprocessing))
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._trunk = built.trunk.to(self._device).eval()
        self._head = built.head.to(self._device).eval()
        s = preprocessing.crop_size
        self.input = TensorInfo("input", np.dtype(np.float32), (-1, 3, s, s))
        self.outputs = (
            TensorInfo("logits", np.dtype(np.float32), (-1, num_classes)),
            TensorInfo("embedding", np.dtype(np.float32), (-1, built.feature_dim)),
        )
        self.providers = (f"pytorch-{self._device.type}",)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not x.flags.writeable:  # torch.from_numpy wants a writable array
            x = x.copy()
        with torch.inference_mode():
            embedding = self._trunk(torch.from_numpy(x).to(self._device))  # (N, D)
            logits = self._head(embedding)  # (N, C)
            return {"logits": logits.float().cpu().numpy(), "embedding": embedding.float().cpu().numpy()}

    def close(self) -> None:
        self._trunk = self._head = None


class LanedSession:
    """One model on the CPU as two ONNX Runtime sessions: `run` on `narrow` (one
    intra-op thread; `lanes` of its runs go on at once, each on its own core) and
    `run_wide` on `wide` (the configured intra-op threads, for a batch alone on the
    machine). Both hold the weights: the model takes more memory than one session
    (a small test model 125 MiB against 91 MiB; up to twice for large weights).
    See "Lanes" in service.inference.batcher for when each runs."""

    def __init__(self, wide: OnnxSession, narrow: OnnxSession, lanes: int) -> None:
        self.wide, self.narrow, self.lanes = wide, narrow, lanes
        self.input, self.outputs, self.providers = wide.input, wide.outputs, wide.providers
        self.spin_between_runs = wide.spin_between_runs

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.narrow.run(x)

    def run_wide(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.wide.run(x)

    def close(self) -> None:
        self.wide.close()
        self.narrow.close()


def runs_on_cpu(providers: Sequence[str]) -> bool:
    """Whether a session runs on the CPU, by its first provider (ONNX Runtime's, or
    "pytorch-<device>"); no providers counts as the CPU."""
    return not providers or providers[0] in ("CPUExecutionProvider", "pytorch-cpu")


def cpu_lanes(settings: Settings) -> int:
    """Lanes for an ONNX model on the CPU: `cpu_lanes`, or with 0 one per intra-op
    thread (`inference_threads`, or with 0 ONNX Runtime's default: the physical cores)."""
    return settings.cpu_lanes or settings.inference_threads or hardware.physical_cores()


def load_runtime(variant: Variant) -> None:
    """Imports the runtime a variant runs on (PyTorch or ONNX Runtime), so that the
    library's own memory (hundreds of MiB for ONNX Runtime's first import) is not
    counted as the first model's."""
    if variant.is_pytorch:
        import torch  # noqa: F401
    else:
        import onnxruntime  # noqa: F401


def sample_input(info: TensorInfo, batch: int, fill_size: int) -> np.ndarray:
    """Zeros of the input's shape with `batch` rows; other dynamic axes get `fill_size`."""
    shape = (batch, *(d if d > 0 else fill_size for d in info.shape[1:]))
    return np.zeros(shape, dtype=info.dtype)


def warm_up(session: Session, max_batch_size: int, fill_size: int) -> None:
    """Runs batch 1 and batch `max_batch_size` once each."""
    for batch in sorted({1, max_batch_size}):
        session.run(sample_input(session.input, batch, fill_size))


# See "Spinning between runs" above.
SPIN_MIN_RUN_SECONDS = 0.010


def batch_one_seconds(session: Session, fill_size: int, runs: int = 3) -> float:
    """The fastest of `runs` batch-1 runs, in seconds."""
    x = sample_input(session.input, 1, fill_size)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(x)
        best = min(best, time.perf_counter() - start)
    return best


def open_onnx_session(
    path: os.PathLike | str, *, warm_batch: int, fill_size: int, lanes: int = 1, **options,
) -> OnnxSession | LanedSession:
    """An OnnxSession (`options` as its constructor takes them) warmed up at batch 1
    and `warm_batch`; on the CPU, one whose batch-1 run is under SPIN_MIN_RUN_SECONDS
    is reopened with spinning stopped between runs (and warmed up again). On the CPU
    with `lanes` > 1, a LanedSession: that session as `wide` and a single-threaded,
    warmed-up one as `narrow`."""
    session = OnnxSession(path, **options)
    warm_up(session, warm_batch, fill_size)
    if session.providers[0] != "CPUExecutionProvider":
        return session
    if batch_one_seconds(session, fill_size) < SPIN_MIN_RUN_SECONDS:
        session.close()
        session = OnnxSession(path, spin_between_runs=False, **options)
        warm_up(session, warm_batch, fill_size)
    if lanes <= 1:
        return session
    narrow = OnnxSession(path, **{**options, "threads": 1})
    warm_up(narrow, warm_batch, fill_size)
    return LanedSession(session, narrow, lanes)
