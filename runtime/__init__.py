"""sdort.runtime: Stable Diffusion pipelines on numpy and ONNX Runtime alone (no torch)."""

from .feature_extractors import CLIPImageProcessor, DPTImageProcessor
from .image_processor import VaeImageProcessor
from .image_processor_ldm3d import VaeImageProcessorLDM3D
from .pipelines import (
    ImagePipelineOutput,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
    VaeTiling,
    OnnxDiffusionPipeline,
    NumericalError,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImageVariationPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    LDM3DPipelineOutput,
    StableDiffusionLDM3DPipeline,
    SafetyConfig,
    StableDiffusionPipeline,
    StableDiffusionPipelineSafe,
    StableDiffusionSafePipelineOutput,
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
    "ImagePipelineOutput",
    "LatentConsistencyModelImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionUpscalePipeline",
    "VaeTiling",
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
    "LDM3DPipelineOutput",
    "StableDiffusionLDM3DPipeline",
    "VaeImageProcessorLDM3D",
    "SafetyConfig",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineSafe",
    "StableDiffusionSafePipelineOutput",
    "StableDiffusionPipelineOutput",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLPipelineOutput",
    "TorchGenerator",
    "VaeImageProcessor",
]
