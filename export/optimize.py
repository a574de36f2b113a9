"""Export-time graph optimisation: ONNX Runtime's transformer fusions, chosen per target provider.

ONNX Runtime's optimiser (`onnxruntime.transformers`) rewrites the UNet's traced blocks into fused
operators. Two targets (`sd-export --target`):

**cpu** (the default): only the fusions the CPU provider has kernels for.

- `MultiHeadAttention` (com.microsoft) for every self- and cross-attention: its CPU kernel runs a
  flash-attention loop, so the [batch x heads, tokens, tokens] score tensors (8 x 4096 x 4096 floats
  per image at 512 px) are never materialised;
- `LayerNormalization`, `SkipLayerNormalization` (the residual add before a LayerNorm), `Gelu` and
  `BiasGelu` (GEGLU's gate).

Left out, because only the CUDA provider runs them: GroupNorm / SkipGroupNorm, BiasSplitGelu, BiasAdd,
NhwcConv and the packed QKV / KV attention inputs. Q, K and V keep their own MatMuls and weights, so
the fused graph holds the same weight tensors as the traced one: the parameter map for run-time LoRA
still finds them. The fp32 graph also gets a ready-to-run CPU file (`write_ready_to_run`).

**cuda**: what ONNX Runtime's own stable-diffusion script
(`onnxruntime/transformers/models/stable_diffusion/optimize_pipeline.py`) does for the CUDA provider:
every fusion `FusionOptions("unet")` enables (GroupNorm in NHWC and SkipGroupNorm, BiasSplitGelu,
BiasAdd, NhwcConv, MultiHeadAttention for the CUDA kernels' flash / memory-efficient attention,
LayerNorm, SkipLayerNorm, Gelu), with symbolic shape inference (SkipGroupNorm, SkipLayerNorm and
BiasAdd only match with it), on the float32 graph first (some patterns match only in float32), then
the float16 conversion (`convert.to_float16`; ORT's script blocks no operator for SD 1.x / 2.x / XL
UNets). BiasSplitGelu and BiasAdd are left out of a UNet whose widths their CUDA kernels refuse
(`CUDA_KERNEL_WIDTHS`: SD's widths only), recorded as `not_fused`. With float16 the self-attention
takes packed QKV and the cross-attention packed KV (one interleaved weight each), as ORT's script
does for float16 only; in float32 the self-attention is the `Attention` operator (one stacked QKV
weight). Those operators have no CPU kernels and the
stacked weights are no parameter's own tensor: a CUDA graph runs on the CUDA provider only
(`sdort.runtime.sessions` refuses it elsewhere) and run-time LoRA cannot reach the attention
projections and convolutions (parameters.json lists them as missing; export-time `--lora` works).
No ready-to-run file: ONNX Runtime's CUDA-optimised graphs hold CUDA-provider kernels and layouts
chosen for one GPU and ONNX Runtime build, not portable files.

Three things stood between sdort's traced UNet and ONNX Runtime's fuser; they are dealt with here,
for both targets:
- `FusionAttentionUnet.get_num_heads` calls `int()` on the head count it reads from the head-split
  Reshape's shape, a 1-element array; NumPy no longer converts arrays with ndim > 0 to scalars
  (NumPy 2.4.6 here: `TypeError: only 0-dimensional arrays can be converted to Python scalars`), so
  the fusion crashed on every export. `_Attention.get_num_heads` reads the same constant's element.
- diffusers' attention processor ends with `.to(query.dtype)`, traced as a float-to-float Cast between
  the attention and `to_out`, which breaks the pattern: `drop_identity_casts` removes such Casts.
- Without packed QKV, the fuser turns self-attention into the `Attention` operator (one stacked QKV
  weight, and a CPU kernel that materialises the scores); `_CpuAttention` emits `MultiHeadAttention`
  with separate Q, K and V for self-attention too, as the fuser does for cross-attention.

The text encoder is left as traced (plain float16 conversion for fp16) for both targets: it runs once
per prompt against the UNet's once per step, so its fusions would gain little, and CLIP's attention
fusion stacks Q/K/V into one weight, which would take run-time LoRA and textual inversion's
parameter map away from it. The VAE stays float32 and unfused.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx

TARGETS = ("cpu", "cuda")
# The `onnxruntime.transformers` model type of each part the export optimises.
MODEL_TYPES = {"unet": "unet"}
# FusionOptions switched off per target: fusions whose operators that target's provider cannot run.
_DISABLED = {
    "cpu": ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
            "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv",
            # symbolic shape inference only removes redundant Casts/Reshapes here, and on a 3.4 GB UNet
            # it holds a second copy of the graph; the attention patterns match without it
            "enable_shape_inference"),
    # ORT's stable-diffusion script for the CUDA provider: all of FusionOptions("unet") (packing: see
    # `fusion_options`). Symbolic shape inference stays on: without it the tiny UNet kept 97 Transposes
    # against 44 and got no SkipGroupNorm, SkipLayerNormalization or BiasAdd; its cost is a second copy
    # of the graph in memory while fusing.
    "cuda": (),
}
# The fused operators counted in sdort.json (`onnxruntime.transformers`' own list, and Gelu).
FUSED_OPS = ("MultiHeadAttention", "Attention", "LayerNormalization", "SkipLayerNormalization", "Gelu",
             "BiasGelu", "FastGelu", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd")


def _unet_optimizer_class(target: str = "cpu"):
    """ONNX Runtime's UNet optimiser with sdort's attention fusion for `target`: `_Attention` (ONNX
    Runtime's, fixed for NumPy 2) for cuda, `_CpuAttention` for cpu (defined here because
    `onnxruntime.transformers` modules import each other by bare name once the package is imported)."""
    import onnxruntime.transformers  # noqa: F401  puts its folder on sys.path
    from fusion_attention_unet import FusionAttentionUnet
    from onnx import helper
    from onnx_model_unet import UnetOnnxModel

    class _Attention(FusionAttentionUnet):
        """ONNX Runtime's UNet attention fusion (packed QKV / KV where enabled), with the head count
        read under NumPy 2 and the search's output map built once per pass."""

        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            if not is_torch2:
                return super().get_num_heads(reshape_q, False)
            # The head split reshapes to Concat(batch, tokens, [heads], [head_size]).
            concat = self.model.get_parent(reshape_q, 1)
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
                return 0
            heads = self.model.get_constant_value(concat.input[2])
            if not isinstance(heads, np.ndarray) or heads.size != 1:
                return 0
            return max(int(heads.reshape(-1)[0]), 0)

        def fuse(self, normalize_node, input_name_to_nodes, output_name_to_node):
            # The matchers rebuild the whole graph's output -> node map for every parent they look up
            # (quadratic in the graph's size: most of an export's optimisation time). The graph does not
            # change while a pass searches (`Fusion.apply` edits it afterwards): the pass's map serves.
            self.model.output_name_to_node = lambda exclude_subgraphs=False: output_name_to_node
            try:
                super().fuse(normalize_node, input_name_to_nodes, output_name_to_node)
            finally:
                del self.model.output_name_to_node

    class _CpuAttention(_Attention):
        """diffusers' attention (torch 2 SDPA or torch 1 pattern) -> MultiHeadAttention(Q, K, V)."""

        def create_attention_node(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output):
            if self.is_cross_attention:
                # queries from the image tokens, keys and values from one other tensor (the text)
                shapes_fit = k_matmul.input[0] == v_matmul.input[0] != input
            else:
                shapes_fit = k_matmul.input[0] == v_matmul.input[0] == input
            if q_matmul.input[0] != input or not shapes_fit or num_heads <= 0:
                return None
            if hidden_size > 0 and hidden_size % num_heads:
                return None
            name = self.model.create_node_name("MultiHeadAttention")
            # No bias input (diffusers' to_q/to_k/to_v have none); the default scale is 1/sqrt(head
            # size), diffusers' `dim_head ** -0.5`.
            node = helper.make_node("MultiHeadAttention", [q_matmul.output[0], k_matmul.output[0], v_matmul.output[0]],
                                    [output], name=name, domain="com.microsoft", num_heads=num_heads)
            self.increase_counter("MultiHeadAttention (cross attention)" if self.is_cross_attention
                                  else "MultiHeadAttention (self attention)")
            return node

    attention = _CpuAttention if target == "cpu" else _Attention

    class _UnetModel(UnetOnnxModel):
        def fuse_multi_head_attention(self, options=None):
            # as UnetOnnxModel's: packed QKV for self-attention, packed KV for cross-attention
            for cross in (False, True):
                attention(self, self.hidden_size, self.num_heads, is_cross_attention=cross,
                          enable_packed_qkv=not cross and options.enable_packed_qkv,
                          enable_packed_kv=cross and options.enable_packed_kv).apply()

    return _UnetModel


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")


