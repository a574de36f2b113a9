"""`sdort batch` on a real local Ray: the same PNGs as `sdort txt2img|img2img`, whatever the worker
count, batching or order; bad rows reported in the manifest while the others succeed; resume; the
worker class in a user's own Ray Data pipeline.

Ray registers its node on the machine's interface address even when told 127.0.0.1, so every Ray
process here runs in a network namespace with only loopback (`unshare --net`, as root: CI is). Ray's
start-up costs seconds on 2 cores, so the file starts Ray twice: the CLI job with 2 workers (a module
fixture), and one process that runs a user's pipeline and then resumes that job with 1 worker.

Equality is exact throughout (same code, same kernels, same seeds, same ONNX Runtime thread count),
except where `sdort txt2img` runs with its own default thread pool: see the parity test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent

JOBS = [
    {"id": "fox", "prompt": "a fox", "steps": 2, "seed": 1},
    {"prompt": "a castle", "steps": 2, "num_images": 2, "height": 32, "width": 32},  # id "2", seed from the id
    {"id": "bad", "prompt": "x", "steps": 2, "height": 7},  # refused by the pipeline, in the worker
    None,  # a blank line: not a row
    {"id": "unknown", "prompt": "x", "colour": 3},  # refused by the parser, before Ray
    {"id": "i2i", "task": "img2img", "prompt": "oil", "image": "start.png", "steps": 2, "strength": 0.5, "seed": 5},
    {"id": "noimg", "task": "img2img", "prompt": "oil", "image": "nothere.png", "steps": 2},
    {"id": "../escape", "prompt": "x"},
    {"id": "fox", "prompt": "the same id again"},
]
OK, FAILED = {"fox", "2", "i2i"}, {"bad", "unknown", "noimg", "../escape"}


def in_loopback_namespace(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `argv` in a new network namespace whose only interface is loopback, brought up."""
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("these tests run Ray in a network namespace with only loopback (`unshare --net`, "
                    f"needs root or CAP_SYS_ADMIN, and `ip`): {probe.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the driver's bar is under test
    return subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_manifest(out: Path) -> dict:
    """The manifest's records by id (a duplicate id's record is the later line's: the first wins)."""
    records = {}
    for record in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()):
        records.setdefault(record["id"], record)
    return records


def png(path: Path):
    with Image.open(path) as image:
        return np.asarray(image), dict(image.text)


@pytest.fixture(scope="module")
def job(tiny_export, tmp_path_factory):
    """The CLI job, 2 workers x 1 thread: (jobs file, output folder, completed process)."""
    folder = tmp_path_factory.mktemp("batch")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "start.png")  # read relative to the jobs file
    jobs = folder / "jobs.jsonl"
    jobs.write_text("".join((json.dumps(row) if row else "") + "\n" for row in JOBS))
    out = folder / "out"
    result = in_loopback_namespace([sys.executable, "-m", "sdort.runtime.cli", "batch", "--model", str(tiny_export),
                                    str(jobs), "--out", str(out), "--workers", "2", "--threads-per-worker", "1"])
    return jobs, out, result


def test_bad_rows_are_reported_and_the_others_succeed(job):
    jobs, out, result = job
    assert result.returncode == 1, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert {id_ for id_, record in manifest.items() if record["status"] == "ok"} == OK, manifest
    assert {id_ for id_, record in manifest.items() if record["status"] == "error"} == FAILED, manifest
    assert "multiple" in manifest["bad"]["error"] and "8" in manifest["bad"]["error"]
    assert manifest["unknown"]["error"].startswith("colour:")
    assert "nothere.png" in manifest["noimg"]["error"] and "not found" in manifest["noimg"]["error"]
    assert manifest["fox"]["error"] is None and manifest["fox"]["seconds"] > 0
    assert manifest["2"]["files"] == ["2-1.png", "2-2.png"]
    assert sorted(p.name for p in out.iterdir()) == ["2-1.png", "2-2.png", "fox.png", "i2i.png", "manifest.jsonl"]
    # the duplicate id is its own row's error (line 9), and the first row keeps its id
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["error"] for r in lines if r["line"] == 9] == ["id: 'fox' is also the id of line 1"]
    # progress on the terminal: rows done / total with a rate
    assert "sdort batch" in result.stderr and "8/8" in result.stderr  # 8 rows: the blank line is none
    assert "row/s" in result.stderr or "s/row" in result.stderr
    assert "5 failed" in result.stdout  # the four of FAILED and the duplicate id


def png_text(parameters: dict) -> dict:
    """Parameters as PNG text holds them (`save_images`: str(value), "" for None)."""
    return {key: "" if value is None else str(value) for key, value in parameters.items()}


