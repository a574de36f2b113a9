"""Time sdort's StableDiffusionXLPipeline against diffusers' on the same weights, with the images'
difference, load times and peak memory. Prints a table and writes JSON.

    sd-export sdxl-arch /tmp/sdxl-arch
    python benchmarks/bench_sdxl.py /tmp/sdxl-arch --sizes 512 --steps 3

The exported folder's manifest names its source: a preset (rebuilt with the same seed, hence the
same weights; the tokenizers and scheduler config are read from the exported folder) or a
diffusers folder, which diffusers loads. Each engine and size runs in its own process, so that
peak memory (max RSS) belongs to one engine alone; torch runs on every core. Each process loads
its pipeline, makes one warm-up image with one step (kernels chosen, buffers allocated), then
times `--repeats` whole runs (median) at guidance 5.0 (batch 2 in the UNet) with seed 0; the last
image is saved, and the report gives the largest difference between the engines' images on the
[0, 1] scale.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import machine  # the scripts' folder is on sys.path when run as a script

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 5.0
SEED = 0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sdort_pipeline(model: Path):
    from sdort.runtime import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model, provider="cpu")


def diffusers_pipeline(model: Path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    source = json.loads((model / "sdort.json").read_text())["source"]
    if not source.startswith("preset:"):
        return StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=torch.float32, add_watermarker=False)
    import diffusers
    from transformers import CLIPTokenizer

    from sdort.export.sources import build_preset

    built = build_preset(source.split(":", 1)[1])
    scheduler_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    modules = built.modules
    return StableDiffusionXLPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(model / "tokenizer_2"), unet=modules["unet"],
        scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
        add_watermarker=False, **built.pipeline_config,
    )


def worker(args) -> None:
    import numpy as np

    if args.engine == "diffusers":
        import torch

        torch.set_num_threads(os.cpu_count())
        start = time.perf_counter()
        pipe = diffusers_pipeline(args.model)
        load = time.perf_counter() - start

        def generate(steps):
            with torch.inference_mode():
                return pipe(PROMPT, num_inference_steps=steps, height=args.size, width=args.size,
                            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                            output_type="np").images
        provider = f"torch {torch.__version__} cpu, {torch.get_num_threads()} threads"
    else:
        start = time.perf_counter()
        pipe = sdort_pipeline(args.model)
        load = time.perf_counter() - start

        def generate(steps):
            return pipe(PROMPT, num_inference_steps=steps, height=args.size, width=args.size,
                        guidance_scale=GUIDANCE, generator=SEED, output_type="np").images
        import onnxruntime

        provider = f"onnxruntime {onnxruntime.__version__} {pipe.unet.device}"
    pipe.set_progress_bar_config(disable=True)
    loaded_rss = rss_mb()
    start = time.perf_counter()
    generate(1)  # warm-up
    warmup = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image = generate(args.steps)
        times.append(time.perf_counter() - start)
    np.save(args.image, np.asarray(image, dtype=np.float32))
    print(json.dumps({
        "provider": provider, "load_s": load, "rss_after_load_mb": loaded_rss, "warmup_1_step_s": warmup,
        "pipeline_s": statistics.median(times), "runs_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def cpu_slug(cpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", cpu.lower())).strip("-")


def print_table(report: dict) -> None:
    """The report as a Markdown table; speed-up = diffusers' pipeline time / sdort's."""
    rows = report["rows"]
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; {report['model']}; {report['steps']} steps, guidance {report['guidance']} "
          f"(UNet batch 2), seed {SEED}; seconds")
    print("| size | engine | load | pipeline | peak RSS MB | speed-up vs diffusers | max abs diff of the images |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['size']} | {row['engine']} | failed: {row['error']} | | | | |")
            continue
        ref = next((r for r in rows if r["engine"] == "diffusers" and r["size"] == row["size"] and "error" not in r),
                   None)
        ratio = f"{ref['pipeline_s'] / row['pipeline_s']:.2f}x" if ref and row is not ref else ""
        diff = report.get("max_abs_diff", {}).get(str(row["size"]))
        diff = f"{diff:.1e}" if diff is not None and row is not ref else ""
        print(f"| {row['size']} | {row['engine']} | {row['load_s']:.1f} | {row['pipeline_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {ratio} | {diff} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", help="SDXL folder written by sd-export (e.g. sdxl-arch)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of each timed run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine and size (median)")
    parser.add_argument("--engines", nargs="+", default=["sdort", "diffusers"], choices=["sdort", "diffusers"])
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/sdxl_<cpu>.json")
    parser.add_argument("--show", type=Path, help="print the table of a saved JSON report and exit")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.show:
        return print_table(json.loads(args.show.read_text()))
    if args.engine:
        return worker(args)

    import numpy as np

    info = machine()
    out = args.out or Path(__file__).parent / "results" / f"sdxl_{cpu_slug(info['cpu'])}.json"
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            for engine in args.engines:
                image = Path(scratch) / f"{engine}-{size}.npy"
                cmd = [sys.executable, __file__, str(args.model), "--engine", engine, "--size", str(size),
                       "--steps", str(args.steps), "--repeats", str(args.repeats), "--image", str(image)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:  # e.g. killed for memory: say so and go on
                    if done.returncode < 0:
                        error = f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9
                                                                          else "")
                    else:
                        error = (done.stderr.strip().splitlines() or [""])[-1]
                    rows.append({"engine": engine, "size": size, "error": f"rc {done.returncode}: {error}"})
                else:
                    rows.append({"engine": engine, "size": size, **json.loads(done.stdout.strip().splitlines()[-1])})
                    images[engine, size] = np.load(image)
                print(f"done: {engine} {size}", file=sys.stderr)
    diffs = {str(size): float(np.abs(images["sdort", size] - images["diffusers", size]).max())
             for size in args.sizes if ("sdort", size) in images and ("diffusers", size) in images}
    report = {"machine": info, "model": str(args.model), "steps": args.steps, "guidance": GUIDANCE,
              "repeats": args.repeats, "rows": rows, "max_abs_diff": diffs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
