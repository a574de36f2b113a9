"""`export(model, out)`: a Source to an artifact folder, written atomically.

Everything is built in a temporary folder beside OUT and renamed at the end, so a failed or
interrupted export never leaves a half-written OUT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from . import convert, optimize, parameter_map
from .lora_fusing import fuse_loras
from .parts import is_xl_unet, parts_for
from .sources import load_source

MANIFEST = "sdort.json"
DTYPES = ("fp32", "fp16")


class ExportCheckError(RuntimeError):
    """An exported part's output drifted from torch's beyond the stated tolerance."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _save_part_config(module, folder: Path) -> None:
    """config.json of the torch component, as diffusers/transformers write it."""
    if hasattr(module, "save_config"):  # diffusers models
        module.save_config(folder)
    else:  # transformers models
        module.config.save_pretrained(folder)


def cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot run a graph on the CUDA provider here, or None where it can: the
    provider listed and starting (an onnxruntime-gpu without a usable GPU lists it all the same)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"no CUDA provider in this ONNX Runtime ({ort.__version__})"
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  whatever stops it, the check is not run: say why
        return f"the CUDA provider could not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return "the CUDA provider could not start (no GPU, driver or CUDA libraries)"
    return None


def _check_cuda_part(part, folder: Path, inputs: dict, expected: list, output_names: list[str], dtype: str,
                     traced: Path) -> tuple[float, dict]:
    """The cuda target's part (`optimize.MODEL_TYPES`): its checks and its graph. Its fused operators
    have no CPU kernels, so the CPU checks the traced graph as converted for `dtype` (folder's
    model.onnx, today's export), then `optimize.optimize_part` replaces it with the CUDA graph made
    from the float32 `traced` file, which is checked on the CUDA provider where one runs here.
    Returns (largest error of the checks that ran, the optimisation record: its `checked_on` says what
    was checked where)."""
    error = convert.compare(part, folder, inputs, expected, output_names)
    checked_on = "CPUExecutionProvider: the traced graph, converted to the export's dtype without the CUDA fusions"
    optimized = optimize.optimize_part(part.name, folder, dtype, "cuda", fp32_graph=traced)
    if not optimized.get("fused"):  # the fusions failed: the traced graph stays, and was checked
        optimized["checked_on"] = checked_on
        return error, optimized
    why_not = cuda_unavailable()
    if why_not is None:
        error = max(error, convert.compare(part, folder, inputs, expected, output_names, provider="cuda"))
        checked_on += "; CUDAExecutionProvider: the CUDA-fused graph"
    else:
        checked_on += f"; the CUDA-fused graph was not run ({why_not})"
    optimized["checked_on"] = checked_on
    return error, optimized


