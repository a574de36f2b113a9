"""What an ONNX file refers to, read before ONNX Runtime opens it.

A model.onnx may keep its weights in other files (ONNX "external data"), named by a `location`
relative to the model's folder. A location such as `../../etc/shadow` or an absolute path would
let a downloaded model make the session read any file the process can; older ONNX Runtime
releases follow it. sdort refuses such a model, and names a missing weights file, before the
session is created.

The `onnx` package is not a runtime dependency, so this module reads the few protobuf fields it
needs itself: ModelProto → GraphProto → TensorProto.external_data, through every subgraph and
constant attribute. It walks field headers and skips payloads, so a 2 GB model costs a few ms.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# Protobuf field numbers from onnx.proto (onnx/onnx.proto3), for the messages that can hold tensors.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODES = 7
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_NODE_ATTRIBUTES = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class _Corrupt(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, payload start, payload end) of the length-delimited fields of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Corrupt
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
            raise _Corrupt
    if pos != end:
        raise _Corrupt


def _tensor_locations(buf, start, end, found):
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(buf[a:b]) for n, a, b in _fields(buf, s, e)}
            if entry.get(_ENTRY_KEY) == b"location" and _ENTRY_VALUE in entry:
                found.add(entry[_ENTRY_VALUE].decode("utf-8", "replace"))


def _sparse_locations(buf, start, end, found):
    for number, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor_locations(buf, s, e, found)


def _node_locations(buf, start, end, found):
    for number, s, e in _fields(buf, start, end):
        if number != _NODE_ATTRIBUTES:
            continue
        for attr_number, a, b in _fields(buf, s, e):
            if attr_number in (_ATTR_TENSOR, _ATTR_TENSORS):
                _tensor_locations(buf, a, b, found)
            elif attr_number in (_ATTR_GRAPH, _ATTR_GRAPHS):
                _graph_locations(buf, a, b, found)
            elif attr_number in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse_locations(buf, a, b, found)


def _graph_locations(buf, start, end, found):
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZERS:
            _tensor_locations(buf, s, e, found)
        elif number == _GRAPH_SPARSE_INITIALIZERS:
            _sparse_locations(buf, s, e, found)
        elif number == _GRAPH_NODES:
            _node_locations(buf, s, e, found)


def external_data_locations(path: Path) -> set[str]:
    """The external-data `location`s a model file names (empty for a self-contained model).

    Raises ValueError naming the file when it is empty, truncated or not an ONNX protobuf.
    """
    found: set[str] = set()
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size == 0:
            raise ValueError(f"{path}: empty file, not an ONNX model")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                has_graph = False
                for number, s, e in _fields(buf, 0, size):
                    if number == _MODEL_GRAPH:
                        has_graph = True
                        _graph_locations(buf, s, e, found)
                    elif number == _MODEL_FUNCTIONS:
                        for fn_number, a, b in _fields(buf, s, e):
                            if fn_number == _FUNCTION_NODES:
                                _node_locations(buf, a, b, found)
            except _Corrupt:
                has_graph = False
    if not has_graph:
        raise ValueError(f"{path}: not a valid ONNX model (truncated or corrupt); export it again")
    return found


def check_model_file(path: Path) -> None:
    """Refuse a model whose external data lies outside its folder, and name missing weight files."""
    folder = path.parent.resolve()
    for location in sorted(external_data_locations(path)):
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ValueError(f"{path}: refusing external data at '{location}', outside the model's folder {folder}")
        if not target.is_file():
            raise FileNotFoundError(f"{target}: the weights file that {path.name} refers to is missing")


def read_json(path: Path) -> dict:
    """A JSON config of a model folder; a missing or malformed file is an error naming it."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: invalid config, expected a JSON object, got {type(value).__name__}")
    return value
