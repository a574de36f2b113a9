"""`layer_norm_feeding` reads a CLIP text encoder's final LayerNorm from its exported model.onnx.

The oracle is the torch module the graph was exported from, and ONNX Runtime running that graph:
the scale, bias and epsilon read without the `onnx` package must be the module's own, and a
numpy layer norm with them must turn the last encoder layer's output into `last_hidden_state`.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from sdort.runtime.model_files import check_model_file, external_data_locations, layer_norm_feeding

LAYERS = 3
OUTPUTS = ["last_hidden_state", "pooler_output"] + [f"hidden_state_{i}" for i in range(LAYERS + 1)]


class _Encoder(torch.nn.Module):
    """CLIPTextModel -> (last_hidden_state, pooler_output, every hidden state, embeddings first)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=LAYERS,
                            vocab_size=1000, max_position_embeddings=77, layer_norm_eps=1e-5,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(final_norm(model).weight, mean=1.0, std=0.5)
        torch.nn.init.normal_(final_norm(model).bias, std=0.5)
    return model


def final_norm(model):
    """The final LayerNorm: `text_model.final_layer_norm` before transformers 5, `final_layer_norm` since."""
    return getattr(model, "text_model", model).final_layer_norm


def export(model, path, opset=17):
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder(model), (ids,), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=True, input_names=["input_ids"], output_names=OUTPUTS,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"},
                                        **{n: {0: "batch", 1: "sequence"} for n in OUTPUTS if n != "pooler_output"}})
    return path


@pytest.fixture(scope="module")
def exported(clip, tmp_path_factory):
    return export(clip, tmp_path_factory.mktemp("opset17") / "text_encoder" / "model.onnx")


def final_ln_node(model):
    """The LayerNormalization node behind graph output last_hidden_state (through Cast / Identity)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers["last_hidden_state"]
    while node.op_type in ("Cast", "Identity"):
        node = producers[node.input[0]]
    assert node.op_type == "LayerNormalization"
    return node


def layer_norm(x, scale, bias, epsilon):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * scale + bias


def test_reads_the_final_layer_norm(clip, exported):
    scale, bias, epsilon = layer_norm_feeding(exported, "last_hidden_state")
    norm = final_norm(clip)
    assert scale.dtype == np.float32 and bias.dtype == np.float32 and scale.shape == (32,)
    np.testing.assert_array_equal(scale, norm.weight.detach().numpy())
    np.testing.assert_array_equal(bias, norm.bias.detach().numpy())
    assert epsilon == clip.config.layer_norm_eps == norm.eps

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 1000, (3, 11), dtype=np.int64)
    last, *hidden = session.run(["last_hidden_state", f"hidden_state_{LAYERS}"], {"input_ids": ids})
    np.testing.assert_allclose(layer_norm(hidden[0], scale, bias, epsilon), last, atol=1e-5, rtol=0)


def test_external_data_gives_the_same_arrays(exported, tmp_path):
    expected = layer_norm_feeding(exported, "last_hidden_state")
    path = tmp_path / "text_encoder" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(onnx.load(str(exported)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    assert external_data_locations(path) == {"model.onnx_data"}
    check_model_file(path)
    scale, bias, epsilon = layer_norm_feeding(path, "last_hidden_state")
    np.testing.assert_array_equal(scale, expected[0])
    np.testing.assert_array_equal(bias, expected[1])
    assert epsilon == expected[2]

    # the weights file is the only copy: a location outside the folder is refused, a missing file named
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx_data"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="refusing external data at '../model.onnx_data'"):
        layer_norm_feeding(path, "last_hidden_state")
    shutil.move(path.parent / "model.onnx_data", tmp_path / "elsewhere")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "model.onnx_data"
    onnx.save(model, str(path))
    with pytest.raises(FileNotFoundError, match="model.onnx_data"):
        layer_norm_feeding(path, "last_hidden_state")


def test_constant_nodes_and_identity(clip, exported, tmp_path):
    """Scale and bias given by Constant nodes, reached through Identity, and an Identity before the output."""
    model = onnx.load(str(exported))
    graph = model.graph
    norm = final_ln_node(model)
    inits = {t.name: t for t in graph.initializer}
    constants = []
    for index in (1, 2):
        tensor = inits[norm.input[index]]
        graph.initializer.remove(tensor)
        constants.append(helper.make_node("Constant", [], [tensor.name + "_c"], value=tensor))
        constants.append(helper.make_node("Identity", [tensor.name + "_c"], [tensor.name]))
    produced = norm.output[0]
    norm.output[0] = produced + "_ln"
    constants.append(helper.make_node("Identity", [produced + "_ln"], [produced]))
    graph.node.extend(constants)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # still a valid model

    scale, bias, epsilon = layer_norm_feeding(path, "last_hidden_state")
    np.testing.assert_array_equal(scale, final_norm(clip).weight.detach().numpy())
    np.testing.assert_array_equal(bias, final_norm(clip).bias.detach().numpy())
    assert epsilon == 1e-5


def test_deduplicated_initializers(tmp_path):
    """Left at their initial ones and zeros, the final norm's weights equal other layers': the exporter
    keeps one initializer and names it again with an Identity node at the start of the graph."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=LAYERS, vocab_size=1000, bos_token_id=0, eos_token_id=2,
                                         pad_token_id=1)).eval()
    path = export(model, tmp_path / "model.onnx")
    onnx_model = onnx.load(str(path))
    norm = final_ln_node(onnx_model)
    assert norm.input[1] not in {t.name for t in onnx_model.graph.initializer}  # the case under test
    scale, bias, _ = layer_norm_feeding(path, "last_hidden_state")
    np.testing.assert_array_equal(scale, np.ones(32, np.float32))
    np.testing.assert_array_equal(bias, np.zeros(32, np.float32))


