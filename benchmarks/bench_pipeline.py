"""Time sdort against diffusers on the same weights: session load, text encoder, one UNet step,
VAE decoder and the whole pipeline, per provider and precision, with peak memory and each
precision's fidelity. Prints a table and writes JSON.

    python benchmarks/bench_pipeline.py models/sd15-arch --sizes 256 512 --steps 3 --out bench.json \
        --openvino-python ~/.cache/sdort-tests/openvino-venv-*/bin/python

Engines: sdort on ONNX Runtime's CPU provider (fp32; CUDA too where present), sdort on the OpenVINO
provider in fp32 and, where OpenVINO says the CPU has bf16, in bf16 (these run in the Python of an
environment with onnxruntime-openvino, `--openvino-python`, as it replaces onnxruntime; this
checkout's sdort is put on its path), diffusers fp32, and diffusers under
`torch.autocast("cpu", dtype=torch.bfloat16)`.

The exported folder's manifest names its source: a preset (rebuilt with the same seed, hence the
same weights) or a diffusers folder, which diffusers loads. Each engine and size runs in its own
process, so that peak memory (max RSS) belongs to one engine alone. Times are medians.

Fidelity, against sdort's fp32 CPU run of the same size (which records, for seed 0, each step's
UNet inputs and output and the final image): `unet_rel_err`, per step, the largest difference of
this engine's UNet output on the recorded inputs as a fraction of the reference output's largest
magnitude; `image_max_abs`, the largest difference of this engine's own final image (same seed,
same steps; [0, 1] scale) from the reference image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
REPO = Path(__file__).resolve().parents[1]
# engine name -> (provider, precision) for sdort's engines; the others are diffusers'.
SDORT_ENGINES = {"cpu": ("cpu", "fp32"), "cuda": ("cuda", "fp32"),
                 "openvino-fp32": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16")}
DIFFUSERS_ENGINES = ("diffusers", "diffusers-bf16")
REFERENCE_ENGINE = "cpu"  # the fp32 run whose steps and image the fidelity figures compare with


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and, in ONNX Runtime, pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class RecordingUNet:
    """The pipeline's UNet session, recording each call's inputs and output (as numpy arrays)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, **inputs):
        import numpy as np

        outputs = self.unet(**inputs)
        # copies: the loop reuses its input buffer from step to step
        arrays = {name: np.array(value.numpy() if hasattr(value, "numpy") else value) for name, value in inputs.items()}
        self.calls.append((arrays, np.array(next(iter(outputs.values())))))
        return outputs


def record_reference(pipe, size: int, steps: int, path: Path) -> None:
    """Run seed 0 once and save each step's UNet inputs and output and the final image to `path`."""
    import numpy as np

    recorder = RecordingUNet(pipe.unet)
    pipe.unet = recorder
    image = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, generator=0, output_type="np").images
    pipe.unet = recorder.unet
    arrays = {"image": image}
    for step, (inputs, output) in enumerate(recorder.calls):
        arrays.update({f"{step}/{name}": value for name, value in inputs.items()})
        arrays[f"{step}/output"] = output
    np.savez(path, **arrays)


def reference_steps(path: Path) -> tuple:
    """(final image, [(UNet inputs, output) per step]) of a `record_reference` file."""
    import numpy as np

    data = dict(np.load(path))
    steps = sorted({int(key.split("/")[0]) for key in data if "/" in key})
    calls = [({key.split("/")[1]: value for key, value in data.items() if key.startswith(f"{step}/")
               and not key.endswith("/output")}, data[f"{step}/output"]) for step in steps]
    return data["image"], calls