def fusion_options(model_type: str, target: str = "cpu", float16: bool = False, disabled=()):
    """ONNX Runtime's FusionOptions for `model_type`, less what `target`'s provider cannot run and the
    options named in `disabled`; for cuda, packed QKV / KV only for a graph that `float16` says will
    be converted (as ORT's script)."""
    check_target(target)
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in (*_DISABLED[target], *disabled):
        setattr(options, name, False)
    if not float16:
        options.enable_packed_qkv = options.enable_packed_kv = False
    return options


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each fused operator (`FUSED_OPS`) the graph holds, those present only."""
    counts = {}
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type, by ONNX type inference on a copy of the graph without its weights'
    bytes (types need no values, and protobuf refuses graphs over 2 GB); the small initializers (shape
    constants) keep theirs."""
    weights = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > 1024:
            weights[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in weights:
                tensor.raw_data = weights[tensor.name]
    graph = onnx.shape_inference.infer_shapes(skeleton).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types


def drop_identity_casts(model: onnx.ModelProto) -> int:
    """Remove Cast nodes whose input already has the target type; returns how many. (ONNX Runtime's
    own pass for this needs symbolic shape inference, which `_DISABLED` turns off.)"""
    types = _elem_types(model)
    outputs = {o.name for o in model.graph.output}
    casts = [node for node in model.graph.node if node.op_type == "Cast" and node.output[0] not in outputs
             and types.get(node.input[0]) == next(a.i for a in node.attribute if a.name == "to")]
    renamed = {node.output[0]: node.input[0] for node in casts}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            while name in renamed:  # through a chain of such Casts, to the first one's input
                name = renamed[name]
            node.input[index] = name
    for node in casts:
        model.graph.node.remove(node)
    return len(casts)


def optimize(model: onnx.ModelProto, part_kind: str, target: str = "cpu", float16: bool = False,
             disabled=()) -> onnx.ModelProto:
    """Apply ONNX Runtime's transformer fusions for `target` to the float32 `model` (changed in place
    and returned); `part_kind` is a key of `MODEL_TYPES`; `float16`: the graph is converted after
    (see `fusion_options`); `disabled`: FusionOptions to switch off besides the target's. No ONNX
    Runtime session optimisation runs here (opt_level 0): the graph stays portable across providers
    that have the fused operators."""
    if part_kind not in MODEL_TYPES:
        raise ValueError(f"no graph optimisation for part kind {part_kind!r}; known: {', '.join(MODEL_TYPES)}")
    options = fusion_options(MODEL_TYPES[part_kind], target, float16, disabled)
    drop_identity_casts(model)
    optimizer = _unet_optimizer_class(target)(model)
    logging.disable(logging.WARNING)  # the fuser's notes ("symbolic shape inference disabled", ...)
    try:
        optimizer.optimize(options)
        optimizer.topological_sort()
    finally:
        logging.disable(logging.NOTSET)
    model = optimizer.model
    # The fused operators are ONNX Runtime's (domain com.microsoft): a valid ONNX file imports that
    # domain (onnx.checker refuses the graph otherwise; ONNX Runtime happens to run it anyway)
    domains = {node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    imported = {entry.domain for entry in model.opset_import}
    model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - imported))
    return model


