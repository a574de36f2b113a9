"""int8 UNets on the fp32 CPU path: fidelity and speed of ONNX Runtime's post-training quantisation.

    python benchmarks/bench_int8.py --model models/sd15 --work /tmp/sdort-int8 \
        --size 256 --steps 4 --out benchmarks/results/int8_sd15-arch.json

(SD 1.5-sized: about 15 minutes on 2 cores, 11.5 GB peak RSS while quantising, 9 GB in --work.)

`--model` is an sdort export (the default, fused fp32 export: MultiHeadAttention keeps the attention
score products out of the quantiser's reach, so only weight MatMuls and Convs become int8). Stages,
each in its own process (its memory and timings its own):

1. record: the fp32 pipeline runs text-to-image on `--calib-prompts` + `--eval-prompts` prompts
   (`--size` px, `--steps` steps, one seed per prompt) and every UNet call's inputs and output are
   kept, with the evaluation prompts' images;
2. quantise, with ONNX Runtime's own tools (`onnxruntime.quantization`), into `--work` (a folder
   built as `NAME.partial` and renamed when complete; reused on a later run unless `--requantize`):
   - `dynamic`: `quantize_dynamic`, MatMul only (weights int8, activations quantised at run time);
   - `static`: `quantize_static`, QDQ, every Conv and MatMul, per-channel int8 weights, uint8
     activations calibrated (MinMax) on the calibration prompts' recorded UNet inputs;
   - `static-keep`: the same with the sensitive layers left fp32 (`nodes_to_exclude`): the
     cross-attention to_k / to_v projections of the text embeddings, conv_in and conv_out;
   - `static-convs`: the same, with every attention / feed-forward MatMul left fp32 (Convs only);
   `reduce_range` (7-bit weights) is on where the CPU lacks VNNI, as ONNX Runtime advises for its
   u8s8 AVX2 kernels, whose 16-bit intermediate sums can saturate;
3. measure each variant and the fp32 UNet: session load (wall and CPU s), one UNet call at batch 2
   (best of `--calls`; wall and the process's CPU seconds), file size; per-step UNet error on the
   evaluation prompts' recorded inputs (max|d| / max|ref| and RMS(d) / RMS(ref), the worst call and
   the mean over calls); the evaluation prompts' images made again with the variant's UNet, same
   seeds, against the fp32 images (max and mean absolute difference on [0, 1]).

Random weights (e.g. the sd15-arch preset) make the fidelity figures only indicative: a trained UNet's
activation outliers, which are what breaks int8, are not those of a random one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a watercolour painting of a lighthouse at dusk",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox in the snow, telephoto",
    "an isometric city block at night, neon signs",
    "a portrait of an old sailor, oil painting",
]
VARIANTS = ("dynamic", "static", "static-keep", "static-convs")


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo), empty where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def prompts(args) -> tuple[list, list]:
    """Calibration prompts and held-out evaluation prompts (never the same)."""
    chosen = PROMPTS[:args.calib_prompts + args.eval_prompts]
    return chosen[:args.calib_prompts], chosen[args.calib_prompts:]


class RecordingUNet:
    """Wraps an `OnnxModel` and keeps every call's inputs (as host arrays of the session's dtypes)
    and output, so that the same UNet inputs can be fed to other UNets later."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **inputs):
        import numpy as np
        import onnxruntime as ort

        arrays = {name: (value.numpy() if isinstance(value, ort.OrtValue) else self.model.prepare(name, value))
                  for name, value in inputs.items()}
        out = self.model(**inputs)
        self.calls.append({**{name: np.array(a, copy=True) for name, a in arrays.items()},
                           "out_sample": np.array(out["out_sample"], copy=True)})
        return out


def load_pipeline(model: Path, unet=None):
    from sdort.runtime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, provider="cpu", **({"unet": unet} if unet else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt_list, args):
    """The evaluation images: one per prompt, seed `args.seed + index`, as float arrays on [0, 1]."""
    import numpy as np

    return np.concatenate([pipe(p, height=args.size, width=args.size, num_inference_steps=args.steps,
                                generator=args.seed + i, output_type="np").images
                           for i, p in enumerate(prompt_list)])


