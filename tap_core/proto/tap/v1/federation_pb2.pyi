from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType

class HelloRequest(_message.Message):
    __slots__ = ("client_version",)
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    def __init__(self, client_version: _Optional[str] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("silo_id", "federation_json", "heartbeat_interval_s", "server_version", "federation_id")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    federation_json: str
    heartbeat_interval_s: float
    server_version: str
    federation_id: str
    def __init__(self, silo_id: _Optional[str] = ..., federation_json: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., server_version: _Optional[str] = ..., federation_id: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("declaration_json", "client_version")
    DECLARATION_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    declaration_json: str
    client_version: str
    def __init__(self, declaration_json: _Optional[str] = ..., client_version: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("silo_id", "message")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    message: str
    def __init__(self, silo_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("wait_s",)
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    def __init__(self, wait_s: _Optional[float] = ...) -> None: ...

class TensorLayout(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ComponentLayout(_message.Message):
    __slots__ = ("name", "tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("action", "round", "retry_after_s", "plan_json", "layout", "message")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Assignment.Action]
        WAIT: _ClassVar[Assignment.Action]
        TRAIN: _ClassVar[Assignment.Action]
        FINISH: _ClassVar[Assignment.Action]
        DONE: _ClassVar[Assignment.Action]
    ACTION_UNSPECIFIED: Assignment.Action
    WAIT: Assignment.Action
    TRAIN: Assignment.Action
    FINISH: Assignment.Action
    DONE: Assignment.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    action: Assignment.Action
    round: int
    retry_after_s: float
    plan_json: str
    layout: _containers.RepeatedCompositeFieldContainer[ComponentLayout]
    message: str
    def __init__(self, action: _Optional[_Union[Assignment.Action, str]] = ..., round: _Optional[int] = ..., retry_after_s: _Optional[float] = ..., plan_json: _Optional[str] = ..., layout: _Optional[_Iterable[_Union[ComponentLayout, _Mapping]]] = ..., message: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("round", "components", "dtype", "payload_bytes", "stats_json", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    components: _containers.RepeatedScalarFieldContainer[str]
    dtype: DType
    payload_bytes: int
    stats_json: str
    weights: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., payload_bytes: _Optional[int] = ..., stats_json: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TensorPiece(_message.Message):
    __slots__ = ("component", "tensor", "offset", "data", "dtype", "shape", "crc32")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    component: int
    tensor: int
    offset: int
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    crc32: int
    def __init__(self, component: _Optional[int] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., crc32: _Optional[int] = ...) -> None: ...

class TensorFrame(_message.Message):
    __slots__ = ("header", "pieces")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    pieces: _containers.RepeatedCompositeFieldContainer[TensorPiece]
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., pieces: _Optional[_Iterable[_Union[TensorPiece, _Mapping]]] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("round", "payload_bytes", "message")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    payload_bytes: int
    message: str
    def __init__(self, round: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round", "activity")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    round: int
    activity: str
    def __init__(self, round: _Optional[int] = ..., activity: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("phase", "round")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    phase: str
    round: int
    def __init__(self, phase: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("results_json",)
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    results_json: str
    def __init__(self, results_json: _Optional[str] = ...) -> None: ...

class ResultsAck(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
