"""The session wrapper reads names, dtypes and shapes from each graph instead of assuming them."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import latents_for


def retype_input(model_file, name: str, elem_type: int, shape) -> None:
    """Give graph input `name` another dtype and shape, cast back inside the graph, as other
    exporters (Optimum, older diffusers scripts) declare their inputs differently."""
    model = onnx.load(str(model_file))
    graph = model.graph
    old = next(i for i in graph.input if i.name == name)
    inner = f"{name}__as_before"
    for node in graph.node:
        node.input[:] = [inner if x == name else x for x in node.input]
    target = old.type.tensor_type.elem_type
    nodes = [helper.make_node("Cast", [name], [inner + "_cast"], to=target)]
    if len(shape) == 0:  # a scalar becomes the [B] the graph wants
        batch = helper.make_node("Shape", [graph.input[0].name], ["__batch_shape"], start=0, end=1)
        nodes += [batch, helper.make_node("Expand", [inner + "_cast", "__batch_shape"], [inner])]
    else:
        nodes.append(helper.make_node("Identity", [inner + "_cast"], [inner]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.input.remove(old)
    graph.input.append(helper.make_tensor_value_info(name, elem_type, shape))
    onnx.save(model, str(model_file))


def test_other_exporters_dtypes_and_timestep_shapes(sd1, tmp_path):
    from sdort.runtime import StableDiffusionPipeline
    from sdort.schedulers import DDIMScheduler

    folder = tmp_path / "variant"
    shutil.copytree(sd1[1], folder)
    retype_input(folder / "text_encoder" / "model.onnx", "input_ids", TensorProto.INT64, ["batch", 77])
    retype_input(folder / "unet" / "model.onnx", "timestep", TensorProto.INT64, [])
    variant = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    assert variant.unet.inputs["timestep"].dtype == np.int64 and variant.unet.inputs["timestep"].shape == ()
    assert variant.text_encoder.inputs["input_ids"].dtype == np.int64
    original = StableDiffusionPipeline.from_pretrained(sd1[1], provider="cpu")
    images = []
    for pipe in (original, variant):  # DDIM's timesteps are integers: both graphs see the same values
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        images.append(pipe("a kite", num_inference_steps=3, latents=latents_for((1, 4, 8, 8)), output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)


def test_provider_choices(sd1):
    import onnxruntime

    from sdort.runtime import OnnxModel

    with pytest.raises(ValueError, match="provider"):
        OnnxModel(sd1[1] / "unet" / "model.onnx", provider="tpu")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="provider='cuda'"):
            OnnxModel(sd1[1] / "unet" / "model.onnx", provider="cuda")
    assert OnnxModel(sd1[1] / "unet" / "model.onnx", provider="auto").device in ("cpu", "cuda")
    with pytest.raises(FileNotFoundError, match="vae_decoder"):
        OnnxModel(sd1[1] / "nothing" / "model.onnx", name="vae_decoder")
