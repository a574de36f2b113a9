"""One wrapper around an ONNX Runtime session, used for every part of every pipeline.

Input and output names, dtypes and shapes are read from the session, never assumed: exports by
sdort, by Optimum or by older diffusers scripts differ (int32 or int64 ids, float or int
timesteps, scalar or [B] timesteps, float16 or float32 parts). Inputs are cast to the dtype the
session declares and bound through IO binding, so a value placed on the device once (such as the
text embeddings, constant over all denoising steps) stays there between calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # one clear message instead of a traceback deep inside a pipeline
    raise ImportError(
        "sdort.runtime needs ONNX Runtime: install sdort[cpu] (onnxruntime) or sdort[cuda] (onnxruntime-gpu)"
    ) from None

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
PROVIDERS = ("auto", "cpu", "cuda")
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


def _providers(provider: str) -> list:
    """The execution providers to ask ONNX Runtime for, as `provider` (auto|cpu|cuda) means."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise ValueError("provider='cuda': this ONNX Runtime has no CUDA provider; install sdort[cuda] (onnxruntime-gpu)")
    if has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An ONNX Runtime session for one part (`text_encoder`, `unet`, ...), called with numpy arrays.

    `model(**inputs)` returns a dict of numpy arrays by output name. Inputs may also be OrtValues
    made by `to_device`, which are bound as they are.
    """

    def __init__(self, path, provider: str = "auto", name: str | None = None, session_options=None):
        global _warned_cpu_fallback
        path = Path(path)
        self.path = path
        self.name = name or path.parent.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the '{self.name}' model file is missing")
        providers = _providers(provider)
        options = session_options or ort.SessionOptions()
        if session_options is None:
            # A failing CUDA provider otherwise prints a wall of errors before falling back to the CPU.
            options.log_severity_level = 3
            # ONNX Runtime's CPU arena keeps every activation buffer it ever grew and fragments over
            # calls of different shapes: measured on SD 1.5's UNet at 512x512, RSS went 3.5 -> 5.7 ->
            # 8.1 GB over two calls with it, and stayed at a 6.3 GB peak (3.5 GB between calls)
            # without it, at the same speed. (CUDA allocations are the CUDA provider's own arena.)
            options.enable_cpu_mem_arena = False
        check_model_file(path)  # before ONNX Runtime reads it: a corrupt file, weights outside the folder
        cuda_tried = "CUDAExecutionProvider" in providers
        try:
            try:
                self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception:
                if provider != "auto" or not cuda_tried:
                    raise
                # Some onnxruntime-gpu builds raise instead of falling back when CUDA cannot start.
                self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
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
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        # The part's config.json (diffusers/transformers config), where the export wrote one.
        config_path = path.parent / "config.json"
        self.config = read_json(config_path) if config_path.is_file() else {}
        self.inputs = {node.name: _spec(node) for node in self.session.get_inputs()}
        self.outputs = {node.name: _spec(node) for node in self.session.get_outputs()}

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
