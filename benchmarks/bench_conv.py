"""One 3x3 convolution at a time, ONNX Runtime's CPU provider against torch: where the fp32 time goes.

    python benchmarks/bench_conv.py --out benchmarks/results/bench_conv.json

At 512 px nearly all of SD 1.5's fp32 work is convolution (the VAE decoder's 2.5 TFLOP are 99.7 %
3x3 convolutions; the UNet's 1.2 TFLOP at batch 2 are 74 %; count them with `--flops MODEL.onnx`).
This times the convolution shapes of those parts at 512 px as single-node graphs, in ONNX Runtime
(graph level EXTENDED, what sdort's UNet file runs, and ALL, with NCHWc layouts, what the VAE runs)
and in torch (oneDNN), with the same threads, and gives GFLOP/s for each, so the README can say
whether a graph-level change could still make those parts faster, or whether both engines already
run the same arithmetic at the same rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

# (part, batch, channels in, channels out, height, width) of SD 1.5's 3x3 convolutions at 512 px
SHAPES = [
    ("vae_decoder", 1, 512, 512, 64, 64),
    ("vae_decoder", 1, 512, 512, 128, 128),
    ("vae_decoder", 1, 256, 256, 256, 256),
    ("vae_decoder", 1, 128, 128, 512, 512),
    ("unet", 2, 320, 320, 64, 64),
    ("unet", 2, 640, 640, 32, 32),
    ("unet", 2, 1280, 1280, 16, 16),
]


def conv_graph(cin: int, cout: int, weight: np.ndarray, bias: np.ndarray):
    """A one-node ONNX graph: Conv 3x3, padding 1, the given weights."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cout, "h", "w"])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def best_of(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and weight packing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(shape, repeats: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch

    part, batch, cin, cout, height, width = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cin, height, width), dtype=np.float32)
    weight = (rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) / np.sqrt(cin * 9)).astype(np.float32)
    bias = np.zeros(cout, np.float32)
    flop = 2 * batch * cout * height * width * cin * 9
    row = {"part": part, "shape": [batch, cin, cout, height, width], "gflop": flop / 1e9}
    model = conv_graph(cin, cout, weight, bias).SerializeToString()
    outputs = {}
    for level_name, level in (("ort_extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                              ("ort_all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = False
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        seconds = best_of(lambda: outputs.__setitem__(level_name, session.run(None, {"x": x})[0]), repeats)
        row[level_name] = {"s": seconds, "gflops": flop / seconds / 1e9}
    torch.set_num_threads(threads)
    with torch.no_grad():
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        seconds = best_of(lambda: outputs.__setitem__(
            "torch", torch.nn.functional.conv2d(tx, tw, tb, padding=1).numpy()), repeats)
    row["torch"] = {"s": seconds, "gflops": flop / seconds / 1e9}
    row["max_abs_ort_vs_torch"] = float(np.abs(outputs["ort_all"] - outputs["torch"]).max())
    return row


def graph_flops(path: Path, latent: int, batch: int) -> dict:
    """Conv and MatMul GFLOP of an exported part at `latent` x `latent` latents and `batch`, from
    ONNX shape inference (attention's data-dependent reshapes leave some MatMuls uncounted)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        # rank 4: [batch, channels, latent, latent]; rank 3: [batch, 77 tokens, width]; rank 1: [batch]
        sizes = {4: [batch, None, latent, latent], 3: [batch, 77, None], 1: [batch]}.get(len(dims), [])
        for dim, size in zip(dims, sizes):
            if size is not None and not dim.dim_value:
                dim.ClearField("dim_param")
                dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    totals = {"conv": 0.0, "matmul": 0.0, "uncounted": 0}
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        if not out or 0 in out:
            totals["uncounted"] += 1
        elif node.op_type == "Conv":
            totals["conv"] += 2 * np.prod(out) * np.prod(shapes[node.input[1]][1:]) / 1e9
        else:
            totals["matmul"] += 2 * np.prod(out) * shapes[node.input[0]][-1] / 1e9
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--flops", metavar="MODEL.onnx", nargs="*", default=[],
                        help="also count the GFLOP of these exported parts at 512 px (UNet at batch 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    rows = []
    print(f"{'part':<12} {'shape (n, cin, cout, h, w)':<28} {'GFLOP':>7} {'ORT ext':>9} {'ORT all':>9} {'torch':>9}  GFLOP/s")
    for shape in SHAPES:
        row = measure(shape, args.repeats, args.threads)
        rows.append(row)
        print(f"{row['part']:<12} {str(row['shape']):<28} {row['gflop']:7.1f} {row['ort_extended']['s']:8.3f}s "
              f"{row['ort_all']['s']:8.3f}s {row['torch']['s']:8.3f}s  {row['ort_extended']['gflops']:.0f} / "
              f"{row['ort_all']['gflops']:.0f} / {row['torch']['gflops']:.0f}", flush=True)
    flops = {}
    for path in args.flops:
        batch = 2 if Path(path).parent.name == "unet" else 1
        flops[path] = graph_flops(Path(path), 64, batch)
        print(f"{path}: {flops[path]}")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "onnxruntime": ort.__version__, "torch": torch.__version__},
              "rows": rows, "graph_gflop_512px": flops}
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.partial")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
