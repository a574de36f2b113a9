"""diffusers' safety checker (`StableDiffusionSafetyChecker`) on ONNX Runtime, and the part of the
Stable Diffusion pipelines that runs it after decoding.

The model is `safety_checker/model.onnx` (CLIP vision tower and projection; the cosine similarity
of the image embedding to 17 concept and 3 special-care embeddings, less their thresholds), fed by
the CLIP feature extractor of `feature_extractor/preprocessor_config.json`. Which images are
flagged follows diffusers' PyTorch `forward`, not the graph's own `has_nsfw_concepts` (diffusers'
`forward_onnx`): see `nsfw_flags`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..feature_extractors import CLIPImageProcessor
from ..model_files import read_json
from ..sessions import OnnxModel, check_provider

logger = logging.getLogger("sdort")

# diffusers' own words, so that logs read the same with either library.
DISABLED_WARNING = (
    "You have disabled the safety checker for {cls} by passing `safety_checker=None`. Ensure that you abide to the "
    "conditions of the Stable Diffusion license and do not expose unfiltered results in services or applications "
    "open to the public. Both the diffusers team and Hugging Face strongly recommend to keep the safety filter "
    "enabled in all public facing circumstances, disabling it only for use-cases that involve analyzing network "
    "behavior or auditing its results. For more information, please have a look at "
    "https://github.com/huggingface/diffusers/pull/254 ."
)
NSFW_WARNING = ("Potential NSFW content was detected in one or more images. A black image will be returned instead."
                " Try again with a different prompt and/or seed.")

# The graph's outputs that give the raw scores (cosine similarity less threshold), written by sdort's
# export; an Optimum export has only `has_nsfw_concepts`.
SCORE_OUTPUTS = ("special_scores", "concept_scores")


def nsfw_flags(special_scores: np.ndarray, concept_scores: np.ndarray) -> list[bool]:
    """Which images are flagged, by the rule of diffusers' `StableDiffusionSafetyChecker.forward`.

    Per image: each score (float32 cosine similarity less its threshold) plus the adjustment is
    rounded to 3 decimals and counts when above 0; once a special-care concept counts, the
    adjustment becomes 0.01 for the concepts after it. The image is flagged when any of the 17
    concepts counts. The rounding is why this is computed here: diffusers' `forward_onnx` (the
    graph's `has_nsfw_concepts`) does not round, and flags scores in (0, 0.0005) that `forward`
    rounds to 0.
    """
    flags = []
    for special, concepts in zip(np.asarray(special_scores, np.float32), np.asarray(concept_scores, np.float32)):
        adjustment = 0.0
        for score in special:
            # np.float32 + Python float stays float32 and round() rounds in float32, as diffusers'
            if round(score + adjustment, 3) > 0:
                adjustment = 0.01
        flags.append(bool(any(round(score + adjustment, 3) > 0 for score in concepts)))
    return flags


def check_images(safety_checker: OnnxModel, feature_extractor, pil_images, images_nhwc: np.ndarray) -> list[bool]:
    """Run the safety checker on a batch: `pil_images` go through the CLIP feature extractor
    (`clip_input`); `images_nhwc` is what the graph's `images` input gets (Optimum's contract; sdort
    blacks out flagged images itself). Returns one boolean per image."""
    feeds = {"clip_input": feature_extractor(list(pil_images))}
    if "images" in safety_checker.inputs:
        # the graph's image input is RGB; the flags do not depend on it (LDM3D decodes RGB + depth)
        feeds["images"] = np.ascontiguousarray(images_nhwc[..., :3], dtype=np.float32)
    outputs = safety_checker(**feeds)
    if all(name in outputs for name in SCORE_OUTPUTS):
        return nsfw_flags(*(outputs[name] for name in SCORE_OUTPUTS))
    return [bool(flag) for flag in np.asarray(outputs["has_nsfw_concepts"]).reshape(-1)]


def load_safety_parts(path: Path, provider: str, session_options, overrides: dict, precision: str = "fp32") -> None:
    """Add to `overrides` what `from_pretrained` does not load by itself: the `safety_checker`
    session when the folder has one (None otherwise), its CLIP `feature_extractor`, and
    `requires_safety_checker` from model_index.json (True when unsaid, as diffusers' default)."""
    if "requires_safety_checker" not in overrides:
        index_path = path / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        overrides["requires_safety_checker"] = bool(index.get("requires_safety_checker", True))
    if "safety_checker" not in overrides:
        model = path / "safety_checker" / "model.onnx"
        overrides["safety_checker"] = (OnnxModel(model, provider=provider, name="safety_checker",
                                                 session_options=session_options, precision=precision)
                                      if model.is_file() else None)
    config = path / "feature_extractor" / "preprocessor_config.json"
    if overrides["safety_checker"] is not None and "feature_extractor" not in overrides and config.is_file():
        overrides["feature_extractor"] = CLIPImageProcessor.from_pretrained(config)


class SafetyCheckedPipeline:
    """Mixin of the pipelines diffusers gives a safety checker (text-to-image, image-to-image,
    inpainting, image variation): `safety_checker`, `feature_extractor` and `requires_safety_checker`
    as diffusers' constructors take them, loaded by `from_pretrained` when the folder has them, and
    `run_safety_checker`, which the base's `decode` calls between the VAE and the post-processing.

    `safety_checker=None` turns the check off (`nsfw_content_detected` is then None) with diffusers'
    warning when the model says it requires one.
    """

    def __init__(self, *args, safety_checker=None, feature_extractor=None, requires_safety_checker: bool = True,
                 **kwargs):
        if feature_extractor is not None:  # else the pipeline's own default (image variation has one)
            kwargs["feature_extractor"] = feature_extractor
        super().__init__(*args, safety_checker=safety_checker, **kwargs)
        self.requires_safety_checker = requires_safety_checker
        if safety_checker is None and requires_safety_checker:
            logger.warning(DISABLED_WARNING.format(cls=type(self)))
        if safety_checker is not None and getattr(self, "feature_extractor", None) is None:
            raise ValueError("feature_extractor: the safety checker needs the CLIP feature extractor "
                             "(feature_extractor/preprocessor_config.json); pass safety_checker=None to run without")

    @classmethod
    def from_pretrained(cls, path, provider: str = "auto", session_options=None, precision: str = "fp32",
                        **overrides):
        # before the safety checker's files are read (the base checks again, for its own callers)
        check_provider(provider, precision, overrides.get("cuda_graph", False))
        if Path(path).is_dir():
            load_safety_parts(Path(path), provider, session_options, overrides, precision)
        return super().from_pretrained(path, provider=provider, session_options=session_options, precision=precision,
                                       **overrides)

    def checker_pil_images(self, image: np.ndarray) -> list:
        """The PIL images the feature extractor gets: the decoded images, post-processed."""
        return self.image_processor.postprocess(image, output_type="pil")

    def run_safety_checker(self, image: np.ndarray):
        """diffusers' `run_safety_checker`: the decoded NCHW images (about [-1, 1]) as PIL images
        through the feature extractor and the checker; flagged images become zeros (black once
        `decode` leaves them un-denormalised). Returns (images, flags), flags None without a checker."""
        if self.safety_checker is None:
            return image, None
        pil_images = self.checker_pil_images(image)
        flags = check_images(self.safety_checker, self.feature_extractor, pil_images, image.transpose(0, 2, 3, 1))
        if any(flags):
            logger.warning(NSFW_WARNING)
            image = image.copy()
            image[np.asarray(flags)] = 0.0
        return image, flags
