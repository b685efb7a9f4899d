from fedmoe.protos import lora_delta_pb2 as _lora_delta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("info", "numbers")
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NumbersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    info: _containers.ScalarMap[str, str]
    numbers: _containers.ScalarMap[str, float]
    def __init__(self, info: _Optional[_Mapping[str, str]] = ..., numbers: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("adapter", "steps", "batch_size", "lr", "seed", "prox_mu", "run_id", "round", "expert")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    adapter: _lora_delta_pb2.LoraDelta
    steps: int
    batch_size: int
    lr: float
    seed: int
    prox_mu: float
    run_id: int
    round: int
    expert: str
    def __init__(self, adapter: _Optional[_Union[_lora_delta_pb2.LoraDelta, _Mapping]] = ..., steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., prox_mu: _Optional[float] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., expert: _Optional[str] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("adapter", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    adapter: _lora_delta_pb2.LoraDelta
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, adapter: _Optional[_Union[_lora_delta_pb2.LoraDelta, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("adapter", "run_id", "round")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    adapter: _lora_delta_pb2.LoraDelta
    run_id: int
    round: int
    def __init__(self, adapter: _Optional[_Union[_lora_delta_pb2.LoraDelta, _Mapping]] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("metrics",)
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...