def record(args) -> dict:
    """Stage 1: the fp32 pipeline's UNet calls (inputs, outputs) and the evaluation images."""
    import numpy as np

    from sdort.runtime.sessions import OnnxModel

    start = time.perf_counter()
    calib, held_out = prompts(args)
    unet = RecordingUNet(OnnxModel(args.model / "unet" / "model.onnx", provider="cpu"))
    pipe = load_pipeline(args.model, unet)
    generate(pipe, calib, args)
    calib_calls = list(unet.calls)
    unet.calls.clear()
    images = generate(pipe, held_out, args)
    arrays = {"images": images}
    for label, calls in (("calib", calib_calls), ("eval", unet.calls)):
        for i, call in enumerate(calls):
            for name, value in call.items():
                arrays[f"{label}/{i}/{name}"] = value
    target = args.work / "record.npz"
    partial = target.with_name(f"record.partial-{os.getpid()}.npz")
    np.savez(partial, **arrays)
    os.replace(partial, target)
    return {"calib_calls": len(calib_calls), "eval_calls": len(unet.calls), "seconds": time.perf_counter() - start}


def recorded_calls(work: Path, label: str) -> list[dict]:
    import numpy as np

    data = np.load(work / "record.npz")
    calls = {}
    for key in data.files:
        if key.startswith(label + "/"):
            _, index, name = key.split("/", 2)
            calls.setdefault(int(index), {})[name] = data[key]
    return [calls[i] for i in sorted(calls)]


class RecordedInputs:
    """`onnxruntime.quantization.CalibrationDataReader` over the calibration prompts' recorded UNet
    inputs (batch 2: the guided step's negative and positive halves)."""

    def __init__(self, work: Path, input_names: list):
        self.calls = [{name: call[name] for name in input_names} for call in recorded_calls(work, "calib")]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.calls):
            return None
        self.position += 1
        return self.calls[self.position - 1]

    def __len__(self):
        return len(self.calls)

    def set_range(self, start_index: int, end_index: int):
        self.calls = self.calls[start_index:end_index]
        self.position = 0


