"""Cached virtual environments for tests that need another package set than the test environment's
(an ONNX Runtime distribution that replaces `onnxruntime`, an older tool chain).

Each environment is created on first use under ~/.cache/sdort-tests/ (or $SDORT_TEST_CACHE), in a
folder named after its pins, and reused afterwards; one builder at a time (a file lock), and a
half-built one from an interrupted run is rebuilt. Creating it needs PyPI once; where it cannot be
created the test fails and says why, and how to skip. (The pattern of test_optimum.py's venv.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PIP_TIMEOUT_S = 1800


def cache_root() -> Path:
    return Path(os.environ.get("SDORT_TEST_CACHE") or Path.home() / ".cache" / "sdort-tests")


def run_logged(command, log: Path, timeout: float, **kwargs) -> int:
    """Run `command`, appending its output to `log`; returns the exit code (124 on timeout)."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            return subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, **kwargs).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n(timed out after {timeout} s)\n")
            return 124


def log_tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join([line for line in text if "is ignored: it is neither" not in line][-lines:])


def cached_venv(name: str, pins: tuple, check: str, skip_variable: str, first: str | None = None) -> Path:
    """The virtual environment `name` with `pins` installed (and `check`, a Python snippet, passing
    in it); created here when missing. `skip_variable` is named in the failure message. `first` (one
    of `pins`, e.g. torch==2.13.0) is installed alone before the others and holds them as a pip
    constraint: pip left to choose would pull another (a multi-GB CUDA torch)."""
    key = hashlib.sha256("\n".join([f"python {sys.version_info[0]}.{sys.version_info[1]}", *pins]).encode())
    root = cache_root()
    venv = root / f"{name}-{key.hexdigest()[:12]}"
    done = venv / ".sdort-complete"
    if done.is_file():
        return venv
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{venv.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then reuse its venv
        except ImportError:  # not POSIX: no lock
            pass
        if done.is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        log = root / f"{venv.name}.log"
        log.write_text("")
        python = venv / "bin" / "python"
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
        steps = [[sys.executable, "-m", "venv", venv]]
        if first is None:
            steps.append([*pip, *pins])
        else:
            constraints = root / f"{venv.name}.constraints.txt"
            constraints.write_text(first + "\n")
            steps += [[*pip, first], [*pip, "-c", constraints, *[pin for pin in pins if pin != first]]]
        steps.append([python, "-c", check])
        for step in steps:
            code = run_logged(step, log, PIP_TIMEOUT_S)
            if code != 0:
                pytest.fail(
                    f"Could not build the virtual environment {venv} (exit code {code} from "
                    f"`{' '.join(map(str, step[:4]))} ...`; log: {log}). Its packages ({', '.join(pins)}) come "
                    f"from PyPI on first use and are cached afterwards. Give this machine PyPI access once, or "
                    f"set {skip_variable}=1 to skip these tests.\n--- last lines of the log ---\n{log_tail(log)}",
                    pytrace=False,
                )
        done.write_text(json.dumps({"pins": pins}) + "\n")
    return venv


def checkout_path_dir(folder: Path, repo: Path) -> Path:
    """A folder to put on PYTHONPATH so that `sdort.runtime` and `sdort.schedulers` are this
    checkout's `runtime/` and `schedulers/` (pyproject maps the package names onto those folders):
    `folder/sdort/` holds links to them, and `sdort` is a namespace package. No install, so a cached
    environment serves every checkout."""
    package = folder / "sdort"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("runtime", "schedulers"):
        link = package / name
        if not link.exists():
            link.symlink_to(repo / name, target_is_directory=True)
    return folder
