"""Time one torch-compatible noise draw: sdort's TorchGenerator.randn against torch.randn.

    python benchmarks/bench_random.py --out results/bench_random.json

Prints the median wall time of one ``randn(shape)`` draw (default shape (2, 4, 128, 128), float32,
the latent of a batch of two 1024x1024 SD images) from a seeded generator, and torch's time for the
same draw when torch is importable (with a check that both give the same bits). The machine is
described (CPU model, logical cores, cores this process may use, load average), because the
numbers of a shared machine vary with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from sdort.runtime.randomness import PhiloxGenerator, TorchGenerator


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def timeit(fn, repeat: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    wall_ms = sorted(w * 1e3 for w in wall)
    return {
        "median_ms": round(statistics.median(wall_ms), 3),
        "min_ms": round(wall_ms[0], 3),
        "p90_ms": round(wall_ms[int(0.9 * (len(wall_ms) - 1))], 3),
        "median_thread_cpu_ms": round(statistics.median(cpu) * 1e3, 3),
        "repeat": repeat,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--shape", default="2,4,128,128", help="comma-separated shape (default 2,4,128,128)")
    ap.add_argument("--repeat", type=int, default=50, help="timed draws per measurement (default 50)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-torch", action="store_true", help="do not time torch even if it is installed")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))

    results = {"shape": list(shape), "dtype": "float32", "seed": args.seed, "machine": machine(), "timings": {}}

    gen = TorchGenerator(args.seed)
    results["timings"]["sdort_TorchGenerator_randn"] = timeit(lambda: gen.randn(shape), args.repeat)
    results["timings"]["sdort_TorchGenerator_randn_float16"] = timeit(
        lambda: gen.randn(shape, dtype=np.float16), max(5, args.repeat // 5))
    results["timings"]["sdort_TorchGenerator_manual_seed"] = timeit(lambda: gen.manual_seed(args.seed), args.repeat)
    philox = PhiloxGenerator(args.seed)
    results["timings"]["sdort_PhiloxGenerator_randn"] = timeit(lambda: philox.randn(shape), max(5, args.repeat // 5))

    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811 - optional comparison only
        except ImportError:
            torch = None
    if torch is not None:
        tgen = torch.Generator().manual_seed(args.seed)
        results["timings"]["torch_randn"] = timeit(lambda: torch.randn(shape, generator=tgen), args.repeat)
        results["torch"] = {
            "version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "intra_op_threads": torch.get_num_threads(),
        }
        ours = TorchGenerator(args.seed).randn(shape)
        theirs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).numpy()
        results["identical_to_torch"] = bool(np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)))

    m = results["machine"]
    print(f"machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
          f"load average {m.get('load_average_1_5_15min')}")
    print(f"numpy {m['numpy']}, python {m['python']}" + (f", torch {results['torch']['version']} "
          f"({results['torch']['cpu_capability']}, {results['torch']['intra_op_threads']} threads)"
          if torch is not None else ", torch not timed"))
    label = f"randn{shape} float32"
    for name, r in results["timings"].items():
        print(f"{name:40s} median {r['median_ms']:8.3f} ms   min {r['min_ms']:8.3f} ms   "
              f"p90 {r['p90_ms']:8.3f} ms   (thread CPU {r['median_thread_cpu_ms']:.3f} ms, n={r['repeat']})")
    if "identical_to_torch" in results:
        print(f"{label}: sdort and torch bit-identical: {results['identical_to_torch']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