def source_copy(args) -> Path:
    """The fp32 UNet as the quantiser reads it, copied into the work folder: ONNX Runtime's quantiser
    writes a shape-inferred copy beside its input, and the export must stay untouched (onnx refuses
    external data with several hard links, so a copy it is)."""
    folder = args.work / "src" / "unet"
    source = args.model / "unet"
    if not (folder / "model.onnx").is_file():
        partial = folder.with_name(f"unet.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for file in source.iterdir():
            if file.name.startswith("model.onnx") or file.name == "config.json":  # graph, external data
                shutil.copy2(file, partial / file.name)
        os.replace(partial, folder)
    return folder / "model.onnx"


def excluded_nodes(model_path: Path, variant: str) -> list[str]:
    """The node names `variant` keeps in fp32."""
    import onnx

    nodes = [node for node in onnx.load(model_path, load_external_data=False).graph.node
             if node.op_type in ("MatMul", "Conv")]
    names = [node.name for node in nodes]
    if variant == "static-keep":
        # Cross-attention K and V project the text embeddings, whose few huge channels (CLIP's outliers)
        # share one activation scale with the rest; the first and last convolutions touch the latents.
        return [n for n in names if "/attn2/to_k/" in n or "/attn2/to_v/" in n
                or n.startswith("/model/conv_in/") or n.startswith("/model/conv_out/")]
    if variant == "static-convs":
        return [node.name for node in nodes if node.op_type == "MatMul"]
    return []


def quantise(args, variant: str) -> dict:
    """Stage 2: one int8 UNet folder `work/VARIANT/unet/` (model.onnx + its external data, config.json)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    source = source_copy(args)
    target = args.work / variant
    partial = args.work / f"{variant}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "unet").mkdir(parents=True)
    shutil.copy2(source.parent / "config.json", partial / "unet" / "config.json")
    output = partial / "unet" / "model.onnx"
    reduce_range = not has_vnni()
    start, cpu = time.perf_counter(), _cpu_s()
    settings = {"reduce_range": reduce_range}
    # onnx's shape inference stops at ONNX Runtime's own ops (MultiHeadAttention, Gelu): what follows
    # them has no inferred type, and every float tensor of this UNet is float32.
    extra = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
    if variant == "dynamic":
        quantize_dynamic(source, output, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         reduce_range=reduce_range, use_external_data_format=True,
                         extra_options=extra)
        settings.update(op_types=["MatMul"], weights="int8 per-tensor", activations="uint8, dynamic")
    else:
        import onnx

        inputs = [i.name for i in onnx.load(source, load_external_data=False).graph.input]
        exclude = excluded_nodes(source, variant)
        quantize_static(
            source, output, RecordedInputs(args.work, inputs), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul"], per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
            # one calibration for every static variant: the ranges do not depend on what is excluded
            calibration_cache_path=args.work / "calibration.json")
        settings.update(op_types=["Conv", "MatMul"], weights="int8 per-channel", activations="uint8, MinMax",
                        calibration_calls=len(RecordedInputs(args.work, inputs)), excluded=len(exclude),
                        excluded_examples=exclude[:6])
    elapsed, elapsed_cpu = time.perf_counter() - start, _cpu_s() - cpu
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return {"quantise_s": elapsed, "quantise_cpu_s": elapsed_cpu, "peak_rss_mb": _peak_rss_mb(), **settings}


def file_size_mb(file: Path) -> float:
    """The size of a model file with its external data (the files beside it named after it)."""
    return sum(f.stat().st_size for f in file.parent.iterdir() if f.name.startswith(file.name)) / 2**20


def relative_errors(out, ref) -> tuple[float, float]:
    import numpy as np

    d = out.astype(np.float64) - ref
    return (float(np.abs(d).max() / np.abs(ref).max()),
            float(np.sqrt(np.mean(d ** 2)) / np.sqrt(np.mean(ref.astype(np.float64) ** 2))))


def measure(args, variant: str) -> dict:
    """Stage 3: one UNet (`fp32`: the export's) loaded, timed, and compared with the fp32 records."""
    import numpy as np

    from sdort.runtime.sessions import OnnxModel

    path = args.model / "unet" / "model.onnx" if variant == "fp32" else args.work / variant / "unet" / "model.onnx"
    start, cpu = time.perf_counter(), _cpu_s()
    unet = OnnxModel(path, provider="cpu")
    load_s, load_cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    calls = recorded_calls(args.work, "eval")
    feeds = {name: calls[0][name] for name in unet.inputs}
    start = time.perf_counter()
    unet(**feeds)
    first_s = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(args.calls):
        start, cpu = time.perf_counter(), _cpu_s()
        unet(**feeds)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
    errors = [relative_errors(unet(**{n: c[n] for n in unet.inputs})["out_sample"], c["out_sample"]) for c in calls]
    _, held_out = prompts(args)
    images = generate(load_pipeline(args.model, unet), held_out, args)
    reference = np.load(args.work / "record.npz")["images"]
    diff = np.abs(images.astype(np.float64) - reference)
    return {
        "file": str(unet.file), "size_mb": file_size_mb(unet.file),
        "load_s": load_s, "load_cpu_s": load_cpu_s, "first_call_s": first_s,
        "call_s": min(walls), "call_cpu_s": min(cpus),
        "unet_max_rel_worst": max(e[0] for e in errors), "unet_max_rel_mean": float(np.mean([e[0] for e in errors])),
        "unet_rms_rel_worst": max(e[1] for e in errors), "unet_rms_rel_mean": float(np.mean([e[1] for e in errors])),
        "unet_calls_compared": len(errors),
        "image_max_abs": float(diff.max()), "image_mean_abs": float(diff.mean()), "images": int(len(images)),
        "peak_rss_mb": _peak_rss_mb()}


def child(args, stage: str, variant: str | None) -> dict:
    """Run one stage in a fresh process and return its JSON result."""
    command = [sys.executable, __file__, "--child", stage, "--variant", variant or "", "--model", str(args.model),
               "--work", str(args.work), "--size", str(args.size), "--steps", str(args.steps), "--seed",
               str(args.seed), "--calib-prompts", str(args.calib_prompts), "--eval-prompts", str(args.eval_prompts),
               "--calls", str(args.calls)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{stage} {variant or ''} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reuse_or_record(args) -> dict:
    """Stage 1 in a child process, unless the work folder holds a recording made with the same
    settings; a new recording discards what was made from the old one (calibration, variants)."""
    settings = {"model": str(args.model.resolve()), "size": args.size, "steps": args.steps, "seed": args.seed,
                "prompts": list(prompts(args))}
    stamp = args.work / "settings.json"
    if stamp.is_file() and (args.work / "record.npz").is_file():
        made = json.loads(stamp.read_text())
        if made.get("settings") == settings:
            return made["recording"]
    for stale in [args.work / "calibration.json", *(args.work / v for v in VARIANTS)]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    recording = child(args, "record", None)
    stamp.write_text(json.dumps({"settings": settings, "recording": recording}, indent=2) + "\n")
    return recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=False, help="an sdort fp32 export (the default fused one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdort-int8"),
                        help="scratch folder for the recordings and the quantised UNets (outside the repo)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--size", type=int, default=256, help="image size (square), px")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of each recorded / compared image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-prompts", type=int, default=3, help="prompts whose UNet inputs calibrate")
    parser.add_argument("--eval-prompts", type=int, default=2, help="held-out prompts compared (UNet and image)")
    parser.add_argument("--calls", type=int, default=3, help="timed UNet calls per variant (the best is kept)")
    parser.add_argument("--requantize", action="store_true", help="quantise again even where a variant's folder exists")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None or not (args.model / "unet" / "model.onnx").is_file():
        parser.error(f"--model: {args.model} is not an sdort export with unet/model.onnx")
    if args.calib_prompts < 1 or args.eval_prompts < 1 or args.calib_prompts + args.eval_prompts > len(PROMPTS):
        parser.error(f"--calib-prompts and --eval-prompts: at least 1 each, at most {len(PROMPTS)} together")
    if args.child:
        stage = {"record": lambda: record(args), "quantise": lambda: quantise(args, args.variant),
                 "measure": lambda: measure(args, args.variant)}[args.child]
        print(json.dumps(stage()))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recording = reuse_or_record(args)
    print(f"recorded {recording['calib_calls']} calibration and {recording['eval_calls']} evaluation UNet calls "
          f"in {recording['seconds']:.0f} s", flush=True)
    quantised = {}
    for variant in args.variants:
        if args.requantize or not (args.work / variant / "unet" / "model.onnx").is_file():
            quantised[variant] = child(args, "quantise", variant)
            print(f"quantised {variant} in {quantised[variant]['quantise_s']:.0f} s "
                  f"(peak RSS {quantised[variant]['peak_rss_mb']:.0f} MB)", flush=True)
    results = {}
    for variant in ["fp32", *args.variants]:
        results[variant] = {**child(args, "measure", variant), **quantised.get(variant, {})}
        got = results[variant]
        print(f"measured {variant}: call {got['call_s']:.2f} s, image max diff {got['image_max_abs']:.3g}", flush=True)
    print("\n| variant | UNet max rel (worst / mean) | UNet RMS rel (worst / mean) | image max / mean abs diff "
          "| UNet call s (CPU s) | load s (CPU s) | size MB |")
    print("|---|---|---|---|---|---|---|")
    for variant, got in results.items():
        print(f"| {variant} | {got['unet_max_rel_worst']:.3g} / {got['unet_max_rel_mean']:.3g} "
              f"| {got['unet_rms_rel_worst']:.3g} / {got['unet_rms_rel_mean']:.3g} "
              f"| {got['image_max_abs']:.3g} / {got['image_mean_abs']:.3g} "
              f"| {got['call_s']:.2f} ({got['call_cpu_s']:.2f}) | {got['load_s']:.1f} ({got['load_cpu_s']:.1f}) "
              f"| {got['size_mb']:.0f} |")
    import onnxruntime

    flags = cpu_flags()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + f".partial-{os.getpid()}")
    partial.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}),
        "vnni": has_vnni(), "model": str(args.model), "size": args.size, "steps": args.steps, "seed": args.seed,
        "batch": 2, "calib_prompts": prompts(args)[0], "eval_prompts": prompts(args)[1],
        "recording": recording, "total_s": time.perf_counter() - started, "results": results}, indent=2) + "\n")
    os.replace(partial, args.out)
    print(f"\n{args.out} written ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