def relative_error(got, expected) -> float:
    import numpy as np

    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def bench_sdort(model: Path, engine: str, size: int, steps: int, repeats: int, reference: Path | None) -> dict:
    import numpy as np

    from sdort.runtime import StableDiffusionPipeline

    provider, precision = SDORT_ENGINES[engine]
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, provider=provider, precision=precision)
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    images = []
    ids = pipe.tokenizer([PROMPT])
    latent = pipe.latent_shape(1, size, size)
    hidden = np.zeros((2, 77, pipe.unet.inputs["encoder_hidden_states"].shape[2]), np.float32)
    sample = np.random.default_rng(0).standard_normal((2, *latent[1:])).astype(np.float32)
    result = {
        "provider": f"onnxruntime {pipe.unet.session.get_providers()[0]} {precision}",
        "load": load,
        "text_encoder": median_time(lambda: pipe.text_encoder(input_ids=ids), repeats),
        "unet_step": median_time(lambda: pipe.unet(sample=sample, timestep=np.full(2, 500.0), encoder_hidden_states=hidden),
                                 repeats),
        "vae_decoder": median_time(lambda: pipe.vae_decoder(latent_sample=sample[:1]), repeats),
        "pipeline": median_time(lambda: images.append(pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
                                                           generator=0, output_type="np").images),
                                max(1, repeats // 2)),
    }
    if engine == REFERENCE_ENGINE and reference is not None:
        record_reference(pipe, size, steps, reference)
    elif reference is not None and reference.is_file():
        expected_image, calls = reference_steps(reference)
        result["unet_rel_err"] = [relative_error(next(iter(pipe.unet(**inputs).values())), output)
                                  for inputs, output in calls]
        result["image_max_abs"] = float(np.abs(images[-1] - expected_image).max())
    return result


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


def bench_diffusers(model: Path, engine: str, size: int, steps: int, repeats: int, reference: Path | None) -> dict:
    import contextlib

    import numpy as np
    import torch

    start = time.perf_counter()
    pipe = diffusers_pipeline(model)
    load = time.perf_counter() - start  # for a preset: building the modules, not reading files
    pipe.set_progress_bar_config(disable=True)
    # bf16 autocast: torch's CPU bf16 kernels for matmuls and convolutions, fp32 elsewhere
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if engine == "diffusers-bf16" \
        else contextlib.nullcontext
    images = []

    def timed(fn):
        def run():
            with precision():
                return fn()
        return run

    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    factor = pipe.vae_scale_factor
    sample = torch.randn(2, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(2, 77, pipe.unet.config.cross_attention_dim)
    t = torch.full((2,), 500.0)
    with torch.inference_mode():
        result = {
            "provider": f"torch {torch.__version__} cpu" + (" bf16 autocast" if engine == "diffusers-bf16" else ""),
            "load": load,
            "text_encoder": median_time(timed(lambda: pipe.text_encoder(ids)), repeats),
            "unet_step": median_time(timed(lambda: pipe.unet(sample, t, hidden)), repeats),
            "vae_decoder": median_time(timed(lambda: pipe.vae.decode(sample[:1])), repeats),
            "pipeline": median_time(timed(lambda: images.append(pipe(
                PROMPT, num_inference_steps=steps, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(0)).images)), max(1, repeats // 2)),
        }
        if reference is not None and reference.is_file():
            expected_image, calls = reference_steps(reference)
            errors = []
            for inputs, output in calls:
                with precision():
                    got = pipe.unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
                                    torch.from_numpy(inputs["encoder_hidden_states"])).sample
                errors.append(relative_error(got.float().numpy(), output))
            result["unet_rel_err"] = errors
            result["image_max_abs"] = float(np.abs(images[-1] - expected_image).max())
    return result


def worker(args) -> None:
    bench = bench_diffusers if args.engine in DIFFUSERS_ENGINES else bench_sdort
    result = bench(args.model, args.engine, args.size, args.steps, args.repeats, args.reference)
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
    """sdort's engines on this environment's ONNX Runtime: the CPU provider first (the fidelity reference)."""
    import onnxruntime

    return ["cpu", "cuda"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]


def openvino_environment(python: str, folder: Path) -> tuple[dict, dict]:
    """(the environment for `python`'s runs with this checkout's sdort first on its path, what its
    OpenVINO says of the CPU). `folder/sdort/` links to runtime/ and schedulers/, which pyproject
    maps to sdort.runtime and sdort.schedulers."""
    package = folder / "sdort"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("runtime", "schedulers"):
        (package / name).symlink_to(REPO / name, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    probe = ("import json, onnxruntime; from sdort.runtime import openvino; "
             "print(json.dumps({'onnxruntime': onnxruntime.__version__, 'cpu': openvino.openvino_cpu_properties(), "
             "'bf16': openvino.bf16_support()}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    return env, json.loads(out.strip().splitlines()[-1])


def ratio(row: dict, rows: list, engine: str) -> str:
    ref = next((r for r in rows if r["engine"] == engine and r["size"] == row["size"]), None)
    return f"{ref['pipeline'] / row['pipeline']:.2f}x" if ref and ref is not row else ""


def print_table(report: dict) -> None:
    """The report as a Markdown table; speed-ups = diffusers' (fp32, bf16 autocast) pipeline time / this
    engine's; fidelity against sdort's fp32 CPU run (largest per-step UNet relative error, image max abs)."""
    rows = report["rows"]
    machine = report["machine"]
    print(f"{machine['cpu']}, {machine['cores']} cores; {report['steps']} steps; medians in seconds")
    print("| size | engine | load | text encoder | UNet step (batch 2) | VAE decoder | pipeline | peak RSS MB "
          "| vs diffusers fp32 | vs diffusers bf16 | UNet rel. err. | image max abs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fidelity = (f"{max(row['unet_rel_err']):.2e} | {row['image_max_abs']:.2e}" if "unet_rel_err" in row
                    else ("reference | reference" if row["engine"] == REFERENCE_ENGINE else " | "))
        print(f"| {row['size']} | {row['engine']} | {row.get('load', float('nan')):.2f} | {row['text_encoder']:.3f} | "
              f"{row['unet_step']:.3f} | {row['vae_decoder']:.3f} | {row['pipeline']:.2f} | {row['peak_rss_mb']:.0f} | "
              f"{ratio(row, rows, 'diffusers')} | {ratio(row, rows, 'diffusers-bf16')} | {fidelity} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", help="folder written by sd-export")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of the whole-pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference")
    parser.add_argument("--no-diffusers-bf16", action="store_true", help="skip diffusers under bf16 autocast")
    parser.add_argument("--openvino-python", help="the Python of an environment with onnxruntime-openvino: "
                        "adds sdort on the OpenVINO provider (fp32, and bf16 where the CPU has it)")
    parser.add_argument("--openvino-model", type=Path, help="the folder the OpenVINO engines load (default: "
                        "MODEL); an `sd-export --no-optimize` export of the same source, as OpenVINO does not "
                        "take the CPU fusions' contrib operators")
    parser.add_argument("--out", type=Path, default=Path("bench_pipeline.json"))
    parser.add_argument("--show", type=Path, help="print the table of a saved JSON report and exit")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.show:
        return print_table(json.loads(args.show.read_text()))
    if args.engine:
        return worker(args)

    scratch = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    engines = [(engine, sys.executable, None, args.model) for engine in providers()]
    report = {"machine": machine(), "model": str(args.model.resolve()), "steps": args.steps}
    if args.openvino_python:
        env, report["openvino"] = openvino_environment(args.openvino_python, scratch / "path")
        openvino_model = args.openvino_model or args.model
        report["openvino_model"] = str(openvino_model.resolve())
        engines.append(("openvino-fp32", args.openvino_python, env, openvino_model))
        if report["openvino"]["bf16"][0]:
            engines.append(("openvino-bf16", args.openvino_python, env, openvino_model))
        else:
            print(f"skipped: openvino-bf16 ({report['openvino']['bf16'][1]})", file=sys.stderr)
    if not args.no_diffusers:
        engines.append(("diffusers", sys.executable, None, args.model))
        if not args.no_diffusers_bf16:
            engines.append(("diffusers-bf16", sys.executable, None, args.model))
    rows = []
    for size in args.sizes:
        reference = scratch / f"reference-{size}.npz"
        for engine, python, env, model in engines:
            cmd = [python, __file__, str(model.resolve()), "--engine", engine, "--size", str(size),
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--reference", str(reference)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{engine} at {size} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
            rows.append({"engine": engine, "size": size, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"done: {engine} {size}", file=sys.stderr)
    report["rows"] = rows
    shutil.rmtree(scratch, ignore_errors=True)  # the reference steps and the path links
    tmp = args.out.with_name(f".{args.out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print_table(report)


if __name__ == "__main__":
    main()
