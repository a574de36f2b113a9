"""`sdort batch`: many generations from a JSONL file, on Ray Data, on one machine or a Ray cluster.

    sdort batch --model models/sd15 jobs.jsonl --out images/ --workers 2 --threads-per-worker 4

Each line of the jobs file is one request: the fields of `sdort <task>` (`task`, txt2img by default;
`prompt`, `negative_prompt`, `seed`, `steps`, `guidance`, `height`, `width`, `scheduler`, `num_images`,
`image`, `mask`, `strength`, ...) and an optional `id` (default: the line number), which names the
outputs: `OUTDIR/<id>.png` (`<id>-1.png`, `<id>-2.png`, ... for several images). A row gives exactly the
PNG `sdort <task>` gives with the same options: both run `generation.generate`.

The rows go through `ray.data.Dataset.map_batches` into `GenerationWorker`, a callable class whose
constructor loads the pipeline in the worker process (sessions are never pickled); its batches are
numpy in and out (uint8 NHWC images), so users can put it in their own Ray Data pipelines. The driver
writes the PNGs (with their parameters: Ray's own image writer drops PNG text) and `OUTDIR/manifest.jsonl`,
both by temporary name and rename, so a killed job leaves nothing half-written, and a rerun skips the
rows the manifest records as done whose files exist.

Ray is an optional extra (`sdort[ray]`), imported only here, only when a job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .generation import Generation, LoadedModel, generate, is_ldm3d_folder, write_images
from .sessions import check_provider, default_session_options

MANIFEST = "manifest.jsonl"
# Fields a row cannot set: the job's command line sets them for every row (or they name no output).
JOB_FIELDS = ("model", "provider", "precision", "output", "from_png")
# Fields holding file paths; relative ones are read from the jobs file's folder.
PATH_FIELDS = ("image", "mask", "depth_map", "refiner")


def derived_seed(row_id: str) -> int:
    """The seed of a row that gives none: a 32-bit number derived from its id (SHA-256).

    Derived rather than random so that a rerun, a resumed job or another cluster makes the same
    image for the same row, whatever the batching, worker count or order; it is recorded in the PNG
    and the manifest as any seed."""
    return int.from_bytes(hashlib.sha256(f"sdort-batch:{row_id}".encode()).digest()[:4], "little")


def _plain(value):
    """A batch cell as a JSON-like Python value (numpy scalars and strings unwrapped); None where it
    is missing (None, or NaN: a numeric column with missing values reaches numpy as floats)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer():  # 2.0 from such a column: "2" suits an int option (steps) and a float one
            return int(value)
    return value


def batch_requests(batch: dict) -> list[dict]:
    """The requests of a numpy batch (column -> array): one dict of fields per row. A `request`
    column, where present, holds each row's fields as JSON (as `sdort batch` sends them, so that
    rows with different fields make one table); the other columns add to it."""
    columns = {name: np.asarray(values) for name, values in batch.items()}
    count = len(next(iter(columns.values()))) if columns else 0
    requests = []
    for i in range(count):
        fields = {}
        if "request" in columns:
            fields.update(json.loads(str(columns["request"][i])))
        for name, values in columns.items():
            if name != "request" and (value := _plain(values[i])) is not None:
                fields[name] = value
        requests.append(fields)
    return requests


