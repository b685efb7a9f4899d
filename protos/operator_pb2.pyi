from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRunRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunOverview(_message.Message):
    __slots__ = ("run_dir", "state", "preset", "seed", "started", "finished", "elapsed_seconds", "current_round", "committed_rounds", "total_rounds", "eta_seconds", "experts", "sites", "rejections", "bytes_sent", "bytes_received")
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    state: str
    preset: str
    seed: int
    started: float
    finished: float
    elapsed_seconds: float
    current_round: int
    committed_rounds: int
    total_rounds: int
    eta_seconds: float
    experts: _containers.RepeatedScalarFieldContainer[str]
    sites: int
    rejections: int
    bytes_sent: int
    bytes_received: int
    def __init__(self, run_dir: _Optional[str] = ..., state: _Optional[str] = ..., preset: _Optional[str] = ..., seed: _Optional[int] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., current_round: _Optional[int] = ..., committed_rounds: _Optional[int] = ..., total_rounds: _Optional[int] = ..., eta_seconds: _Optional[float] = ..., experts: _Optional[_Iterable[str]] = ..., sites: _Optional[int] = ..., rejections: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertRound(_message.Message):
    __slots__ = ("expert", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    expert: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, expert: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "started", "finished", "seconds", "experts", "bytes_sent", "bytes_received", "rejections")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    started: float
    finished: float
    seconds: float
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRound]
    bytes_sent: int
    bytes_received: int
    rejections: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., seconds: _Optional[float] = ..., experts: _Optional[_Iterable[_Union[ExpertRound, _Mapping]]] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., rejections: _Optional[int] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("node_id", "site", "domain", "rank", "fingerprint", "num_examples", "first_seen", "last_seen", "rounds_joined", "failures", "rejections", "bytes_sent", "bytes_received")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_JOINED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    site: str
    domain: str
    rank: int
    fingerprint: str
    num_examples: int
    first_seen: float
    last_seen: float
    rounds_joined: int
    failures: int
    rejections: int
    bytes_sent: int
    bytes_received: int
    def __init__(self, node_id: _Optional[str] = ..., site: _Optional[str] = ..., domain: _Optional[str] = ..., rank: _Optional[int] = ..., fingerprint: _Optional[str] = ..., num_examples: _Optional[int] = ..., first_seen: _Optional[float] = ..., last_seen: _Optional[float] = ..., rounds_joined: _Optional[int] = ..., failures: _Optional[int] = ..., rejections: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "time", "round", "message", "json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    time: float
    round: int
    message: str
    json: str
    def __init__(self, kind: _Optional[str] = ..., time: _Optional[float] = ..., round: _Optional[int] = ..., message: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...
