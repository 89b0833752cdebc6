"""What runs a model version, at what precision, on what input: `Variant`.

A model version has one artifact per variant: the PyTorch state dict its job
published, and the ONNX graphs ExportModel made (each a precision and an input
layout). The variant is the artifact's key in the store (`key`, the `variant`
column of the artifacts and profiles tables), the `variant` label of the
Prometheus metrics, the suffix of a KServe model name and the file name under
the version's directory (`file_name`); everything else holds a `Variant`.

    Variant.PYTORCH.key                                  # "pytorch"
    v = Variant.onnx("int8", "uint8_nhwc")
    v.key, v.file_name                                   # "onnx-int8-uint8_nhwc", "model-int8-uint8_nhwc.onnx"
    Variant.parse("onnx-int8-uint8_nhwc") == v           # True
    Variant.of_artifact(artifact)                        # from a pb.ModelArtifact
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

RUNTIMES = ("pytorch", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")  # also their sort order
# Input layouts of ONNX graphs, in the order a request that names none is served:
# the float NCHW graph, else the uint8 NHWC one.
LAYOUTS = ("float_nchw", "uint8_nhwc")

PRECISION_OF: dict[int, str] = {
    pb.PRECISION_UNSPECIFIED: "fp32", pb.PRECISION_FP32: "fp32", pb.PRECISION_FP16: "fp16", pb.PRECISION_INT8: "int8",
}
LAYOUT_OF: dict[int, str] = {
    pb.INPUT_FORMAT_UNSPECIFIED: "float_nchw", pb.INPUT_FORMAT_FLOAT_NCHW: "float_nchw",
    pb.INPUT_FORMAT_UINT8_NHWC: "uint8_nhwc",
}
_PRECISION_ENUM = {"fp32": pb.PRECISION_FP32, "fp16": pb.PRECISION_FP16, "int8": pb.PRECISION_INT8}
_LAYOUT_ENUM = {"float_nchw": pb.INPUT_FORMAT_FLOAT_NCHW, "uint8_nhwc": pb.INPUT_FORMAT_UINT8_NHWC}


@dataclasses.dataclass(frozen=True)
class Variant:
    runtime: str  # "pytorch" or "onnx"
    precision: str = "fp32"  # "fp32", "fp16" or "int8"; PyTorch runs fp32
    layout: str = "float_nchw"  # "float_nchw" or "uint8_nhwc"; PyTorch takes float NCHW

    PYTORCH: ClassVar[Variant]

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.runtime == "pytorch" and (self.precision, self.layout) != ("fp32", "float_nchw"):
            raise ValueError("the PyTorch variant is fp32 on float NCHW input")

    @classmethod
    def onnx(cls, precision: str, layout: str = "float_nchw") -> Variant:
        return cls("onnx", precision, layout)

    @classmethod
    def parse(cls, key: str) -> Variant:
        """The variant of a key: "pytorch" or "onnx-<precision>-<layout>"; ValueError otherwise."""
        if key == "pytorch":
            return cls.PYTORCH
        runtime, _, rest = key.partition("-")
        precision, _, layout = rest.partition("-")
        if runtime != "onnx" or not precision or not layout:
            raise ValueError(f"a variant is 'pytorch' or 'onnx-<precision>-<layout>', not {key!r}")
        return cls.onnx(precision, layout)

    @classmethod
    def of_artifact(cls, artifact: pb.ModelArtifact) -> Variant:
        if artifact.format == pb.ARTIFACT_FORMAT_PYTORCH:
            return cls.PYTORCH
        return cls.onnx(PRECISION_OF[artifact.precision], LAYOUT_OF[artifact.input_format])

    @property
    def is_pytorch(self) -> bool:
        return self.runtime == "pytorch"

    @property
    def uint8_nhwc(self) -> bool:
        return self.layout == "uint8_nhwc"

    @property
    def key(self) -> str:
        return "pytorch" if self.is_pytorch else f"onnx-{self.precision}-{self.layout}"

    @property
    def file_name(self) -> str:
        """The artifact's file in its model version's directory."""
        return "model.pt" if self.is_pytorch else f"model-{self.precision}-{self.layout}.onnx"

    @property
    def precision_enum(self) -> int:
        return _PRECISION_ENUM[self.precision]

    @property
    def input_format(self) -> int:
        return _LAYOUT_ENUM[self.layout]

    def sort_key(self) -> tuple[int, int, int]:
        """PyTorch first, then ONNX fp32, fp16, int8, the float graph before the uint8 one."""
        return (RUNTIMES.index(self.runtime), PRECISIONS.index(self.precision), LAYOUTS.index(self.layout))

    def to_proto(self) -> pb.Variant:
        """The API's Variant (runtime and precision; the API's has no layout)."""
        runtime = pb.RUNTIME_PYTORCH if self.is_pytorch else pb.RUNTIME_ONNX
        return pb.Variant(runtime=runtime, precision=self.precision_enum)

    def __str__(self) -> str:
        return self.key


Variant.PYTORCH = Variant("pytorch")