class GenerationWorker:
    """A Ray Data callable class that runs `sdort` generations: one pipeline loaded per worker.

        ds.map_batches(GenerationWorker, fn_constructor_kwargs={"model": "models/sd15", "threads": 2},
                       compute=ray.data.ActorPoolStrategy(size=2), num_cpus=2, batch_size=1)

    A batch's rows are requests: the fields of `sdort <task>` as columns (`prompt`, `seed`, `steps`,
    ...; `task`, txt2img by default; `id`, optional) or as a JSON `request` column. The output has one
    row per image: `id`, `index` (1-based within its request), `count` (images of the request),
    `seed`, `parameters` (the PNG's text as JSON), `image` (uint8 HWC; NHWC when a batch's images
    share a size), `status` ("ok" or "error"), `error` and `seconds`. A request without a seed uses
    `derived_seed(id)` (with no id either, a random one, reported in `seed`).

    `on_error="raise"` (the default) fails the batch on a bad request, as any Ray Data function;
    `"report"` gives that request one row with status "error", its message and an empty 0x0 image,
    and goes on. Each request runs exactly as `sdort <task>` with its options runs it
    (`generation.generate`), so the images do not depend on batching or on which worker ran them.
    `threads` is ONNX Runtime's intra-op thread count per session (None: its default, all cores);
    keep it equal across runs that must match bit for bit: the pool's size can move the last bit of
    a few pixels. `provider` and `precision` are `from_pretrained`'s.
    """

    def __init__(self, model: str, provider: str = "auto", threads: int | None = None, on_error: str = "raise",
                 precision: str = "fp32"):
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error: must be 'raise' or 'report'; got {on_error!r}")
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model: {model}: no such model folder")
        self.model, self.provider, self.precision, self.on_error = str(model), provider, precision, on_error
        # ONNX Runtime's intra-op pool otherwise takes every core: N workers would fight over them.
        self.session_options = default_session_options(threads)
        self._loaded: dict[tuple, LoadedModel] = {}
        self.load("txt2img")  # now, in the worker's constructor: the first batch does not pay for it

    def load(self, task: str, refiner: str | None = None) -> LoadedModel:
        """The task's pipeline, loaded on first use; later tasks reuse the first one's sessions."""
        key = (task, refiner)
        if key not in self._loaded:
            share = next(iter(self._loaded.values()), None)
            loaded = LoadedModel(task, self.model, self.provider, refiner, session_options=self.session_options,
                                 share=share, precision=self.precision)
            loaded.pipe.set_progress_bar_config(disable=True)  # a worker's bars would interleave with the driver's
            self._loaded[key] = loaded
        return self._loaded[key]

    def run(self, fields: dict) -> tuple[Generation | None, int, str | None]:
        """One request: (generation, seed, error message)."""
        from .cli import task_options

        fields = dict(fields)
        row_id = fields.pop("id", None)
        task = fields.pop("task", None) or "txt2img"
        if fields.get("seed") is None:
            fields["seed"] = derived_seed(str(row_id)) if row_id is not None else int(
                np.random.SeedSequence().entropy % 2**32)
        seed = fields["seed"] if isinstance(fields["seed"], int) else -1  # -1: a seed the parser will refuse
        try:
            for name in JOB_FIELDS:
                if name in fields:
                    raise ValueError(f"{name}: set for the whole job, not per row")
            options = task_options(task, {**fields, "model": self.model})
            if is_ldm3d_folder(task, self.model):
                raise ValueError("task: LDM3D's depth maps are not written by sdort batch; use sdort txt2img")
            return generate(self.load(task, getattr(options, "refiner", None)), options), seed, None
        except (ValueError, OSError, FloatingPointError, TypeError) as exc:
            if self.on_error == "raise":
                raise
            return None, seed, str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def __call__(self, batch: dict) -> dict:
        out = {name: [] for name in ("id", "index", "count", "seed", "parameters", "image", "status", "error",
                                     "seconds")}
        for fields in batch_requests(batch):
            start = time.perf_counter()
            generation, seed, error = self.run(fields)
            seconds = time.perf_counter() - start
            images = [np.asarray(image.convert("RGB")) for image in generation.images] if generation else [
                np.zeros((0, 0, 3), np.uint8)]
            for index, image in enumerate(images, 1):
                out["id"].append(str(fields.get("id", "")))
                out["index"].append(index)
                out["count"].append(len(images) if generation else 0)
                out["seed"].append(seed)
                out["parameters"].append(json.dumps(generation.parameters if generation else {}, ensure_ascii=False))
                out["image"].append(image)
                out["status"].append("ok" if generation else "error")
                out["error"].append(error or "")
                out["seconds"].append(seconds)
        columns = {name: np.asarray(values) for name, values in out.items() if name != "image"}
        columns["seed"] = columns["seed"].astype(np.int64)
        shapes = {image.shape for image in out["image"]}
        if len(shapes) == 1:
            columns["image"] = np.stack(out["image"])
        else:  # images of several sizes: Ray Data keeps them as a variable-shaped tensor column
            columns["image"] = np.empty(len(out["image"]), dtype=object)
            columns["image"][:] = out["image"]
        return columns


