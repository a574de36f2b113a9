"""Which ONNX initializer holds which diffusers / transformers parameter: `<part>/parameters.json`.

Run-time LoRA and textual inversion (`sdort.runtime.lora`, `runtime/pipelines/adapters.py`) override
weights of an exported graph without torch. They need to know, for a parameter such as
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`, the initializer that holds it
and its layout there. torch's exporter renames initializers (`onnx::MatMul_1234`) and stores the
weight of a Linear that becomes a MatMul transposed; a later graph pass may rename them again. So the
map is found by value: before the torch module is released, every Linear / Conv weight and every
Embedding table is digested (as is and, for matrices, transposed; in float16 when the part is
exported in float16), and after the part's final model file is written its initializers are
digested and matched. A digest that two parameters share (identical tensors) or that two
initializers share is ambiguous: those parameters are listed as such, never guessed.

parameters.json (format 1):

    {"format": 1,
     "parameters": {"<param name>": [{"initializer": "<name>", "transposed": false,
                                      "dtype": "float32", "shape": [320, 320]}], ...},
     "ambiguous": ["<param name>", ...],   # identical values: no safe mapping
     "missing": ["<param name>", ...]}     # not found in the graph (folded or fused away)

`shape` is the initializer's shape; the parameter's is the same, or reversed when `transposed`.
A parameter may be held by several initializers (every copy is listed and overridden together).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FILE_NAME = "parameters.json"
FORMAT = 1
# The parts whose weights LoRA and textual inversion change.
ADAPTABLE_PARTS = ("unet", "text_encoder", "text_encoder_2")


def _digest(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.dtype.name, array.shape, hashlib.sha1(array.tobytes()).hexdigest()


def _as_float16(array: np.ndarray) -> np.ndarray:
    """float16 as the export's converter (onnxruntime.transformers.float16) writes it: clamped to
    float16's finite range and with tiny magnitudes raised to its smallest positive value."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(array)


def adaptable_parameters(module) -> dict:
    """The parameters LoRA or textual inversion may change, by name: the weights of Linear and Conv
    modules (diffusers' LoRA targets) and of Embedding tables (the token embedding)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    return {f"{name}.weight": sub.weight for name, sub in module.named_modules()
            if isinstance(sub, kinds) and getattr(sub, "weight", None) is not None}


def digest_parameters(module, float16: bool) -> dict[tuple, list[tuple[str, bool]]]:
    """digest -> [(parameter name, transposed)] for `adaptable_parameters(module)`; call it while
    the module still has its weights. Only digests are kept, so a UNet's weights are not held twice."""
    found: dict[tuple, list[tuple[str, bool]]] = {}
    for name, weight in adaptable_parameters(module).items():
        array = weight.detach().float().cpu().numpy()
        forms = [array] + ([_as_float16(array)] if float16 else [])
        for form in forms:
            found.setdefault(_digest(form), []).append((name, False))
            if form.ndim == 2:
                found.setdefault(_digest(form.T), []).append((name, True))
    return found


def _external_array(tensor, folder: Path) -> np.ndarray:
    """An initializer kept in the export's own weights file, read from it (the file this export just
    wrote; onnx's reader refuses files with several hard links, which copies made with `cp -al` have)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype("<f2" if tensor.data_type == 10 else "<f4")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    with open(folder / info["location"], "rb") as file:
        file.seek(int(info.get("offset", 0)))
        data = file.read(count * dtype.itemsize)
    return np.frombuffer(data, dtype).reshape(tuple(tensor.dims))


def match(digests: dict, model_path: Path) -> dict:
    """parameters.json's content for the saved graph at `model_path` (external data read one
    initializer at a time)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    located: dict[str, list[dict]] = {}
    claimed: dict[str, set[str]] = {}  # initializer -> parameters whose digest it has
    ambiguous: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(tensor.dims) not in (2, 3, 4):
            continue
        array = _external_array(tensor, model_path.parent) if tensor.data_location == onnx.TensorProto.EXTERNAL \
            else numpy_helper.to_array(tensor)
        holders = digests.get(_digest(array), [])
        names = {name for name, _ in holders}
        if len(names) > 1:  # identical parameters: which is which cannot be told
            ambiguous.update(names)
            continue
        for name, transposed in holders:
            claimed.setdefault(tensor.name, set()).add(name)
            located.setdefault(name, []).append({"initializer": tensor.name, "transposed": transposed,
                                                 "dtype": array.dtype.name, "shape": list(array.shape)})
    for name, places in located.items():
        if len({p["initializer"] for p in places}) != len(places):  # one initializer matching twice
            ambiguous.add(name)
    all_names = sorted({name for holders in digests.values() for name, _ in holders})
    parameters = {name: located[name] for name in all_names if name in located and name not in ambiguous}
    return {"format": FORMAT, "parameters": parameters, "ambiguous": sorted(ambiguous),
            "missing": [n for n in all_names if n not in located and n not in ambiguous]}


def write(digests: dict, folder: Path) -> dict:
    """Match the part in `folder` (its model.onnx as finally saved) and write folder/parameters.json
    (through a temporary name). Returns the map."""
    content = match(digests, folder / "model.onnx")
    tmp = folder / f".{FILE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    tmp.rename(folder / FILE_NAME)
    return content
