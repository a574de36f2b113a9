"""Time sdort on CUDA (with and without CUDA graphs) against diffusers fp16 with SDPA, on one GPU
and the same weights, in one run; writes JSON.

    python benchmarks/bench_cuda.py models/sd15-arch-fp16 --size 512 --steps 20 50 \
        --out benchmarks/results/cuda_sd15-arch.json
    python benchmarks/bench_cuda.py --smoke            # here, on the CPU: tiny preset, 64 px, 2 steps

`benchmarks/cuda.sh` installs, exports `sd15-arch` fp16 for the CUDA target and runs this.

Engines, one after the other in this process (each freed before the next):
- `sdort`: `from_pretrained(MODEL, provider="cuda")`: IO binding, the text embeddings placed on the
  GPU once, latents and noise_pred crossing to and from the host every step (the numpy scheduler);
- `sdort-cuda-graph`: the same with `cuda_graph=True`: the UNet replayed as a captured CUDA graph
  on fixed device buffers;
- `diffusers`: diffusers' StableDiffusionPipeline from the export's source (the preset rebuilt with
  its seed, or the diffusers folder: the same weights), `.to("cuda", torch.float16)`, its default
  attention processor (`AttnProcessor2_0`, torch's scaled_dot_product_attention; recorded).

For each: session load, the first call (kernel choice, buffers, graph capture), the whole pipeline at
each step count (median of `--repeats`), the per-step cost of the loop ((t[last] - t[first]) /
(steps[last] - steps[first]): the steps alone, without text encoder and VAE), and one UNet call as
the loop makes it (batch 2, guidance). For the fixed-buffer engine also the UNet run on its bound
buffers with nothing copied (`OnnxModel.run_bound`); and, once, the host<->device round trip of a
step alone: the UNet's `sample` and `timestep` copied into device OrtValues of their size and dtype
(`update_inplace`) and `out_sample` copied back (`numpy()`). Images (seed 0, guidance 7.5) are
compared: sdort against diffusers, and the CUDA-graph engine against plain sdort (max abs, [0, 1]).

`--smoke`: the same code on the CPU in well under a minute: the `tiny` preset (exported here unless
MODEL is given), 64 px, 1 and 2 steps, provider cpu, diffusers fp32 on the CPU, and in place of CUDA
graphs the fixed-buffer mode without capture (`OnnxModel(fixed_buffers=True)`), whose images must
equal plain sdort's bit for bit (the script fails otherwise).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import PROMPT, diffusers_pipeline, machine, median_time  # the scripts' folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
GUIDANCE = 7.5


def timed_runs(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls of `fn`, the last call's result); no warm-up here: the
    engines make their first call before."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def loop_step(pipeline_s: dict) -> float | None:
    """The per-step cost of the loop from the pipeline times at two step counts."""
    counts = sorted(pipeline_s)
    if len(counts) < 2:
        return None
    return (pipeline_s[counts[-1]] - pipeline_s[counts[0]]) / (counts[-1] - counts[0])


def unet_feeds(pipe, size: int) -> dict:
    """One UNet call's inputs as the loop makes them at `size` (batch 2: guidance), host arrays
    except the text embeddings, placed once with `to_device` as the loop does."""
    import numpy as np

    unet = pipe.unet
    latent = pipe.latent_shape(2, size, size)
    width = unet.inputs["encoder_hidden_states"].shape[2]
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal(latent).astype(np.float32), "timestep": pipe._timestep_feed(500.0, 2),
            "encoder_hidden_states": unet.to_device("encoder_hidden_states",
                                                    rng.standard_normal((2, 77, width)).astype(np.float32))}


def copy_round_trip(unet, feeds: dict, output, repeats: int) -> dict:
    """The host<->device copies of one step alone: `sample` and `timestep` into device OrtValues of
    the session's dtypes (`update_inplace`), `out_sample` back to the host (`numpy()`)."""
    import onnxruntime as ort

    arrays = {name: unet.prepare(name, feeds[name]) for name in ("sample", "timestep")}
    buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), a.dtype, unet.device, 0)
               for name, a in arrays.items()}
    out = ort.OrtValue.ortvalue_from_numpy(output, unet.device, 0)
    return {
        "device": unet.device,
        "host_to_device_s": median_time(lambda: [buffers[n].update_inplace(a) for n, a in arrays.items()], repeats),
        "device_to_host_s": median_time(out.numpy, repeats),
        "bytes_in": int(sum(a.nbytes for a in arrays.values())),
        "bytes_out": int(output.nbytes),
    }


