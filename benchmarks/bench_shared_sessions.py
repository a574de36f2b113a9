"""Show that a second pipeline built from `pipe.components` adds no model memory.

    python benchmarks/bench_shared_sessions.py models/sd15-arch --out shared.json

Loads a text-to-image pipeline, then builds image-to-image and inpainting pipelines from its
components, and, for contrast, loads a second text-to-image pipeline from the folder. Prints the
process's resident memory (RSS, from /proc) after each step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdort.runtime import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_shared_sessions.json"))
    args = parser.parse_args()
    rows = [("start", rss_mb())]
    txt2img = StableDiffusionPipeline.from_pretrained(args.model, provider=args.provider)
    rows.append(("StableDiffusionPipeline.from_pretrained", rss_mb()))
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    rows.append(("+ StableDiffusionImg2ImgPipeline(**components)", rss_mb()))
    inpaint = StableDiffusionInpaintPipeline(**txt2img.components)
    rows.append(("+ StableDiffusionInpaintPipeline(**components)", rss_mb()))
    assert img2img.unet is txt2img.unet and inpaint.unet is txt2img.unet
    second = StableDiffusionPipeline.from_pretrained(args.model, provider=args.provider)
    rows.append(("+ a second from_pretrained (for contrast)", rss_mb()))
    del second
    print("| step | RSS MB | added MB |\n|---|---|---|")
    for i, (name, mb) in enumerate(rows):
        print(f"| {name} | {mb:.0f} | {mb - rows[i - 1][1] if i else 0:+.0f} |")
    args.out.write_text(json.dumps({"model": str(args.model), "rss_mb": dict(rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
