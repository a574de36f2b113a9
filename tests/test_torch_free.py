"""The runtime generates images in a process where torch, diffusers and transformers cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
""")


def test_runtime_generates_without_torch(tiny_export, tmp_path):
    script = BLOCKER + textwrap.dedent(f"""
        import numpy as np
        from sdort.runtime import StableDiffusionPipeline
        from sdort.schedulers import EulerDiscreteScheduler
        pipe = StableDiffusionPipeline.from_pretrained({str(tiny_export)!r}, provider="cpu")
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        image = pipe("a fox", num_inference_steps=2, generator=1).images[0]
        image.save({str(tmp_path / "fox.png")!r})
        assert not any(m.split(".")[0] in ("torch", "diffusers", "transformers") for m in sys.modules)
        print("ok", image.size)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok (64, 64)" in result.stdout
    assert (tmp_path / "fox.png").is_file()


def test_runtime_cli_without_torch(tiny_export, tmp_path):
    script = BLOCKER + textwrap.dedent(f"""
        from sdort.runtime.cli import main
        raise SystemExit(main(["txt2img", "--model", {str(tiny_export)!r}, "a boat", "--steps", "2",
                               "-o", {str(tmp_path / "boat.png")!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "boat.png").is_file()


def test_runtime_without_onnxruntime_names_the_extras():
    script = BLOCKER.replace('("torch", "diffusers", "transformers")', '("onnxruntime",)') + textwrap.dedent("""
        try:
            import sdort.runtime
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sdort[cpu]" in result.stdout and "sdort[cuda]" in result.stdout