def bench_sdort(model: Path, engine: str, provider: str, size: int, steps: list, repeats: int,
                cuda_graph: bool = False, fixed_buffers: bool = False) -> tuple[dict, dict]:
    """One sdort engine: (its figures, {steps: image})."""
    from sdort.runtime import StableDiffusionPipeline
    from sdort.runtime.sessions import OnnxModel

    start = time.perf_counter()
    overrides = {}
    if fixed_buffers and not cuda_graph:  # the smoke run's stand-in for CUDA graphs: the same buffers, no capture
        overrides["unet"] = OnnxModel(model / "unet" / "model.onnx", provider=provider, fixed_buffers=True)
    pipe = StableDiffusionPipeline.from_pretrained(model, provider=provider, cuda_graph=cuda_graph, **overrides)
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)

    def run(count):
        return pipe(PROMPT, num_inference_steps=count, height=size, width=size, guidance_scale=GUIDANCE,
                    generator=0, output_type="np").images

    first, _ = timed_runs(lambda: run(min(steps)), 1)  # kernels chosen, buffers made, the CUDA graph captured
    images, pipeline_s = {}, {}
    for count in steps:
        pipeline_s[count], images[count] = timed_runs(lambda: run(count), repeats)
    feeds = unet_feeds(pipe, size)
    output = pipe.unet(**feeds)["out_sample"]
    unet = {"call_s": median_time(lambda: pipe.unet(**feeds), 5 * repeats)}
    if pipe.unet.fixed_buffers:
        unet["bound_run_s"] = median_time(pipe.unet.run_bound, 5 * repeats)
    result = {"engine": engine, "providers": pipe.unet.session.get_providers(),
              "unet_dtype": pipe.unet.inputs["sample"].dtype.__name__, "cuda_graph": pipe.unet.cuda_graph,
              "fixed_buffers": pipe.unet.fixed_buffers, "load_s": load, "first_call_s": first,
              "pipeline_s": pipeline_s, "loop_step_s": loop_step(pipeline_s), "unet": unet,
              "copies": copy_round_trip(pipe.unet, feeds, output, 5 * repeats)}
    del pipe, feeds
    gc.collect()
    return result, images


def bench_diffusers(model: Path, device: str, size: int, steps: list, repeats: int) -> tuple[dict, dict]:
    """diffusers on the export's source weights: fp16 on CUDA, fp32 on the CPU (the smoke run)."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = diffusers_pipeline(model).to(device, dtype)
    load = time.perf_counter() - start  # for a preset: building the modules, not reading files
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(count):
        # the generator on the CPU, as sdort's int seed: diffusers draws the latents there and moves them
        images = pipe(PROMPT, num_inference_steps=count, height=size, width=size, guidance_scale=GUIDANCE,
                      generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
        sync()
        return images

    first, _ = timed_runs(lambda: run(min(steps)), 1)
    images, pipeline_s = {}, {}
    for count in steps:
        pipeline_s[count], images[count] = timed_runs(lambda: run(count), repeats)
    factor = pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(2, 4, size // factor, size // factor, generator=generator).to(device, dtype)
    hidden = torch.zeros(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((2,), 500.0, device=device)

    def unet_call():
        pipe.unet(sample, t, hidden)
        sync()

    with torch.inference_mode():
        unet = {"call_s": median_time(unet_call, 5 * repeats)}
    result = {"engine": "diffusers", "providers": [f"torch {torch.__version__} {device}"],
              "unet_dtype": str(dtype).replace("torch.", ""),
              "attention": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}),
              "load_s": load, "first_call_s": first, "pipeline_s": pipeline_s,
              "loop_step_s": loop_step(pipeline_s), "unet": unet}
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, images


def max_abs(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def versions() -> dict:
    """The libraries and, where there is one, the GPU."""
    import diffusers
    import numpy
    import onnxruntime
    import torch

    found = {"onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers(),
             "torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": numpy.__version__}
    if hasattr(onnxruntime, "get_build_info"):
        found["onnxruntime_build"] = onnxruntime.get_build_info()
    if torch.cuda.is_available():
        found.update(gpu=torch.cuda.get_device_name(0), torch_cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version())
        try:
            found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return found


def export_manifest(model: Path) -> dict:
    """What the export says of itself: dtype, source, the UNet's optimisation (target, fusions)."""
    manifest = json.loads((model / "sdort.json").read_text())
    unet = manifest.get("parts", {}).get("unet", {})
    return {"source": manifest.get("source"), "dtype": manifest.get("dtype"),
            "unet_optimization": unet.get("optimization")}


