"""What run-time LoRA costs: loading an adapter, switching scales, fusing, and the UNet call after it.

    python benchmarks/bench_lora.py models/sd15-arch --out lora.json            # the real figures
    python benchmarks/bench_lora.py /tmp/tiny --size 64 --rank 4 --out t.json  # a smoke run

Writes a random rank-R LoRA (attention projections of the UNet and the text encoder, as most LoRAs
are) for the model in MODEL, then times with the CPU provider: `from_pretrained`, `load_lora_weights`
(reads the base weights once, re-creates the UNet and text-encoder sessions), `set_adapters` with a new
weight for both parts and for the UNet only (only its session is re-created), `fuse_lora`,
`unfuse_lora`, and one UNet call at --size without and with overridden weights (a session with
overrides runs without ONNX Runtime's NCHWc layout pass, see sessions.py). Also the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sdort.runtime import StableDiffusionPipeline


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_lora(pipe, rank: int, path: Path) -> int:
    """A kohya-free diffusers-format LoRA on the attention projections; returns its layer count."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    targets = {"unet": (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"),
               "text_encoder": ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")}
    for component, ends in targets.items():
        part = pipe._part_weights(component)
        for name, places in part.map.parameters.items():
            if name.endswith(ends):
                shape = places[0]["shape"][::-1] if places[0]["transposed"] else places[0]["shape"]
                module = name[: -len(".weight")]
                tensors[f"{component}.{module}.lora_A.weight"] = rng.standard_normal((rank, shape[1]), np.float32) * 0.01
                tensors[f"{component}.{module}.lora_B.weight"] = rng.standard_normal((shape[0], rank), np.float32) * 0.01
    save_file(tensors, str(path))
    return len(tensors) // 2


def timed(rows, label, action):
    start = time.perf_counter()
    action()
    rows.append({"step": label, "seconds": round(time.perf_counter() - start, 3), "rss_mb": round(rss_mb())})
    print(f"{label:<48} {rows[-1]['seconds']:8.2f} s  {rows[-1]['rss_mb']:8.0f} MB")


def unet_call(pipe, size: int):
    latent = size // pipe.vae_scale_factor
    width = pipe.unet.inputs["encoder_hidden_states"].shape[-1]
    feed = dict(sample=np.zeros((2, 4, latent, latent), np.float32), timestep=np.array([500.0, 500.0]),
                encoder_hidden_states=np.zeros((2, 77, width if isinstance(width, int) else 768), np.float32))
    spec = pipe.unet.inputs["timestep"]
    feed["timestep"] = feed["timestep"].astype(spec.dtype).reshape((2,) if spec.shape else ())[: 2 if spec.shape else None]
    return lambda: pipe.unet(**feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--size", type=int, default=512, help="image size of the timed UNet call (batch 2)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench_lora.json"))
    args = parser.parse_args()
    rows = []
    holder = {}
    timed(rows, "from_pretrained", lambda: holder.update(pipe=StableDiffusionPipeline.from_pretrained(
        args.model, provider="cpu")))
    pipe = holder["pipe"]
    timed(rows, f"UNet call {args.size}px, file weights", unet_call(pipe, args.size))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "lora.safetensors"
        layers = random_lora(pipe, args.rank, path)
        timed(rows, f"load_lora_weights ({layers} layers, rank {args.rank})", lambda: pipe.load_lora_weights(path, "a"))
    timed(rows, "set_adapters('a', 0.5): UNet + text encoder", lambda: pipe.set_adapters("a", 0.5))
    timed(rows, "set_adapters('a', {'unet': 0.8, te: 0.5}): UNet only",
          lambda: pipe.set_adapters("a", {"unet": 0.8, "text_encoder": 0.5}))
    timed(rows, "set_adapters, same weights: nothing re-created",
          lambda: pipe.set_adapters("a", {"unet": 0.8, "text_encoder": 0.5}))
    timed(rows, f"UNet call {args.size}px, overridden weights", unet_call(pipe, args.size))
    timed(rows, "fuse_lora()", lambda: pipe.fuse_lora())
    timed(rows, "unfuse_lora()", lambda: pipe.unfuse_lora())
    timed(rows, "unload_lora_weights()", lambda: pipe.unload_lora_weights())
    args.out.write_text(json.dumps({"model": str(args.model), "size": args.size, "rank": args.rank, "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
