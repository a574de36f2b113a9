"""Export-time graph optimisation (export/optimize.py) and the ready-to-run CPU file.

The oracle is diffusers' UNet in torch on the same inputs. Bounds: relative to max(1, max|torch|),
float32 on both sides; the fused graph sums in another order (MultiHeadAttention's flash-attention
loop rescales a running softmax, Gelu and LayerNorm kernels differ from the traced ops), which moves
the last bits: about 1e-6 measured on the tiny UNet, bounded at 1e-4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

TOLERANCE = 1e-4


def _unet_inputs(unet, batch=2, height=8, width=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, unet.config.in_channels, height, width), dtype=np.float32),
            "timestep": np.array([981.0, 21.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, unet.config.cross_attention_dim),
                                                         dtype=np.float32)}


def _torch_unet(unet, inputs):
    with torch.no_grad():
        return unet(*(torch.from_numpy(inputs[name]) for name in ("sample", "timestep", "encoder_hidden_states")),
                    return_dict=False)[0].numpy()


def _relative_error(got, ref):
    return float(np.max(np.abs(got.astype(np.float64) - ref))) / max(1.0, float(np.max(np.abs(ref))))


@pytest.fixture(scope="module")
def plain(tmp_path_factory, sd1):
    """The same diffusers folder as `sd1`, exported with `optimize_graphs=False`."""
    from sdort.export import export

    source = sd1[1].parent / "diffusers"
    return export(str(source), tmp_path_factory.mktemp("plain") / "onnx", log=lambda *_: None, optimize_graphs=False)


def test_fused_operators_and_manifest(sd1):
    from diffusers.models.attention_processor import Attention

    pipe, out = sd1
    attentions = sum(isinstance(module, Attention) for module in pipe.unet.modules())
    graph = onnx.load(str(out / "unet" / "model.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    # every self- and cross-attention became one MultiHeadAttention; no score Softmax is left
    assert attentions > 0 and ops.count("MultiHeadAttention") == attentions
    assert "Softmax" not in ops and "Attention" not in ops
    assert not {"GroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd"} & set(ops)  # CUDA-only operators
    record = json.loads((out / "sdort.json").read_text())["parts"]["unet"]["optimization"]
    assert record["target"] == "cpu" and record["fused"]["MultiHeadAttention"] == attentions
    assert record["fused"]["Gelu"] > 0  # GEGLU's gate
    assert record["ready_to_run"]["file"] == "model.ort.onnx" and (out / "unet" / "model.ort.onnx").is_file()
    assert record["ready_to_run"]["provider"] == "CPUExecutionProvider"
    # the other parts are left as traced
    assert "optimization" not in json.loads((out / "sdort.json").read_text())["parts"]["vae_decoder"]


def test_optimised_unet_matches_diffusers(sd1):
    from sdort.runtime import OnnxModel
    from sdort.runtime.sessions import default_session_options

    pipe, out = sd1
    inputs = _unet_inputs(pipe.unet)
    ref = _torch_unet(pipe.unet, inputs)
    # model.onnx itself (options given: the ready-to-run file is not chosen), then the ready-to-run file
    fused = OnnxModel(out / "unet" / "model.onnx", provider="cpu", session_options=default_session_options())
    assert fused.file.name == "model.onnx"
    ready = OnnxModel(out / "unet" / "model.onnx", provider="cpu")
    assert ready.file.name == "model.ort.onnx"
    got_fused, got_ready = (model(**inputs)["out_sample"] for model in (fused, ready))
    assert _relative_error(got_fused, ref) < TOLERANCE
    assert _relative_error(got_ready, ref) < TOLERANCE
    # the ready-to-run file holds the graph ONNX Runtime would build at load: the same numbers up to
    # its NCHWc convolutions' order of summation (float32, measured ~1e-7)
    assert _relative_error(got_ready, got_fused.astype(np.float64)) < 1e-5


def test_export_without_optimisation(sd1, plain):
    from sdort.runtime import OnnxModel

    pipe, _ = sd1
    ops = {node.op_type for node in onnx.load(str(plain / "unet" / "model.onnx")).graph.node}
    assert "MultiHeadAttention" not in ops and "Softmax" in ops
    assert not (plain / "unet" / "model.ort.onnx").exists()
    assert "optimization" not in json.loads((plain / "sdort.json").read_text())["parts"]["unet"]
    inputs = _unet_inputs(pipe.unet, batch=1, height=9, width=7, seed=1)
    unet = OnnxModel(plain / "unet" / "model.onnx", provider="cpu")
    assert unet.file.name == "model.onnx"
    assert _relative_error(unet(**inputs)["out_sample"], _torch_unet(pipe.unet, inputs)) < TOLERANCE


def test_ready_to_run_only_where_it_applies(sd1, tmp_path):
    from sdort.runtime.sessions import ready_to_run_file

    _, out = sd1
    unet = out / "unet" / "model.onnx"
    cpu = ["CPUExecutionProvider"]
    assert ready_to_run_file(unet, cpu) == out / "unet" / "model.ort.onnx"
    # CUDA or OpenVINO first: the portable model.onnx (the file holds CPU-provider operators)
    assert ready_to_run_file(unet, ["CUDAExecutionProvider", *cpu]) is None
    assert ready_to_run_file(unet, ["OpenVINOExecutionProvider", *cpu]) is None
    assert ready_to_run_file(out / "vae_decoder" / "model.onnx", cpu) is None  # none recorded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    moved = copy / "unet" / "model.onnx"
    assert ready_to_run_file(moved, cpu) == copy / "unet" / "model.ort.onnx"  # a copied folder keeps it
    manifest = json.loads((copy / "sdort.json").read_text())
    record = manifest["parts"]["unet"]["optimization"]["ready_to_run"]
    for key, value in (("onnxruntime", "0.0.1"),  # another ONNX Runtime wrote it
                       ("file", "../vae_decoder/model.onnx")):  # a recorded name never leaves the folder
        (copy / "sdort.json").write_text(json.dumps(manifest).replace(json.dumps(record[key]), json.dumps(value)))
        assert ready_to_run_file(moved, cpu) is None, key
    (copy / "sdort.json").write_text(json.dumps(manifest))
    # model.onnx edited after the export (its digest differs): model.onnx, never the stale file
    graph = onnx.load(str(moved))
    graph.doc_string = "edited"
    onnx.save(graph, str(moved))
    assert ready_to_run_file(moved, cpu) is None


def test_identity_casts_removed_only():
    from onnx import TensorProto, helper

    from sdort.export.optimize import drop_identity_casts

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["same"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["same"], ["again"], to=TensorProto.FLOAT),  # a chain of them
         helper.make_node("Cast", ["again"], ["half"], to=TensorProto.FLOAT16),
         helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    assert drop_identity_casts(model) == 2
    assert [(n.input[0], n.output[0]) for n in model.graph.node] == [("x", "half"), ("half", "y")]
