"""sdort.runtime: Stable Diffusion pipelines on numpy and ONNX Runtime alone (no torch)."""

from .feature_extractors import CLIPImageProcessor, DPTImageProcessor
from .image_processor import VaeImageProcessor
from .pipelines import (
    OnnxDiffusionPipeline,
    NumericalError,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImageVariationPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    StableDiffusionXLPipelineOutput,
)
from .randomness import PhiloxGenerator, TorchGenerator
from .sessions import OnnxModel
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPImageProcessor",
    "CLIPTokenizer",
    "DPTImageProcessor",
    "OnnxDiffusionPipeline",
    "NumericalError",
    "OnnxModel",
    "PhiloxGenerator",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImageVariationPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLPipelineOutput",
    "TorchGenerator",
    "VaeImageProcessor",
]