# ---- the `sdort batch` command ----------------------------------------------------------------


def add_arguments(parser) -> None:
    """`sdort batch`'s options."""
    from .cli import add_provider_arguments

    parser.add_argument("jobs", help="JSONL file: one request per line (the fields of sdort <task>, an optional id)")
    parser.add_argument("--model", required=True, help="folder written by sd-export (or Optimum)")
    parser.add_argument("--out", required=True, help="folder for the PNGs and manifest.jsonl (made if missing)")
    parser.add_argument("--workers", type=int, default=1, help="Ray workers, each with its own pipeline (default 1)")
    parser.add_argument("--threads-per-worker", type=int, default=None,
                        help="ONNX Runtime threads (and Ray CPUs) per worker (default: the cores / workers; "
                             "with one worker, ONNX Runtime's own default, as sdort txt2img)")
    parser.add_argument("--ray-address", default=None,
                        help="a Ray cluster to run on (auto: the one this machine belongs to, or ray://HEAD:10001); "
                             "default: a local Ray started for the job")
    add_provider_arguments(parser)  # --provider, --precision: as the task commands'


class Row:
    """One line of the jobs file: its id, its fields (paths made absolute), the error that keeps it
    from running, and its fingerprint (what it asks for, so a changed row is not taken as done)."""

    def __init__(self, line: int, text: str, base: Path, model: str):
        self.line, self.error, self.fields = line, None, {}
        self.id = str(line)
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            self.error = f"line {line}: not JSON ({exc.msg})"
            fields = {}
        if not isinstance(fields, dict):
            self.error, fields = f"line {line}: a row must be a JSON object", {}
        if fields.get("id") is not None:
            self.id = str(fields["id"])
        fields.pop("id", None)
        for name in PATH_FIELDS:  # relative to the jobs file, as a jobs file is usually written beside its images
            if isinstance(fields.get(name), str) and not Path(fields[name]).is_absolute():
                fields[name] = str(base / fields[name])
        self.fields = fields
        asked = json.dumps([model, self.id, fields], sort_keys=True)
        self.fingerprint = hashlib.sha256(asked.encode()).hexdigest()[:16]
        if self.error is None:
            self.error = self.check()

    def check(self) -> str | None:
        """What makes this row unrunnable before any model is loaded: a bad id, a job-wide or unknown
        field, a value the command's parser refuses."""
        from .cli import task_options

        if not self.id or self.id.startswith(".") or any(c in self.id for c in "/\\\0") or len(self.id) > 200:
            return f"id: {self.id!r} cannot name a file (no '/', '\\', leading '.', at most 200 characters)"
        for name in JOB_FIELDS:
            if name in self.fields:
                return f"{name}: set for the whole job on the command line, not per row"
        fields = dict(self.fields)
        task = fields.pop("task", None) or "txt2img"
        try:
            task_options(task, {**fields, "model": "."})
        except ValueError as exc:
            return str(exc).splitlines()[0]
        return None

    def request(self) -> dict:
        return {"id": self.id, "request": json.dumps(self.fields, ensure_ascii=False)}


def read_rows(jobs: Path, model: str) -> list[Row]:
    rows, seen = [], {}
    with open(jobs, encoding="utf-8") as file:
        for line, text in enumerate(file, 1):
            if not text.strip():
                continue
            row = Row(line, text, jobs.parent, model)
            if row.id in seen and row.error is None:
                row.error = f"id: {row.id!r} is also the id of line {seen[row.id]}"
            seen.setdefault(row.id, line)
            rows.append(row)
    return rows


