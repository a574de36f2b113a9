"""sdort.runtime: Stable Diffusion pipelines on numpy and ONNX Runtime alone (no torch)."""

from .image_processor import VaeImageProcessor
from .pipeline import DiffusionPipeline, StableDiffusionPipelineOutput
from .random import PhiloxGenerator, TorchGenerator
from .sessions import OnnxModel
from .text_to_image import StableDiffusionPipeline
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTokenizer",
    "DiffusionPipeline",
    "OnnxModel",
    "PhiloxGenerator",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
    "TorchGenerator",
    "VaeImageProcessor",
]
