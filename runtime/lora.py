"""LoRA and textual-inversion files read without torch, and the weight changes they make.

- `read_safetensors`: the safetensors format read directly (8-byte little-endian header length, a
  JSON header of dtype / shape / byte offsets, then the raw buffer). It is small and fixed, so
  sdort parses it itself rather than add the `safetensors` package to the runtime's dependencies
  (its numpy API also loads every tensor eagerly); bfloat16, which numpy lacks, is widened to
  float32 exactly (its bits are float32's upper half).
- `read_lora`: diffusers / PEFT files (`unet.….lora_A.weight`, `text_encoder.….lora_B.weight`, the
  older `….lora.down.weight`, `…_lora.down.weight` and `….lora_linear_layer.down.weight` forms
  diffusers still reads, `….alpha` network alphas, PEFT's `lora_adapter_metadata`) and kohya /
  A1111 files (`lora_unet_…`, `lora_te_…`, `lora_te1_…` / `lora_te2_…` for SDXL, with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`), as diffusers' `lora_state_dict` and
  `get_peft_kwargs` read them: each layer's scale is alpha / rank (alpha = rank where the file
  gives none, PEFT's `use_rslora`: alpha / sqrt(rank)).
- `lora_delta`: PEFT's `get_delta_weight`, up @ down (a k x k convolution's down and 1 x 1 up
  included), for W' = W + weight * scale * delta.
- `read_embedding`: textual-inversion vectors (diffusers' `learned_embeds.safetensors` {token: vector},
  A1111's `emb_params` / `string_to_param.*`, SDXL's `clip_l` / `clip_g`).

`ParameterMap` reads `<part>/parameters.json`, written by `sd-export` (export/parameter_map.py): which
initializer of the part's graph holds which diffusers parameter, and in which layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PARAMETER_MAP = "parameters.json"
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}
# diffusers' metadata key for the LoraConfig of each component (loaders/lora_base.py)
_METADATA_KEY = "lora_adapter_metadata"
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}


# ---- files ------------------------------------------------------------------------------------

def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors by name, the header's `__metadata__`) of a .safetensors file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        raise ValueError(f"{path}: a pickle file, which can run code when loaded; sdort reads .safetensors only")
    data = path.read_bytes()
    try:
        (length,) = np.frombuffer(data[:8], "<u8") if len(data) >= 8 else (None,)
        if length is None or not 2 <= length <= len(data) - 8:
            raise ValueError
        header = json.loads(data[8:8 + int(length)])
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + int(length):]
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed safetensors entry for '{name}'") from None
        count = math.prod(shape)
        if dtype == "BF16":  # float32 with the low 16 bits dropped: widen exactly
            if end - start != 2 * count or end > len(body):
                raise ValueError(f"{path}: '{name}' has {end - start} bytes for bf16 {shape}")
            bits = np.frombuffer(body[start:end], "<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(shape)
            continue
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: '{name}' has dtype {dtype}, which sdort does not read")
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if not 0 <= start <= end <= len(body) or end - start != count * np_dtype.itemsize:
            raise ValueError(f"{path}: '{name}' has byte range {start}..{end}, wrong for {dtype} {shape}")
        tensors[name] = np.frombuffer(body[start:end], np_dtype).reshape(shape)
    return tensors, metadata


class ParameterMap:
    """A part's parameters.json: `locations(param)` -> [{initializer, transposed, dtype, shape}]."""

    def __init__(self, part_folder: Path, part: str):
        path = Path(part_folder) / PARAMETER_MAP
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; this export predates run-time LoRA and textual inversion "
                                    f"(or another tool made it): export the model again with sd-export")
        from .model_files import read_json

        content = read_json(path)
        self.part = part
        self.path = path
        self.parameters: dict[str, list[dict]] = content.get("parameters", {})
        self.unmapped = {name: "holds the same values as another parameter" for name in content.get("ambiguous", [])}
        self.unmapped.update({name: "is not in the exported graph" for name in content.get("missing", [])})

    def names(self) -> set[str]:
        return set(self.parameters) | set(self.unmapped)

    def locations(self, param: str) -> list[dict]:
        if param in self.parameters:
            return self.parameters[param]
        why = self.unmapped.get(param, "is unknown")
        raise ValueError(f"{self.path}: {self.part} parameter '{param}' {why}, so its weights cannot be changed "
                         f"at run time; fuse the LoRA at export instead (sd-export --lora)")


# ---- LoRA -------------------------------------------------------------------------------------

@dataclass
class LoraLayer:
    """One layer's LoRA: W' = W + weight * scale * up @ down (`scale` = alpha / rank)."""

    down: np.ndarray
    up: np.ndarray
    scale: float


def lora_delta(layer: LoraLayer, shape) -> np.ndarray:
    """up @ down in float32, shaped as the weight (PEFT's `get_delta_weight`: a Linear's [out, in]; a
    convolution's [out, in, kh, kw] from a k x k down and a 1 x 1 up, which is their matrix product
    over the flattened kernel)."""
    rank = layer.down.shape[0]
    up = np.asarray(layer.up, np.float32).reshape(shape[0], rank)
    down = np.asarray(layer.down, np.float32).reshape(rank, -1)
    return (up @ down).reshape(shape)


