#!/usr/bin/env bash
# sdort on CUDA against diffusers fp16, on one GPU, in one run (issue 12, section 4): makes a virtual
# environment, installs, exports `sd15-arch` fp16 for the CUDA target and runs benchmarks/bench_cuda.py
# (512x512, 20 and 50 steps, with and without CUDA graphs, diffusers fp16 with SDPA); the JSON goes to
# benchmarks/results/cuda_sd15-arch.json. Meant to finish in under eight minutes on a machine with
# the wheels at hand (the export is about half of it).
#
#   benchmarks/cuda.sh [WORKDIR]     # WORKDIR (default ~/.cache/sdort-cuda-bench): the venv, the export
#
# Environment:
#   PYTHON        the interpreter the venv is made from (default python3; 3.10+)
#   SDORT_WHEELS  a folder of wheels to install from, offline (pip --no-index --find-links): a machine
#                 without network needs every wheel there (torch 2.13.0 with its nvidia-* wheels,
#                 onnxruntime-gpu with nvidia-cudnn/cublas/..., diffusers, transformers, onnx,
#                 onnxscript, setuptools, ...); fill it on a networked machine of the same platform and
#                 Python version: `pip download -d DIR "REPO[cuda,export]" torch==2.13.0 \
#                 "onnxruntime-gpu[cuda,cudnn]" diffusers pip setuptools wheel` (about 4 GB, mostly CUDA)
#   SDORT_VENV    an existing venv to use as it is (skips the installs)
#
# Assumption: `pip install torch==2.13.0` from PyPI on Linux x86-64 is torch's CUDA build (PyPI's
# Linux wheels are; it pulls the nvidia-* CUDA libraries as wheels). onnxruntime-gpu is installed
# with its `cuda,cudnn` extras, so its CUDA and cuDNN libraries are there whatever CUDA torch brought,
# and bench_cuda.py loads them with `onnxruntime.preload_dlls()`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/sdort-cuda-bench}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${SDORT_VENV:-$WORK/venv}"
MODEL="$WORK/sd15-arch-fp16"
START=$(date +%s)
log() { echo "[cuda.sh +$(( $(date +%s) - START ))s] $*" >&2; }
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1  # nothing from the Hub: the preset is built from its config and seed

pip_install() {
    if [ -n "${SDORT_WHEELS:-}" ]; then
        "$VENV/bin/python" -m pip install -q --no-index --find-links "$SDORT_WHEELS" "$@"
    else
        "$VENV/bin/python" -m pip install -q "$@"
    fi
}

if [ -z "${SDORT_VENV:-}" ]; then
    log "venv: $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    pip_install --upgrade pip setuptools wheel
    log "installing torch==2.13.0 (the CUDA build pip picks on Linux)"
    pip_install torch==2.13.0
    log "installing sdort[cuda,export], diffusers, onnxruntime-gpu's CUDA libraries"
    # torch is satisfied already (export's torch>=2.1): pip must not choose another one
    pip_install --no-build-isolation -e "$REPO[cuda,export]" diffusers "onnxruntime-gpu[cuda,cudnn]" "torch==2.13.0"
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import sys
import torch
import onnxruntime
if hasattr(onnxruntime, "preload_dlls"):
    onnxruntime.preload_dlls()
problems = []
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no GPU (a CPU build, or no driver)")
if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    problems.append(f"onnxruntime {onnxruntime.__version__} has no CUDA provider (is onnxruntime, not -gpu, installed?)")
if problems:
    sys.exit("cuda.sh: " + "; ".join(problems))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}; "
      f"onnxruntime {onnxruntime.__version__}", file=sys.stderr)
EOF

NOTE_FILE="$MODEL.how"
if [ ! -f "$MODEL/model_index.json" ]; then
    log "exporting sd15-arch fp16 --target cuda to $MODEL"
    set +e
    "$VENV/bin/sd-export" sd15-arch "$MODEL" --dtype fp16 --target cuda --overwrite 2> "$WORK/export.err"
    status=$?
    set -e
    if [ $status -eq 0 ]; then
        echo "exported with sd-export --dtype fp16 --target cuda" > "$NOTE_FILE"
    elif [ $status -eq 2 ]; then  # refused (an unknown --target, or sd-export's own one-line error)
        reason="$(tail -n 1 "$WORK/export.err")"
        log "note: sd-export refused --target cuda ($reason); exporting with plain --dtype fp16"
        echo "--target cuda refused ($reason): exported with plain sd-export --dtype fp16 (no CUDA fusions)" > "$NOTE_FILE"
        "$VENV/bin/sd-export" sd15-arch "$MODEL" --dtype fp16 --overwrite
    else
        cat "$WORK/export.err" >&2
        exit $status
    fi
else
    log "reusing $MODEL"
fi

log "benchmarking"
"$PY" "$REPO/benchmarks/bench_cuda.py" "$MODEL" --size 512 --steps 20 50 --repeats 3 \
    --note "$(cat "$NOTE_FILE" 2>/dev/null || echo "export of unknown origin: $MODEL")" \
    --out "$REPO/benchmarks/results/cuda_sd15-arch.json"
log "done"
