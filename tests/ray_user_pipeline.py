"""A user's own Ray Data pipeline around sdort's worker class, then `sdort batch` resuming a job, in
one process and one local Ray (tests/test_batch.py runs this in a network namespace with only loopback).

    python ray_user_pipeline.py MODEL JOBS.jsonl OUTDIR RESULT.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
import ray

from sdort.runtime.batch import Text2ImageWorker
from sdort.runtime.cli import main


def user_pipeline(model: str) -> dict:
    """Rows with the same columns (None where a row gives no value, as a table would have), two
    requests in one batch, one worker: unlike `sdort batch`'s one row a batch on two workers."""
    rows = [
        {"id": "fox", "prompt": "a fox", "steps": 2, "seed": 1, "num_images": None, "height": None, "width": None},
        {"id": "2", "prompt": "a castle", "steps": 2, "seed": None, "num_images": 2, "height": 32, "width": 32},
    ]
    ds = ray.data.from_items(rows).map_batches(
        Text2ImageWorker, fn_constructor_kwargs={"model": model, "threads": 1}, concurrency=1, batch_size=2,
        num_cpus=1, batch_format="numpy")
    out = {}
    for row in ds.take_all():
        assert row["status"] == "ok", row["error"]
        out[f"{row['id']}-{row['index']}"] = np.asarray(row["image"])
        out[f"{row['id']}-{row['index']}-parameters"] = np.asarray(row["parameters"])
    return out


if __name__ == "__main__":
    model, jobs, outdir, result = sys.argv[1:5]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    images = user_pipeline(model)
    # `sdort batch` as the console script runs it; it keeps the Ray this process already started.
    code = main(["batch", "--model", model, jobs, "--out", outdir, "--workers", "1", "--threads-per-worker", "1"])
    ray.shutdown()
    np.savez(result, **images, returncode=np.asarray(code))
    print(json.dumps({"returncode": code}))
