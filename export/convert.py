"""Graph work on one part: trace it to ONNX, convert it to float16, save it, check it against torch.

`exporter.py` drives these steps for every part of a model and writes the artifact folder around
them (configs, tokenizer, manifest, the atomic rename); nothing here knows about folders of parts.
"""

from __future__ import annotations

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


def trace(part: Part, module: torch.nn.Module, modules: dict) -> onnx.ModelProto:
    """Export `module` to an ONNX graph following `part`'s contract (TorchScript exporter, opset 17).

    `modules` are the model's other components, which some sample inputs are sized from."""
    wrapped = part.wrap(module).eval()
    sample = part.sample(module, *TRACE_SHAPE, modules)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        path = Path(scratch) / "model.onnx"
        torch.onnx.export(
            wrapped, sample, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=part.inputs, output_names=part.output_names(module), dynamic_axes=part.axes(module),
        )
        return onnx.load(str(path))  # also pulls in weights written as external data


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert weights and activations to float16 with ONNX Runtime's own converter.

    The timestep input stays float32: float16 cannot represent fractional timesteps such as
    Karras schedules produce (980.4 would become 980.5), and the cast inside the graph is free.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=["timestep"], disable_shape_infer=True)


def save(model: onnx.ModelProto, folder: Path) -> None:
    """Write model.onnx, with the weights in one model.onnx_data file when the graph is too big for protobuf."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    # ByteSize() itself fails above protobuf's 2 GB limit: count the weights instead.
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def check(part: Part, module: torch.nn.Module, folder: Path, dtype: str, modules: dict) -> float:
    """Run the exported graph in ONNX Runtime and the torch module on the same input.

    Returns the largest error relative to max(1, max|torch output|) over all outputs; the
    comparison is with torch float32, also for float16 graphs.
    """
    from sdort.runtime.sessions import OnnxModel

    sample = part.sample(module, *CHECK_SHAPE, modules)
    with torch.no_grad():
        expected = part.wrap(module).eval()(*sample)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = OnnxModel(folder / "model.onnx", provider="cpu", name=part.name)
    got = session(**{name: t.numpy() for name, t in zip(part.inputs, sample)})
    error = 0.0
    for name, ref in zip(part.output_names(module), expected):
        ref = ref.numpy().astype(np.float64)
        out = np.asarray(got[name], dtype=np.float64)
        if not np.all(np.isfinite(out)):
            return float("inf")
        error = max(error, float(np.max(np.abs(out - ref))) / max(1.0, float(np.max(np.abs(ref)))))
    return error
