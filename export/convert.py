"""Graph work on one part: trace it to ONNX, convert it to float16, save it, check it against torch.

`exporter.py` drives these steps for every part of a model and writes the artifact folder around
them (configs, tokenizer, manifest, the atomic rename); nothing here knows about folders of parts.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .parts import Part

OPSET = 17
# A graph above this many bytes keeps its weights in one model.onnx_data file beside it.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000 - 50_000_000
# Largest allowed |onnxruntime - torch| / max(1, max|torch|) on the check input, per dtype.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}

# Trace on latent sizes that are not multiples of the UNet's overall downsampling factor, so that
# diffusers takes its `upsample_size` path and the graph reads each skip connection's size:
# then every latent size (image sizes that are any multiple of 8) works. Check on another size.
TRACE_SHAPE = (2, 9, 7)
CHECK_SHAPE = (1, 8, 16)


def trace_to_file(part: Part, module: torch.nn.Module, modules: dict, scratch: Path) -> Path:
    """Export `module` to `scratch`/model.onnx following `part`'s contract (TorchScript exporter,
    opset 17) and return that path. Above protobuf's 2 GB torch writes the weights beside it, one
    file per tensor; `save_file` moves them into the artifact without loading them all at once.

    `modules` are the model's other components, which some sample inputs are sized from."""
    wrapped = part.wrap(module).eval()
    sample = part.sample(module, *TRACE_SHAPE, modules)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            wrapped, sample, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=part.inputs, output_names=part.output_names(module), dynamic_axes=part.axes(module),
        )
    return path


def trace(part: Part, module: torch.nn.Module, modules: dict) -> onnx.ModelProto:
    """Export `module` to an in-memory ONNX graph following `part`'s contract (see `trace_to_file`)."""
    with tempfile.TemporaryDirectory() as scratch:
        return onnx.load(str(trace_to_file(part, module, modules, Path(scratch))))  # weights included


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert weights and activations to float16 with ONNX Runtime's own converter.

    The timestep input stays float32: float16 cannot represent fractional timesteps such as
    Karras schedules produce (980.4 would become 980.5), and the cast inside the graph is free.
    The nodes are sorted again after: the converter appends its input Casts at the end of the node
    list, which ONNX Runtime accepts but `onnx.checker` does not (nodes must be in topological order).
    """
    import onnxruntime.transformers  # noqa: F401  puts its folder on sys.path (onnx_model's imports)
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(model, keep_io_types=["timestep"], disable_shape_infer=True)
    OnnxModel(model).topological_sort()
    return model


def _weights_bytes(model: onnx.ModelProto) -> int:
    # ByteSize() itself fails above protobuf's 2 GB limit: count the weights instead.
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(model: onnx.ModelProto, folder: Path) -> None:
    """Write model.onnx, with the weights in one model.onnx_data file when the graph is too big for protobuf."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def save_file(source: Path, folder: Path, float16: bool = False) -> None:
    """`save` for the graph in the file `source` (as `trace_to_file` writes it), streaming its weights.

    The graph is read without its external weights; each tensor's bytes are copied from torch's
    files into model.onnx_data, so that no more than one tensor's bytes are in memory at a time.
    The files are those `save` writes: the same graph and, above the threshold, the initializers of
    1 kB and more in one model.onnx_data, in initializer order. `float16` converts the graph with
    `to_float16` first, in memory (the float32 and float16 weights at once).
    """
    from onnx.external_data_helper import _get_attribute_tensors, _get_initializer_tensors

    if float16:
        return save(to_float16(onnx.load(str(source))), folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source), load_external_data=False)
    base = source.parent
    initializers = list(_get_initializer_tensors(model))
    attributes = list(_get_attribute_tensors(model))

    def is_external(tensor):
        return tensor.data_location == onnx.TensorProto.EXTERNAL

    def length(tensor):
        info = _external_entries(tensor)
        if "length" in info:
            return int(info["length"])
        return (base / info["location"]).stat().st_size - int(info.get("offset", 0))

    weights = sum(length(t) if is_external(t) else len(t.raw_data) for t in model.graph.initializer)
    path = folder / "model.onnx"
    if weights <= EXTERNAL_DATA_THRESHOLD:
        external = [t for t in initializers + attributes if is_external(t)]
        if external:
            onnx.load_external_data_for_model(model, str(base))
            for tensor in external:  # as if never external: no explicit data_location in the file
                tensor.ClearField("data_location")
        onnx.save_model(model, str(path))
        return
    # onnx's own rule (save_model with size_threshold=1024): initializers with raw data of 1 kB and
    # more; and any tensor torch already wrote outside the graph.
    moved = [t for t in initializers if is_external(t) or (t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= 1024)]
    moved += [t for t in attributes if is_external(t)]
    with open(folder / "model.onnx_data", "wb") as data:
        for tensor in moved:
            offset = data.tell()
            if is_external(tensor):
                info = _external_entries(tensor)
                with open(base / info["location"], "rb") as weights_file:
                    weights_file.seek(int(info.get("offset", 0)))
                    _copy(weights_file, data, length(tensor))
            else:
                data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "model.onnx_data"), ("offset", offset), ("length", data.tell() - offset)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))


def _copy(src, dst, size: int, chunk: int = 64 << 20) -> None:
    while size > 0:
        block = src.read(min(chunk, size))
        if not block:
            raise OSError(f"{src.name}: ended {size} bytes early")
        dst.write(block)
        size -= len(block)


def reference(part: Part, module: torch.nn.Module, modules: dict) -> tuple[dict, list]:
    """The check's input (numpy, by input name) and torch's float32 outputs on it, in output order."""
    sample = part.sample(module, *CHECK_SHAPE, modules)
    with torch.no_grad():
        expected = part.wrap(module).eval()(*sample)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return {name: t.numpy() for name, t in zip(part.inputs, sample)}, [ref.numpy() for ref in expected]


def compare(part: Part, folder: Path, inputs: dict, expected: list, output_names: list[str],
            file: str = "model.onnx", provider: str = "cpu") -> float:
    """Run the graph `file` in `folder` in ONNX Runtime (`provider`: cpu or cuda) on `inputs`; its
    largest error against `expected`, relative to max(1, max|expected|), over all outputs."""
    from sdort.runtime.sessions import OnnxModel

    session = OnnxModel(folder / file, provider=provider, name=part.name)
    got = session(**inputs)
    del session  # its weights, before the comparison's float64 copies
    error = 0.0
    for name, ref in zip(output_names, expected):
        ref = ref.astype(np.float64)
        out = np.asarray(got[name], dtype=np.float64)
        if not np.all(np.isfinite(out)):
            return float("inf")
        error = max(error, float(np.max(np.abs(out - ref))) / max(1.0, float(np.max(np.abs(ref)))))
    return error


def check(part: Part, module: torch.nn.Module, folder: Path, dtype: str, modules: dict) -> float:
    """Run the exported graph in ONNX Runtime and the torch module on the same input.

    Returns the largest error relative to max(1, max|torch output|) over all outputs; the
    comparison is with torch float32, also for float16 graphs.
    """
    inputs, expected = reference(part, module, modules)
    return compare(part, folder, inputs, expected, part.output_names(module))
