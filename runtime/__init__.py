"""sdort.runtime: Stable Diffusion pipelines on numpy and ONNX Runtime alone (no torch)."""

from .depth_to_image import StableDiffusionDepth2ImgPipeline
from .feature_extractors import CLIPImageProcessor, DPTImageProcessor
from .image_processor import VaeImageProcessor
from .image_to_image import StableDiffusionImg2ImgPipeline
from .image_variation import StableDiffusionImageVariationPipeline
from .inpaint import StableDiffusionInpaintPipeline
from .pipeline import DiffusionPipeline, NumericalError, StableDiffusionPipelineOutput
from .randomness import PhiloxGenerator, TorchGenerator
from .sessions import OnnxModel
from .text_to_image import StableDiffusionPipeline
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPImageProcessor",
    "CLIPTokenizer",
    "DPTImageProcessor",
    "DiffusionPipeline",
    "NumericalError",
    "OnnxModel",
    "PhiloxGenerator",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImageVariationPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
    "TorchGenerator",
    "VaeImageProcessor",
]
