from fedmoe.protos import lora_delta_pb2 as _lora_delta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Payload(_message.Message):
    __slots__ = ("tensors", "config_json")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_lora_delta_pb2.Tensor]
    config_json: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[_lora_delta_pb2.Tensor, _Mapping]]] = ..., config_json: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("info_json",)
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    info_json: str
    def __init__(self, info_json: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("payload", "run_id")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    payload: Payload
    run_id: int
    def __init__(self, payload: _Optional[_Union[Payload, _Mapping]] = ..., run_id: _Optional[int] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("payload", "metrics_json")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    payload: Payload
    metrics_json: str
    def __init__(self, payload: _Optional[_Union[Payload, _Mapping]] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("payload", "run_id")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    payload: Payload
    run_id: int
    def __init__(self, payload: _Optional[_Union[Payload, _Mapping]] = ..., run_id: _Optional[int] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("metrics_json",)
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    metrics_json: str
    def __init__(self, metrics_json: _Optional[str] = ...) -> None: ...
