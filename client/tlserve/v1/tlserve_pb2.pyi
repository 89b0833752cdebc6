import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_AUTO: _ClassVar[Strategy]
    STRATEGY_FEATURE_EXTRACTION: _ClassVar[Strategy]
    STRATEGY_PARTIAL: _ClassVar[Strategy]
    STRATEGY_FULL: _ClassVar[Strategy]
    STRATEGY_PROGRESSIVE_UNFREEZING: _ClassVar[Strategy]
    STRATEGY_PROTOTYPE: _ClassVar[Strategy]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]

class Runtime(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_UNSPECIFIED: _ClassVar[Runtime]
    RUNTIME_ONNX: _ClassVar[Runtime]
    RUNTIME_PYTORCH: _ClassVar[Runtime]

class InputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_FORMAT_UNSPECIFIED: _ClassVar[InputFormat]
    INPUT_FORMAT_FLOAT_NCHW: _ClassVar[InputFormat]
    INPUT_FORMAT_UINT8_NHWC: _ClassVar[InputFormat]

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]

class Split(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_UNSPECIFIED: _ClassVar[Split]
    SPLIT_TRAIN: _ClassVar[Split]
    SPLIT_VAL: _ClassVar[Split]
    SPLIT_TEST: _ClassVar[Split]

class ArchiveFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARCHIVE_FORMAT_UNSPECIFIED: _ClassVar[ArchiveFormat]
    ARCHIVE_FORMAT_ZIP: _ClassVar[ArchiveFormat]
    ARCHIVE_FORMAT_TAR: _ClassVar[ArchiveFormat]
    ARCHIVE_FORMAT_TAR_GZ: _ClassVar[ArchiveFormat]

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_SGD: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW: _ClassVar[Optimizer]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]
    LR_SCHEDULE_ONE_CYCLE: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]

class MixedPrecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXED_PRECISION_UNSPECIFIED: _ClassVar[MixedPrecision]
    MIXED_PRECISION_OFF: _ClassVar[MixedPrecision]
    MIXED_PRECISION_FP16: _ClassVar[MixedPrecision]
    MIXED_PRECISION_BF16: _ClassVar[MixedPrecision]

class StopMetric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_METRIC_UNSPECIFIED: _ClassVar[StopMetric]
    STOP_METRIC_VAL_ACCURACY: _ClassVar[StopMetric]
    STOP_METRIC_VAL_LOSS: _ClassVar[StopMetric]

