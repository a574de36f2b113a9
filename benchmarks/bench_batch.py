"""Images per minute of `sdort batch` on a local Ray, 1 worker x T threads against W workers x 1
thread, against a plain loop in one process (one pipeline, `generate` per request). Prints a table
and writes JSON.

    sd-export sd15-arch models/sd15-arch
    python benchmarks/bench_batch.py models/sd15-arch --size 256 --steps 10 --images 12 \
        --out benchmarks/results/bench_batch_sd15-arch.json

Every engine makes the same requests (distinct prompts and seeds, one image each). Two rates:
`steady`, from the first finished image to the last (what a long job converges to: model loading
and Ray's start-up left out), and `job`, the whole command's wall time (Ray started, pipelines
loaded, PNGs written). The plain loop's `job` includes loading its pipeline and writing its PNGs.

Ray runs in a network namespace with only loopback (`unshare --net`, as root), as the tests do:
Ray registers its node on the machine's interface address even when told 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def requests(count: int, size: int, steps: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"a photo of a lighthouse, number {i}", "seed": i, "steps": steps,
             "height": size, "width": size} for i in range(count)]


def rates(count: int, job_seconds: float, finished: list[float]) -> dict:
    """Images per minute over the whole job and between the first and the last finished image."""
    finished = sorted(finished)
    span = finished[-1] - finished[0] if len(finished) > 1 else 0
    steady = (len(finished) - 1) / span * 60 if span > 0 else None
    return {"images": count, "job_seconds": round(job_seconds, 2),
            "job_images_per_min": round(count / job_seconds * 60, 2),
            "steady_images_per_min": None if steady is None else round(steady, 2)}


def plain_loop(model: str, rows: list[dict], out: Path, threads: int) -> dict:
    """One process, one pipeline, a loop over the requests: what `sdort batch` is measured against."""
    from sdort.runtime.cli import task_options
    from sdort.runtime.generation import LoadedModel, generate, write_images
    from sdort.runtime.sessions import default_session_options

    start = time.perf_counter()
    loaded = LoadedModel("txt2img", model, "cpu", session_options=default_session_options(threads))
    loaded.pipe.set_progress_bar_config(disable=True)
    finished = []
    for row in rows:
        fields = {k: v for k, v in row.items() if k != "id"}
        write_images(generate(loaded, task_options("txt2img", {**fields, "model": model})), out / f"{row['id']}.png")
        finished.append(time.perf_counter())
    return rates(len(rows), time.perf_counter() - start, finished)


def ray_job(model: str, jobs: Path, out: Path, workers: int, threads: int) -> dict:
    start = time.perf_counter()
    command = [sys.executable, "-m", "sdort.runtime.cli", "batch", "--model", model, str(jobs), "--out", str(out),
               "--workers", str(workers), "--threads-per-worker", str(threads), "--provider", "cpu"]
    result = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"sdort batch failed ({result.returncode}):\n{result.stderr[-3000:]}")
    finished = [path.stat().st_mtime for path in out.glob("*.png")]
    return rates(len(finished), seconds, finished)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder written by sd-export (tiny, sd15-arch, ...)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=12, help="requests per engine (one image each)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores to share out: 1 x CORES threads against CORES x 1 (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench_batch.json"))
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    rows = requests(args.images, args.size, args.steps)
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(row) + "\n" for row in rows))
        cores = args.cores
        plan = [(f"plain loop, 1 process x {cores} threads", lambda out: plain_loop(model, rows, out, cores)),
                (f"sdort batch, 1 worker x {cores} threads", lambda out: ray_job(model, jobs, out, 1, cores)),
                (f"sdort batch, {cores} workers x 1 thread", lambda out: ray_job(model, jobs, out, cores, 1))]
        for name, run in plan:
            out = Path(tmp) / f"out{len(engines)}"
            out.mkdir()
            engines[name] = run(out)
            print(name, engines[name], flush=True)
    print(f"\n{Path(args.model).name}, {args.size}x{args.size}, {args.steps} steps, {args.images} images\n")
    print("| engine | images/min (steady) | images/min (whole job) | job seconds |\n|---|---|---|---|")
    for name, result in engines.items():
        steady, job, seconds = (result[k] for k in ("steady_images_per_min", "job_images_per_min", "job_seconds"))
        print(f"| {name} | {steady} | {job} | {seconds} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": Path(args.model).name, "size": args.size, "steps": args.steps, "images": args.images,
        "cores": args.cores, "cpu": platform.processor() or platform.machine(), "engines": engines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
