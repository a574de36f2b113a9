"""One wrapper around an ONNX Runtime session, used for every part of every pipeline.

Input and output names, dtypes and shapes are read from the session, never assumed: exports by
sdort, by Optimum or by older diffusers scripts differ (int32 or int64 ids, float or int
timesteps, scalar or [B] timesteps, float16 or float32 parts). Inputs are cast to the dtype the
session declares and bound through IO binding, so a value placed on the device once (such as the
text embeddings, constant over all denoising steps) stays there between calls.

A fixed-buffer session (`fixed_buffers=True`, and always with `cuda_graph=True`) binds one device
buffer per input and output once, at its first call, and copies each later call's values into them:
the addresses never change, as ONNX Runtime's CUDA graphs need (see `OnnxModel.__call__`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
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


def check_provider(provider: str, precision: str = "fp32", cuda_graph: bool = False) -> None:
    """Refuse a provider, precision or CUDA-graph choice this environment or CPU cannot run, with what
    to use instead."""
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
    if cuda_graph and (provider not in ("cuda", "auto") or "CUDAExecutionProvider" not in ort.get_available_providers()):
        reason = (f"provider={provider!r}" if provider not in ("cuda", "auto")
                  else f"this ONNX Runtime ({ort.__version__}) has no CUDA provider; install sdort[cuda] (onnxruntime-gpu)")
        raise ValueError(f"cuda_graph=True needs ONNX Runtime's CUDA provider (provider='cuda', or 'auto' where "
                         f"CUDA is available): {reason}; or load without cuda_graph")


def _providers(provider: str, precision: str = "fp32", cuda_graph: bool = False) -> list:
    """The execution providers to ask ONNX Runtime for, as `provider` (auto|cpu|cuda|openvino),
    `precision` and `cuda_graph` (the CUDA provider's `enable_cuda_graph`) mean."""
    check_provider(provider, precision, cuda_graph)
    if provider == "openvino":
        # The CPU provider stays as the fallback for any node OpenVINO does not take.
        return [openvino.provider_entry(precision), "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise ValueError("provider='cuda': this ONNX Runtime has no CUDA provider; install sdort[cuda] (onnxruntime-gpu)")
    if has_cuda:
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if cuda_graph else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
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


def _asks_for_cuda(providers: list) -> bool:
    """Whether the provider list (names, or (name, options) pairs) asks for the CUDA provider."""
    return any((entry if isinstance(entry, str) else entry[0]) == "CUDAExecutionProvider" for entry in providers)


def _check_graph_target(path: Path, name: str, provider: str, providers: list) -> None:
    """Refuse, before ONNX Runtime reads it, a graph the export fused for providers other than
    `providers` (those asked for, as `provider` chose them):
    - a CUDA-target graph (`sd-export --target cuda`: GroupNorm, NhwcConv, packed attention, ... which
      have no CPU or OpenVINO kernels) without the CUDA provider;
    - for OpenVINO, which runs standard ONNX operators only, any fused graph (the CPU target's
      com.microsoft MultiHeadAttention, Gelu): ONNX Runtime would split it between the two
      providers, and onnxruntime-openvino 1.24 then fails at the first call."""
    record = _optimization_record(path)
    fused = record.get("fused") or {}
    if not fused:
        return
    if record.get("target") == "cuda" and not _asks_for_cuda(providers):
        where = ("provider='auto', which found no usable CUDA provider and runs on the CPU" if provider == "auto"
                 else f"provider={provider!r}")
        raise ValueError(f"{path}: the '{name}' graph was exported for ONNX Runtime's CUDA provider (`sd-export "
                         f"--target cuda`; fused: {', '.join(sorted(fused))}) and does not run with {where}; open "
                         f"it with provider='cuda' (sdort[cuda]: onnxruntime-gpu, on a machine with a GPU), or "
                         f"export the model with `sd-export SRC OUT --target cpu`")
    if provider == "openvino":
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


@dataclass(frozen=True, eq=False)
class StagedInput:
    """What `to_device` gives on a fixed-buffer session: a private, read-only host copy of one input,
    copied into that input's fixed device buffer by the first call that uses it and not again while
    the buffer still holds it (so the text embeddings cross to the device once per loop, as an
    OrtValue from `to_device` does on an ordinary session)."""

    name: str
    array: np.ndarray


@dataclass
class _FixedBuffers:
    """A fixed-buffer session's device buffers (OrtValues, by name), bound once in `binding`;
    `staged`: the StagedInput each input buffer holds now (None: a value copied in by a call)."""

    binding: object
    inputs: dict
    outputs: dict
    staged: dict


# `run_options` of a run that ONNX Runtime must not capture into a CUDA graph (its kGraphAnnotationSkip).
_NO_CAPTURE = ort.RunOptions()
_NO_CAPTURE.add_run_config_entry("gpu_graph_id", "-1")


class OnnxModel:
    """An ONNX Runtime session for one part (`text_encoder`, `unet`, ...), called with numpy arrays.

    `model(**inputs)` returns a dict of numpy arrays by output name. Inputs may also be OrtValues
    made by `to_device`, which are bound as they are.

    `fixed_buffers=True`: every input and output is bound, once, to a device buffer made at the first
    call with that call's shapes; later calls copy their values into those buffers and read the
    outputs back (see `__call__`). `cuda_graph=True` adds ONNX Runtime's CUDA graphs on top (the CUDA
    provider's `enable_cuda_graph`: the whole UNet replayed as one launch), which need exactly that.
    A fixed-buffer session runs one call at a time (a lock), and one set of shapes for its lifetime.
    """

    def __init__(self, path, provider: str = "auto", name: str | None = None, session_options=None,
                 precision: str = "fp32", initializers: dict | None = None, fixed_buffers: bool = False,
                 cuda_graph: bool = False):
        global _warned_cpu_fallback
        path = Path(path)
        self.path = path
        self.name = name or path.parent.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the '{self.name}' model file is missing")
        providers = _providers(provider, precision, cuda_graph)
        self.cuda_graph = cuda_graph
        self.fixed_buffers = fixed_buffers or cuda_graph
        self._fixed: _FixedBuffers | None = None  # made by the first call
        self._lock = threading.Lock()
        _check_graph_target(path, self.name, provider, providers)
        self.precision = precision
        options = session_options or default_session_options()
        # `initializers` (name -> numpy array) replace the file's weights of those names: run-time
        # LoRA and textual inversion (see `reload`).
        self._reopen = dict(provider=provider, session_options=session_options, precision=precision,
                            fixed_buffers=fixed_buffers, cuda_graph=cuda_graph)
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
        cuda_tried = _asks_for_cuda(providers)
        try:
            try:
                self.session = ort.InferenceSession(str(self.file), sess_options=options, providers=providers,
                                                    **ignores_overrides)
            except Exception:
                if provider != "auto" or not cuda_tried or cuda_graph:  # CUDA graphs have no CPU fallback
                    raise
                # Some onnxruntime-gpu builds raise instead of falling back when CUDA cannot start.
                _check_graph_target(path, self.name, provider, ["CPUExecutionProvider"])
                self.session = ort.InferenceSession(str(self.file), sess_options=options,
                                                    providers=["CPUExecutionProvider"], **ignores_overrides)
        except _LOAD_ERRORS as exc:
            # ONNX Runtime's own errors for a model it cannot load: one line naming the file.
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # ONNX Runtime refuses CUDA graphs for a graph with nodes on the CPU or control flow
            hint = "; with cuda_graph=True every node must run on the CUDA provider: load without cuda_graph" \
                if cuda_graph else ""
            raise ValueError(f"{path}: ONNX Runtime cannot load the '{self.name}' model: {detail}{hint}") from None
        active = self.session.get_providers()
        if (provider == "cuda" or cuda_graph) and "CUDAExecutionProvider" not in active:
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
        """Place an input on the session's device once, for reuse over many calls.

        On a fixed-buffer session: a `StagedInput`, which the call that uses it copies into the
        input's fixed buffer (once while the buffer holds it; a second device copy would be a second
        address, which a CUDA graph cannot read)."""
        array = self.prepare(name, value)
        if self.fixed_buffers:
            staged = np.array(array, copy=True)  # its value now, as a device copy would keep it
            staged.flags.writeable = False
            return StagedInput(name, staged)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        """Run the session on `inputs` (numpy arrays, or what `to_device` made) and return its outputs.

        A fixed-buffer session's first call makes one device buffer per input and output, of that
        call's shapes and the session's dtypes, and binds them once. The outputs' shapes come from
        the session's declared dims (static, or named like an input's dim: `out_sample`'s `batch`,
        `latent_height`, ... are `sample`'s); where a dim is not declared so, from one ordinary run,
        which ONNX Runtime is told not to capture (run option gpu_graph_id -1). Every call then
        copies its inputs into those buffers (`update_inplace`; a StagedInput only when the buffer
        does not hold it already), runs the same binding (with cuda_graph: ONNX Runtime captures the
        graph on the first such run and replays it on the next ones) and copies the outputs back to
        the host.
        """
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}; it expects {self._expected()}")
        if not self.fixed_buffers:
            return self._run(inputs)
        with self._lock:  # the buffers hold one call's values at a time
            if self._fixed is None:
                arrays = {name: self._host_array(name, value) for name, value in inputs.items()}
                shapes = self._declared_output_shapes(arrays)
                if shapes is None:
                    outputs = self._run(arrays, _NO_CAPTURE if self.cuda_graph else None)
                    shapes = {name: list(array.shape) for name, array in outputs.items()}
                self._fixed = self._make_fixed_buffers(arrays, shapes)
            return self._run_fixed(inputs)

    def _run(self, inputs: dict, run_options=None) -> dict[str, np.ndarray]:
        """One run on a binding made for this call: host arrays bound where they are (ONNX Runtime
        copies them to the device), OrtValues as they are, outputs allocated on the device."""
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
        self.session.run_with_iobinding(binding, run_options)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))

    def _host_array(self, name: str, value) -> np.ndarray:
        """An input as the host array a fixed buffer is filled from (an OrtValue is read back)."""
        if isinstance(value, StagedInput):
            return value.array
        return self.prepare(name, value.numpy() if isinstance(value, ort.OrtValue) else value)

    def _declared_output_shapes(self, arrays: dict) -> dict | None:
        """The outputs' shapes for these inputs from the session's declared dims (static ones, and
        named ones that an input's dim of the same name fixes); None where one is not declared so.
        A wrong guess cannot pass silently: ONNX Runtime refuses an output buffer of another shape."""
        named = {}
        for name, array in arrays.items():
            for dim, size in zip(self.inputs[name].shape, array.shape):
                if isinstance(dim, str) and named.setdefault(dim, size) != size:
                    return None  # one name, two sizes: ONNX Runtime's run says what is wrong
        shapes = {}
        for name, spec in self.outputs.items():
            shape = [dim if isinstance(dim, int) else named.get(dim) for dim in spec.shape]
            if None in shape:
                return None
            shapes[name] = shape
        return shapes

    def _make_fixed_buffers(self, arrays: dict, shapes: dict) -> _FixedBuffers:
        """Device buffers of the first call's input shapes and of the output `shapes`, in the
        session's dtypes, bound once."""
        def buffer(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)

        binding = self.session.io_binding()
        inputs = {name: buffer(array.shape, array.dtype) for name, array in arrays.items()}
        outputs = {name: buffer(shape, self.outputs[name].dtype) for name, shape in shapes.items()}
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        return _FixedBuffers(binding, inputs, outputs, staged={})

    def _run_fixed(self, inputs: dict) -> dict[str, np.ndarray]:
        """A later call of a fixed-buffer session: copy in, run the fixed binding, copy out."""
        fixed = self._fixed
        copies = {}
        for name, value in inputs.items():
            if isinstance(value, StagedInput) and fixed.staged.get(name) is value:
                continue  # the buffer holds it already
            array = self._host_array(name, value)
            captured = fixed.inputs[name].shape()
            if list(array.shape) != captured:  # checked for every input before any buffer changes
                raise ValueError(
                    f"{self.name}: input '{name}' has shape {list(array.shape)}, but this session's fixed "
                    f"buffers{' (cuda_graph=True)' if self.cuda_graph else ''} were made at its first call for "
                    f"{captured} and hold that shape alone, as a CUDA graph replays one shape: load a new "
                    f"pipeline for another image size or batch, or load without cuda_graph")
            copies[name] = (array, value)
        for name, (array, value) in copies.items():
            fixed.inputs[name].update_inplace(array)
            fixed.staged[name] = value if isinstance(value, StagedInput) else None
        self.session.run_with_iobinding(fixed.binding)
        return {name: self._read(value) for name, value in fixed.outputs.items()}

    def _read(self, value) -> np.ndarray:
        """A fixed output buffer's values as a host array of the caller's own: a CPU OrtValue's
        `numpy()` is a view of the buffer, which the next call overwrites (the schedulers keep past
        outputs); a CUDA one's is a fresh copy from the device."""
        array = value.numpy()
        return array.copy() if self.device == "cpu" else array

    def run_bound(self) -> None:
        """Run a fixed-buffer session once more on what its input buffers hold, copying nothing in or
        out: the session's own time without the host<->device copies (benchmarks/bench_cuda.py)."""
        if self._fixed is None:
            raise ValueError(f"{self.name}: run_bound needs a fixed-buffer session after its first call")
        with self._lock:
            self.session.run_with_iobinding(self._fixed.binding)
