"""Median time of one scheduler step on a (2, 4, 128, 128) float32 latent (SD 1.5 at 1024x1024 with
guidance, the largest latent SD users run), for every sdort scheduler; writes JSON.

    python benchmarks/bench_schedulers.py --steps 25 --out bench_schedulers.json

The denoising loop of each scheduler runs with a cheap stand-in for the UNet; the time reported is
scale_model_input + step, the work the scheduler adds to each UNet call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

import numpy as np

import sdort.schedulers as S
from sdort.runtime import TorchGenerator

SHAPE = (2, 4, 128, 128)
SD15_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def time_scheduler(cls, steps: int) -> float:
    scheduler = cls.from_config(SD15_CONFIG)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    generator = TorchGenerator(0)
    latents = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * np.float32(scheduler.init_noise_sigma)
    model_output = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    times = []
    for t in scheduler.timesteps:
        start = time.perf_counter()
        scaled = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model_output, t, latents, generator=generator, eta=1.0).prev_sample
        times.append(time.perf_counter() - start)
        del scaled
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default="bench_schedulers.json")
    args = parser.parse_args()
    logging.getLogger("sdort.schedulers").setLevel(logging.ERROR)  # PNDM's keys are unknown to the others
    names = sorted(name for name in S.__all__ if name.endswith("Scheduler"))
    rows = {name: time_scheduler(getattr(S, name), args.steps) for name in names}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(f"median step on {SHAPE} float32, {args.steps} steps; {machine['cores']} cores")
    print("| scheduler | median ms |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "shape": SHAPE, "steps": args.steps, "median_seconds": rows}, f, indent=2)


if __name__ == "__main__":
    main()
