"""The CUDA export target (`sd-export --target cuda`, export/optimize.py): ONNX Runtime's CUDA fusions on
the float32 UNet, then float16; what sdort.json says was checked where; the runtime's refusals.

Without a CUDA provider (this project's CI machines) the fused graph cannot run: its GroupNorm,
NhwcConv and packed-QKV attention (and BiasSplitGelu and BiasAdd, at SD's widths) have no CPU
kernels. What these tests prove here is the graph's form (which operators, which dtypes, valid ONNX
that ONNX Runtime type-checks), the honesty of the record, and the refusals; and, through a test-only
rewrite into standard operators, the fused graph's numbers on the CPU. The CUDA kernels' numbers
against diffusers are proven only where a CUDA provider runs: `test_cuda_pipeline_matches_diffusers_fp16`,
skipped otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import latents_for

FP16_TOLERANCE = 3e-2  # export/convert.py's fp16 bound (relative to max(1, max|torch|))


@pytest.fixture(scope="module")
def cuda_export(sd1, tmp_path_factory):
    """`sd1`'s diffusers folder exported with `--dtype fp16 --target cuda`, and the export's log."""
    from sdort.export import export

    lines = []
    out = export(str(sd1[1].parent / "diffusers"), tmp_path_factory.mktemp("cuda") / "onnx", dtype="fp16",
                 target="cuda", log=lines.append)
    return out, lines


def _cuda_missing() -> str | None:
    from sdort.export.exporter import cuda_unavailable

    return cuda_unavailable()


def test_cuda_fusions_in_the_unet(sd1, cuda_export):
    from diffusers.models.attention_processor import Attention

    out, _ = cuda_export
    attentions = sum(isinstance(module, Attention) for module in sd1[0].unet.modules())
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    # every attention fused, its scores never materialised
    mha = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert attentions > 0 and len(mha) == attentions and "Softmax" not in ops
    # float16: self-attention on packed QKV (one input), cross-attention on Q and packed KV (two);
    # never the CPU target's separate Q, K, V (three inputs), nor the stacked-weight Attention operator
    assert sorted(len(node.input) for node in mha) == [1] * (attentions // 2) + [2] * (attentions // 2)
    assert "Attention" not in ops
    # the CUDA provider's own operators; none of the CPU target's NCHW Conv and InstanceNorm
    for op in ("GroupNorm", "SkipGroupNorm", "NhwcConv", "SkipLayerNormalization"):
        assert op in ops, op
    assert "Conv" not in ops and "InstanceNormalization" not in ops
    record = json.loads((out / "sdort.json").read_text())["parts"]["unet"]["optimization"]
    assert record["target"] == "cuda"
    # the tiny UNet's widths are none the BiasSplitGelu / BiasAdd CUDA kernels take (SD's 320, 640, 1280
    # channels): fused without them, and the record says why (a real SD UNet keeps them)
    assert "BiasSplitGelu" not in ops and "BiasAdd" not in ops
    assert sorted(record["not_fused"]) == ["BiasAdd", "BiasSplitGelu"]
    assert "its CUDA kernel takes only 2560, 5120, 10240" in record["not_fused"]["BiasSplitGelu"]
    assert record["fused"] == {op: ops.count(op) for op in sorted(set(record["fused"]))}
    assert record["fused"]["MultiHeadAttention"] == attentions


def test_cuda_kernel_widths_are_read_from_the_bias():
    """`unsupported_cuda_widths` on one-node graphs: SD's widths pass, others are named."""
    from onnx import TensorProto, helper, numpy_helper

    from sdort.export.optimize import unsupported_cuda_widths

    def graph(op, width):
        node = helper.make_node(op, ["x", "b"] + (["s"] if op == "BiasAdd" else []), ["y"], domain="com.microsoft")
        values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("x", "s", "y")]
        return helper.make_model(helper.make_graph([node], "g", values[:2], values[2:],
                                                   [numpy_helper.from_array(np.zeros(width, np.float32), "b")]))

    assert unsupported_cuda_widths(graph("BiasSplitGelu", 5120)) == {}
    assert unsupported_cuda_widths(graph("BiasAdd", 640)) == {}
    assert unsupported_cuda_widths(graph("BiasSplitGelu", 512)) == {"BiasSplitGelu": [512]}
    assert unsupported_cuda_widths(graph("BiasAdd", 64)) == {"BiasAdd": [64]}


