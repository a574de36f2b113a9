"""One wrapper around an ONNX Runtime session, used for every part of every pipeline.

Input and output names, dtypes and shapes are read from the session, never assumed: exports by
sdort, by Optimum or by older diffusers scripts differ (int32 or int64 ids, float or int
timesteps, scalar or [B] timesteps, float16 or float32 parts). Inputs are cast to the dtype the
session declares and bound through IO binding, so a value placed on the device once (such as the
text embeddings, constant over all denoising steps) stays there between calls.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # one clear message instead of a traceback deep inside a pipeline
    raise ImportError(
        "sdort.runtime needs ONNX Runtime: install sdort[cpu] (onnxruntime), sdort[cuda] (onnxruntime-gpu) "
        "or sdort[openvino] (onnxruntime-openvino)"
    ) from None

from . import openvino
from .model_files import check_model_file, read_json

logger = logging.getLogger("sdort")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
}
PROVIDERS = ("auto", "cpu", "cuda", "openvino")
PRECISIONS = openvino.PRECISIONS  # fp32 everywhere; bf16 only on OpenVINO (see openvino.py)
# ONNX Runtime's exceptions for a model file it cannot load (all plain `Exception` subclasses).
_LOAD_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in
                     ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "NotImplemented")
                     if hasattr(ort.capi.onnxruntime_pybind11_state, name))
_warned_cpu_fallback = False


@dataclass(frozen=True)
class TensorSpec:
    """What a session declares for one input or output: name, numpy dtype, shape (str/None = dynamic)."""

    name: str
    dtype: type
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"'{self.name}' {np.dtype(self.dtype).name} [{dims}]"


def _spec(node) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise ValueError(f"unsupported ONNX type {node.type} for '{node.name}'")
    return TensorSpec(node.name, dtype, tuple(node.shape))


def check_provider(provider: str, precision: str = "fp32") -> None:
    """Refuse a provider or precision this environment or CPU cannot run, with what to use instead."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if provider == "openvino" and openvino.PROVIDER not in ort.get_available_providers():
        raise ValueError(f"provider='openvino': this ONNX Runtime ({ort.__version__}) has no OpenVINO provider; "
                         "install sdort[openvino] (the onnxruntime-openvino package, which takes the place of "
                         "onnxruntime in the environment: uninstall onnxruntime first)")
    if precision == "bf16" and provider != "openvino":
        raise ValueError(f"precision='bf16' is not available with provider={provider!r}: ONNX Runtime's CPU "
                         "provider has no bf16 kernels, and the CUDA provider's reduced precision is an fp16 "
                         "export (sd-export --dtype fp16). Use provider='openvino' (sdort[openvino]) on a CPU "
                         "with bf16, or precision='fp32'")
    if precision == "bf16":
        openvino.check_bf16()


