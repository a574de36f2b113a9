"""Run by test_openvino.py in the onnxruntime-openvino environment: sdort's text-to-image on
provider="openvino" at each precision, images saved as .npy, and what the provider reports.

    python openvino_child.py REQUEST.json

REQUEST: {"model": folder, "latents": .npy, "out": folder, "call": pipeline keyword arguments}.
Writes OUT/report.json: ONNX Runtime's version and providers, OpenVINO's CPU properties, the
bf16 verdict, and per precision either the image file and the execution provider of every node
that ran (from ONNX Runtime's profile) or the error raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdort.runtime import StableDiffusionPipeline, openvino
from sdort.runtime.sessions import OnnxModel


def providers_that_ran(pipe) -> dict:
    """Each part's execution providers over the nodes its profile recorded."""
    seen = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        profile = Path(getattr(pipe, name).session.end_profiling())
        events = json.loads(profile.read_text())
        seen[name] = sorted({event["args"]["provider"] for event in events
                             if event.get("cat") == "Node" and "provider" in event.get("args", {})})
        profile.unlink()
    return seen


def profiled(path: Path, precision: str, prefix: Path) -> OnnxModel:
    """The part's session on OpenVINO with profiling on, to read which provider ran each node."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return OnnxModel(path, provider="openvino", precision=precision, session_options=options)


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out = Path(request["out"])
    latents = np.load(request["latents"])
    supported, evidence = openvino.bf16_support()
    report = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
              "openvino_cpu": openvino.openvino_cpu_properties(), "bf16": supported, "bf16_evidence": evidence,
              "runs": {}}
    for precision in ("fp32", "bf16"):
        try:
            # each part its own profile prefix: ONNX Runtime names the file by the second the session
            # started, so parts loaded within one second would share (and overwrite) one file
            parts = {part: profiled(Path(request["model"]) / part / "model.onnx", precision, out / f"profile-{precision}-{part}")
                     for part in ("text_encoder", "unet", "vae_decoder")}
            pipe = StableDiffusionPipeline.from_pretrained(request["model"], provider="openvino", precision=precision,
                                                           **parts)
        except ValueError as exc:
            report["runs"][precision] = {"error": str(exc)}
            continue
        pipe.set_progress_bar_config(disable=True)
        image = pipe(latents=latents, output_type="np", **request["call"]).images
        np.save(out / f"image-{precision}.npy", image)
        report["runs"][precision] = {"image": str(out / f"image-{precision}.npy"),
                                     "ran_on": providers_that_ran(pipe), "device": pipe.unet.device}
    if request.get("fused_model"):  # an export with the CPU fusions: refused, naming the way out
        try:
            StableDiffusionPipeline.from_pretrained(request["fused_model"], provider="openvino")
            report["fused"] = {"error": None}
        except ValueError as exc:
            report["fused"] = {"error": str(exc)}
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
