"""What an ONNX file refers to, and the few weights sdort reads from it, without the `onnx` package.

A model.onnx may keep its weights in other files (ONNX "external data"), named by a `location`
relative to the model's folder. A location such as `../../etc/shadow` or an absolute path would
let a downloaded model make the session read any file the process can; older ONNX Runtime
releases follow it. sdort refuses such a model, and names a missing weights file, before the
session is created.

The runtime also applies a CLIP text encoder's final LayerNorm to an earlier hidden state
(diffusers' `clip_skip`), and reads that LayerNorm's scale, bias and epsilon from the exported
text_encoder/model.onnx (`layer_norm_feeding`).

The `onnx` package is not a runtime dependency, so this module reads the few protobuf fields it
needs itself: ModelProto → GraphProto → NodeProto / TensorProto, through every subgraph and
constant attribute where it looks for external data. It walks field headers and skips payloads,
so a 2 GB model costs a few ms and only the tensors asked for are copied out of it.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Protobuf wire types: how a field's value is laid out after its key.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# Protobuf field numbers from onnx.proto (onnx/onnx.proto3), for the messages read here.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODES = 7
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_OUTPUTS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 12, 15
_NODE_INPUTS, _NODE_OUTPUTS, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTES, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_ATTR_NAME, _ATTR_FLOAT, _ATTR_INT = 1, 2, 3
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_ATTR_TYPE = 20
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_SEGMENT, _TENSOR_FLOAT_DATA, _TENSOR_INT32_DATA = 1, 2, 3, 4, 5
_TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 9, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto, the items of TensorProto.external_data
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR = 1  # TypeProto.tensor_type
_TENSOR_TYPE_SHAPE = 2  # TypeProto.Tensor.shape
_SHAPE_DIMS = 1  # TensorShapeProto.dim

# Enum values from onnx.proto.
_ATTRIBUTE_FLOAT, _ATTRIBUTE_INT = 1, 2  # AttributeProto.AttributeType
_FLOAT, _FLOAT16 = 1, 10  # TensorProto.DataType
_EXTERNAL = 1  # TensorProto.DataLocation
_DEFAULT_DOMAINS = ("", "ai.onnx")
_TENSOR_DTYPES = {_FLOAT: np.dtype("<f4"), _FLOAT16: np.dtype("<f2")}
_MAX_VECTOR = 1 << 20  # elements: far above any hidden size, far below a file's worth of weights


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


def _all_fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end) of every field of one message, in order.

    The span is the varint's own bytes for wire type 0 (decode it with `_varint`), the 8 or 4
    bytes of a fixed64 / fixed32, and the payload of a length-delimited field, which is skipped,
    not read. Raises _Corrupt on anything that is not a well-formed message.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, stop = _varint(buf, pos, end)
        elif wire == _FIXED64:
            stop = pos + 8
        elif wire == _FIXED32:
            stop = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
            raise _Corrupt
        if stop > end:
            raise _Corrupt
        yield number, wire, pos, stop
        pos = stop


def _fields(buf, start: int, end: int):
    """(field number, payload start, payload end) of the length-delimited fields of one message."""
    for number, wire, s, e in _all_fields(buf, start, end):
        if wire == _LEN:
            yield number, s, e


def _int64(buf, start: int, end: int) -> int:
    """The int64 in the varint at buf[start:end] (negative numbers are 10-byte two's complement)."""
    value, _ = _varint(buf, start, end)
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(buf, start: int, end: int) -> list[int]:
    """The int64s packed back to back as varints in one length-delimited payload."""
    values, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos, end)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values


def _text(buf, start: int, end: int) -> str:
    """The UTF-8 string at buf[start:end]."""
    return bytes(buf[start:end]).decode("utf-8", "replace")


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


@contextlib.contextmanager
def _mapped(path: Path):
    """(buffer, size) of the model file, memory-mapped; an empty file is an error naming it."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size == 0:
            raise ValueError(f"{path}: empty file, not an ONNX model")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf, size


def external_data_locations(path: Path) -> set[str]:
    """The external-data `location`s a model file names (empty for a self-contained model).

    Raises ValueError naming the file when it is empty, truncated or not an ONNX protobuf.
    """
    found: set[str] = set()
    with _mapped(path) as (buf, size):
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


def _weights_file(path: Path, location: str) -> Path:
    """The file an external-data `location` in model `path` names; refused outside the model's folder."""
    folder = path.parent.resolve()
    target = (folder / location).resolve()
    if Path(location).is_absolute() or not target.is_relative_to(folder):
        raise ValueError(f"{path}: refusing external data at '{location}', outside the model's folder {folder}")
    if not target.is_file():
        raise FileNotFoundError(f"{target}: the weights file that {path.name} refers to is missing")
    return target