def _diffusers_module(component: str, rest: str) -> tuple[str, str] | None:
    """(module name, role) of a diffusers-format key below its component prefix; role is 'down',
    'up' or 'alpha'; None for keys that are not LoRA layers."""
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                         (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"),
                         ("_lora.up.weight", "up"), (".alpha", "alpha")):
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if suffix.startswith("_lora"):  # attention processors: attn1.processor.to_q_lora -> attn1.to_q
                module = module.replace(".processor.", ".")
                head, _, last = module.rpartition(".")
                if component == "unet":
                    last = "to_out.0" if last == "to_out" else last
                else:
                    last = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}.get(last, last)
                module = f"{head}.{last}"
            return module, role
    return None


def _spellings(component: str, module: str) -> list[str]:
    """A module's name as files may spell it: transformers 5 dropped CLIPTextModel's `text_model.`
    level, which LoRA files (kohya's `lora_te_text_model_…`, older diffusers') still name."""
    if component == "unet":
        return [module]
    if module.startswith("text_model."):
        return [module, module[len("text_model."):]]
    return [module, f"text_model.{module}"]


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that is the module's name or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def read_lora(path, known: dict[str, set[str]]) -> dict[str, dict[str, LoraLayer]]:
    """The layers of a LoRA file by component and parameter name (`…to_q.weight`).

    `known`: each component's parameter names (the parts' parameter maps); a key naming no layer
    of them, or a component the model lacks, is an error naming the file and the key.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    for key in tensors:
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise ValueError(f"{path}: '{key}': a DoRA LoRA, which sdort does not apply")
        if key.endswith("lora_B.bias"):
            raise ValueError(f"{path}: '{key}': a LoRA with biases, which sdort does not apply")
    kohya = all(key.startswith(tuple(_KOHYA_PREFIXES)) for key in tensors)
    flat = {c: {spelling.replace(".", "_"): name[: -len(".weight")] for name in names
                for spelling in _spellings(c, name[: -len(".weight")])} for c, names in known.items()}
    parts: dict[tuple[str, str], dict] = {}  # (component, module) -> {down, up, alpha}
    for key, value in tensors.items():
        if kohya:
            prefix = next(p for p in _KOHYA_PREFIXES if key.startswith(p))
            component = _KOHYA_PREFIXES[prefix]
            name, _, role = key[len(prefix):].partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(role)
            module = flat.get(component, {}).get(name)
        else:
            component, _, rest = key.partition(".")
            if component not in COMPONENTS:  # the oldest diffusers files: the UNet's keys, unprefixed
                component, rest = "unet", key
            found = _diffusers_module(component, rest)
            module, role = found if found else (None, None)
        if component not in known:
            raise ValueError(f"{path}: key '{key}' is for a {component}, which this model does not have "
                             f"(a LoRA for another architecture?)")
        if module is not None:  # the model's own spelling of the name
            module = next((m for m in _spellings(component, module) if f"{m}.weight" in known[component]), None)
        if role is None or module is None:
            raise ValueError(f"{path}: key '{key}' matches no layer of this model's {component} "
                             f"(a LoRA for another architecture, or a format sdort does not read)")
        parts.setdefault((component, module), {})[role] = value
    config = json.loads(metadata[_METADATA_KEY]) if _METADATA_KEY in metadata else {}
    if any(config.get(f"{c}.use_dora") for c in COMPONENTS):
        raise ValueError(f"{path}: a DoRA LoRA, which sdort does not apply")
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, module), found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise ValueError(f"{path}: the {component} layer '{module}' has no {missing} weight")
        down, up = found["down"], found["up"]
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or math.prod(up.shape[2:]) != 1:
            raise ValueError(f"{path}: the {component} layer '{module}' has down {list(down.shape)} and up "
                             f"{list(up.shape)}, which do not make a rank-{rank} LoRA")
        if "alpha" in found:
            alpha = float(np.asarray(found["alpha"], np.float64).reshape(-1)[0])
        else:
            alpha = float(_pattern_value(config.get(f"{component}.alpha_pattern"), module,
                                         config.get(f"{component}.lora_alpha", rank)))
        root = math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank
        layers.setdefault(component, {})[f"{module}.weight"] = LoraLayer(down, up, alpha / root)
    return layers


# ---- textual inversion ------------------------------------------------------------------------

def read_embedding(path) -> dict[str, np.ndarray]:
    """A textual-inversion file's vectors, [n, D] float32, by the key they came under: a diffusers
    file's token, `emb_params` / `string_to_param.*` (A1111), or `clip_l` / `clip_g` (SDXL)."""
    tensors, _ = read_safetensors(path)
    if not tensors:
        raise ValueError(f"{path}: holds no embedding")
    found = {}
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if value.ndim not in (1, 2) or value.size == 0:
            raise ValueError(f"{path}: '{key}' has shape {list(value.shape)}; an embedding is [D] or [vectors, D]")
        found[key] = value.reshape(-1, value.shape[-1])
    return found


def parse_lora_argument(value: str) -> tuple[str, float]:
    """`--lora FILE[:SCALE]` (sd-export and the generation commands) -> (file, scale); a path that
    itself holds ':' keeps it when no number follows."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0


def parse_embedding_argument(value: str) -> tuple[str, str | None]:
    """`--embedding FILE[:TOKEN]` -> (file, token or None: the file's own, as load_textual_inversion)."""
    head, sep, tail = value.rpartition(":")
    if not sep or not head or Path(value).exists():
        return value, None
    return head, tail or None
