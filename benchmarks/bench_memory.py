"""Resident memory over many generations in one process: does it stop growing?

    python benchmarks/bench_memory.py models/tiny --calls 50 --size 64 --steps 10 --out memory.json

Loads one pipeline and calls it `--calls` times with a new seed each time (a new scheduler copy,
generator and output per call, as a service would), recording the process's RSS (from /proc)
after each call. Prints RSS after calls 1, 5, 10, ... and the growth from call 5 to the last,
and writes every value as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from bench_shared_sessions import rss_mb  # the scripts' folder is on sys.path when run as a script

from sdort.runtime import StableDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default=None, help="a scheduler class name (default: the model's)")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_memory.json"))
    args = parser.parse_args()

    loaded_before = rss_mb()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, provider=args.provider)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        import sdort.schedulers

        pipe.scheduler = getattr(sdort.schedulers, args.scheduler).from_config(pipe.scheduler.config)
    loaded = rss_mb()
    rss, seconds = [], []
    for seed in range(args.calls):
        start = time.perf_counter()
        image = pipe(f"a photo of thing number {seed}", height=args.size, width=args.size,
                     num_inference_steps=args.steps, generator=seed).images[0]
        seconds.append(time.perf_counter() - start)
        del image
        gc.collect()
        rss.append(rss_mb())
    marks = sorted({1, 2, 5, 10, 20, 30, 40, args.calls} & set(range(1, args.calls + 1)))
    print(f"{args.model} {args.size}x{args.size}, {args.steps} steps, {type(pipe.scheduler).__name__}: "
          f"RSS before loading {loaded_before:.0f} MB, after loading {loaded:.0f} MB")
    print("| after call | " + " | ".join(map(str, marks)) + " |")
    print("|---|" + "---|" * len(marks))
    print("| RSS MB | " + " | ".join(f"{rss[m - 1]:.1f}" for m in marks) + " |")
    base = rss[min(4, len(rss) - 1)]
    print(f"growth from call {min(5, len(rss))} to call {len(rss)}: {rss[-1] - base:+.1f} MB "
          f"(max {max(rss):.1f} MB); median call {sorted(seconds)[len(seconds) // 2]:.2f} s")
    args.out.write_text(json.dumps({"model": str(args.model), "size": args.size, "steps": args.steps,
                                    "scheduler": type(pipe.scheduler).__name__, "rss_loaded_mb": loaded,
                                    "rss_after_call_mb": rss, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
