import datetime

from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("model", "pretrained", "activation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    pretrained: str
    activation: str
    def __init__(self, model: _Optional[str] = ..., pretrained: _Optional[str] = ..., activation: _Optional[str] = ...) -> None: ...

class ImageSource(_message.Message):
    __slots__ = ("images", "n_images")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: str
    n_images: int
    def __init__(self, images: _Optional[str] = ..., n_images: _Optional[int] = ...) -> None: ...

class ValidationData(_message.Message):
    __slots__ = ("data", "classnames", "templates", "bias_data", "queries", "skew_k", "desired", "bias_protocol", "bias_split_by", "retrieval_data", "frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLASSNAMES_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    BIAS_DATA_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SKEW_K_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    BIAS_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BIAS_SPLIT_BY_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_DATA_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: str
    classnames: str
    templates: str
    bias_data: str
    queries: str
    skew_k: int
    desired: str
    bias_protocol: str
    bias_split_by: str
    retrieval_data: str
    frames: int
    def __init__(self, data: _Optional[str] = ..., classnames: _Optional[str] = ..., templates: _Optional[str] = ..., bias_data: _Optional[str] = ..., queries: _Optional[str] = ..., skew_k: _Optional[int] = ..., desired: _Optional[str] = ..., bias_protocol: _Optional[str] = ..., bias_split_by: _Optional[str] = ..., retrieval_data: _Optional[str] = ..., frames: _Optional[int] = ...) -> None: ...

class RankHeadsRequest(_message.Message):
    __slots__ = ("model", "images", "texts", "taxonomy", "judge", "layers", "m", "span_rank", "batch_size", "no_cache", "out", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SPAN_RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    images: ImageSource
    texts: str
    taxonomy: str
    judge: str
    layers: str
    m: int
    span_rank: int
    batch_size: int
    no_cache: bool
    out: str
    force: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Union[ImageSource, _Mapping]] = ..., texts: _Optional[str] = ..., taxonomy: _Optional[str] = ..., judge: _Optional[str] = ..., layers: _Optional[str] = ..., m: _Optional[int] = ..., span_rank: _Optional[int] = ..., batch_size: _Optional[int] = ..., no_cache: bool = ..., out: _Optional[str] = ..., force: bool = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("model", "ranking", "policy", "k", "heads", "concept", "min_ccs", "seed", "seeds", "mode", "tower", "max_acc_drop", "max_skew", "min_acc", "export_anyway", "export_format", "labels", "atol", "images", "texts", "judge", "layers", "validation", "out", "force", "max_recall_drop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    MIN_CCS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOWER_FIELD_NUMBER: _ClassVar[int]
    MAX_ACC_DROP_FIELD_NUMBER: _ClassVar[int]
    MAX_SKEW_FIELD_NUMBER: _ClassVar[int]
    MIN_ACC_FIELD_NUMBER: _ClassVar[int]
    EXPORT_ANYWAY_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    MAX_RECALL_DROP_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    ranking: str
    policy: str
    k: int
    heads: str
    concept: str
    min_ccs: int
    seed: int
    seeds: int
    mode: str
    tower: str
    max_acc_drop: float
    max_skew: float
    min_acc: float
    export_anyway: bool
    export_format: str
    labels: str
    atol: float
    images: ImageSource
    texts: str
    judge: str
    layers: str
    validation: ValidationData
    out: str
    force: bool
    max_recall_drop: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., ranking: _Optional[str] = ..., policy: _Optional[str] = ..., k: _Optional[int] = ..., heads: _Optional[str] = ..., concept: _Optional[str] = ..., min_ccs: _Optional[int] = ..., seed: _Optional[int] = ..., seeds: _Optional[int] = ..., mode: _Optional[str] = ..., tower: _Optional[str] = ..., max_acc_drop: _Optional[float] = ..., max_skew: _Optional[float] = ..., min_acc: _Optional[float] = ..., export_anyway: bool = ..., export_format: _Optional[str] = ..., labels: _Optional[str] = ..., atol: _Optional[float] = ..., images: _Optional[_Union[ImageSource, _Mapping]] = ..., texts: _Optional[str] = ..., judge: _Optional[str] = ..., layers: _Optional[str] = ..., validation: _Optional[_Union[ValidationData, _Mapping]] = ..., out: _Optional[str] = ..., force: bool = ..., max_recall_drop: _Optional[float] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("model", "validation", "out", "force", "language")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    validation: ValidationData
    out: str
    force: bool
    language: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., validation: _Optional[_Union[ValidationData, _Mapping]] = ..., out: _Optional[str] = ..., force: bool = ..., language: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("run_dir", "format", "labels", "atol", "out", "force")
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    format: str
    labels: str
    atol: float
    out: str
    force: bool
    def __init__(self, run_dir: _Optional[str] = ..., format: _Optional[str] = ..., labels: _Optional[str] = ..., atol: _Optional[float] = ..., out: _Optional[str] = ..., force: bool = ...) -> None: ...

class HeadScore(_message.Message):
    __slots__ = ("name", "layer", "head", "label", "ccs", "texts", "verdicts", "variance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CCS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    head: int
    label: str
    ccs: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    verdicts: _containers.RepeatedScalarFieldContainer[bool]
    variance: float
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., head: _Optional[int] = ..., label: _Optional[str] = ..., ccs: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ..., verdicts: _Optional[_Iterable[bool]] = ..., variance: _Optional[float] = ...) -> None: ...

class RankHeadsResult(_message.Message):
    __slots__ = ("run_dir", "files", "model", "weights_sha256", "layers", "m", "heads", "ccs_distribution", "cached_stats", "image_count", "skipped_images", "ranking_sha256")
    class CcsDistributionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    CCS_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CACHED_STATS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RANKING_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    files: _containers.RepeatedScalarFieldContainer[str]
    model: str
    weights_sha256: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    m: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadScore]
    ccs_distribution: _containers.ScalarMap[str, float]
    cached_stats: bool
    image_count: int
    skipped_images: int
    ranking_sha256: str
    def __init__(self, run_dir: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., m: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[HeadScore, _Mapping]]] = ..., ccs_distribution: _Optional[_Mapping[str, float]] = ..., cached_stats: bool = ..., image_count: _Optional[int] = ..., skipped_images: _Optional[int] = ..., ranking_sha256: _Optional[str] = ...) -> None: ...

