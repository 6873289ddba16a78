"""Just enough of the protobuf wire format to turn a weights-as-inputs ONNX graph into a self-contained model.

The device has no `onnx` package. A forward graph whose weights are graph inputs becomes a standalone model by
dropping those inputs and appending one TensorProto initializer per weight; both are edits of length-delimited
fields, so the rest of the file is copied through byte for byte.
Field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5, .input = 11;
ValueInfoProto.name = 1; TensorProto.dims = 1, .data_type = 2, .name = 8, .raw_data = 9.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edge_ft.errors import UserError

_LEN = 2  # wire type of strings, bytes and embedded messages
_TENSOR_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield (field number, raw bytes of the whole field, payload of a length-delimited field or b"")."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = b""
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            payload, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, buf[start:pos], payload


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """A TensorProto with raw little-endian data (what onnx.numpy_helper.from_array writes)."""
    array = np.ascontiguousarray(array)
    dims = b"".join(_varint(1 << 3) + _varint(d) for d in array.shape)
    return (dims + _varint(2 << 3) + _varint(_TENSOR_TYPES[array.dtype]) + _len_field(8, name.encode())
            + _len_field(9, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()))


def _value_name(value_info: bytes) -> str:
    return next((p.decode() for n, _, p in _fields(value_info) if n == 1), "")


def bake_weights(model: bytes, weights: dict[str, np.ndarray], source: str = "model") -> bytes:
    """Serialized ModelProto with graph inputs named in `weights` turned into initializers holding them."""
    try:
        out, found = bytearray(), set()
        for number, raw, payload in _fields(model):
            if number != 7:
                out += raw
                continue
            graph = bytearray()
            for g_number, g_raw, g_payload in _fields(payload):
                if g_number == 11 and _value_name(g_payload) in weights:
                    found.add(_value_name(g_payload))
                    continue
                graph += g_raw
            for name, array in weights.items():
                graph += _len_field(5, tensor_proto(name, array))
            out += _len_field(7, bytes(graph))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: not a valid ONNX model ({e}); re-export the bundle") from None
    missing = sorted(set(weights) - found)
    if missing:
        raise UserError(f"{source}: the graph has no input named {missing[0]!r}; re-export the bundle")
    return bytes(out)


def with_metadata(model: bytes, props: dict[str, str], prefix: str, source: str = "model") -> bytes:
    """Serialized ModelProto whose metadata_props (field 14) hold `props`, replacing earlier keys under `prefix`."""
    try:
        out = bytearray()
        for number, raw, payload in _fields(model):
            if number == 14 and next((p.decode() for n, _, p in _fields(payload) if n == 1), "").startswith(prefix):
                continue
            out += raw
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: not a valid ONNX model ({e})") from None
    for key, value in props.items():  # StringStringEntryProto: key = 1, value = 2
        out += _len_field(14, _len_field(1, key.encode()) + _len_field(2, value.encode()))
    return bytes(out)


def one_node_model() -> bytes:
    """A serialized ModelProto of one Relu on a float tensor of shape (1,), opset 17: the smallest graph a
    session runs, which pays onnxruntime's once-per-process setup and nothing else."""
    def value(name: str) -> bytes:  # ValueInfoProto: name = 1, type = 2 (TypeProto.tensor_type = 1: elem_type, shape)
        shape = _len_field(2, _len_field(1, _varint(1 << 3) + _varint(1)))
        return _len_field(1, name.encode()) + _len_field(2, _len_field(1, _varint(1 << 3) + _varint(1) + shape))

    node = _len_field(1, b"x") + _len_field(2, b"y") + _len_field(4, b"Relu")  # NodeProto: input, output, op_type
    graph = _len_field(1, node) + _len_field(2, b"g") + _len_field(11, value("x")) + _len_field(12, value("y"))
    opset = _len_field(8, _varint(2 << 3) + _varint(17))  # ModelProto.opset_import: OperatorSetIdProto.version = 2
    return _varint(1 << 3) + _varint(8) + _len_field(7, graph) + opset  # ir_version 8, graph, opset
