"""`sd-export`: artifact layout, dynamic shapes, fp16, atomic output, and the failure paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-c", "from sdort.export.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_layout_and_manifest(tiny_export):
    out = tiny_export
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (out / part / "model.onnx").is_file()
        assert (out / part / "config.json").is_file()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae_decoder"] == ["diffusers", "AutoencoderKL"] and index["unet"][1] == "UNet2DConditionModel"
    manifest = json.loads((out / "sdort.json").read_text())
    assert manifest["dtype"] == "fp32" and manifest["opset"] == 17 and manifest["source"] == "preset:tiny"
    assert all(info["max_abs_error"] < 1e-3 for info in manifest["parts"].values())


def test_dynamic_batch_and_size(tiny_export):
    from sdort.runtime import OnnxModel

    unet = OnnxModel(tiny_export / "unet" / "model.onnx", provider="cpu")
    for batch, h, w in [(1, 8, 8), (3, 5, 12), (2, 16, 10)]:
        out = unet(sample=np.zeros((batch, 4, h, w), np.float32), timestep=np.full(batch, 500.0),
                   encoder_hidden_states=np.zeros((batch, 77, 32), np.float32))["out_sample"]
        assert out.shape == (batch, 4, h, w)
    decoder = OnnxModel(tiny_export / "vae_decoder" / "model.onnx", provider="cpu")
    assert decoder(latent_sample=np.zeros((2, 4, 5, 7), np.float32))["sample"].shape == (2, 3, 40, 56)
    encoder = OnnxModel(tiny_export / "vae_encoder" / "model.onnx", provider="cpu")
    assert encoder(sample=np.zeros((1, 3, 40, 56), np.float32))["latent_parameters"].shape == (1, 8, 5, 7)


def test_fp16_export_makes_real_images(tmp_path):
    from sdort.export import export
    from sdort.runtime import StableDiffusionPipeline

    out = export("tiny", tmp_path / "fp16", dtype="fp16", log=lambda *_: None)
    manifest = json.loads((out / "sdort.json").read_text())
    assert manifest["parts"]["unet"]["dtype"] == "fp16" and manifest["parts"]["vae_decoder"]["dtype"] == "fp32"
    pipe = StableDiffusionPipeline.from_pretrained(out, provider="cpu")
    assert pipe.unet.inputs["sample"].dtype == np.float16
    assert pipe.unet.inputs["timestep"].dtype == np.float32
    images = pipe("a fox", num_inference_steps=3, output_type="np",
                  latents=np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)).images
    assert np.all(np.isfinite(images)) and images.std() > 1e-3


def test_cli_lines_overwrite_and_atomicity(tmp_path):
    out = tmp_path / "model"
    result = run_cli("tiny", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert any(line.startswith(part) and " s " in line and "MB" in line for line in lines), lines
    again = run_cli("tiny", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run_cli("tiny", str(out), "--overwrite").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_failed_check_leaves_nothing(tmp_path, monkeypatch):
    from sdort.export import convert, exporter

    monkeypatch.setitem(convert.TOLERANCE, "fp32", 0.0)
    with pytest.raises(exporter.ExportCheckError, match="text_encoder"):
        exporter.export("tiny", tmp_path / "model", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_bad_sources(tmp_path, capsys):
    from sdort.export.cli import main  # in this process: the subprocess runs above prove the entry point

    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main([str(tmp_path / "folder"), str(tmp_path / "out")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hub_without_network_fails_fast_naming_the_repo(tmp_path):
    start = time.monotonic()
    result = run_cli("someone/some-model", str(tmp_path / "out"),
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    assert "someone/some-model" in result.stderr and "local diffusers folder" in result.stderr
    assert not (tmp_path / "out").exists()