def check_model_file(path: Path) -> None:
    """Refuse a model whose external data lies outside its folder, and name missing weight files."""
    for location in sorted(external_data_locations(path)):
        _weights_file(path, location)


class _Node(NamedTuple):
    """The parts of a NodeProto that `layer_norm_feeding` follows; attributes stay undecoded spans."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: list[tuple[int, int]]


def _node(buf, start: int, end: int) -> _Node:
    """Decode one NodeProto's names, leaving its attributes (which may hold large tensors) unread."""
    name = op_type = domain = ""
    inputs, outputs, attributes = [], [], []
    for number, s, e in _fields(buf, start, end):
        if number == _NODE_INPUTS:
            inputs.append(_text(buf, s, e))
        elif number == _NODE_OUTPUTS:
            outputs.append(_text(buf, s, e))
        elif number == _NODE_NAME:
            name = _text(buf, s, e)
        elif number == _NODE_OP_TYPE:
            op_type = _text(buf, s, e)
        elif number == _NODE_DOMAIN:
            domain = _text(buf, s, e)
        elif number == _NODE_ATTRIBUTES:
            attributes.append((s, e))
    return _Node(name, op_type, domain, inputs, outputs, attributes)


def _attribute(buf, node: _Node, name: str) -> dict[int, tuple[int, int, int]] | None:
    """The fields of `node`'s attribute `name`, as {field number: (wire type, start, end)}, or None."""
    wanted = name.encode()
    for start, end in node.attributes:
        fields = {number: (wire, s, e) for number, wire, s, e in _all_fields(buf, start, end)}
        if _ATTR_NAME in fields and bytes(buf[fields[_ATTR_NAME][1]:fields[_ATTR_NAME][2]]) == wanted:
            return fields
    return None


def _attribute_value(buf, node: _Node, name: str, kind: int, default):
    """`node`'s attribute `name` as a Python float or int (`kind`: _ATTRIBUTE_FLOAT or _INT),
    `default` when absent; None when it is there with another type."""
    fields = _attribute(buf, node, name)
    if fields is None:
        return default
    if _ATTR_TYPE in fields and fields[_ATTR_TYPE][0] == _VARINT:
        if _varint(buf, fields[_ATTR_TYPE][1], fields[_ATTR_TYPE][2])[0] != kind:
            return None
    number, wire = (_ATTR_FLOAT, _FIXED32) if kind == _ATTRIBUTE_FLOAT else (_ATTR_INT, _VARINT)
    if number not in fields:  # protobuf leaves out a field that holds its default, 0
        return 0.0 if kind == _ATTRIBUTE_FLOAT else 0
    got_wire, s, e = fields[number]
    if got_wire != wire:
        raise _Corrupt
    return struct.unpack("<f", bytes(buf[s:e]))[0] if kind == _ATTRIBUTE_FLOAT else _int64(buf, s, e)


def _is_default_domain(node: _Node) -> bool:
    """Whether `node` is an operator of the ONNX standard ("" or "ai.onnx"), not a contrib op."""
    return node.domain in _DEFAULT_DOMAINS


def _passes_value(buf, node: _Node) -> bool:
    """Whether `node` hands its first input on unchanged as float: Identity, or Cast to float32."""
    if not _is_default_domain(node) or not node.inputs:
        return False
    if node.op_type == "Identity":
        return True
    return node.op_type == "Cast" and _attribute_value(buf, node, "to", _ATTRIBUTE_INT, None) == _FLOAT