def test_float16_model(clip, exported, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    norm = final_norm(clip)
    for keep_io_types in (True, False):  # float32 outputs (a Cast at each) and float16 outputs
        model = convert_float_to_float16(onnx.load(str(exported)), keep_io_types=keep_io_types,
                                         disable_shape_infer=True)
        path = tmp_path / f"fp16_{keep_io_types}" / "model.onnx"
        path.parent.mkdir()
        onnx.save(model, str(path))
        scale, bias, epsilon = layer_norm_feeding(path, "last_hidden_state")
        ln = final_ln_node(model)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert inits[ln.input[1]].dtype == np.float16
        assert scale.dtype == np.float32
        np.testing.assert_array_equal(scale, inits[ln.input[1]].astype(np.float32))
        np.testing.assert_array_equal(bias, inits[ln.input[2]].astype(np.float32))
        np.testing.assert_array_equal(scale, norm.weight.detach().half().float().numpy())
        np.testing.assert_array_equal(bias, norm.bias.detach().half().float().numpy())
        assert epsilon == 1e-5


def test_opset_14_has_no_layer_norm_node(clip, tmp_path):
    path = export(clip, tmp_path / "text_encoder" / "model.onnx", opset=14)
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node)
    with pytest.raises(ValueError, match="could not find the final layer norm") as info:
        layer_norm_feeding(path, "last_hidden_state")
    assert str(path) in str(info.value) and "opset 17" in str(info.value)


def test_outputs_without_a_layer_norm(exported, tmp_path):
    for output in ("pooler_output", f"hidden_state_{LAYERS}"):
        with pytest.raises(ValueError, match="could not find the final layer norm") as info:
            layer_norm_feeding(exported, output)
        assert str(exported) in str(info.value)
    with pytest.raises(ValueError, match="has no such output") as info:
        layer_norm_feeding(exported, "text_embeds")
    assert str(exported) in str(info.value) and "last_hidden_state" in str(info.value)


def test_refuses_a_layer_norm_over_other_axes(exported, tmp_path):
    model = onnx.load(str(exported))
    norm = final_ln_node(model)
    for attribute in norm.attribute:
        if attribute.name == "axis":
            attribute.i = 1
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="axis 1") as info:
        layer_norm_feeding(path, "last_hidden_state")
    assert str(path) in str(info.value)

    for attribute in norm.attribute:  # the last axis spelled as a positive number is fine
        if attribute.name == "axis":
            attribute.i = 2
    onnx.save(model, str(path))
    assert layer_norm_feeding(path, "last_hidden_state")[0].shape == (32,)


def test_corrupt_and_empty_files(exported, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        layer_norm_feeding(empty, "last_hidden_state")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(exported.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{cut}: not a valid ONNX model"):
        layer_norm_feeding(cut, "last_hidden_state")


def test_hand_built_graphs(tmp_path):
    """Scale as float_data, bias as float16 int32_data, attributes left at their defaults; a Cast
    to float16 before the output is not followed (it changes the values)."""
    from onnx import TensorProto

    rng = np.random.default_rng(1)
    scale = rng.normal(size=8).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln"),
         helper.make_node("Cast", ["y"], ["out"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["y"], ["half"], to=TensorProto.FLOAT16)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("half", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor("s", TensorProto.FLOAT, [8], scale.tolist()),
         helper.make_tensor("b", TensorProto.FLOAT16, [8], bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model.graph.initializer[0].float_data and model.graph.initializer[1].int32_data
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    got_scale, got_bias, epsilon = layer_norm_feeding(path, "out")
    np.testing.assert_array_equal(got_scale, scale)
    np.testing.assert_array_equal(got_bias, bias.astype(np.float32))
    assert epsilon == 1e-5
    with pytest.raises(ValueError, match="'half' comes from Cast node"):
        layer_norm_feeding(path, "half")
