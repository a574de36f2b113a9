"""Faults: killed exports, a full disk, Ctrl-C during generation, NaN out of a model, file modes.

The processes here are real (`sd-export` and `sdort` killed with real signals) and the models are
real ONNX graphs: the NaN cases are the tiny export with one node added after its output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

QUIET = {"log": lambda *_: None}


def _wait_for(predicate, process, timeout=120.0):
    start = time.monotonic()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before the moment to kill it")
        if time.monotonic() - start > timeout:
            process.kill()
            raise AssertionError("timed out waiting for the moment to kill the process")
        time.sleep(0.02)


def _partials(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


# Moments of an export at which it is killed: the temporary folder appears; the UNet is written;
# the last part (the VAE decoder) has begun.
KILL_MOMENTS = {
    "temporary folder created": lambda tmp: tmp.is_dir(),
    "unet written": lambda tmp: (tmp / "unet" / "model.onnx").is_file(),
    "vae_decoder begun": lambda tmp: (tmp / "vae_decoder").is_dir(),
}


@pytest.mark.parametrize("moment, replacing", [("temporary folder created", False), ("unet written", True),
                                               ("vae_decoder begun", True)])
def test_killed_export_leaves_no_out_or_keeps_the_old_one(tmp_path, tiny_export, moment, replacing):
    """SIGKILL during `sd-export`: a new OUT does not appear; an OUT being replaced (--overwrite) stays whole."""
    out = tmp_path / "model"
    if replacing:
        shutil.copytree(tiny_export, out)
    process = subprocess.Popen([sys.executable, "-m", "sdort.export.cli", "tiny", str(out), "--overwrite"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out.parent / f".{out.name}.partial-{process.pid}"
    _wait_for(lambda: KILL_MOMENTS[moment](tmp), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert tmp.is_dir(), "the kill did not land during the export"
    if replacing:
        assert (out / "sdort.json").read_text() == (tiny_export / "sdort.json").read_text()
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_export.iterdir())
    else:
        assert not out.exists()


def test_next_export_cleans_up_killed_ones_and_writes_ordinary_modes(tmp_path, monkeypatch):
    """The next export of OUT removes killed exports' folders; every file is rw-r--r-- (with umask 022),
    the external weights file included (onnx writes it 0600)."""
    from sdort.export import convert, export

    out = tmp_path / "model"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that has ended, as a killed export's
    for kind in ("partial", "old"):
        (tmp_path / f".model.{kind}-{dead.pid}" / "unet").mkdir(parents=True)
    running = subprocess.Popen(["sleep", "120"])  # an export still running: its folder stays
    alive = tmp_path / f".model.partial-{running.pid}"
    alive.mkdir()
    monkeypatch.setattr(convert, "EXTERNAL_DATA_THRESHOLD", 0)  # every part with a model.onnx_data
    old_umask = os.umask(0o022)
    try:
        export("tiny", out, **QUIET)
    finally:
        os.umask(old_umask)
        running.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", alive.name])
    assert (out / "unet" / "model.onnx_data").is_file()
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o755}, modes


def test_export_on_a_full_disk_is_a_clear_error(tmp_path):
    """On a 4 MB file system (the tiny export needs 16 MB): one line, exit 2, nothing left behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = subprocess.run([sys.executable, "-m", "sdort.export.cli", "tiny", str(disk / "model")],
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left on the device while writing the export" in lines[0], lines
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_ctrl_c_during_generation_leaves_no_png(tiny_export, tmp_path):
    out = tmp_path / "fox.png"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the progress bar says the loop began
    process = subprocess.Popen(
        [sys.executable, "-m", "sdort.runtime.cli", "txt2img", "--model", str(tiny_export), "a fox", "--steps", "900",
         "--num-images", "2", "-o", str(out)], stderr=subprocess.PIPE, text=True, env=env,
        # as a terminal gives it: a shell's background jobs (CI under nohup, `cmd &`) inherit SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "it/s" not in seen and "s/it" not in seen:  # the denoising loop has begun
        chunk = process.stderr.read(1)
        assert chunk, f"sdort ended before the loop began: {seen}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, seen[-500:] + rest[-3000:]
    # the last words after the progress bar, and no traceback
    assert rest.rstrip().endswith("sdort: interrupted; no image written") and "Traceback" not in rest, rest
    assert list(tmp_path.iterdir()) == []


def test_interrupted_png_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) in the middle of writing a PNG: neither the PNG nor its temporary file stays."""
    from PIL import Image

    from sdort.runtime.generation import save_images

    image = Image.new("RGB", (64, 64), (10, 20, 30))
    real_save = Image.Image.save

    def interrupted(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # the bytes are on disk, then the signal arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_images([image], [tmp_path / "out.png"], {"prompt": "a fox"})
    assert list(tmp_path.iterdir()) == []


def _poisoned(tiny_export, tmp_path, part: str, output: str) -> Path:
    """A copy of the tiny model whose `part` multiplies `output` by 1e38 * 1e38 = inf (a float16 overflow's
    effect, in float32): a real ONNX graph that returns infinities and NaN (inf - inf)."""
    import onnx
    from onnx import helper, numpy_helper

    folder = tmp_path / f"poisoned-{part}"
    shutil.copytree(tiny_export, folder)
    model = onnx.load(str(folder / part / "model.onnx"))
    graph = model.graph
    assert output in [o.name for o in graph.output]
    for node in graph.node:
        node.output[:] = [f"{o}_clean" if o == output else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(1e38, np.float32), "huge"))
    graph.node.append(helper.make_node("Mul", [f"{output}_clean", "huge"], [f"{output}_big"]))
    graph.node.append(helper.make_node("Mul", [f"{output}_big", "huge"], [f"{output}_inf"]))
    graph.node.append(helper.make_node("Sub", [f"{output}_inf", f"{output}_inf"], [output]))
    onnx.save_model(model, str(folder / part / "model.onnx"))
    return folder


@pytest.mark.parametrize("part, output, message", [
    ("unet", "out_sample", "unet returned NaN or infinity at step 1 of 4 (timestep 667)"),  # PNDM: 3 steps, 4 calls
    ("vae_decoder", "sample", "vae_decoder returned NaN or infinity when decoding the latents"),
])
def test_nan_from_a_model_is_an_error_naming_part_and_step(tiny_export, tmp_path, part, output, message, capsys):
    from sdort.runtime import NumericalError, StableDiffusionPipeline
    from sdort.runtime.cli import main

    folder = _poisoned(tiny_export, tmp_path, part, output)
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    with pytest.raises(NumericalError, match=re.escape(message)):
        pipe("a fox", num_inference_steps=3, generator=0)
    code = main(["txt2img", "--model", str(folder), "a fox", "--steps", "3", "-o", str(tmp_path / "fox.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "--dtype fp32" in err[-1]
    assert not (tmp_path / "fox.png").exists()