class Manifest:
    """`OUTDIR/manifest.jsonl`: a record per row (id, files, status, seconds, error, seed), rewritten
    whole by temporary name and rename (at most once a second, and at the end), so a killed job
    leaves the last complete one."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST
        self.previous: dict[str, dict] = {}
        if self.path.is_file():
            for text in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(text)
                    # the first row with an id owns it (a later one is a duplicate, an error)
                    self.previous.setdefault(str(record["id"]), record)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line written by hand or by another tool: that row simply runs again
        self.records: dict[int, dict] = {}  # this run's, by the row's line (duplicate ids have their own)
        self._written = 0.0

    def done(self, row: Row, out: Path) -> dict | None:
        """The previous record of a row that need not run again: it succeeded, asked for the same
        thing, and all its files are there (temporary files are never listed: PNGs are renamed in)."""
        record = self.previous.get(row.id)
        if (record and record.get("status") in ("ok", "skipped") and record.get("fingerprint") == row.fingerprint
                and record.get("files") and all((out / name).is_file() for name in record["files"])):
            return record
        return None

    def add(self, record: dict, rows: list[Row], force: bool = False) -> None:
        if record:
            self.records[record["line"]] = record
        if force or time.monotonic() - self._written >= 1.0:
            self.write(rows)

    def write(self, rows: list[Row]) -> None:
        lines = []
        for row in rows:  # in the jobs file's order; rows not reached yet keep their last record
            record = self.records.get(row.line) or self.previous.get(row.id)
            if record is not None:
                lines.append(json.dumps(record, ensure_ascii=False))
        tmp = self.path.with_name(f".{MANIFEST}.partial")
        try:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._written = time.monotonic()


def record_for(row: Row, status: str, files=(), seconds=None, error=None, seed=None) -> dict:
    return {"id": row.id, "line": row.line, "task": row.fields.get("task") or "txt2img", "status": status,
            "files": list(files), "seconds": None if seconds is None else round(seconds, 3), "seed": seed,
            "error": error, "fingerprint": row.fingerprint}


def start_ray(address: str | None, cpus: int):
    """Ray for the job: (ray, whether this job started it and must stop it). A process already
    connected to Ray (a Python caller of `run_batch`) keeps its connection; otherwise connect to the
    cluster at `address`, or start a local Ray with `cpus` CPUs."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("sdort batch needs Ray Data: install sdort[ray] (pip install 'ray[data]')") from None
    import logging

    owned = not ray.is_initialized()
    if owned and address is not None:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    elif owned:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    # Ray Data's per-dataset lines (and its note that we turned its bars off) would break the row bar;
    # a failure still reaches the driver as an exception.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts rows
    return ray, owned


def plan(rows: list[Row], manifest: Manifest, out: Path) -> list[Row]:
    """Record the rows that cannot run (errors) and those already done (skipped); the rows to run."""
    todo = []
    for row in rows:
        previous = manifest.done(row, out) if row.error is None else None
        if row.error is not None:
            manifest.add(record_for(row, "error", error=row.error), rows)
        elif previous is not None:
            manifest.add(record_for(row, "skipped", previous["files"], seed=previous.get("seed")), rows)
        else:
            todo.append(row)
    manifest.add({}, rows, force=True)
    return todo


