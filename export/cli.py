"""The `sd-export MODEL OUT` command."""

from __future__ import annotations

import sys

from .exporter import DTYPES, ExportCheckError, export
from .sources import PRESETS


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="sd-export",
        description="Export a Stable Diffusion checkpoint (Hub id, diffusers folder or preset) to ONNX for sdort.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help=f"Hub repo id, local diffusers folder, or preset: {', '.join(PRESETS)}")
    parser.add_argument("out", metavar="OUT", help="folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp16 converts text encoder and UNet; the VAE stays fp32 (default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="leave out the model's safety checker (the runtime then checks nothing)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        export(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite,
               safety_checker=not args.no_safety_checker)
    except (ValueError, OSError, ConnectionError, ExportCheckError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sd-export: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