def test_dtypes_and_valid_graphs(cuda_export):
    import onnxruntime as ort

    out, _ = cuda_export
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    onnx.checker.check_model(unet)  # sorted nodes, the com.microsoft domain imported
    inputs = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    assert inputs == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT,
                      "encoder_hidden_states": onnx.TensorProto.FLOAT16}
    # every weight float16 but GroupNorm's gamma and beta, which ORT's converter keeps float32
    # (`ALWAYS_FLOAT_INPUTS`: the kernels take float32 scales with float16 data)
    norm_inputs = {name for node in unet.graph.node if node.op_type in ("GroupNorm", "SkipGroupNorm")
                   for name in node.input[1:3]}
    floats = {t.name for t in unet.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert floats and floats <= norm_inputs
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet.graph.initializer)
    for part in ("vae_decoder", "vae_encoder"):  # the VAE stays float32 and unfused
        vae = onnx.load(str(out / part / "model.onnx"))
        assert {t.data_type for t in vae.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
        assert not {node.domain for node in vae.graph.node} - {"", "ai.onnx"}
    text = onnx.load(str(out / "text_encoder" / "model.onnx"))
    onnx.checker.check_model(text)  # the plain fp16 conversion, sorted too
    assert not {node.domain for node in text.graph.node} - {"", "ai.onnx"}
    # ONNX Runtime type-checks the whole graph (every contrib operator's schema) before it looks for
    # kernels: on the CPU it stops at a missing kernel, not at a type error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(Exception, match="NOT_IMPLEMENTED") as failure:
        ort.InferenceSession(str(out / "unet" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert "Type Error" not in str(failure.value)


def test_record_says_what_was_checked_where(cuda_export):
    out, lines = cuda_export
    manifest = json.loads((out / "sdort.json").read_text())
    unet = manifest["parts"]["unet"]
    record = unet["optimization"]
    assert "ready_to_run" not in record and not (out / "unet" / "model.ort.onnx").exists()
    assert unet["max_abs_error"] <= FP16_TOLERANCE
    checked = record["checked_on"]
    assert checked.startswith("CPUExecutionProvider: the traced graph")
    missing = _cuda_missing()
    if missing:  # never a claim that the fused graph ran
        assert checked.endswith(f"the CUDA-fused graph was not run ({missing})")
        assert "CUDAExecutionProvider" not in checked
    else:
        assert checked.endswith("CUDAExecutionProvider: the CUDA-fused graph")
    assert any(line.strip() == f"checked on {checked}" for line in lines)  # and the log says it
    for part in ("text_encoder", "vae_encoder", "vae_decoder"):
        assert "optimization" not in manifest["parts"][part]


def test_refused_without_the_cuda_provider(cuda_export):
    from sdort.runtime import OnnxModel
    from sdort.runtime.sessions import _check_graph_target

    out, _ = cuda_export
    path = out / "unet" / "model.onnx"
    way_out = r"open it with provider='cuda'.*sd-export SRC OUT --target cpu"
    with pytest.raises(ValueError, match=rf"'unet' graph was exported for ONNX Runtime's CUDA provider.*"
                                         rf"provider='cpu'; {way_out}"):
        OnnxModel(path, provider="cpu")
    if _cuda_missing():
        with pytest.raises(ValueError, match=rf"provider='auto', which found no usable CUDA provider.*{way_out}"):
            OnnxModel(path, provider="auto")
    # OpenVINO (not installed here: the check itself, with the providers OnnxModel would ask for)
    with pytest.raises(ValueError, match=rf"provider='openvino'; {way_out}"):
        _check_graph_target(path, "unet", "openvino", [("OpenVINOExecutionProvider", {}), "CPUExecutionProvider"])
    _check_graph_target(path, "unet", "cuda", [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    # the other parts are plain graphs: they open on the CPU
    assert OnnxModel(out / "vae_decoder" / "model.onnx", provider="cpu").device == "cpu"


def test_no_optimize_refused(tmp_path, capsys):
    from sdort.export.cli import main

    assert main(["tiny", str(tmp_path / "out"), "--target", "cuda", "--no-optimize"]) == 2
    assert "target 'cuda' is the CUDA provider's graph fusions, which --no-optimize turns off" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runtime_lora_on_packed_weights_is_a_clear_error(sd1, cuda_export, tmp_path):
    """Packed QKV / KV stack the projections' weights into new tensors and NhwcConv re-lays the
    convolutions out: parameters.json cannot name them. `load_lora_weights` resolves every layer of
    the file through `ParameterMap.locations` before it changes anything (runtime/pipelines/adapters.py);
    these are those calls, on a diffusers LoRA made by peft."""
    from test_lora import make_peft_lora

    from sdort.runtime.lora import ParameterMap, read_lora

    out, _ = cuda_export
    lora = make_peft_lora(sd1[0], tmp_path, seed=3, components=("unet",))
    unet_map = ParameterMap(out / "unet", "unet")
    layers = read_lora(lora, {"unet": unet_map.names()})["unet"]
    packed = sorted(p for p in layers if ".attn1.to_q." in p)
    assert packed
    with pytest.raises(ValueError, match=rf"unet parameter '{packed[0]}' is not in the exported graph.*"
                                         r"fuse the LoRA at export instead \(sd-export --lora\)"):
        unet_map.locations(packed[0])
    for param in ("attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v", "conv1"):  # packed / NHWC
        assert not any(param in p for p in unet_map.parameters), param
    # what stays mapped is the tensor the fused graph computes with (no stale copy a LoRA would change
    # to no effect): the cross-attention's own Q, the output projections
    assert any(".attn2.to_q." in p for p in unet_map.parameters)
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    used = {name for node in graph.node for name in node.input}
    assert all(place["initializer"] in used for places in unet_map.parameters.values() for place in places)


@pytest.mark.skipif(bool(_cuda_missing()), reason="needs ONNX Runtime's CUDA provider and a GPU")
def test_cuda_pipeline_matches_diffusers_fp16(sd1, cuda_export):
    """What a GPU machine proves: the CUDA-fused fp16 graph, run by the CUDA provider, gives diffusers'
    fp16 images (the folder loaded with `torch_dtype=torch.float16` on the GPU, as users run it; its VAE
    is float16 too, sdort's float32). Bound: 3e-2 max abs on [0, 1], the export's fp16 bound, for two
    float16 computations that round differently (fused kernels against torch's, float16's 2^-11
    relative steps over the UNet's depth, through 4 steps); float32 parity is 1e-3."""
    import torch
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    from sdort.runtime import StableDiffusionPipeline

    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU: diffusers' fp16 reference needs one")
    out, _ = cuda_export
    reference = DiffusersPipeline.from_pretrained(sd1[1].parent / "diffusers", torch_dtype=torch.float16,
                                                  safety_checker=None, requires_safety_checker=False).to("cuda")
    reference.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(out, provider="cuda")
    ours.set_progress_bar_config(disable=True)
    assert ours.unet.device == "cuda"
    latents = latents_for((1, 4, 8, 8))
    kwargs = dict(prompt="a red fox in the snow", num_inference_steps=4, height=64, width=64, output_type="np")
    got = ours(latents=latents, **kwargs).images
    expected = reference(latents=torch.from_numpy(latents).to("cuda", torch.float16), **kwargs).images
    assert got.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    assert np.abs(got - np.asarray(expected, np.float32)).max() <= FP16_TOLERANCE


def _attention_module(tensor: str) -> str:
    """The diffusers module name of the attention whose traced tensor is `tensor`
    ("/model/down_blocks.1/attentions.0/transformer_blocks.0/attn1/Reshape_3_output_0" ->
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1")."""
    return ".".join(tensor.split("/")[2:-1])


def test_cuda_fused_graph_decomposed_runs_torch_numbers_on_cpu(sd1, cuda_export):
    """The CUDA-fused fp16 UNet's numbers, without a GPU: `cuda_ops_support.decompose_cuda_ops`
    rewrites each CUDA-only operator (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd,
    packed-QKV / packed-KV MultiHeadAttention) into standard ONNX operators with ONNX Runtime's
    definitions of them, reading the fused graph's own tensors; the CPU provider runs the result
    (with its fp32 fallback for fp16 nodes it has no kernels for) against the torch UNet in float32.

    What it proves: the fused graph's wiring and weights — the interleaved QKV / KV packing, the NHWC
    conv weights, SkipGroupNorm's skip / bias / second output, BiasSplitGelu's halves and bias and
    BiasAdd's operands (where the graph has them: not at the tiny UNet's widths), GroupNorm's
    recovered gamma / beta / epsilon / SiLU — compute diffusers' UNet. What it does not: the CUDA
    kernels themselves (their fp16 arithmetic, tiling, the flash attention paths);
    `test_cuda_pipeline_matches_diffusers_fp16` does, on a GPU.

    Compared: the UNet's output, and every fused attention's output (the MultiHeadAttention result,
    torch's input to `to_out`): the tiny random UNet's attention is nearly uniform, so a Q / K mix-up
    moves the UNet's output by only ~3e-2, but that attention's own output by ~0.45.
    Inputs: the export check's own (`parts.UNET.sample`, latents 8 x 16: not square, so NHWC
    height / width mix-ups show), at batch 2 (timesteps 1 and 981). Bound: the export's fp16 bound,
    3e-2 relative to max(1, max|torch|) (export/convert.py TOLERANCE), for float16 weights and
    activations through the UNet's depth; measured 1.9e-3 (output), 2.8e-3 (worst attention). Each
    deliberate misreading of the graph (`MISTAKES`: K and V swapped, Q and K swapped, the NHWC weight
    read as NCHW, BiasSplitGelu's halves swapped, GroupNorm's SiLU dropped) must land past the
    bound; measured 9e-2 to 1.6.
    """
    import onnxruntime as ort
    import torch
    from cuda_ops_support import MISTAKES, decompose_cuda_ops
    from diffusers.models.attention_processor import Attention

    from sdort.export.convert import CHECK_SHAPE
    from sdort.export.parts import unet_part

    out, _ = cuda_export
    unet = sd1[0].unet
    fused = onnx.load(str(out / "unet" / "model.onnx"))
    attentions = [node.output[0] for node in fused.graph.node if node.op_type == "MultiHeadAttention"]
    modules = dict(unet.named_modules())
    assert all(isinstance(modules.get(_attention_module(name)), Attention) for name in attentions)
    assert len(attentions) == sum(isinstance(module, Attention) for module in modules.values())

    part = unet_part(unet)
    sample = part.sample(unet, 2, *CHECK_SHAPE[1:], {})
    [output] = part.output_names(unet)
    expected = {}

    def keep(name):
        return lambda module, args: expected.__setitem__(name, args[0].numpy().astype(np.float64))

    hooks = [modules[_attention_module(name)].to_out[0].register_forward_pre_hook(keep(name))
             for name in attentions]
    try:
        with torch.no_grad():
            expected[output] = part.wrap(unet).eval()(*sample).numpy().astype(np.float64)
    finally:
        for hook in hooks:  # `sd1` is the session's: leave its UNet as it was
            hook.remove()
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in fused.graph.input}
    feed = {name: t.numpy().astype(types[name]) for name, t in zip(part.inputs, sample)}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp32 fallback's notes

    def error(mistake=None) -> float:
        """The largest error, relative to max(1, max|torch|), over the output and the attentions."""
        model = decompose_cuda_ops(fused, mistake)
        assert [o.name for o in model.graph.output] == [output]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT16, None)
                                  for name in attentions)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in model.graph.output]
        worst = 0.0
        for name, got in zip(names, session.run(names, feed)):
            assert got.shape == expected[name].shape, name
            ref = expected[name]
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()) / max(1.0, float(np.abs(ref).max())))
        return worst

    assert error() <= FP16_TOLERANCE
    ops = {node.op_type for node in fused.graph.node}
    for mistake in MISTAKES:  # the check can fail: each misreading of the fused graph shows
        if mistake == "gelu_halves_swapped" and "BiasSplitGelu" not in ops:
            continue  # the tiny UNet is fused without it (test_cuda_fusions_in_the_unet)
        assert error(mistake) > FP16_TOLERANCE, mistake
