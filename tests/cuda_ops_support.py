"""Test-only: the CUDA-fused UNet rewritten into operators the CPU provider runs, same semantics.

`sd-export --target cuda` leaves the UNet with ONNX Runtime's CUDA-only contrib operators
(com.microsoft). `decompose_cuda_ops` replaces each of them by standard ONNX operators (opset 17)
computing what ONNX Runtime's own definitions say they compute, reading the fused graph's tensors
exactly as they are stored (the NHWC weights, the packed QKV / KV projections, the fused biases,
the GroupNorm scales the fusion recovered). Running the result on the CPU then checks the fused
graph's wiring and weights against torch; it says nothing about the CUDA kernels themselves.

Where each operator's meaning comes from (microsoft/onnxruntime; the fusions in site-packages
`onnxruntime/transformers/`):

- NhwcConv: Conv on NHWC data with an [M, kH, kW, C/group] weight and Conv's attributes
  (fusion_nhwc_conv.py: the weight is the Conv weight transposed (0, 2, 3, 1), the attributes copied).
- GroupNorm: y = gamma * (x - mean) / sqrt(var + epsilon) + beta over `groups` groups of channels,
  then SiLU when `activation` is 1; NHWC unless `channels_last` is 0
  (core/graph/contrib_ops/diffusion_defs.cc, GroupNorm schema; the CUDA kernel
  contrib_ops/cuda/diffusion/group_norm_impl.cu accumulates in float).
- SkipGroupNorm: s = x + skip (+ bias), y = GroupNorm(s), optional second output s
  (diffusion_defs.cc, SkipGroupNorm schema; inputs X, gamma, beta, skip, bias; the skip shapes
  and float gamma / beta: contrib_ops/cuda/diffusion/group_norm.cc, GroupNorm::ComputeInternal).
- BiasSplitGelu: a = x + bias on the last axis of [N, S, D]; left half times the exact (erf) Gelu of
  the right half (diffusion_defs.cc, BiasSplitGelu schema; contrib_ops/cuda/diffusion/
  bias_split_gelu_impl.cu: `value_left * gelu(value_right)`, gelu = x * 0.5 * (erf(x / sqrt 2) + 1)).
- BiasAdd: x + bias + skip (diffusion_defs.cc, BiasAdd schema).
- MultiHeadAttention with packed QKV (query [B, S, N, 3, H], no key) or packed KV (key
  [B, L, N, 2, H], no value) (core/graph/contrib_ops/bert_defs.cc, MultiHeadAttention's inputs;
  fusion_attention_unet.py builds the packed weights with np.dstack of per-head Q/K/V): split on
  axis 3, each part back to [B, S, N*H], and the CPU provider's own MultiHeadAttention on
  separate Q, K, V (same num_heads, default scale).

SkipLayerNormalization and MultiHeadAttention with separate inputs have CPU kernels: kept as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"
CUDA_ONLY = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
# Deliberate misreadings of the fused graph (`decompose_cuda_ops(mistake=...)`): the packed KV's
# halves swapped, packed QKV's Q and K swapped, the NHWC conv weight's bytes read as NCHW,
# BiasSplitGelu's halves swapped, GroupNorm's SiLU dropped.
MISTAKES = ("kv_swapped", "qk_swapped", "nhwc_weight_read_as_nchw", "gelu_halves_swapped", "no_silu")


class _Builder:
    """Collects the replacement nodes and constants for one fused node, with unique names."""

    def __init__(self, prefix: str, constants: list):
        self.prefix, self.constants, self.nodes, self.count = prefix, constants, [], 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}/d{self.count}"

    def const(self, value) -> str:
        name = self.name()
        self.constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list, outputs: list | None = None, n_out: int = 1, **attrs) -> list:
        outputs = outputs or [self.name() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(), **attrs))
        return outputs

    def one(self, op_type: str, inputs: list, output: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, [output] if output else None, **attrs)[0]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _group_norm(b: _Builder, x: str, gamma: str, beta: str, channels: int, attrs: dict, output: str,
                mistake: str | None = None) -> None:
    """GroupNorm of the NHWC (or NCHW) tensor `x`, in float32 as the kernel computes, cast back to x's type."""
    groups, eps = attrs["groups"], attrs.get("epsilon", 1e-5)
    channels_last = attrs.get("channels_last", 1)
    data = b.one("Cast", [x], to=onnx.TensorProto.FLOAT)
    if not channels_last:
        data = b.one("Transpose", [data], perm=[0, 2, 3, 1])
    # [N, H, W, C] -> [N, H*W, groups, C/groups]: statistics per (sample, group) over axes 1 and 3
    grouped = b.one("Reshape", [data, b.const(np.array([0, -1, groups, channels // groups], np.int64))])
    mean = b.one("ReduceMean", [grouped], axes=[1, 3], keepdims=1)
    centred = b.one("Sub", [grouped, mean])
    var = b.one("ReduceMean", [b.one("Mul", [centred, centred])], axes=[1, 3], keepdims=1)
    std = b.one("Sqrt", [b.one("Add", [var, b.const(np.array(eps, np.float32))])])
    normed = b.one("Reshape", [b.one("Div", [centred, std]), b.one("Shape", [data])])
    scale = b.one("Cast", [gamma], to=onnx.TensorProto.FLOAT)
    shift = b.one("Cast", [beta], to=onnx.TensorProto.FLOAT)
    y = b.one("Add", [b.one("Mul", [normed, scale]), shift])  # per channel: the last axis
    if attrs.get("activation", 0) == 1 and mistake != "no_silu":  # SiLU
        y = b.one("Mul", [y, b.one("Sigmoid", [y])])
    if not channels_last:
        y = b.one("Transpose", [y], perm=[0, 3, 1, 2])
    b.one("CastLike", [y, x], output)


def _decompose(node, b: _Builder, initializers: dict, mistake: str | None = None) -> bool:
    """Append `node`'s standard-operator equivalent to `b`; False where the node stays as it is.
    `mistake` (one of `MISTAKES`) makes one deliberate misreading, for showing the check can fail."""
    op, ins, outs, attrs = node.op_type, list(node.input), list(node.output), _attrs(node)
    if node.domain != MS:
        return False
    if op == "NhwcConv":
        x = b.one("Transpose", [ins[0]], perm=[0, 3, 1, 2])
        if mistake == "nhwc_weight_read_as_nchw":  # the wrong reading: the NHWC bytes taken as NCHW
            m, kh, kw, c = initializers[ins[1]].dims
            w = b.one("Reshape", [ins[1], b.const(np.array([m, c, kh, kw], np.int64))])
        else:  # the stored [M, kH, kW, C/group] weight back to Conv's [M, C/group, kH, kW]
            w = b.one("Transpose", [ins[1]], perm=[0, 3, 1, 2])
        y = b.one("Conv", [x, w, *ins[2:]], **attrs)
        b.one("Transpose", [y], outs[0], perm=[0, 2, 3, 1])
    elif op == "GroupNorm":
        _group_norm(b, ins[0], ins[1], ins[2], initializers[ins[1]].dims[0], attrs, outs[0], mistake)
    elif op == "SkipGroupNorm":
        # The fuser's skip is 4D, [N, H, W, C] or the time embedding's [N, 1, 1, C]: plain broadcasting.
        # (The kernel also takes an [N, C] skip, which this Add would misalign; the fuser emits none.)
        total = b.one("Add", [ins[0], ins[3]])
        if len(ins) > 4 and ins[4]:
            total = b.one("Add", [total, ins[4]])
        if len(outs) > 1 and outs[1]:
            total = b.one("Identity", [total], outs[1])
        _group_norm(b, total, ins[1], ins[2], initializers[ins[1]].dims[0], attrs, outs[0], mistake)
    elif op == "BiasSplitGelu":
        biased = b.one("Cast", [b.one("Add", [ins[0], ins[1]])], to=onnx.TensorProto.FLOAT)
        left, right = b.op("Split", [biased], n_out=2, axis=-1)
        if mistake == "gelu_halves_swapped":
            left, right = right, left
        erf = b.one("Erf", [b.one("Mul", [right, b.const(np.array(1 / np.sqrt(2), np.float32))])])
        gelu = b.one("Mul", [b.one("Mul", [right, b.const(np.array(0.5, np.float32))]),
                             b.one("Add", [erf, b.const(np.array(1.0, np.float32))])])
        b.one("CastLike", [b.one("Mul", [left, gelu]), ins[0]], outs[0])
    elif op == "BiasAdd":
        b.one("Add", [b.one("Add", [ins[0], ins[1]]), ins[2]], outs[0])
    elif op == "MultiHeadAttention" and (len(ins) == 1 or (len(ins) == 2 and ins[1])):
        flat = b.const(np.array([0, 0, -1], np.int64))
        if len(ins) == 1:  # packed QKV [B, S, N, 3, H]
            q, k, v = (b.one("Reshape", [part, flat]) for part in b.op("Split", [ins[0]], n_out=3, axis=3))
            if mistake == "qk_swapped":
                q, k = k, q
        else:  # Q [B, S, N*H] and packed KV [B, L, N, 2, H]
            q = ins[0]
            k, v = (b.one("Reshape", [part, flat]) for part in b.op("Split", [ins[1]], n_out=2, axis=3))
            if mistake == "kv_swapped":
                k, v = v, k
        b.nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], outs, name=b.name(), domain=MS, **attrs))
    else:
        return False
    return True


def decompose_cuda_ops(model: onnx.ModelProto, mistake: str | None = None) -> onnx.ModelProto:
    """A copy of the CUDA-fused `model` with every CUDA-only operator replaced (see the module's
    docstring); raises where one is left that this does not know. `mistake`: see `_decompose`."""
    if mistake not in (None, *MISTAKES):
        raise ValueError(f"mistake must be one of {', '.join(MISTAKES)}; got {mistake!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    constants, nodes = [], []
    for index, node in enumerate(graph.node):
        builder = _Builder(f"cpu_decomposed/{index}", constants)
        if _decompose(node, builder, initializers, mistake):
            nodes.extend(builder.nodes)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    left = sorted({n.op_type for n in graph.node if n.domain == MS and n.op_type in CUDA_ONLY}
                  | {"MultiHeadAttention (packed)" for n in graph.node
                     if n.op_type == "MultiHeadAttention" and len(n.input) < 3})
    if left:
        raise ValueError(f"CUDA-only operators left after the decomposition: {', '.join(left)}")
    return out
