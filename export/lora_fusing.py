"""`sd-export --lora FILE[:SCALE]`: LoRAs fused into the weights before tracing, as diffusers'
`load_lora_weights` + `set_adapters(names, scales)` + `fuse_lora()` would leave them.

The files are read by the runtime's reader (`sdort.runtime.lora`: diffusers / PEFT and kohya formats,
alpha / rank scales), so export-time and run-time LoRA share one reading of the formats; each torch
weight W becomes W + sum(scale * alpha / rank * up @ down) when its component is loaded, which a lazy
source does one component at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.sessions import file_sha256
from .parameter_map import adaptable_parameters


def fuse_loras(source, loras) -> list[dict]:
    """Make `source` fuse `loras` ([(file, scale)]) into its UNet and text encoders as they load;
    returns the manifest's `loras` entries. Errors (a missing file, a key naming no layer) come now,
    before any tracing."""
    import torch

    from sdort.runtime.lora import COMPONENTS, lora_delta, read_lora

    known = {c: set(adaptable_parameters(source.modules[c])) for c in COMPONENTS if source.modules.get(c) is not None}
    per_component: dict[str, list] = {}
    entries = []
    for file, scale in loras:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such LoRA file (--lora)")
        for component, layers in read_lora(path, known).items():
            per_component.setdefault(component, []).append((layers, float(scale)))
        entries.append({"file": path.name, "scale": float(scale), "sha256": file_sha256(path)})

    def fused(module, component):
        weights = adaptable_parameters(module)
        with torch.no_grad():
            for layers, scale in per_component[component]:
                for param, layer in layers.items():
                    weight = weights[param]
                    delta = lora_delta(layer, tuple(weight.shape)) * np.float32(scale * layer.scale)
                    weight += torch.from_numpy(delta).to(weight.dtype)
        return module

    for component in per_component:
        loader = source.loaders.get(component)
        if loader is None:  # an eager source: its module is here already
            source.modules[component] = fused(source.modules[component], component)
        else:
            source.loaders[component] = lambda loader=loader, component=component: fused(loader(), component)
    return entries
