"""sdort.runtime: Stable Diffusion pipelines on numpy and ONNX Runtime alone (no torch)."""

from .image_processor import CLIPImageProcessor, DPTImageProcessor, VaeImageProcessor
from .image_to_image import StableDiffusionImg2ImgPipeline
from .inpaint import StableDiffusionInpaintPipeline
from .pipeline import DiffusionPipeline, StableDiffusionPipelineOutput
from .random import PhiloxGenerator, TorchGenerator
from .sessions import OnnxModel
from .text_to_image import StableDiffusionPipeline
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPImageProcessor",
    "CLIPTokenizer",
    "DPTImageProcessor",
    "DiffusionPipeline",
    "OnnxModel",
    "PhiloxGenerator",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
    "TorchGenerator",
    "VaeImageProcessor",
]