class BatchNormStatistics(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCHNORM_STATISTICS_UNSPECIFIED: _ClassVar[BatchNormStatistics]
    BATCHNORM_STATISTICS_UPDATE: _ClassVar[BatchNormStatistics]
    BATCHNORM_STATISTICS_FROZEN: _ClassVar[BatchNormStatistics]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class JobPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_PHASE_UNSPECIFIED: _ClassVar[JobPhase]
    JOB_PHASE_PREPARING: _ClassVar[JobPhase]
    JOB_PHASE_CACHING_FEATURES: _ClassVar[JobPhase]
    JOB_PHASE_TRAINING: _ClassVar[JobPhase]
    JOB_PHASE_EVALUATING: _ClassVar[JobPhase]
    JOB_PHASE_PUBLISHING: _ClassVar[JobPhase]

class ValidationProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALIDATION_PROTOCOL_UNSPECIFIED: _ClassVar[ValidationProtocol]
    VALIDATION_PROTOCOL_HOLDOUT: _ClassVar[ValidationProtocol]
    VALIDATION_PROTOCOL_FIXED_EPOCHS: _ClassVar[ValidationProtocol]

class ArtifactFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_FORMAT_UNSPECIFIED: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_ONNX: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_PYTORCH: _ClassVar[ArtifactFormat]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_AUTO: Strategy
STRATEGY_FEATURE_EXTRACTION: Strategy
STRATEGY_PARTIAL: Strategy
STRATEGY_FULL: Strategy
STRATEGY_PROGRESSIVE_UNFREEZING: Strategy
STRATEGY_PROTOTYPE: Strategy
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_FP16: Precision
PRECISION_INT8: Precision
RUNTIME_UNSPECIFIED: Runtime
RUNTIME_ONNX: Runtime
RUNTIME_PYTORCH: Runtime
INPUT_FORMAT_UNSPECIFIED: InputFormat
INPUT_FORMAT_FLOAT_NCHW: InputFormat
INPUT_FORMAT_UINT8_NHWC: InputFormat
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_INT64: DataType
SPLIT_UNSPECIFIED: Split
SPLIT_TRAIN: Split
SPLIT_VAL: Split
SPLIT_TEST: Split
ARCHIVE_FORMAT_UNSPECIFIED: ArchiveFormat
ARCHIVE_FORMAT_ZIP: ArchiveFormat
ARCHIVE_FORMAT_TAR: ArchiveFormat
ARCHIVE_FORMAT_TAR_GZ: ArchiveFormat
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_SGD: Optimizer
OPTIMIZER_ADAMW: Optimizer
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
LR_SCHEDULE_ONE_CYCLE: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
MIXED_PRECISION_UNSPECIFIED: MixedPrecision
MIXED_PRECISION_OFF: MixedPrecision
MIXED_PRECISION_FP16: MixedPrecision
MIXED_PRECISION_BF16: MixedPrecision
STOP_METRIC_UNSPECIFIED: StopMetric
STOP_METRIC_VAL_ACCURACY: StopMetric
STOP_METRIC_VAL_LOSS: StopMetric
BATCHNORM_STATISTICS_UNSPECIFIED: BatchNormStatistics
BATCHNORM_STATISTICS_UPDATE: BatchNormStatistics
BATCHNORM_STATISTICS_FROZEN: BatchNormStatistics
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_PHASE_UNSPECIFIED: JobPhase
JOB_PHASE_PREPARING: JobPhase
JOB_PHASE_CACHING_FEATURES: JobPhase
JOB_PHASE_TRAINING: JobPhase
JOB_PHASE_EVALUATING: JobPhase
JOB_PHASE_PUBLISHING: JobPhase
VALIDATION_PROTOCOL_UNSPECIFIED: ValidationProtocol
VALIDATION_PROTOCOL_HOLDOUT: ValidationProtocol
VALIDATION_PROTOCOL_FIXED_EPOCHS: ValidationProtocol
ARTIFACT_FORMAT_UNSPECIFIED: ArtifactFormat
ARTIFACT_FORMAT_ONNX: ArtifactFormat
ARTIFACT_FORMAT_PYTORCH: ArtifactFormat

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("resize_size", "crop_size", "mean", "std", "interpolation")
    RESIZE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    resize_size: int
    crop_size: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    interpolation: str
    def __init__(self, resize_size: _Optional[int] = ..., crop_size: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., interpolation: _Optional[str] = ...) -> None: ...

class ClassMetrics(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("top1_accuracy", "top5_accuracy", "loss", "image_count", "per_class", "confusion_matrix")
    TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP5_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    top1_accuracy: float
    top5_accuracy: float
    loss: float
    image_count: int
    per_class: _containers.RepeatedCompositeFieldContainer[ClassMetrics]
    confusion_matrix: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, top1_accuracy: _Optional[float] = ..., top5_accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., image_count: _Optional[int] = ..., per_class: _Optional[_Iterable[_Union[ClassMetrics, _Mapping]]] = ..., confusion_matrix: _Optional[_Iterable[int]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "description", "memory_total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    memory_total_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "torch_version", "torchvision_version", "onnxruntime_version", "devices", "onnxruntime_providers", "max_receive_message_bytes", "start_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCHVISION_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    version: str
    torch_version: str
    torchvision_version: str
    onnxruntime_version: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    onnxruntime_providers: _containers.RepeatedScalarFieldContainer[str]
    max_receive_message_bytes: int
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[str] = ..., torch_version: _Optional[str] = ..., torchvision_version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., onnxruntime_providers: _Optional[_Iterable[str]] = ..., max_receive_message_bytes: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ("family", "cached_only")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CACHED_ONLY_FIELD_NUMBER: _ClassVar[int]
    family: str
    cached_only: bool
    def __init__(self, family: _Optional[str] = ..., cached_only: _Optional[bool] = ...) -> None: ...

class BackboneWeights(_message.Message):
    __slots__ = ("name", "is_default", "imagenet_top1_accuracy", "imagenet_top5_accuracy", "parameter_count", "gflops", "file_size_bytes", "cached", "file_name", "preprocessing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    IMAGENET_TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    IMAGENET_TOP5_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    imagenet_top1_accuracy: float
    imagenet_top5_accuracy: float
    parameter_count: int
    gflops: float
    file_size_bytes: int
    cached: bool
    file_name: str
    preprocessing: Preprocessing
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., imagenet_top1_accuracy: _Optional[float] = ..., imagenet_top5_accuracy: _Optional[float] = ..., parameter_count: _Optional[int] = ..., gflops: _Optional[float] = ..., file_size_bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., file_name: _Optional[str] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ...) -> None: ...

class Backbone(_message.Message):
    __slots__ = ("name", "family", "input_size", "parameter_count", "gflops", "imagenet_top1_accuracy", "imagenet_top5_accuracy", "file_size_bytes", "cached", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    IMAGENET_TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    IMAGENET_TOP5_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    input_size: int
    parameter_count: int
    gflops: float
    imagenet_top1_accuracy: float
    imagenet_top5_accuracy: float
    file_size_bytes: int
    cached: bool
    weights: _containers.RepeatedCompositeFieldContainer[BackboneWeights]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., input_size: _Optional[int] = ..., parameter_count: _Optional[int] = ..., gflops: _Optional[float] = ..., imagenet_top1_accuracy: _Optional[float] = ..., imagenet_top5_accuracy: _Optional[float] = ..., file_size_bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., weights: _Optional[_Iterable[_Union[BackboneWeights, _Mapping]]] = ...) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones", "weights_cache_dir")
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[Backbone]
    weights_cache_dir: str
    def __init__(self, backbones: _Optional[_Iterable[_Union[Backbone, _Mapping]]] = ..., weights_cache_dir: _Optional[str] = ...) -> None: ...

class SplitOptions(_message.Message):
    __slots__ = ("val_fraction", "test_fraction", "seed")
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    val_fraction: float
    test_fraction: float
    seed: int
    def __init__(self, val_fraction: _Optional[float] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class UploadDatasetMetadata(_message.Message):
    __slots__ = ("name", "format", "size_bytes", "sha256", "split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: ArchiveFormat
    size_bytes: int
    sha256: str
    split: SplitOptions
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[ArchiveFormat, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., split: _Optional[_Union[SplitOptions, _Mapping]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadDatasetMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadDatasetMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterDatasetRequest(_message.Message):
    __slots__ = ("name", "path", "split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    split: SplitOptions
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., split: _Optional[_Union[SplitOptions, _Mapping]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitSummary(_message.Message):
    __slots__ = ("split", "image_count", "class_counts")
    class ClassCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    split: Split
    image_count: int
    class_counts: _containers.ScalarMap[str, int]
    def __init__(self, split: _Optional[_Union[Split, str]] = ..., image_count: _Optional[int] = ..., class_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ImageSizeStats(_message.Message):
    __slots__ = ("min_width", "max_width", "min_height", "max_height", "median_width", "median_height")
    MIN_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MIN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    median_width: int
    median_height: int
    def __init__(self, min_width: _Optional[int] = ..., max_width: _Optional[int] = ..., min_height: _Optional[int] = ..., max_height: _Optional[int] = ..., median_width: _Optional[int] = ..., median_height: _Optional[int] = ...) -> None: ...

class DatasetWarning(_message.Message):
    __slots__ = ("kind", "path", "other_path", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DatasetWarning.Kind]
        KIND_CORRUPT: _ClassVar[DatasetWarning.Kind]
        KIND_DUPLICATE: _ClassVar[DatasetWarning.Kind]
        KIND_LEAKAGE: _ClassVar[DatasetWarning.Kind]
        KIND_IGNORED: _ClassVar[DatasetWarning.Kind]
    KIND_UNSPECIFIED: DatasetWarning.Kind
    KIND_CORRUPT: DatasetWarning.Kind
    KIND_DUPLICATE: DatasetWarning.Kind
    KIND_LEAKAGE: DatasetWarning.Kind
    KIND_IGNORED: DatasetWarning.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OTHER_PATH_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: DatasetWarning.Kind
    path: str
    other_path: str
    detail: str
    def __init__(self, kind: _Optional[_Union[DatasetWarning.Kind, str]] = ..., path: _Optional[str] = ..., other_path: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "name", "create_time", "class_names", "splits", "generated_splits", "image_count", "size_bytes", "image_sizes", "warnings", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_SPLITS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    create_time: _timestamp_pb2.Timestamp
    class_names: _containers.RepeatedScalarFieldContainer[str]
    splits: _containers.RepeatedCompositeFieldContainer[SplitSummary]
    generated_splits: bool
    image_count: int
    size_bytes: int
    image_sizes: ImageSizeStats
    warnings: _containers.RepeatedCompositeFieldContainer[DatasetWarning]
    source: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., splits: _Optional[_Iterable[_Union[SplitSummary, _Mapping]]] = ..., generated_splits: _Optional[bool] = ..., image_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., image_sizes: _Optional[_Union[ImageSizeStats, _Mapping]] = ..., warnings: _Optional[_Iterable[_Union[DatasetWarning, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class WeightsSource(_message.Message):
    __slots__ = ("torchvision", "scratch", "file", "model")
    class Scratch(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    TORCHVISION_FIELD_NUMBER: _ClassVar[int]
    SCRATCH_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    torchvision: str
    scratch: WeightsSource.Scratch
    file: str
    model: ModelRef
    def __init__(self, torchvision: _Optional[str] = ..., scratch: _Optional[_Union[WeightsSource.Scratch, _Mapping]] = ..., file: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class EarlyStopping(_message.Message):
    __slots__ = ("metric", "patience", "min_delta")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    metric: StopMetric
    patience: int
    min_delta: float
    def __init__(self, metric: _Optional[_Union[StopMetric, str]] = ..., patience: _Optional[int] = ..., min_delta: _Optional[float] = ...) -> None: ...

class TrainingOptions(_message.Message):
    __slots__ = ("epochs", "batch_size", "optimizer", "learning_rate", "layer_lr_decay", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "head_dropout", "grad_clip_norm", "early_stopping", "cache_features", "cached_views", "mixed_precision", "epochs_per_phase", "batchnorm_statistics", "min_steps_per_epoch")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LAYER_LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    HEAD_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    CACHE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CACHED_VIEWS_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_PER_PHASE_FIELD_NUMBER: _ClassVar[int]
    BATCHNORM_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    optimizer: Optimizer
    learning_rate: float
    layer_lr_decay: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: LrSchedule
    warmup_epochs: float
    label_smoothing: float
    head_dropout: float
    grad_clip_norm: float
    early_stopping: EarlyStopping
    cache_features: bool
    cached_views: int
    mixed_precision: MixedPrecision
    epochs_per_phase: int
    batchnorm_statistics: BatchNormStatistics
    min_steps_per_epoch: int
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., learning_rate: _Optional[float] = ..., layer_lr_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[_Union[LrSchedule, str]] = ..., warmup_epochs: _Optional[float] = ..., label_smoothing: _Optional[float] = ..., head_dropout: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ..., early_stopping: _Optional[_Union[EarlyStopping, _Mapping]] = ..., cache_features: _Optional[bool] = ..., cached_views: _Optional[int] = ..., mixed_precision: _Optional[_Union[MixedPrecision, str]] = ..., epochs_per_phase: _Optional[int] = ..., batchnorm_statistics: _Optional[_Union[BatchNormStatistics, str]] = ..., min_steps_per_epoch: _Optional[int] = ...) -> None: ...

class AugmentationOptions(_message.Message):
    __slots__ = ("enabled", "random_crop_min_scale", "horizontal_flip", "rotation_degrees", "color_jitter")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    RANDOM_CROP_MIN_SCALE_FIELD_NUMBER: _ClassVar[int]
    HORIZONTAL_FLIP_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DEGREES_FIELD_NUMBER: _ClassVar[int]
    COLOR_JITTER_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    random_crop_min_scale: float
    horizontal_flip: bool
    rotation_degrees: float
    color_jitter: float
    def __init__(self, enabled: _Optional[bool] = ..., random_crop_min_scale: _Optional[float] = ..., horizontal_flip: _Optional[bool] = ..., rotation_degrees: _Optional[float] = ..., color_jitter: _Optional[float] = ...) -> None: ...

class FineTuneRequest(_message.Message):
    __slots__ = ("dataset", "model_name", "backbone", "weights", "strategy", "trainable_groups", "training", "augmentation", "devices", "seed", "image_size", "idempotency_key", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    model_name: str
    backbone: str
    weights: WeightsSource
    strategy: Strategy
    trainable_groups: int
    training: TrainingOptions
    augmentation: AugmentationOptions
    devices: int
    seed: int
    image_size: int
    idempotency_key: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, dataset: _Optional[str] = ..., model_name: _Optional[str] = ..., backbone: _Optional[str] = ..., weights: _Optional[_Union[WeightsSource, _Mapping]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., trainable_groups: _Optional[int] = ..., training: _Optional[_Union[TrainingOptions, _Mapping]] = ..., augmentation: _Optional[_Union[AugmentationOptions, _Mapping]] = ..., devices: _Optional[int] = ..., seed: _Optional[int] = ..., image_size: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StrategyDecision(_message.Message):
    __slots__ = ("strategy", "reason", "images_per_class", "probe_accuracy", "chance_accuracy", "trainable_groups", "validation_protocol", "validation_reason")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROBE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CHANCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_REASON_FIELD_NUMBER: _ClassVar[int]
    strategy: Strategy
    reason: str
    images_per_class: float
    probe_accuracy: float
    chance_accuracy: float
    trainable_groups: int
    validation_protocol: ValidationProtocol
    validation_reason: str
    def __init__(self, strategy: _Optional[_Union[Strategy, str]] = ..., reason: _Optional[str] = ..., images_per_class: _Optional[float] = ..., probe_accuracy: _Optional[float] = ..., chance_accuracy: _Optional[float] = ..., trainable_groups: _Optional[int] = ..., validation_protocol: _Optional[_Union[ValidationProtocol, str]] = ..., validation_reason: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "time", "state", "phase", "epoch", "total_epochs", "step", "total_steps", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second", "unfrozen_groups", "eta", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UNFROZEN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    state: JobState
    phase: JobPhase
    epoch: int
    total_epochs: int
    step: int
    total_steps: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    images_per_second: float
    unfrozen_groups: _containers.RepeatedScalarFieldContainer[str]
    eta: _duration_pb2.Duration
    message: str
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., phase: _Optional[_Union[JobPhase, str]] = ..., epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_accuracy: _Optional[float] = ..., learning_rate: _Optional[float] = ..., images_per_second: _Optional[float] = ..., unfrozen_groups: _Optional[_Iterable[str]] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "request", "create_time", "start_time", "end_time", "progress", "error", "model", "decision", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    request: FineTuneRequest
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    progress: JobEvent
    error: str
    model: ModelRef
    decision: StrategyDecision
    attempts: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[FineTuneRequest, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[_Union[JobEvent, _Mapping]] = ..., error: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., decision: _Optional[_Union[StrategyDecision, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("dataset_id", "backbone", "weights", "strategy", "hyperparameters", "parent")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    backbone: str
    weights: WeightsSource
    strategy: Strategy
    hyperparameters: FineTuneRequest
    parent: ModelRef
    def __init__(self, dataset_id: _Optional[str] = ..., backbone: _Optional[str] = ..., weights: _Optional[_Union[WeightsSource, _Mapping]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., hyperparameters: _Optional[_Union[FineTuneRequest, _Mapping]] = ..., parent: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ParityReport(_message.Message):
    __slots__ = ("images_compared", "max_abs_logit_diff", "top1_agreement")
    IMAGES_COMPARED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_LOGIT_DIFF_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    images_compared: int
    max_abs_logit_diff: float
    top1_agreement: float
    def __init__(self, images_compared: _Optional[int] = ..., max_abs_logit_diff: _Optional[float] = ..., top1_agreement: _Optional[float] = ...) -> None: ...

class ModelArtifact(_message.Message):
    __slots__ = ("model", "format", "precision", "input_format", "size_bytes", "sha256", "opset", "inputs", "outputs", "has_embedding", "parity", "test_top1_accuracy", "accuracy_delta_points", "create_time", "class_names", "preprocessing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    TEST_TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DELTA_POINTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    format: ArtifactFormat
    precision: Precision
    input_format: InputFormat
    size_bytes: int
    sha256: str
    opset: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    has_embedding: bool
    parity: ParityReport
    test_top1_accuracy: float
    accuracy_delta_points: float
    create_time: _timestamp_pb2.Timestamp
    class_names: _containers.RepeatedScalarFieldContainer[str]
    preprocessing: Preprocessing
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., format: _Optional[_Union[ArtifactFormat, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., input_format: _Optional[_Union[InputFormat, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., opset: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., has_embedding: _Optional[bool] = ..., parity: _Optional[_Union[ParityReport, _Mapping]] = ..., test_top1_accuracy: _Optional[float] = ..., accuracy_delta_points: _Optional[float] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "create_time", "backbone", "class_names", "preprocessing", "lineage", "job_id", "val_metrics", "test_metrics", "decision", "parameter_count", "gflops", "artifacts", "labels", "profile")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    create_time: _timestamp_pb2.Timestamp
    backbone: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    preprocessing: Preprocessing
    lineage: Lineage
    job_id: str
    val_metrics: EvaluationReport
    test_metrics: EvaluationReport
    decision: StrategyDecision
    parameter_count: int
    gflops: float
    artifacts: _containers.RepeatedCompositeFieldContainer[ModelArtifact]
    labels: _containers.ScalarMap[str, str]
    profile: ModelProfile
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backbone: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., job_id: _Optional[str] = ..., val_metrics: _Optional[_Union[EvaluationReport, _Mapping]] = ..., test_metrics: _Optional[_Union[EvaluationReport, _Mapping]] = ..., decision: _Optional[_Union[StrategyDecision, _Mapping]] = ..., parameter_count: _Optional[int] = ..., gflops: _Optional[float] = ..., artifacts: _Optional[_Iterable[_Union[ModelArtifact, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., profile: _Optional[_Union[ModelProfile, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name", "latest_only", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    latest_only: bool
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., latest_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model", "all_versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    all_versions: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., all_versions: _Optional[bool] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[ModelRef]
    def __init__(self, deleted: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ...) -> None: ...

class CalibrationOptions(_message.Message):
    __slots__ = ("image_count", "method", "per_channel", "reduce_range")
    class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        METHOD_UNSPECIFIED: _ClassVar[CalibrationOptions.Method]
        METHOD_MINMAX: _ClassVar[CalibrationOptions.Method]
        METHOD_ENTROPY: _ClassVar[CalibrationOptions.Method]
        METHOD_PERCENTILE: _ClassVar[CalibrationOptions.Method]
    METHOD_UNSPECIFIED: CalibrationOptions.Method
    METHOD_MINMAX: CalibrationOptions.Method
    METHOD_ENTROPY: CalibrationOptions.Method
    METHOD_PERCENTILE: CalibrationOptions.Method
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    REDUCE_RANGE_FIELD_NUMBER: _ClassVar[int]
    image_count: int
    method: CalibrationOptions.Method
    per_channel: bool
    reduce_range: bool
    def __init__(self, image_count: _Optional[int] = ..., method: _Optional[_Union[CalibrationOptions.Method, str]] = ..., per_channel: _Optional[bool] = ..., reduce_range: _Optional[bool] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("model", "precision", "input_format", "include_embedding", "opset", "max_accuracy_drop_points", "calibration")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_POINTS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    precision: Precision
    input_format: InputFormat
    include_embedding: bool
    opset: int
    max_accuracy_drop_points: float
    calibration: CalibrationOptions
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., precision: _Optional[_Union[Precision, str]] = ..., input_format: _Optional[_Union[InputFormat, str]] = ..., include_embedding: _Optional[bool] = ..., opset: _Optional[int] = ..., max_accuracy_drop_points: _Optional[float] = ..., calibration: _Optional[_Union[CalibrationOptions, _Mapping]] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("model", "format", "precision", "input_format", "chunk_size_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    format: ArtifactFormat
    precision: Precision
    input_format: InputFormat
    chunk_size_bytes: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., format: _Optional[_Union[ArtifactFormat, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., input_format: _Optional[_Union[InputFormat, str]] = ..., chunk_size_bytes: _Optional[int] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("artifact", "chunk")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    artifact: ModelArtifact
    chunk: bytes
    def __init__(self, artifact: _Optional[_Union[ModelArtifact, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("runtime", "precision")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    runtime: Runtime
    precision: Precision
    def __init__(self, runtime: _Optional[_Union[Runtime, str]] = ..., precision: _Optional[_Union[Precision, str]] = ...) -> None: ...

class ProfileModelRequest(_message.Message):
    __slots__ = ("model", "variants", "batch_size", "iterations", "measure_accuracy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MEASURE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    batch_size: int
    iterations: int
    measure_accuracy: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., batch_size: _Optional[int] = ..., iterations: _Optional[int] = ..., measure_accuracy: _Optional[bool] = ...) -> None: ...

class VariantProfile(_message.Message):
    __slots__ = ("variant", "latency_p50_seconds", "latency_p95_seconds", "latency_p99_seconds", "batch_size", "throughput_images_per_second", "peak_memory_bytes", "size_bytes", "parameter_count", "gflops", "test_top1_accuracy", "device", "time", "iterations", "load_seconds", "accuracy_measured", "test_image_count")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    TEST_TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_MEASURED_FIELD_NUMBER: _ClassVar[int]
    TEST_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    variant: Variant
    latency_p50_seconds: float
    latency_p95_seconds: float
    latency_p99_seconds: float
    batch_size: int
    throughput_images_per_second: float
    peak_memory_bytes: int
    size_bytes: int
    parameter_count: int
    gflops: float
    test_top1_accuracy: float
    device: str
    time: _timestamp_pb2.Timestamp
    iterations: int
    load_seconds: float
    accuracy_measured: bool
    test_image_count: int
    def __init__(self, variant: _Optional[_Union[Variant, _Mapping]] = ..., latency_p50_seconds: _Optional[float] = ..., latency_p95_seconds: _Optional[float] = ..., latency_p99_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., throughput_images_per_second: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ..., parameter_count: _Optional[int] = ..., gflops: _Optional[float] = ..., test_top1_accuracy: _Optional[float] = ..., device: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., iterations: _Optional[int] = ..., load_seconds: _Optional[float] = ..., accuracy_measured: _Optional[bool] = ..., test_image_count: _Optional[int] = ...) -> None: ...

class ModelProfile(_message.Message):
    __slots__ = ("model", "time", "variants")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    time: _timestamp_pb2.Timestamp
    variants: _containers.RepeatedCompositeFieldContainer[VariantProfile]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., variants: _Optional[_Iterable[_Union[VariantProfile, _Mapping]]] = ...) -> None: ...

class CompareBackbonesRequest(_message.Message):
    __slots__ = ("dataset", "backbones", "max_images_per_class", "weights", "image_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    backbones: _containers.RepeatedScalarFieldContainer[str]
    max_images_per_class: int
    weights: str
    image_size: int
    def __init__(self, dataset: _Optional[str] = ..., backbones: _Optional[_Iterable[str]] = ..., max_images_per_class: _Optional[int] = ..., weights: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class BackboneComparison(_message.Message):
    __slots__ = ("backbone", "probe_accuracy", "latency_p50_seconds", "parameter_count", "gflops", "file_size_bytes", "weights", "image_size", "feature_dim", "feature_seconds", "device")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    PROBE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    probe_accuracy: float
    latency_p50_seconds: float
    parameter_count: int
    gflops: float
    file_size_bytes: int
    weights: str
    image_size: int
    feature_dim: int
    feature_seconds: float
    device: str
    def __init__(self, backbone: _Optional[str] = ..., probe_accuracy: _Optional[float] = ..., latency_p50_seconds: _Optional[float] = ..., parameter_count: _Optional[int] = ..., gflops: _Optional[float] = ..., file_size_bytes: _Optional[int] = ..., weights: _Optional[str] = ..., image_size: _Optional[int] = ..., feature_dim: _Optional[int] = ..., feature_seconds: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...

class CompareBackbonesResponse(_message.Message):
    __slots__ = ("results", "dataset_id", "class_count", "chance_accuracy", "train_image_count", "val_image_count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHANCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VAL_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BackboneComparison]
    dataset_id: str
    class_count: int
    chance_accuracy: float
    train_image_count: int
    val_image_count: int
    def __init__(self, results: _Optional[_Iterable[_Union[BackboneComparison, _Mapping]]] = ..., dataset_id: _Optional[str] = ..., class_count: _Optional[int] = ..., chance_accuracy: _Optional[float] = ..., train_image_count: _Optional[int] = ..., val_image_count: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "runtime", "precision", "images", "top_k", "return_logits", "return_embeddings", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    runtime: Runtime
    precision: Precision
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    top_k: int
    return_logits: bool
    return_embeddings: bool
    request_id: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., runtime: _Optional[_Union[Runtime, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., top_k: _Optional[int] = ..., return_logits: _Optional[bool] = ..., return_embeddings: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top_k", "logits", "embedding")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    logits: _containers.RepeatedScalarFieldContainer[float]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., logits: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "runtime", "precision", "predictions", "request_id", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    runtime: Runtime
    precision: Precision
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    request_id: str
    error: PredictError
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., runtime: _Optional[_Union[Runtime, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[PredictError, _Mapping]] = ...) -> None: ...