class ResultWriter:
    """Takes the workers' output rows (one per image) as they arrive, in any order; when a request's
    images are all in, writes its PNGs (`write_images`: parameters as PNG text, temporary name and
    rename) and its manifest record."""

    def __init__(self, out: Path, rows: list[Row], manifest: Manifest, done: int):
        self.out, self.rows, self.manifest, self.bar = out, rows, manifest, None
        self.done = done
        self.by_id = {row.id: row for row in rows if row.error is None}  # ids are unique among these
        self.pending: dict[str, list] = {}

    def start(self) -> None:
        """The terminal's progress bar: rows done / total and a rate, from when the workers start
        (the rows already done count as done, not in the rate)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.rows), initial=self.done, unit="row", desc="sdort batch", smoothing=0.1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def add(self, result: dict) -> None:
        from PIL import Image

        row = self.by_id[result["id"]]
        if result["status"] != "ok":
            record = record_for(row, "error", seconds=result["seconds"], error=result["error"],
                                seed=int(result["seed"]))
        else:
            images = self.pending.setdefault(row.id, [])
            images.append((int(result["index"]), np.asarray(result["image"], dtype=np.uint8)))
            if len(images) < int(result["count"]):
                return
            del self.pending[row.id]
            generation = Generation([Image.fromarray(image) for _, image in sorted(images, key=lambda x: x[0])],
                                    json.loads(result["parameters"]))
            paths = write_images(generation, self.out / f"{row.id}.png")
            record = record_for(row, "ok", [path.name for path in paths], result["seconds"], seed=int(result["seed"]))
        self.manifest.add(record, self.rows)
        self.bar.update()


def run_on_ray(todo: list[Row], args, threads: int | None, writer: ResultWriter) -> str | None:
    """Run the rows through `GenerationWorker` on Ray Data (one row a block, so that any free worker
    takes the next row); None, or the message of a failure of the job itself (Ray, a worker that
    could not start), after which the rows not finished are recorded as errors."""
    cpus = threads or max(1, (os.cpu_count() or 1) // args.workers)  # what Ray reserves for each worker
    ray, owned = start_ray(args.ray_address, args.workers * cpus)
    writer.start()
    try:
        dataset = ray.data.from_items([row.request() for row in todo], override_num_blocks=len(todo))
        results = dataset.map_batches(
            GenerationWorker, batch_size=1, batch_format="numpy", num_cpus=cpus,
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            fn_constructor_kwargs=dict(model=str(Path(args.model).resolve()), provider=args.provider,
                                       precision=args.precision, threads=threads, on_error="report"))
        for result in results.iter_rows():
            writer.add(result)
    except Exception as exc:  # noqa: BLE001 - whatever stopped the job, the manifest must say so
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for row in todo:
            if row.line not in writer.manifest.records:
                writer.manifest.records[row.line] = record_for(row, "error", error=f"job failed: {message}")
        return f"the Ray job failed: {message}"
    finally:
        if owned:
            ray.shutdown()
    return None


def run_batch(args) -> int:
    """`sdort batch`: check the job, skip the rows already done, run the others on Ray Data, write
    each request's PNGs and the manifest as results arrive; 0 if every row succeeded, else 1."""
    model, jobs, out = Path(args.model), Path(args.jobs), Path(args.out)
    if not model.is_dir():
        raise FileNotFoundError(f"--model: {model}: no such model folder")
    if not jobs.is_file():
        raise FileNotFoundError(f"jobs: {jobs} not found")
    if args.workers < 1:
        raise ValueError(f"--workers: must be at least 1; got {args.workers}")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker: must be at least 1; got {args.threads_per_worker}")
    threads = args.threads_per_worker
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)  # N pools of all the cores would fight
    # (One worker and no --threads-per-worker: ONNX Runtime's default pool, that of `sdort txt2img`. The
    # pool's size can change the last bit of a few pixels, so only equal pools promise equal PNGs.)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is not a folder")
    check_provider(args.provider, args.precision)  # here, not in every worker
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial"):  # a killed run's temporary files: never outputs
        stale.unlink(missing_ok=True)
    rows = read_rows(jobs, str(model.resolve()))
    manifest = Manifest(out)
    todo = plan(rows, manifest, out)
    writer = ResultWriter(out, rows, manifest, done=len(rows) - len(todo))
    job_error = None
    try:
        if todo:
            job_error = run_on_ray(todo, args, threads, writer)
    finally:  # Ctrl-C included: the manifest keeps every row finished so far
        writer.close()
        manifest.write(rows)
    counts = {status: sum(record["status"] == status for record in manifest.records.values())
              for status in ("ok", "skipped", "error")}
    print(f"{len(rows)} rows: {counts['ok']} made, {counts['skipped']} already done, {counts['error']} failed; "
          f"manifest: {manifest.path}")
    if job_error is not None:
        print(f"sdort: error: {job_error}", file=sys.stderr)
    return 0 if counts["error"] == 0 and len(manifest.records) == len(rows) else 1


__all__ = ["GenerationWorker", "Text2ImageWorker", "batch_requests", "derived_seed", "run_batch"]

# The name the issue and Ray's Stable Diffusion example use; the worker runs every task.
Text2ImageWorker = GenerationWorker