def print_table(report: dict) -> None:
    rows, steps = report["engines"], report["steps"]
    print(f"{report['versions'].get('gpu', report['machine']['cpu'])}; {report['size']}x{report['size']}, "
          f"guidance {GUIDANCE}; medians in seconds")
    head = " | ".join(f"{n} steps" for n in steps)
    print(f"| engine | load | first call | {head} | loop step | UNet call | UNet on bound buffers | "
          f"vs diffusers ({steps[-1]} steps) | image max abs vs diffusers |")
    print("|---|---|---|" + "---|" * len(steps) + "---|---|---|---|---|")
    reference = next((r for r in rows if r["engine"] == "diffusers"), None)
    for row in rows:
        if "error" in row:
            print(f"| {row['engine']} | failed: {row['error'].splitlines()[0][:200]} |")
            continue
        times = " | ".join(f"{row['pipeline_s'][n]:.3f}" for n in steps)
        bound = row["unet"].get("bound_run_s")
        speedup = f"{reference['pipeline_s'][steps[-1]] / row['pipeline_s'][steps[-1]]:.2f}x" if reference else ""
        diff = row.get("image_max_abs_vs_diffusers", {}).get(steps[-1])
        step = row["loop_step_s"]
        print(f"| {row['engine']} | {row['load_s']:.2f} | {row['first_call_s']:.3f} | {times} | "
              f"{'' if step is None else f'{step * 1000:.2f} ms'} | {row['unet']['call_s'] * 1000:.2f} ms | "
              f"{'' if bound is None else f'{bound * 1000:.2f} ms'} | {speedup} | {'' if diff is None else f'{diff:.2e}'} |")
    for row in rows:
        if "copies" in row:
            c = row["copies"]
            print(f"{row['engine']}: one step's round trip: {c['bytes_in']} B in {c['host_to_device_s'] * 1e6:.0f} us, "
                  f"{c['bytes_out']} B out {c['device_to_host_s'] * 1e6:.0f} us ({c['device']})")
    for note in report.get("notes", []):
        print(f"note: {note}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", help="folder written by sd-export (fp16, --target cuda)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 64 px, 1 and 2 steps, on the CPU (a check "
                        "of this script, not a measurement)")
    parser.add_argument("--note", action="append", default=[], help="recorded in the JSON (cuda.sh: how it exported)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: benchmarks/results/"
                        "cuda_<model folder>.json; smoke: a temporary file)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # first: its CUDA libraries, which onnxruntime-gpu can then use

    import onnxruntime

    scratch = None
    if args.smoke:
        args.size, args.steps, args.repeats, provider, device = 64, [1, 2], 1, "cpu", "cpu"
        torch.set_num_threads(1)  # the CPU's cores are ONNX Runtime's (see tests/conftest.py)
        if args.model is None:
            from sdort.export import export

            scratch = Path(tempfile.mkdtemp(prefix="bench_cuda-"))
            args.model = export("tiny", scratch / "tiny", log=lambda *_: None)
    else:
        provider, device = "cuda", "cuda"
        if args.model is None:
            parser.error("MODEL: give the exported folder (or --smoke)")
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            sys.exit(f"bench_cuda: needs a GPU for torch (CUDA available: {torch.cuda.is_available()}) and ONNX "
                     f"Runtime's CUDA provider (providers: {onnxruntime.get_available_providers()}); "
                     f"--smoke runs on the CPU")
        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()  # the pip-installed CUDA and cuDNN libraries, where torch did not load them
    model = args.model.resolve()
    out = args.out or (Path(tempfile.gettempdir()) / "bench_cuda_smoke.json" if args.smoke
                       else REPO / "benchmarks" / "results" / f"cuda_{model.name}.json")
    steps = sorted(set(args.steps))
    report = {"machine": machine(), "versions": versions(), "model": str(model), "export": export_manifest(model),
              "size": args.size, "steps": steps, "repeats": args.repeats, "guidance_scale": GUIDANCE,
              "prompt": PROMPT, "notes": list(args.note)}
    graph_engine = "sdort-fixed-buffers" if args.smoke else "sdort-cuda-graph"
    plain, plain_images = bench_sdort(model, "sdort", provider, args.size, steps, args.repeats)
    print(f"done: sdort ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    try:
        graphed, graphed_images = bench_sdort(model, graph_engine, provider, args.size, steps, args.repeats,
                                              cuda_graph=not args.smoke, fixed_buffers=True)
    except Exception as exc:  # noqa: BLE001  on a GPU: recorded, so that the other engines' figures still come
        if args.smoke:
            raise
        graphed, graphed_images = {"engine": graph_engine, "error": f"{type(exc).__name__}: {exc}"}, None
        gc.collect()
    print(f"done: {graph_engine} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    reference, reference_images = bench_diffusers(model, device, args.size, steps, args.repeats)
    print(f"done: diffusers ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for row, images in ((plain, plain_images), (graphed, graphed_images)):
        if images is not None:
            row["image_max_abs_vs_diffusers"] = {n: max_abs(images[n], reference_images[n]) for n in steps}
    if graphed_images is not None:
        graphed["image_max_abs_vs_sdort"] = {n: max_abs(graphed_images[n], plain_images[n]) for n in steps}
    report["engines"] = [plain, graphed, reference]
    report["seconds"] = time.perf_counter() - started
    if scratch is not None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print_table(report)
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    if args.smoke and any(graphed["image_max_abs_vs_sdort"].values()):  # numpy against numpy, same kernels
        sys.exit(f"bench_cuda: the fixed-buffer images differ from plain sdort's: {graphed['image_max_abs_vs_sdort']}")


if __name__ == "__main__":
    main()
