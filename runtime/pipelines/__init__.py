"""diffusers' Stable Diffusion pipelines on ONNX Runtime: one module per task, on shared machinery.

`base.py` holds what every task shares (loading an exported folder, prompt encoding, latents, the one
denoising loop, decoding) and `checks.py` the argument and output checks. A task module says only
what it adds: where the schedule starts, how the first latents are made, which channels the UNet
reads besides the latents. A new pipeline (SDXL, an upscaler) is a new module here.
"""

from .base import OnnxDiffusionPipeline, StableDiffusionPipelineOutput, TextConditionedPipeline
from .checks import NumericalError
from .depth_to_image import StableDiffusionDepth2ImgPipeline
from .image_to_image import StableDiffusionImg2ImgPipeline
from .image_variation import StableDiffusionImageVariationPipeline
from .inpaint import StableDiffusionInpaintPipeline
from .safe import SafetyConfig, StableDiffusionPipelineSafe, StableDiffusionSafePipelineOutput
from .safety_checker import SafetyCheckedPipeline
from .ldm3d import LDM3DPipelineOutput, StableDiffusionLDM3DPipeline
from .sdxl import StableDiffusionXLPipelineOutput
from .sdxl_image_to_image import StableDiffusionXLImg2ImgPipeline
from .sdxl_inpaint import StableDiffusionXLInpaintPipeline
from .sdxl_text_to_image import StableDiffusionXLPipeline
from .text_to_image import StableDiffusionPipeline
from .upscale import StableDiffusionUpscalePipeline
from .latent_upscale import ImagePipelineOutput, StableDiffusionLatentUpscalePipeline
from .lcm import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from .vae import VaeTiling

__all__ = [
    "ImagePipelineOutput",
    "LatentConsistencyModelImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionLatentUpscalePipeline",
    "StableDiffusionUpscalePipeline",
    "VaeTiling",
    "OnnxDiffusionPipeline",
    "TextConditionedPipeline",
    "NumericalError",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImageVariationPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LDM3DPipelineOutput",
    "StableDiffusionLDM3DPipeline",
    "SafetyCheckedPipeline",
    "SafetyConfig",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineSafe",
    "StableDiffusionSafePipelineOutput",
    "StableDiffusionPipelineOutput",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLPipelineOutput",
]