def _providers(provider: str, precision: str = "fp32") -> list:
    """The execution providers to ask ONNX Runtime for, as `provider` (auto|cpu|cuda|openvino) and
    `precision` mean."""
    check_provider(provider, precision)
    if provider == "openvino":
        # The CPU provider stays as the fallback for any node OpenVINO does not take.
        return [openvino.provider_entry(precision), "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise ValueError("provider='cuda': this ONNX Runtime has no CUDA provider; install sdort[cuda] (onnxruntime-gpu)")
    if has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# The SessionOptions settings `_with_initializers` carries over to its copy (ONNX Runtime adds an
# initializer to an options object once, and has no way to copy one). Config entries made with
# `add_session_config_entry` cannot be read back, and are not carried.
_OPTION_ATTRIBUTES = ("enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse", "enable_profiling",
                      "execution_mode", "execution_order", "graph_optimization_level", "inter_op_num_threads",
                      "intra_op_num_threads", "log_severity_level", "log_verbosity_level", "logid",
                      "optimized_model_filepath", "profile_file_prefix", "use_deterministic_compute")


def _with_initializers(options, initializers: dict, keep: list):
    """A copy of `options` that gives the session `initializers` (name -> numpy array) in place of the
    model file's: ONNX Runtime's `add_initializer`, which uses the arrays' memory as it is (the
    caller keeps them alive, and the OrtValues put in `keep`, as long as the session)."""
    copy = ort.SessionOptions()
    for name in _OPTION_ATTRIBUTES:
        if hasattr(options, name):
            setattr(copy, name, getattr(options, name))
    for name, array in initializers.items():
        if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
            raise ValueError(f"initializers['{name}']: a C-contiguous numpy array is needed")
        keep.append(ort.OrtValue.ortvalue_from_numpy(array))
        copy.add_initializer(name, keep[-1])
    return copy


def default_session_options(threads: int | None = None):
    """The ONNX Runtime session options sdort's sessions use when given none; `threads`: ONNX
    Runtime's intra-op threads per session (None: its default, one per physical core)."""
    options = ort.SessionOptions()
    # A failing CUDA provider otherwise prints a wall of errors before falling back to the CPU.
    options.log_severity_level = 3
    # ONNX Runtime's CPU arena keeps every activation buffer it ever grew and fragments over
    # calls of different shapes: measured on SD 1.5's UNet at 512x512, RSS went 3.5 -> 5.7 ->
    # 8.1 GB over two calls with it, and stayed at a 6.3 GB peak (3.5 GB between calls)
    # without it, at the same speed. (CUDA allocations are the CUDA provider's own arena.)
    options.enable_cpu_mem_arena = False
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def ready_to_run_file(path: Path, providers: list) -> Path | None:
    """The ready-to-run file the export saved beside `path` (`sd-export`'s model.ort.onnx: the graph
    as ONNX Runtime's CPU provider optimises it, see export/optimize.py), where a session of
    `providers` can use it: the CPU provider alone, the ONNX Runtime version that wrote it, and
    `path` still the model.onnx it was made from (its SHA-256), as the model's sdort.json records.
    None otherwise: then model.onnx, optimised at load, serves (CUDA, OpenVINO, another ONNX
    Runtime, a graph edited since the export, an export without the file)."""
    ready = _ready_record(path, providers)
    if ready.get("onnxruntime") != ort.__version__:
        return None
    file = path.parent / Path(str(ready.get("file", ""))).name  # a file of this folder, whatever it says
    if not file.is_file() or file == path or ready.get("model_sha256") != file_sha256(path):
        return None
    return file


def _optimization_record(path: Path) -> dict:
    """What the export's sdort.json says of the graph optimisation of `path`'s part ({} if nothing)."""
    manifest = path.parent.parent / "sdort.json"
    if path.name != "model.onnx" or not manifest.is_file():
        return {}
    return read_json(manifest).get("parts", {}).get(path.parent.name, {}).get("optimization") or {}


def _ready_record(path: Path, providers: list) -> dict:
    """What sdort.json says of the CPU ready-to-run file of `path`'s part; {} where it says nothing or
    `providers` are not the CPU provider alone."""
    if providers != ["CPUExecutionProvider"]:
        return {}
    ready = _optimization_record(path).get("ready_to_run") or {}
    return ready if ready.get("provider") == "CPUExecutionProvider" else {}


def _check_openvino_graph(path: Path, name: str) -> None:
    """OpenVINO runs standard ONNX operators only: refuse a graph the export fused for ONNX Runtime's
    CPU provider (com.microsoft MultiHeadAttention, Gelu) before ONNX Runtime splits it between the
    two providers (onnxruntime-openvino 1.24 then fails at the first call)."""
    fused = _optimization_record(path).get("fused") or {}
    if fused:
        raise ValueError(f"{path}: the '{name}' graph was fused for ONNX Runtime's CPU provider "
                         f"({', '.join(sorted(fused))}), operators OpenVINO does not run; for provider='openvino' "
                         f"export the model with `sd-export SRC OUT --no-optimize`")


# A part with a ready-to-run file runs the graph of ONNX Runtime's EXTENDED level on the CPU: the file
# as it is (no optimisation at load), or model.onnx optimised at load to the same level where the file
# cannot serve (LoRA weights, an edited graph, another ONNX Runtime), so both give the same numbers.
# ALL's NCHWc layouts on top were no faster on SD 1.5's UNet (batch 2 at 512 px: 16.5 s against
# 15.0 s) and cost 9 of the 11.5 CPU seconds of its load (benchmarks/bench_cpu_graph.py).
READY_TO_RUN_LEVEL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
CPU_GRAPH_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


class OnnxModel:
    """An ONNX Runtime session for one part (`text_encoder`, `unet`, ...), called with numpy arrays.

    `model(**inputs)` returns a dict of numpy arrays by output name. Inputs may also be OrtValues
    made by `to_device`, which are bound as they are.
    """

    def __init__(self, path, provider: str = "auto", name: str | None = None, session_options=None,
                 precision: str = "fp32", initializers: dict | None = None):
        global _warned_cpu_fallback
        path = Path(path)
        self.path = path
        self.name = name or path.parent.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the '{self.name}' model file is missing")
        providers = _providers(provider, precision)
        if provider == "openvino":
            _check_openvino_graph(path, self.name)
        self.precision = precision
        options = session_options or default_session_options()
        # `initializers` (name -> numpy array) replace the file's weights of those names: run-time
        # LoRA and textual inversion (see `reload`).
        self._reopen = dict(provider=provider, session_options=session_options, precision=precision)
        self.initializers = dict(initializers or {})
        self._initializer_values = []
        # ONNX Runtime's NCHWc layout pass (CPU, ORT_ENABLE_ALL) re-lays Conv weights out from the file's
        # values, before given initializers take effect: with it, a changed Conv weight is silently
        # ignored (measured on onnxruntime 1.32). Changed weights disable that one pass.
        ignores_overrides = {"disabled_optimizers": ["NchwcTransformer"]} if self.initializers else {}
        if self.initializers:
            options = _with_initializers(options, self.initializers, self._initializer_values)
        # The export's ready-to-run CPU graph loads in a fraction of model.onnx's time (no optimisation
        # at load); used with sdort's own session options and the file's own weights only.
        self.file = path
        if session_options is None and _ready_record(path, providers):
            ready = None if self.initializers else ready_to_run_file(path, providers)
            self.file = ready or path
            options.graph_optimization_level = READY_TO_RUN_LEVEL if ready else CPU_GRAPH_LEVEL
        check_model_file(self.file)  # before ONNX Runtime reads it: a corrupt file, weights outside the folder
        cuda_tried = "CUDAExecutionProvider" in providers
        try:
            try:
                self.session = ort.InferenceSession(str(self.file), sess_options=options, providers=providers,
                                                    **ignores_overrides)
            except Exception:
                if provider != "auto" or not cuda_tried:
                    raise
                # Some onnxruntime-gpu builds raise instead of falling back when CUDA cannot start.
                self.session = ort.InferenceSession(str(self.file), sess_options=options,
                                                    providers=["CPUExecutionProvider"], **ignores_overrides)
        except _LOAD_ERRORS as exc:
            # ONNX Runtime's own errors for a model it cannot load: one line naming the file.
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: ONNX Runtime cannot load the '{self.name}' model: {detail}") from None
        active = self.session.get_providers()
        if provider == "cuda" and "CUDAExecutionProvider" not in active:
            raise RuntimeError(f"{self.name}: ONNX Runtime could not create the CUDA provider")
        if cuda_tried and "CUDAExecutionProvider" not in active and not _warned_cpu_fallback:
            # onnxruntime-gpu is installed but CUDA could not start (no GPU, driver or libraries).
            # A CPU-only onnxruntime never tries CUDA, so it has nothing to warn about.
            _warned_cpu_fallback = True
            logger.warning("sdort: ONNX Runtime could not create the CUDA provider; running on the CPU")
        if provider == "openvino" and openvino.PROVIDER not in active:
            raise RuntimeError(f"{self.name}: ONNX Runtime could not create the OpenVINO provider")
        # OpenVINO's CPU device works in host memory: its inputs and outputs bind as the CPU's do.
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        # The part's config.json (diffusers/transformers config), where the export wrote one.
        config_path = path.parent / "config.json"
        self.config = read_json(config_path) if config_path.is_file() else {}
        self.inputs = {node.name: _spec(node) for node in self.session.get_inputs()}
        self.outputs = {node.name: _spec(node) for node in self.session.get_outputs()}

    def reload(self, initializers: dict | None) -> None:
        """Re-create the session with `initializers` (name -> numpy array, kept alive here as long as
        the session) in place of the file's weights of those names; None or {}: the file's own.
        ONNX Runtime takes an initializer of another shape where the graph allows it (a longer token
        embedding table)."""
        self.__init__(self.path, name=self.name, initializers=initializers, **self._reopen)

    def __repr__(self):
        return f"OnnxModel({self.name}, device={self.device}, inputs={list(self.inputs)})"

    def _expected(self) -> str:
        return ", ".join(spec.describe() for spec in self.inputs.values())

    def prepare(self, name: str, value) -> np.ndarray:
        """Check `value` against input `name` and cast it to the session's dtype."""
        spec = self.inputs.get(name)
        if spec is None:
            raise ValueError(f"{self.name}: no input named '{name}'; it expects {self._expected()}")
        value = np.asarray(value)
        fits = value.ndim == len(spec.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(spec.shape, value.shape)
        )
        if not fits:
            raise ValueError(f"{self.name}: input {spec.describe()} does not accept shape {list(value.shape)}")
        # Not np.ascontiguousarray: it turns a 0-d array into shape [1], and IO binding does not
        # check ranks, so a rank-0 timestep (Optimum's UNet) would reach the graph as [1].
        return np.asarray(value, dtype=spec.dtype, order="C")

    def to_device(self, name: str, value):
        """Place an input on the session's device once, for reuse over many calls."""
        array = self.prepare(name, value)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}; it expects {self._expected()}")
        binding = self.session.io_binding()
        keep_alive = []  # the binding points into these buffers until the run ends
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                keep_alive.append(self.prepare(name, value))
                binding.bind_cpu_input(name, keep_alive[-1])
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))