# The ready-to-run file beside model.onnx: the graph after ONNX Runtime's own CPU optimisations, so
# that a CPU session loads it without optimising again (see `write_ready_to_run`).
READY_FILE = "model.ort.onnx"
READY_DATA = READY_FILE + "_data"


def write_ready_to_run(folder: Path) -> dict:
    """Save `folder`/model.onnx as ONNX Runtime's CPU provider optimises it when a session opens
    (`SessionOptions.optimized_model_filepath`) to `READY_FILE`, weights in `READY_DATA`; returns
    what sdort.json records about it.

    The level is ORT_ENABLE_EXTENDED, not ALL: ALL adds the NCHWc layout transforms, whose block size
    is the CPU's vector width, so the file would only suit CPUs like this one. EXTENDED's fusions
    (FusedConv, FusedMatMul, ...) are CPU-provider operators: the file is for the CPU provider only,
    and the runtime opens model.onnx for any other provider or ONNX Runtime version.
    """
    import onnxruntime as ort

    from sdort.runtime.sessions import file_sha256

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / READY_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", READY_DATA)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    for stale in (folder / READY_FILE, folder / READY_DATA):
        stale.unlink(missing_ok=True)  # ONNX Runtime appends to an existing data file
    ort.InferenceSession(str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
    # model.onnx's digest: the runtime takes the file only while model.onnx is the graph it came from
    return {"file": READY_FILE, "provider": "CPUExecutionProvider", "onnxruntime": ort.__version__,
            "level": "extended", "model_sha256": file_sha256(folder / "model.onnx")}


# CUDA kernels that take only SD's widths (onnxruntime/contrib_ops/cuda/diffusion/bias_split_gelu.cc and
# bias_add.cc refuse any other at run time: GEGLU's at 320, 640 and 1280 channels, the residual add's
# channels): operator -> (its FusionOptions switch, the lengths its bias input may have). A UNet of
# other widths is fused without those operators.
CUDA_KERNEL_WIDTHS = {"BiasSplitGelu": ("enable_bias_splitgelu", (2560, 5120, 10240)),
                      "BiasAdd": ("enable_bias_add", (320, 640, 1280))}


def unsupported_cuda_widths(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The `CUDA_KERNEL_WIDTHS` operators of the graph whose bias length their CUDA kernel refuses:
    operator -> those lengths."""
    lengths = {tensor.name: tensor.dims[0] for tensor in model.graph.initializer if len(tensor.dims) == 1}
    found = {}
    for node in model.graph.node:
        if node.op_type in CUDA_KERNEL_WIDTHS and node.input[1] in lengths:
            if lengths[node.input[1]] not in CUDA_KERNEL_WIDTHS[node.op_type][1]:
                found.setdefault(node.op_type, set()).add(lengths[node.input[1]])
    return {op: sorted(widths) for op, widths in sorted(found.items())}


def optimize_part(name: str, folder: Path, dtype: str, target: str = "cpu", fp32_graph: Path | None = None) -> dict | None:
    """The export step for the part `name` saved in `folder`: fuse model.onnx in place (`optimize`) and
    write what the target adds; returns what sdort.json records, or None where nothing applies (a part
    without fusions here, or a float16 graph for the cpu target: its fusions are the CUDA target's).

    cpu: model.onnx (float32) fused, and its ready-to-run file. cuda: the float32 graph `fp32_graph`
    (default model.onnx) fused, converted to float16 when `dtype` is fp16, saved as model.onnx."""
    from .convert import save, to_float16

    check_target(target)
    if name not in MODEL_TYPES or (target == "cpu" and dtype != "fp32"):
        return None
    path = folder / "model.onnx"
    record = {"target": target}
    try:
        source = str(fp32_graph or path)
        model = optimize(onnx.load(source), name, target, float16=dtype == "fp16")
        refused = unsupported_cuda_widths(model) if target == "cuda" else {}
        if refused:  # again, from the traced graph, without the fusions those kernels refuse
            model = optimize(onnx.load(source), name, target, float16=dtype == "fp16",
                             disabled=[CUDA_KERNEL_WIDTHS[op][0] for op in refused])
            record["not_fused"] = {op: f"widths {widths}: its CUDA kernel takes only "
                                       f"{', '.join(map(str, CUDA_KERNEL_WIDTHS[op][1]))}"
                                   for op, widths in sorted(refused.items())}
        if target == "cuda" and dtype == "fp16":
            model = to_float16(model)
    except Exception as exc:  # noqa: BLE001  the fuser on a graph it does not know: keep the traced one
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"{name}: ONNX Runtime's graph fusions failed ({message}); the traced graph is kept")
        record.update(fused={}, fusion_error=message)
    else:
        record["fused"] = fused_op_counts(model)
        for stale in (path, folder / "model.onnx_data"):
            stale.unlink(missing_ok=True)  # onnx appends external data to an existing file
        save(model, folder)
        del model
    if target == "cpu":
        record["ready_to_run"] = write_ready_to_run(folder)
    return record
