"""The fp32 CPU path, one UNet at a time: session load, step time and peak memory of graph variants.

    python benchmarks/bench_cpu_graph.py --plain models/sd15-plain/unet --optimised models/sd15/unet \
        --size 256 512 --steps 3 --rounds 2 --out benchmarks/results/cpu_graph_sd15-arch.json

Compares, for each UNet folder given (`--plain`: an export with `--no-optimize`; `--optimised`: the
default export, whose folder may also hold the ready-to-run `model.ort.onnx`):

- `*/default`: the file `OnnxModel` loads, with sdort's session options (ONNX Runtime's full graph
  optimisation at load);
- `plain/no-load-opt`: the same file with load-time optimisation off, which shows what that costs;
- `*/ready`: the ready-to-run file (already optimised at export), loaded without optimising again
  (what `OnnxModel` does), and `*/ready+load-opt` with the full optimisation at load all the same;
- `*/static`: free dimensions fixed to the run's batch, latent size and 77 tokens
  (`add_free_dimension_override_by_name`);
- `--threads`: the same with that intra-op thread count, to compare against ONNX Runtime's default.

Each variant runs in a fresh process (so its peak RSS is its own): session load time, RSS after
loading, the first call, the best of `--steps` timed calls at batch 2 (a guided step), and the peak
RSS (VmHWM); beside each wall time the process's CPU seconds (user + system), which other jobs on
a shared machine disturb much less. The variants are interleaved over `--rounds` rounds and the best
of each kept, so a disturbance hits one round, not one variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(spec: dict) -> dict:
    """One variant in this process: load, first call, best timed call, memory."""
    import numpy as np
    import onnxruntime as ort

    from sdort.runtime.sessions import OnnxModel, default_session_options

    options = default_session_options()
    if spec.get("no_load_opt"):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    latent = spec["size"] // 8
    if spec.get("static"):
        for name, value in (("batch", 2), ("height", latent), ("width", latent), ("sequence", 77)):
            options.add_free_dimension_override_by_name(name, value)
    if spec.get("threads"):
        options.intra_op_num_threads = spec["threads"]
    path = Path(spec["path"])
    start, cpu = time.perf_counter(), _cpu_s()
    unet = OnnxModel(path, provider="cpu", session_options=options)
    load_s, load_cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    rss_loaded = _status_mb("VmRSS")
    rng = np.random.default_rng(0)
    width = unet.inputs["encoder_hidden_states"].shape[2]
    feeds = {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
             "timestep": np.array([981.0, 981.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32)}
    start = time.perf_counter()
    out = unet(**feeds)["out_sample"]
    first_s = time.perf_counter() - start
    steps, cpus = [], []
    for _ in range(spec["steps"]):
        start, cpu = time.perf_counter(), _cpu_s()
        unet(**feeds)
        steps.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
    return {"load_s": load_s, "load_cpu_s": load_cpu_s, "step_cpu_s": min(cpus), "rss_loaded_mb": rss_loaded,
            "first_call_s": first_s, "step_s": min(steps),
            "peak_rss_mb": _status_mb("VmHWM"), "out_abs_max": float(np.abs(out).max()),
            "out_sum": float(out.astype(np.float64).sum())}


def variants(args) -> list[dict]:
    found = []
    for label, folder in (("plain", args.plain), ("optimised", args.optimised)):
        if folder is None:
            continue
        model = folder / "model.onnx"
        found.append({"name": f"{label}/default", "path": model})
        if label == "plain":
            found.append({"name": "plain/no-load-opt", "path": model, "no_load_opt": True})
        ready = folder / "model.ort.onnx"
        if ready.is_file():
            found.append({"name": f"{label}/ready", "path": ready, "no_load_opt": True})
            # the same file with ONNX Runtime's full optimisation at load again (its NCHWc layouts)
            found.append({"name": f"{label}/ready+load-opt", "path": ready})
        found.append({"name": f"{label}/static", "path": ready if ready.is_file() else model,
                      "no_load_opt": ready.is_file(), "static": True})
        for threads in args.threads:  # on the file OnnxModel would load
            found.append({"name": f"{label}/threads={threads}", "path": ready if ready.is_file() else model,
                          "no_load_opt": ready.is_file(), "threads": threads})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=Path, help="UNet folder of an export without graph optimisation")
    parser.add_argument("--optimised", type=Path, help="UNet folder of the default (optimised) export")
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="image sizes (square)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="*", default=[], help="intra-op thread counts to try")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_graph.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in its own process
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.plain is None and args.optimised is None:
        parser.error("give --plain and/or --optimised")
    chosen = [v for v in variants(args) if args.only is None or v["name"] in args.only]
    results = {}
    for size in args.size:
        best = {}
        for round_ in range(args.rounds):
            for variant in chosen:
                spec = {**variant, "path": str(variant["path"]), "size": size, "steps": args.steps}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                if done.returncode:
                    print(done.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{variant['name']} at {size}px failed")
                got = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{size}px round {round_ + 1} {variant['name']:<24} load {got['load_s']:6.2f} s "
                      f"(CPU {got['load_cpu_s']:6.2f} s)  step {got['step_s']:6.3f} s "
                      f"(CPU {got['step_cpu_s']:6.3f} s)  "
                      f"first {got['first_call_s']:6.3f} s  "
                      f"RSS loaded {got['rss_loaded_mb']:6.0f} MB  peak {got['peak_rss_mb']:6.0f} MB", flush=True)
                keep = best.setdefault(variant["name"], got)
                for key in ("load_s", "load_cpu_s", "step_s", "step_cpu_s", "first_call_s", "peak_rss_mb",
                            "rss_loaded_mb"):
                    keep[key] = min(keep[key], got[key])
        results[str(size)] = best
    print("\n| variant | " + " | ".join(f"{s}px step s | {s}px peak MB" for s in args.size) + " | load s |")
    print("|---|" + "---|---|" * len(args.size) + "---|")
    for name in results[str(args.size[0])]:
        cells = " | ".join(f"{results[str(s)][name]['step_s']:.3f} | {results[str(s)][name]['peak_rss_mb']:.0f}"
                           for s in args.size)
        print(f"| {name} | {cells} | {results[str(args.size[0])][name]['load_s']:.2f} |")
    import onnxruntime

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
        "rounds": args.rounds, "steps": args.steps, "batch": 2, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
