"""The UNet's fixed-buffer mode and CUDA graphs (`OnnxModel(fixed_buffers=True)`, `cuda_graph=True`).

The fixed-buffer logic (one device buffer per input and output, bound once; later calls copied
into them) runs on the CPU provider too, without graph capture: there it must give the ordinary
path's numbers bit for bit, because both run the same session on the same bytes (numpy against
numpy, same kernels). The CUDA graph itself needs onnxruntime-gpu and a GPU (the last tests skip
without one); benchmarks/bench_cuda.py times it.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdort.runtime import StableDiffusionPipeline
from sdort.runtime.sessions import OnnxModel, StagedInput

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
REPO = Path(__file__).resolve().parents[1]


def call(pipe, prompt="a red fox", size=64, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 7.5, "generator": 0, "output_type": "np", **kwargs}
    return pipe(prompt, height=size, width=size, **kwargs).images


@pytest.fixture(scope="module")
def pipes(tiny_export):
    """(ordinary pipeline, the same with a fixed-buffer UNet), both on the CPU provider."""
    ordinary = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    unet = OnnxModel(Path(tiny_export) / "unet" / "model.onnx", provider="cpu", fixed_buffers=True)
    fixed = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", unet=unet)
    return ordinary, fixed


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_fixed_buffers_match_the_ordinary_path_bitwise(pipes, guidance_scale):
    # 1.0: no guidance, so the UNet's output goes to PNDM's history as it is: an output that were a
    # view of the fixed buffer would be overwritten by the next step and change the image.
    ordinary, fixed = pipes
    fixed.unet._fixed = None  # a fresh first call: this test's own shapes
    expected = call(ordinary, guidance_scale=guidance_scale)
    got = call(fixed, guidance_scale=guidance_scale)
    assert fixed.unet._fixed is not None  # steps 2 and 3 ran on the fixed buffers
    assert isinstance(fixed.unet._fixed.staged["encoder_hidden_states"], StagedInput)
    np.testing.assert_array_equal(got, expected)
    # a second call: new embeddings (another prompt) reach the buffer, the old ones are not reused
    np.testing.assert_array_equal(call(fixed, prompt="a blue bird", guidance_scale=guidance_scale),
                                  call(ordinary, prompt="a blue bird", guidance_scale=guidance_scale))


def test_fixed_unet_calls_with_numpy_staged_and_ortvalue_inputs(tiny_export):
    path = Path(tiny_export) / "unet" / "model.onnx"
    ordinary, fixed = OnnxModel(path, provider="cpu"), OnnxModel(path, provider="cpu", fixed_buffers=True)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 77, 32)).astype(np.float32)
    staged = fixed.to_device("encoder_hidden_states", embeds)
    assert isinstance(staged, StagedInput) and not staged.array.flags.writeable
    embeds[:] = 0  # to_device keeps the value it was given, as a device copy does
    for step in range(3):
        sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        t = np.full(2, 900.0 - 100 * step)
        expected = ordinary(sample=sample, timestep=t, encoder_hidden_states=staged.array)["out_sample"]
        for hidden in (staged, ort.OrtValue.ortvalue_from_numpy(staged.array)):  # an OrtValue: copied every call
            got = fixed(sample=sample, timestep=t, encoder_hidden_states=hidden)["out_sample"]
            np.testing.assert_array_equal(got, expected)
    fixed.run_bound()  # reruns on the buffers' values, reading nothing back


def test_fixed_buffers_learn_undeclared_output_shapes_and_take_rank_0_inputs(tmp_path):
    # y = concat(x, x) is declared [twice], a name no input has: its shape comes from one ordinary
    # run; z = x * t is declared [n], x's dim; t is rank 0, as Optimum's UNet timestep.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=0), helper.make_node("Mul", ["x", "t"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["twice"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    model = OnnxModel(tmp_path / "model.onnx", provider="cpu", fixed_buffers=True)
    for step in range(3):
        x = np.arange(3, dtype=np.float32) + step
        out = model(x=x, t=np.float32(2 + step))
        np.testing.assert_array_equal(out["y"], np.concatenate([x, x]))
        np.testing.assert_array_equal(out["z"], x * (2 + step))
        assert model._fixed.inputs["t"].shape() == []
    with pytest.raises(ValueError, match=r"input 'x' has shape \[4\].*made at its first call for \[3\]"):
        model(x=np.zeros(4, np.float32), t=np.float32(1))


def test_another_shape_is_refused_and_the_buffers_stay_usable(pipes):
    ordinary, fixed = pipes
    fixed.unet._fixed = None
    call(fixed)
    with pytest.raises(ValueError, match=r"unet: input 'sample' has shape \[2, 4, 16, 16\], but this session's fixed "
                                         r"buffers were made at its first call for \[2, 4, 8, 8\].*load a new "
                                         r"pipeline for another image size or batch, or load without cuda_graph"):
        call(fixed, size=128)
    with pytest.raises(ValueError, match=r"input 'sample' has shape \[4, 4, 8, 8\].*\[2, 4, 8, 8\]"):
        call(fixed, num_images_per_prompt=2)
    # nothing was copied by the refused calls: the first shape still gives the ordinary numbers
    np.testing.assert_array_equal(call(fixed, prompt="a blue bird"), call(ordinary, prompt="a blue bird"))


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has the CUDA provider")
@pytest.mark.parametrize("provider", ["cpu", "auto", "cuda", "openvino"])
def test_cuda_graph_without_cuda_is_refused_before_any_file_is_read(tmp_path, provider):
    # a folder that does not exist: the refusal comes before any file is looked at
    with pytest.raises(ValueError, match=r"cuda_graph=True needs ONNX Runtime's CUDA provider|provider='cuda': "
                                         r"this ONNX Runtime has no CUDA provider|no OpenVINO provider"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nowhere", provider=provider, cuda_graph=True)


def test_cuda_graph_refusal_names_the_way_out(tiny_export):
    with pytest.raises(ValueError, match=r"cuda_graph=True needs ONNX Runtime's CUDA provider \(provider='cuda', or "
                                         r"'auto' where CUDA is available\): provider='cpu'; or load without cuda_graph"):
        OnnxModel(Path(tiny_export) / "unet" / "model.onnx", provider="cpu", cuda_graph=True)
    done = subprocess.run([sys.executable, "-m", "sdort.runtime.cli", "txt2img", "a fox", "--model", str(tiny_export),
                           "--provider", "cpu", "--cuda-graph", "-o", "never.png"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "cuda_graph=True needs ONNX Runtime's CUDA provider" in done.stderr


def test_bench_cuda_smoke_runs_end_to_end(tiny_export, tmp_path, monkeypatch):
    # The GPU benchmark's own code on the CPU (its CUDA run needs benchmarks/cuda.sh on a GPU): every
    # engine runs, the JSON is written, and the fixed-buffer images equal plain sdort's (the script
    # exits non-zero otherwise).
    # (in this process: torch and diffusers are loaded already; the script's folder on the path, as a script has it)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench_cuda = importlib.import_module("bench_cuda")
    out = tmp_path / "smoke.json"
    bench_cuda.main(["--smoke", str(tiny_export), "--out", str(out), "--repeats", "1"])
    report = json.loads(out.read_text())
    engines = {row["engine"]: row for row in report["engines"]}
    assert list(engines) == ["sdort", "sdort-fixed-buffers", "diffusers"]
    assert engines["sdort-fixed-buffers"]["fixed_buffers"] and "bound_run_s" in engines["sdort-fixed-buffers"]["unet"]
    assert engines["sdort-fixed-buffers"]["image_max_abs_vs_sdort"] == {"1": 0.0, "2": 0.0}
    # fp32 on the CPU, same weights and seed: within the project's 1e-3 parity bound
    assert max(engines["sdort"]["image_max_abs_vs_diffusers"].values()) < 1e-3
    assert engines["sdort"]["copies"]["bytes_in"] > 0 and engines["sdort"]["loop_step_s"] is not None


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU (CUDAExecutionProvider)")
def test_cuda_graph_replays_the_uncaptured_run_bitwise(tiny_export):
    # One session: its first call runs uncaptured (gpu_graph_id -1), the next captures, the later ones
    # replay the graph. The same kernels on the same bytes: bit for bit.
    unet = OnnxModel(Path(tiny_export) / "unet" / "model.onnx", provider="cuda", cuda_graph=True)
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.standard_normal((2, 4, 8, 8)).astype(np.float32), timestep=np.full(2, 500.0),
                  encoder_hidden_states=unet.to_device("encoder_hidden_states",
                                                       rng.standard_normal((2, 77, 32)).astype(np.float32)))
    first = unet(**inputs)["out_sample"]
    for _ in range(3):
        np.testing.assert_array_equal(unet(**inputs)["out_sample"], first)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU (CUDAExecutionProvider)")
def test_cuda_graph_pipeline_matches_plain_cuda(tiny_export):
    # Two sessions: each picks its cuDNN convolution algorithms by timing them (ONNX Runtime's
    # default EXHAUSTIVE search), and two algorithms may round differently, so the two pipelines are
    # compared within 1e-4 on [0, 1] images (fp32), not bitwise (the test above is bitwise).
    plain = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cuda")
    graphed = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cuda", cuda_graph=True)
    assert graphed.unet.cuda_graph and not graphed.text_encoder.fixed_buffers
    np.testing.assert_allclose(call(graphed), call(plain), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="load a new pipeline for another image size"):
        call(graphed, size=128)