def _build(source, tmp: Path, dtype: str, log, optimize_graphs: bool = True, target: str = "cpu") -> dict:
    """Every part, one component's weights in memory at a time: a lazy source reads or builds each
    component when its first part begins and drops it once its last part is traced and run in torch,
    before ONNX Runtime opens the graph to check it."""
    parts_info = {}
    parts = parts_for(source.modules)
    for index, part in enumerate(parts):
        start = time.perf_counter()
        module = source.load(part.component)
        folder = tmp / part.name
        scratch = tmp / f".trace-{part.name}"  # torch's graph and weight files, removed once saved
        traced = convert.trace_to_file(part, module, source.modules, scratch)
        folder.mkdir()
        _save_part_config(module, folder)
        inputs, expected = convert.reference(part, module, source.modules)
        output_names = part.output_names(module)
        # LoRA / textual inversion targets, digested while the weights are here (parameter_map.py)
        digests = (parameter_map.digest_parameters(module, float16=part.fp16 and dtype == "fp16")
                   if part.name in parameter_map.ADAPTABLE_PARTS else None)
        if all(later.component != part.component for later in parts[index + 1:]):
            del module
            source.release(part.component)
        part_dtype = dtype if part.fp16 else "fp32"
        convert.save_file(traced, folder, float16=part_dtype == "fp16")
        checked_on = None
        if optimize_graphs and target == "cuda" and part.name in optimize.MODEL_TYPES:
            # fused from the float32 trace, then converted (optimize.py); checked where it can run
            error, optimized = _check_cuda_part(part, folder, inputs, expected, output_names, part_dtype, traced)
            checked_on = optimized["checked_on"]
        else:
            # graph fusions and the CPU's ready-to-run file (optimize.py); the check runs on both files
            optimized = optimize.optimize_part(part.name, folder, part_dtype, target) if optimize_graphs else None
            checked = ["model.onnx"] + ([optimized["ready_to_run"]["file"]] if optimized else [])
            error = max(convert.compare(part, folder, inputs, expected, output_names, file) for file in checked)
        shutil.rmtree(scratch)
        del inputs, expected
        tolerance = convert.TOLERANCE[part_dtype]
        size = _folder_size(folder)
        log(f"{part.name:<15} {time.perf_counter() - start:7.1f} s  {size / 1e6:9.1f} MB  {part_dtype}  "
            f"max abs error vs torch {error:.2e} (tolerance {tolerance:.0e})")
        if checked_on:
            log(f"{'':<15} checked on {checked_on}")
        if not error <= tolerance:
            raise ExportCheckError(
                f"{part.name}: ONNX Runtime output differs from torch by {error:.3e}, above the tolerance {tolerance:.0e}"
            )
        if digests is not None:  # on the part's final model file
            parameter_map.write(digests, folder)
        parts_info[part.name] = {"dtype": part_dtype, "inputs": part.inputs, "outputs": output_names,
                                 "max_abs_error": error}
        if optimized:
            parts_info[part.name]["optimization"] = optimized
    return parts_info


# How diffusers' pipelines list their safety checker in model_index.json.
_SAFETY_CHECKER_ENTRY = ["stable_diffusion", "StableDiffusionSafetyChecker"]


def _without_safety_checker(source) -> None:
    """`--no-safety-checker`: leave the checker out (never loaded), and its feature extractor's
    config unless another part reads it."""
    source.modules.pop("safety_checker", None)
    source.loaders.pop("safety_checker", None)
    if not any(name in source.modules for name in ("depth_estimator", "image_encoder")):
        source.feature_extractor = source.feature_extractor_class = None