class PrunedHead(_message.Message):
    __slots__ = ("name", "layer", "head", "reason", "label", "ccs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CCS_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    head: int
    reason: str
    label: str
    ccs: int
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., head: _Optional[int] = ..., reason: _Optional[str] = ..., label: _Optional[str] = ..., ccs: _Optional[int] = ...) -> None: ...

class PruneResult(_message.Message):
    __slots__ = ("run_dir", "files", "policy", "mode", "tower", "heads", "before", "after", "gate_failures", "exported", "plan")
    class BeforeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AfterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOWER_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    GATE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    files: _containers.RepeatedScalarFieldContainer[str]
    policy: str
    mode: str
    tower: str
    heads: _containers.RepeatedCompositeFieldContainer[PrunedHead]
    before: _containers.ScalarMap[str, float]
    after: _containers.ScalarMap[str, float]
    gate_failures: _containers.RepeatedScalarFieldContainer[str]
    exported: bool
    plan: _struct_pb2.Struct
    def __init__(self, run_dir: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., policy: _Optional[str] = ..., mode: _Optional[str] = ..., tower: _Optional[str] = ..., heads: _Optional[_Iterable[_Union[PrunedHead, _Mapping]]] = ..., before: _Optional[_Mapping[str, float]] = ..., after: _Optional[_Mapping[str, float]] = ..., gate_failures: _Optional[_Iterable[str]] = ..., exported: bool = ..., plan: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ValidateResult(_message.Message):
    __slots__ = ("model", "summary", "report", "out", "files")
    class SummaryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model: str
    summary: _containers.ScalarMap[str, float]
    report: _struct_pb2.Struct
    out: str
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., summary: _Optional[_Mapping[str, float]] = ..., report: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., out: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportResult(_message.Message):
    __slots__ = ("out_dir", "files")
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    out_dir: str
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, out_dir: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class OperationMetadata(_message.Message):
    __slots__ = ("kind", "state", "stage", "fraction", "message", "create_time", "start_time", "end_time")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[OperationMetadata.Kind]
        KIND_RANK_HEADS: _ClassVar[OperationMetadata.Kind]
        KIND_PRUNE: _ClassVar[OperationMetadata.Kind]
        KIND_VALIDATE: _ClassVar[OperationMetadata.Kind]
        KIND_EXPORT: _ClassVar[OperationMetadata.Kind]
    KIND_UNSPECIFIED: OperationMetadata.Kind
    KIND_RANK_HEADS: OperationMetadata.Kind
    KIND_PRUNE: OperationMetadata.Kind
    KIND_VALIDATE: OperationMetadata.Kind
    KIND_EXPORT: OperationMetadata.Kind
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[OperationMetadata.State]
        STATE_QUEUED: _ClassVar[OperationMetadata.State]
        STATE_RUNNING: _ClassVar[OperationMetadata.State]
        STATE_SUCCEEDED: _ClassVar[OperationMetadata.State]
        STATE_FAILED: _ClassVar[OperationMetadata.State]
        STATE_CANCELLED: _ClassVar[OperationMetadata.State]
    STATE_UNSPECIFIED: OperationMetadata.State
    STATE_QUEUED: OperationMetadata.State
    STATE_RUNNING: OperationMetadata.State
    STATE_SUCCEEDED: OperationMetadata.State
    STATE_FAILED: OperationMetadata.State
    STATE_CANCELLED: OperationMetadata.State
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: OperationMetadata.Kind
    state: OperationMetadata.State
    stage: str
    fraction: float
    message: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[OperationMetadata.Kind, str]] = ..., state: _Optional[_Union[OperationMetadata.State, str]] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "available", "pretrained_tags", "description", "cached_pretrained_tags")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ModelInfo.Kind]
        KIND_TOY: _ClassVar[ModelInfo.Kind]
        KIND_LOCAL_DIR: _ClassVar[ModelInfo.Kind]
        KIND_ARCHITECTURE: _ClassVar[ModelInfo.Kind]
    KIND_UNSPECIFIED: ModelInfo.Kind
    KIND_TOY: ModelInfo.Kind
    KIND_LOCAL_DIR: ModelInfo.Kind
    KIND_ARCHITECTURE: ModelInfo.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_TAGS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CACHED_PRETRAINED_TAGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelInfo.Kind
    available: bool
    pretrained_tags: _containers.RepeatedScalarFieldContainer[str]
    description: str
    cached_pretrained_tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelInfo.Kind, str]] = ..., available: bool = ..., pretrained_tags: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., cached_pretrained_tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "modes", "towers", "judges", "export_formats")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    TOWERS_FIELD_NUMBER: _ClassVar[int]
    JUDGES_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    modes: _containers.RepeatedScalarFieldContainer[str]
    towers: _containers.RepeatedScalarFieldContainer[str]
    judges: _containers.RepeatedScalarFieldContainer[str]
    export_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ..., modes: _Optional[_Iterable[str]] = ..., towers: _Optional[_Iterable[str]] = ..., judges: _Optional[_Iterable[str]] = ..., export_formats: _Optional[_Iterable[str]] = ...) -> None: ...
