"""The `sd-export MODEL OUT` command."""

from __future__ import annotations

import sys

from .exporter import DTYPES, ExportCheckError, export
from .optimize import TARGETS
from ..runtime.lora import parse_lora_argument
from .sources import PRESETS


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="sd-export",
        description="Export a Stable Diffusion checkpoint (Hub id, diffusers folder, single file or preset) to ONNX "
                    "for sdort.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help=f"Hub repo id, local diffusers folder, original-format single-file checkpoint "
                             f"(.safetensors: SD 1.x, SD 2.x, SDXL), or preset: {', '.join(PRESETS)}")
    parser.add_argument("out", metavar="OUT", help="folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp16 converts text encoder and UNet; the VAE stays fp32 (default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="leave out the model's safety checker (the runtime then checks nothing)")
    parser.add_argument("--config", metavar="DIR_OR_REPO",
                        help="single-file MODEL: the diffusers configs to use, a local diffusers folder (configs "
                             "suffice) or a Hub repo id (default: the repo diffusers infers, which needs the network "
                             "once)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="single-file MODEL: read a pickle checkpoint (.ckpt, .pt, .pth, .bin); loading a "
                             "pickle can run code, so only for files you trust")
    parser.add_argument("--lora", metavar="FILE[:SCALE]", action="append", default=[], type=parse_lora_argument,
                        help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya) into the weights with SCALE "
                             "(default 1.0), as diffusers' fuse_lora; repeatable")
    parser.add_argument("--no-optimize", action="store_true",
                        help="keep the traced fp32 UNet graph as it is: no fused attention/LayerNorm/Gelu operators "
                             "and no ready-to-run CPU file (model.ort.onnx)")
    parser.add_argument("--target", choices=TARGETS, default="cpu",
                        help="the execution provider the UNet graph is fused for: cpu runs on every provider "
                             "(ONNX Runtime's CPU fusions, and the ready-to-run CPU file); cuda adds the CUDA "
                             "provider's own fusions (GroupNorm, NhwcConv, packed attention...) before the fp16 "
                             "conversion and runs only with provider 'cuda' (onnxruntime-gpu) (default: cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        export(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite,
               safety_checker=not args.no_safety_checker, config=args.config, allow_pickle=args.allow_pickle,
               loras=args.lora, optimize_graphs=not args.no_optimize, target=args.target)
    except (ValueError, OSError, ConnectionError, ExportCheckError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sd-export: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
