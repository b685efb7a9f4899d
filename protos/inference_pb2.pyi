from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "gate", "top_k")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    gate: str
    top_k: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., gate: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("expert", "weight")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    weight: float
    def __init__(self, expert: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("text", "experts", "gate", "round")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    text: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    gate: str
    round: int
    def __init__(self, text: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ..., gate: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("prompt", "gate")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    gate: str
    def __init__(self, prompt: _Optional[str] = ..., gate: _Optional[str] = ...) -> None: ...

class RouteReply(_message.Message):
    __slots__ = ("experts", "gate", "round")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    gate: str
    round: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ..., gate: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
