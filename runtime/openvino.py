"""ONNX Runtime's OpenVINO execution provider: its options for a compute precision, and whether
this CPU can run bf16.

The provider comes with the `onnxruntime-openvino` distribution (`pip install sdort[openvino]`),
which replaces `onnxruntime`: an environment holds one ONNX Runtime distribution. It runs the same
ONNX graphs through OpenVINO's CPU plugin, which has bf16 kernels (AVX-512 BF16, AMX) where ONNX
Runtime's CPU provider has only fp32 (and int8).

The precision is OpenVINO's `INFERENCE_PRECISION_HINT`, given per device in the provider option
`load_config` (a JSON string, `{"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}`), which the provider
applies after its own settings. fp32 is asked for explicitly, not left to defaults: OpenVINO's CPU
plugin, used directly, infers in bf16 by default on CPUs with native bf16 (its own
`INFERENCE_PRECISION_HINT` reads "bf16" there), and sdort's fp32 must keep its parity with diffusers.

OpenVINO's CPU plugin ignores a bf16 hint on a CPU without bf16 (measured: on an AVX2-only AMD
EPYC the "bf16" outputs equal the fp32 ones bit for bit), so `check_bf16` asks OpenVINO itself
what the CPU can do (`OPTIMIZATION_CAPABILITIES` lists BF16) and refuses rather than silently
running fp32.
"""

from __future__ import annotations

import ctypes
import json
from functools import lru_cache
from pathlib import Path

PROVIDER = "OpenVINOExecutionProvider"
PRECISIONS = ("fp32", "bf16")
# OpenVINO's names of the inference precisions sdort offers.
_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Linux CPU flags of native bf16 arithmetic (AVX-512 BF16: Intel Cooper Lake, Sapphire Rapids and
# later, AMD Zen 4 and later; AMX-BF16: Intel Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def provider_entry(precision: str) -> tuple[str, dict]:
    """The OpenVINO provider with its options for `precision` (fp32 or bf16), on OpenVINO's CPU device,
    as `InferenceSession(providers=[...])` takes it."""
    config = {"CPU": {"INFERENCE_PRECISION_HINT": _HINTS[precision]}}
    return PROVIDER, {"device_type": "CPU", "load_config": json.dumps(config)}


def _openvino_c_library():
    """OpenVINO's C library as onnxruntime-openvino ships it (beside ONNX Runtime's own), or None."""
    try:
        import onnxruntime
    except ImportError:
        return None
    folder = Path(onnxruntime.__file__).parent / "capi"
    candidates = sorted(folder.glob("libopenvino_c.so*")) + sorted(folder.glob("openvino_c.dll"))
    for candidate in candidates:
        try:
            return ctypes.CDLL(str(candidate))
        except OSError:
            continue
    return None


@lru_cache(maxsize=1)
def openvino_cpu_properties() -> dict | None:
    """OpenVINO's CPU plugin's own word on this CPU: `OPTIMIZATION_CAPABILITIES` (e.g. "FP32 INT8
    BIN EXPORT_IMPORT", with BF16 where it runs bf16), its default `INFERENCE_PRECISION_HINT`, and
    `FULL_DEVICE_NAME`; None where OpenVINO's C API cannot be reached (no onnxruntime-openvino).

    Read through OpenVINO's C API with ctypes: onnxruntime-openvino ships the library but no
    Python binding of it, and the `openvino` package would be a second copy of OpenVINO."""
    library = _openvino_c_library()
    if library is None:
        return None
    library.ov_core_create.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    library.ov_core_get_property.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                             ctypes.POINTER(ctypes.c_char_p)]
    library.ov_core_free.argtypes = [ctypes.c_void_p]
    library.ov_free.argtypes = [ctypes.c_char_p]
    core = ctypes.c_void_p()
    if library.ov_core_create(ctypes.byref(core)) != 0:  # 0 is OK in ov_status_e
        return None
    properties = {}
    try:
        for key in ("OPTIMIZATION_CAPABILITIES", "INFERENCE_PRECISION_HINT", "FULL_DEVICE_NAME"):
            value = ctypes.c_char_p()
            if library.ov_core_get_property(core, b"CPU", key.encode(), ctypes.byref(value)) == 0 and value.value:
                properties[key] = value.value.decode(errors="replace")
                library.ov_free(value)
    finally:
        library.ov_core_free(core)
    return properties or None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "this CPU"


def bf16_support() -> tuple[bool, str]:
    """Whether OpenVINO runs bf16 on this CPU, and the evidence: OpenVINO's capabilities where
    reachable, else the CPU flags of /proc/cpuinfo."""
    properties = openvino_cpu_properties()
    if properties and "OPTIMIZATION_CAPABILITIES" in properties:
        capabilities = properties["OPTIMIZATION_CAPABILITIES"]
        return "BF16" in capabilities.split(), f"OpenVINO's CPU capabilities: {capabilities}"
    flags = cpu_flags()
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return bool(found), f"CPU flags: {', '.join(found) if found else 'no ' + ' or '.join(BF16_CPU_FLAGS)}"


def check_bf16() -> None:
    """Raise a clear error when this CPU cannot run OpenVINO's bf16 inference precision."""
    supported, evidence = bf16_support()
    if not supported:
        raise ValueError(
            f"precision='bf16': {cpu_name()} has no bf16 arithmetic for OpenVINO ({evidence}); bf16 needs "
            f"a CPU with AVX-512 BF16 or AMX (Intel Xeon 3rd gen Cooper Lake / 4th gen and later, AMD Zen 4 "
            f"and later). OpenVINO would silently run fp32 instead; use precision='fp32'")