def test_rows_give_the_pngs_of_the_task_commands(job, tiny_export, tmp_path):
    """Each row's PNG equals `sdort txt2img|img2img`'s with the same options: the command line's
    arguments parsed by the `sdort` parser and run as `run_task` runs them (`generate`,
    `write_images`), with the job's ONNX Runtime thread count (1 per worker). Pixels and PNG text
    (sdort's keys and A1111's parameters) must be equal.

    The thread count matters: ONNX Runtime's default pool (the cores) against 1 thread changed 2 of
    the 12288 values of the 64x64 fox by 1/255 on this machine. So `sdort txt2img` itself, run with
    its default pool, is held to the same PNG text and to pixels within 1/255 on at most 0.1% of
    the values."""
    from sdort.runtime.batch import derived_seed
    from sdort.runtime.cli import build_parser, main
    from sdort.runtime.generation import LoadedModel, generate, write_images
    from sdort.runtime.sessions import default_session_options

    jobs, out, _ = job
    model = str(tiny_export)
    commands = {
        "fox": ["txt2img", "--model", model, "a fox", "--steps", "2", "--seed", "1"],
        "2": ["txt2img", "--model", model, "a castle", "--steps", "2", "--seed", str(derived_seed("2")),
              "--num-images", "2", "--height", "32", "--width", "32"],
        "i2i": ["img2img", "--model", model, "oil", "--image", str(jobs.parent / "start.png"), "--steps", "2",
                "--strength", "0.5", "--seed", "5"],
    }
    one_thread = default_session_options(1)
    loaded = {task: LoadedModel(task, model, "auto", session_options=one_thread) for task in ("txt2img", "img2img")}
    for row_id, argv in commands.items():
        args = build_parser().parse_args([*argv, "-o", str(tmp_path / f"{row_id}.png")])
        for path in write_images(generate(loaded[args.command], args), args.output):
            (cli_pixels, cli_text), (batch_pixels, batch_text) = png(path), png(out / path.name)
            np.testing.assert_array_equal(batch_pixels, cli_pixels, err_msg=path.name)
            assert batch_text == cli_text, path.name
    assert png(out / "2-1.png")[1]["seed"] == str(derived_seed("2")) == str(read_manifest(out)["2"]["seed"])
    assert not np.array_equal(png(out / "2-1.png")[0], png(out / "2-2.png")[0])

    assert main([*commands["fox"], "-o", str(tmp_path / "cli.png")]) == 0  # the command itself, its own pool
    (cli_pixels, cli_text), (batch_pixels, batch_text) = png(tmp_path / "cli.png"), png(out / "fox.png")
    assert batch_text == cli_text
    difference = np.abs(batch_pixels.astype(int) - cli_pixels)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.001 * difference.size


def test_user_pipeline_and_resume_with_one_worker(job, tiny_export, tmp_path):
    """In one Ray: the worker class in a user's `map_batches` (2 requests a batch, 1 worker) gives
    the job's images; then the job resumed with 1 worker after a killed run: the deleted PNG (and
    its leftover temporary file) is made again, identical to the 2-worker run's; complete rows are
    skipped untouched; bad rows fail again."""
    jobs, first, _ = job
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "fox.png").unlink()
    (out / ".fox.png.partial").write_bytes(b"\x89PNG half")  # what a killed writer leaves
    kept = {name: (out / name).stat().st_mtime_ns for name in ("2-1.png", "2-2.png", "i2i.png")}
    result = in_loopback_namespace([sys.executable, str(HERE / "ray_user_pipeline.py"), str(tiny_export), str(jobs),
                                    str(out), str(tmp_path / "user.npz")])
    assert result.returncode == 0, result.stderr[-3000:]
    user = np.load(tmp_path / "user.npz")
    assert int(user["returncode"]) == 1  # the bad rows fail again
    for key, name in (("fox-1", "fox.png"), ("2-1", "2-1.png"), ("2-2", "2-2.png")):
        pixels, text = png(first / name)
        np.testing.assert_array_equal(user[key], pixels, err_msg=key)
        assert png_text(json.loads(str(user[f"{key}-parameters"]))) == text, key

    manifest = read_manifest(out)
    assert manifest["fox"]["status"] == "ok" and manifest["fox"]["files"] == ["fox.png"]
    assert {id_ for id_ in ("2", "i2i") if manifest[id_]["status"] == "skipped"} == {"2", "i2i"}
    assert {id_ for id_, record in manifest.items() if record["status"] == "error"} == FAILED
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    np.testing.assert_array_equal(png(out / "fox.png")[0], png(first / "fox.png")[0])
    assert png(out / "fox.png")[1] == png(first / "fox.png")[1]
    assert not list(out.glob(".*"))  # no temporary file left


def test_changed_rows_run_again_and_bad_options_exit_2(job, tiny_export, tmp_path):
    """Without Ray: a row whose fields changed is not taken as done (its fingerprint), and the
    command line's own errors exit 2 before anything runs."""
    from sdort.runtime.batch import Manifest, read_rows
    from sdort.runtime.cli import main

    jobs, out, _ = job
    rows = {}
    for row in read_rows(jobs, str(Path(tiny_export).resolve())):
        rows.setdefault(row.id, row)  # the first "fox", not its duplicate
    manifest = Manifest(out)
    assert manifest.done(rows["fox"], out) is not None
    changed = tmp_path / "jobs.jsonl"
    changed.write_text(json.dumps({**JOBS[0], "steps": 3}) + "\n")
    assert manifest.done(read_rows(changed, str(Path(tiny_export).resolve()))[0], out) is None

    base = ["batch", "--model", str(tiny_export), str(jobs), "--out", str(tmp_path / "o")]
    assert main([*base, "--workers", "0"]) == 2
    assert main([*base, "--threads-per-worker", "0"]) == 2
    assert main(["batch", "--model", str(tmp_path / "nothing"), str(jobs), "--out", str(tmp_path / "o")]) == 2
    assert main([*base[:3], str(tmp_path / "missing.jsonl"), *base[4:]]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--model", str(tiny_export), str(jobs)])  # no --out
    assert exit_.value.code == 2
    assert not (tmp_path / "o").exists()


def test_ray_is_imported_only_when_a_job_runs():
    code = ("import sys, sdort.runtime.cli, sdort.runtime.batch; "
            "sdort.runtime.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