class _Graph:
    """One GraphProto, indexed lazily: a name's producer is looked for from the last node back
    (ONNX lists nodes in topological order, so a graph output's is near the end), decoding only
    nodes whose bytes contain the name; initializers are looked up by name, payloads unread."""

    def __init__(self, buf, start: int, end: int):
        self.buf = buf
        self.nodes: list[tuple[int, int]] = []
        self.initializers: list[tuple[int, int]] = []
        self.outputs: dict[str, tuple[int, int]] = {}  # graph output name -> its ValueInfoProto
        for number, s, e in _fields(buf, start, end):
            if number == _GRAPH_NODES:
                self.nodes.append((s, e))
            elif number == _GRAPH_INITIALIZERS:
                self.initializers.append((s, e))
            elif number == _GRAPH_OUTPUTS:
                names = [_text(buf, a, b) for n, a, b in _fields(buf, s, e) if n == _VALUE_INFO_NAME]
                self.outputs[names[-1] if names else ""] = (s, e)
        self._decoded: dict[int, _Node] = {}
        self._initializer_spans: dict[str, tuple[int, int]] | None = None

    def producer(self, name: str) -> _Node | None:
        """The node whose outputs include `name`, or None."""
        needle = name.encode()
        if not needle:
            return None
        for s, e in reversed(self.nodes):
            if self.buf.find(needle, s, e) == -1:  # a node naming `name` holds its bytes
                continue
            node = self._decoded.get(s)
            if node is None:
                node = self._decoded[s] = _node(self.buf, s, e)
            if name in node.outputs:
                return node
        return None

    def initializer(self, name: str) -> tuple[int, int] | None:
        """The span of the initializer TensorProto called `name`, or None."""
        if self._initializer_spans is None:
            self._initializer_spans = {}
            for s, e in self.initializers:
                # name (8) comes before raw_data (9) in a serialized tensor: stop there
                span = next(((a, b) for n, a, b in _fields(self.buf, s, e) if n == _TENSOR_NAME), None)
                if span is not None:
                    self._initializer_spans.setdefault(_text(self.buf, *span), (s, e))
        return self._initializer_spans.get(name)

    def source(self, name: str) -> tuple[str, _Node | None]:
        """Follow `name` back through Identity / Cast-to-float nodes: (the name reached, its
        producer, or None where that is an initializer or graph input)."""
        seen = set()
        while name not in seen and self.initializer(name) is None:
            seen.add(name)
            node = self.producer(name)
            if node is None or not _passes_value(self.buf, node):
                return name, node
            name = node.inputs[0]
        return name, None


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 as `value` (1e-05, not 9.99999974737875e-06)."""
    bits = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == bits:
            return candidate
    return value


def _vector(buf, start: int, end: int, path: Path, what: str) -> np.ndarray:
    """The one-dimensional float32 / float16 TensorProto at buf[start:end] as a new float32 array.

    Its values come from raw_data, float_data (float32), int32_data (float16 bit patterns) or an
    external-data file beside `path`; its shape is checked first, then only its bytes are read.
    `what` names it in errors.
    """
    return _tensor(buf, start, end, path, what, vector=True).astype(np.float32)


def _tensor(buf, start: int, end: int, path: Path, what: str, vector: bool) -> np.ndarray:
    """The float32 / float16 TensorProto at buf[start:end], in its own dtype (see `_vector`);
    `vector`: refuse any shape but one dimension of a hidden size's length."""
    dims: list[int] = []
    data_type = 0
    raw = None
    values: list[bytes] = []  # float_data, as little-endian float32 bytes
    halves: list[int] = []  # int32_data, one float16 bit pattern each
    external: dict[str, str] = {}
    location = 0
    for number, wire, s, e in _all_fields(buf, start, end):
        if number == _TENSOR_DIMS:
            dims.extend([_int64(buf, s, e)] if wire == _VARINT else _packed_varints(buf, s, e))
        elif number == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type = _varint(buf, s, e)[0]
        elif number == _TENSOR_FLOAT_DATA and wire in (_LEN, _FIXED32):
            values.append(bytes(buf[s:e]))
        elif number == _TENSOR_INT32_DATA:
            halves.extend([_int64(buf, s, e)] if wire == _VARINT else _packed_varints(buf, s, e))
        elif number == _TENSOR_RAW_DATA and wire == _LEN:
            raw = bytes(buf[s:e])
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            entry = {n: _text(buf, a, b) for n, a, b in _fields(buf, s, e)}
            if _ENTRY_KEY in entry:
                external[entry[_ENTRY_KEY]] = entry.get(_ENTRY_VALUE, "")
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            location = _varint(buf, s, e)[0]
        elif number == _TENSOR_SEGMENT:
            raise ValueError(f"{path}: {what} is a segmented tensor, which sdort does not read")
    dtype = _TENSOR_DTYPES.get(data_type)
    if dtype is None:
        raise ValueError(f"{path}: {what} has ONNX data type {data_type}; expected float32 (1) or float16 (10)")
    if vector and (len(dims) != 1 or not 0 < dims[0] <= _MAX_VECTOR):
        raise ValueError(f"{path}: {what} has shape {dims}; expected one dimension, the hidden size")
    nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if location == _EXTERNAL or external:
        data = _external_bytes(path, external, nbytes, what)
    elif raw is not None:
        data = raw
    elif data_type == _FLOAT:
        data = b"".join(values)
    else:
        data = (np.array(halves, dtype=np.int64) & 0xFFFF).astype("<u2").tobytes()
    if len(data) != nbytes:
        raise ValueError(f"{path}: {what} holds {len(data)} bytes, its shape {dims} needs {nbytes}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).copy()


def _external_bytes(path: Path, external: dict[str, str], nbytes: int, what: str) -> bytes:
    """The `nbytes` bytes an external-data entry (location, offset, length: strings) points at."""
    if "location" not in external:
        raise ValueError(f"{path}: {what} is marked as external data but names no location")
    target = _weights_file(path, external["location"])
    try:
        offset = int(external.get("offset", "0"))
        length = int(external["length"]) if "length" in external else nbytes
    except ValueError:
        raise ValueError(f"{path}: {what} has a malformed external-data offset or length {external}") from None
    if offset < 0 or length != nbytes:
        raise ValueError(f"{path}: {what} has external-data offset {offset} and length {length}; "
                         f"its shape needs {nbytes} bytes")
    with open(target, "rb") as file:
        file.seek(offset)
        data = file.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{target}: truncated; {what} of {path.name} needs {nbytes} bytes at offset {offset}")
    return data


def read_initializers(path: Path, names) -> dict[str, np.ndarray]:
    """The float32 / float16 initializers `names` of the main graph of model file `path`, each a
    new array in its stored dtype and shape (external data read from beside the file, checked as
    `check_model_file` does). Run-time LoRA reads the base weights it changes with this."""
    path = Path(path)
    found = {}
    with _mapped(path) as (buf, size):
        try:
            graph = next(((s, e) for number, s, e in _fields(buf, 0, size) if number == _MODEL_GRAPH), None)
            if graph is None:
                raise _Corrupt
            index = _Graph(buf, *graph)
            for name in names:
                span = index.initializer(name)
                if span is None:
                    raise ValueError(f"{path}: no initializer named '{name}'; the model file changed after "
                                     f"its parameters.json was written: export it again")
                found[name] = _tensor(buf, *span, path, f"initializer '{name}'", vector=False)
        except _Corrupt:
            raise ValueError(f"{path}: not a valid ONNX model (truncated or corrupt); export it again") from None
    return found


def _output_rank(buf, start: int, end: int) -> int | None:
    """The rank a graph output's ValueInfoProto declares, or None where it declares no shape."""
    for number, s, e in _fields(buf, start, end):
        if number != _VALUE_INFO_TYPE:
            continue
        for type_number, a, b in _fields(buf, s, e):
            if type_number != _TYPE_TENSOR:
                continue
            for tensor_number, c, d in _fields(buf, a, b):
                if tensor_number == _TENSOR_TYPE_SHAPE:
                    return sum(1 for n, _, _ in _fields(buf, c, d) if n == _SHAPE_DIMS)
    return None


def _describe(node: _Node | None, name: str) -> str:
    """Where the value `name` comes from, for an error message."""
    if node is None:
        return f"'{name}' is a graph input or initializer"
    domain = f"{node.domain}." if node.domain else ""
    return f"'{name}' comes from {domain}{node.op_type} node '{node.name}'"


def layer_norm_feeding(path: Path, output: str = "last_hidden_state") -> tuple[np.ndarray, np.ndarray, float]:
    """(scale, bias, epsilon) of the LayerNormalization node whose result is the graph output `output`.

    For a CLIP text encoder exported at opset >= 17 this is its `final_layer_norm`: the runtime
    applies it to an earlier hidden state for clip_skip. From the node that produces `output`
    it follows Identity and Cast-to-float nodes back to a LayerNormalization (ONNX domain) over
    the last axis; its inputs 1 and 2 (scale, bias) may be initializers, inline or external data
    beside the model, or Constant nodes, stored as float32 or float16. scale and bias come back
    as float32 arrays of one dimension (bias zeros where the node has none); epsilon (default
    1e-5) as the shortest decimal that is the same float32, so 1e-05 stays 1e-05.

    Only the model's field headers and those two tensors are read (the file is memory-mapped).
    Raises ValueError naming the file when the final layer norm cannot be found that way, e.g.
    for an older export that spelled it out as ReduceMean/Sub/Pow/..., when it normalizes over
    other axes, or when the file is not a valid ONNX model; FileNotFoundError for missing weights.
    """
    path = Path(path)
    with _mapped(path) as (buf, size):
        try:
            return _layer_norm_feeding(buf, size, path, output)
        except _Corrupt:
            raise ValueError(f"{path}: not a valid ONNX model (truncated or corrupt); export it again") from None


def _layer_norm_feeding(buf, size: int, path: Path, output: str) -> tuple[np.ndarray, np.ndarray, float]:
    """`layer_norm_feeding` on the mapped file `buf`; raises _Corrupt on malformed protobuf."""
    graph_span = next(((s, e) for number, s, e in _fields(buf, 0, size) if number == _MODEL_GRAPH), None)
    if graph_span is None:
        raise _Corrupt
    graph = _Graph(buf, *graph_span)
    missing = f"{path}: could not find the final layer norm of graph output '{output}'"
    if output not in graph.outputs:
        raise ValueError(f"{missing}: the graph has no such output (outputs: {', '.join(graph.outputs) or 'none'})")

    name, node = graph.source(output)
    if node is None or node.op_type != "LayerNormalization" or not _is_default_domain(node):
        raise ValueError(f"{missing}: {_describe(node, name)}, not LayerNormalization (an export at opset 17 "
                         f"or later keeps nn.LayerNorm as one node; older ones spell it out)")
    where = f"LayerNormalization node '{node.name}'"
    axis = _attribute_value(buf, node, "axis", _ATTRIBUTE_INT, -1)
    rank = _output_rank(buf, *graph.outputs[output])
    if axis is None or (axis != -1 and not (rank is not None and axis == rank - 1)):
        raise ValueError(f"{missing}: {where} normalizes from axis {axis}, not over the last axis only")
    epsilon = _attribute_value(buf, node, "epsilon", _ATTRIBUTE_FLOAT, 1e-5)
    if epsilon is None:
        raise ValueError(f"{missing}: {where} has an epsilon that is not a float")

    tensors = {}
    for index, role in ((1, "scale"), (2, "bias")):
        if len(node.inputs) <= index or not node.inputs[index]:
            if role == "scale":
                raise ValueError(f"{missing}: {where} has no scale input")
            continue
        source, producer = graph.source(node.inputs[index])
        what = f"the {role} '{source}' of {where}"
        initializer = graph.initializer(source)
        if initializer is not None:
            tensors[role] = _vector(buf, *initializer, path, what)
        elif producer is None:
            raise ValueError(f"{missing}: {what} is neither a node's output nor an initializer")
        elif producer.op_type == "Constant" and _is_default_domain(producer):
            value = _attribute(buf, producer, "value")
            if value is None or _ATTR_TENSOR not in value or value[_ATTR_TENSOR][0] != _LEN:
                raise ValueError(f"{path}: {what} is a Constant without a `value` tensor, which sdort does not read")
            tensors[role] = _vector(buf, value[_ATTR_TENSOR][1], value[_ATTR_TENSOR][2], path, what)
        else:
            raise ValueError(f"{missing}: {what} comes from a {producer.op_type} node, not an initializer or Constant")

    scale = tensors["scale"]
    bias = tensors.get("bias", np.zeros_like(scale))
    if bias.shape != scale.shape:
        raise ValueError(f"{missing}: {where} has scale of shape {scale.shape} but bias of shape {bias.shape}")
    return scale, bias, _shortest_float32(epsilon)


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
