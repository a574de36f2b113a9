"""Time sdort against diffusers on the same weights: text encoder, one UNet step, VAE decoder and
the whole pipeline, per provider, with peak memory. Prints a table and writes JSON.

    python benchmarks/bench_pipeline.py models/sd15-arch --sizes 256 512 --steps 3 --out bench.json

The exported folder's manifest names its source: a preset (rebuilt with the same seed, hence the
same weights) or a diffusers folder, which diffusers loads. Each engine and size runs in its own
process, so that peak memory (max RSS) belongs to one engine alone. Times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and, in ONNX Runtime, pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sdort(model: Path, provider: str, size: int, steps: int, repeats: int) -> dict:
    import numpy as np

    from sdort.runtime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, provider=provider)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer([PROMPT])
    latent = pipe.latent_shape(1, size, size)
    hidden = np.zeros((2, 77, pipe.unet.inputs["encoder_hidden_states"].shape[2]), np.float32)
    sample = np.random.default_rng(0).standard_normal((2, *latent[1:])).astype(np.float32)
    return {
        "provider": pipe.unet.device,
        "text_encoder": median_time(lambda: pipe.text_encoder(input_ids=ids), repeats),
        "unet_step": median_time(lambda: pipe.unet(sample=sample, timestep=np.full(2, 500.0), encoder_hidden_states=hidden),
                                 repeats),
        "vae_decoder": median_time(lambda: pipe.vae_decoder(latent_sample=sample[:1]), repeats),
        "pipeline": median_time(lambda: pipe(PROMPT, num_inference_steps=steps, height=size, width=size, generator=0),
                                max(1, repeats // 2)),
    }


def diffusers_pipeline(model: Path):
    import torch
    from diffusers import StableDiffusionPipeline

    source = json.loads((model / "sdort.json").read_text())["source"]
    if source.startswith("preset:"):
        from sdort.export.sources import build_preset, shipped_tokenizer_dir
        from transformers import CLIPTokenizer

        import diffusers

        built = build_preset(source.split(":", 1)[1])
        scheduler_config = json.loads(built.scheduler_config)
        return StableDiffusionPipeline(
            vae=built.modules["vae"], text_encoder=built.modules["text_encoder"], unet=built.modules["unet"],
            tokenizer=CLIPTokenizer.from_pretrained(shipped_tokenizer_dir()),
            scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None)


def bench_diffusers(model: Path, size: int, steps: int, repeats: int) -> dict:
    import torch

    pipe = diffusers_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    factor = pipe.vae_scale_factor
    sample = torch.randn(2, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(2, 77, pipe.unet.config.cross_attention_dim)
    t = torch.full((2,), 500.0)
    with torch.inference_mode():
        return {
            "provider": f"torch {torch.__version__} cpu",
            "text_encoder": median_time(lambda: pipe.text_encoder(ids), repeats),
            "unet_step": median_time(lambda: pipe.unet(sample, t, hidden), repeats),
            "vae_decoder": median_time(lambda: pipe.vae.decode(sample[:1]), repeats),
            "pipeline": median_time(lambda: pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
                                                 generator=torch.Generator().manual_seed(0)), max(1, repeats // 2)),
        }


def worker(args) -> None:
    if args.engine == "diffusers":
        result = bench_diffusers(args.model, args.size, args.steps, args.repeats)
    else:
        result = bench_sdort(args.model, args.engine, args.size, args.steps, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def providers() -> list[str]:
    import onnxruntime

    return ["cuda", "cpu"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]


def print_table(report: dict) -> None:
    """The report as a Markdown table; speed-up = diffusers' pipeline time / this engine's."""
    rows = report["rows"]
    machine = report["machine"]
    print(f"{machine['cpu']}, {machine['cores']} cores; {report['steps']} steps; medians in seconds")
    print("| size | engine | text encoder | UNet step (batch 2) | VAE decoder | pipeline | peak RSS MB | speed-up vs diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next((r for r in rows if r["engine"] == "diffusers" and r["size"] == row["size"]), None)
        ratio = f"{ref['pipeline'] / row['pipeline']:.2f}x" if ref and row is not ref else ""
        print(f"| {row['size']} | {row['engine']} | {row['text_encoder']:.3f} | {row['unet_step']:.3f} | "
              f"{row['vae_decoder']:.3f} | {row['pipeline']:.2f} | {row['peak_rss_mb']:.0f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", help="folder written by sd-export")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of the whole-pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference")
    parser.add_argument("--out", type=Path, default=Path("bench_pipeline.json"))
    parser.add_argument("--show", type=Path, help="print the table of a saved JSON report and exit")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.show:
        return print_table(json.loads(args.show.read_text()))
    if args.engine:
        return worker(args)

    engines = providers() + ([] if args.no_diffusers else ["diffusers"])
    rows = []
    for size in args.sizes:
        for engine in engines:
            cmd = [sys.executable, __file__, str(args.model), "--engine", engine, "--size", str(size),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append({"engine": engine, "size": size, **json.loads(out)})
            print(f"done: {engine} {size}", file=sys.stderr)
    report = {"machine": machine(), "model": str(args.model), "steps": args.steps, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