def _write_files(source, tmp: Path, dtype: str, parts_info: dict) -> None:
    for folder, files in source.tokenizers.items():  # none for image variation, which has no text encoder
        (tmp / folder).mkdir()
        for name, content in files.items():
            (tmp / folder / name).write_bytes(content)
    if source.feature_extractor is not None:
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_bytes(source.feature_extractor)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_bytes(source.scheduler_config)
    scheduler_class = json.loads(source.scheduler_config).get("_class_name", "PNDMScheduler")
    modules = source.modules
    index = {
        **source.pipeline_config,  # e.g. SDXL's force_zeros_for_empty_prompt, requires_aesthetics_score
        "_class_name": source.pipeline_class,
        "_diffusers_version": _version("diffusers"),
        "feature_extractor": (["transformers", source.feature_extractor_class] if source.feature_extractor is not None
                              else [None, None]),
        # with a checker, what the source says (diffusers' default True); without, no warning at load
        "requires_safety_checker": ("safety_checker" in modules
                                    and bool(source.pipeline_config.get("requires_safety_checker", True))),
        "safety_checker": ((source.model_index.get("safety_checker") or _SAFETY_CHECKER_ENTRY)
                           if "safety_checker" in modules else [None, None]),
        "scheduler": ["diffusers", scheduler_class],
    }
    for suffix in ("", "_2"):
        if f"text_encoder{suffix}" in modules:
            index[f"text_encoder{suffix}"] = ["transformers", type(modules[f"text_encoder{suffix}"]).__name__]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if is_xl_unet(modules["unet"]) and "text_encoder" not in modules:  # an SDXL refiner: listed, absent
        index["text_encoder"] = index["tokenizer"] = [None, None]
    for name in ("depth_estimator", "image_encoder"):
        if name in modules:
            index[name] = ["transformers", type(modules[name]).__name__]
    for folder, config in source.extra_scheduler_configs.items():  # the x4 upscaler's low_res_scheduler
        (tmp / folder).mkdir()
        (tmp / folder / "scheduler_config.json").write_bytes(config)
        index[folder] = ["diffusers", json.loads(config).get("_class_name", "DDPMScheduler")]
    index["unet"] = ["diffusers", type(modules["unet"]).__name__]
    index["vae_decoder"] = ["diffusers", "AutoencoderKL"]
    index["vae_encoder"] = ["diffusers", "AutoencoderKL"]
    index = dict(sorted(index.items()))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    manifest = {
        "format": 1,
        "source": source.description,
        "dtype": dtype,
        "opset": convert.OPSET,
        "parts": parts_info,
        "versions": {p: _version(p) for p in ("sdort", "torch", "diffusers", "transformers", "onnx", "onnxruntime")},
    }
    if getattr(source, "fused_loras", None):
        manifest["loras"] = source.fused_loras
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Delete what killed exports of OUT left beside it (`.OUT.partial-PID`, `.OUT.old-PID`).

    SIGKILL runs no cleanup, so the next export of the same OUT does it; folders of exports
    still running (their PID is alive) are left alone.
    """
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _ordinary_permissions(folder: Path) -> None:
    """rw-r--r-- files and rwxr-xr-x folders (less the umask): onnx writes external data 0600, which a
    service running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def export(model: str, out, dtype: str = "fp32", overwrite: bool = False, log=print,
           safety_checker: bool = True, config: str | None = None, allow_pickle: bool = False,
           loras=(), optimize_graphs: bool = True, target: str = "cpu") -> Path:
    """Export MODEL (preset, diffusers folder, single-file checkpoint or Hub id) to the artifact folder
    OUT; `safety_checker=False` leaves out the model's safety checker (`sd-export --no-safety-checker`);
    `config` and `allow_pickle` are for a single file (`sd-export --config`, `--allow-pickle`); `loras`:
    [(file, scale)] fused into the weights before tracing (`sd-export --lora FILE[:SCALE]`);
    `optimize_graphs=False` keeps the traced graphs as they are (`sd-export --no-optimize`); `target`:
    the execution provider the UNet's graph is fused for, cpu (runs anywhere) or cuda (the CUDA
    provider only; `sd-export --target`; see optimize.py)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    optimize.check_target(target)
    if target == "cuda" and not optimize_graphs:
        raise ValueError("target 'cuda' is the CUDA provider's graph fusions, which --no-optimize turns off: "
                         "drop --no-optimize, or use --target cpu --no-optimize for the traced graphs")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
    # one component's weights in memory at a time
    source = load_source(model, lazy=True, config=config, allow_pickle=allow_pickle)
    if not safety_checker:
        _without_safety_checker(source)
    if loras:
        source.fused_loras = fuse_loras(source, loras)  # recorded in sdort.json
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            parts_info = _build(source, tmp, dtype, log, optimize_graphs, target)
            _write_files(source, tmp, dtype, parts_info)
        except OSError as exc:
            if exc.errno != errno.ENOSPC and "No space left" not in str(exc):
                raise
            raise OSError(errno.ENOSPC, f"{out.parent}: no space left on the device while writing the export "
                                        f"({_folder_size(tmp) / 1e6:.0f} MB written); nothing was kept") from None
        _ordinary_permissions(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:  # also on KeyboardInterrupt
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported {source.description} to {out} ({_folder_size(out) / 1e6:.1f} MB)")
    return out
