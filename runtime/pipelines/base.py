"""What every task pipeline shares: loading an exported folder, prompt encoding, the one denoising
loop, latent preparation and decoding.

A task pipeline (text-to-image, image-to-image, ...) only checks its inputs and says what it adds
to the loop: where the schedule starts, how the first latents are made, which extra channels the
UNet reads, and what happens after each step.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ...schedulers import get_scheduler_class
from ..image_processor import VaeImageProcessor
from ..model_files import read_json
from ..randomness import as_generator, randn_tensor
from ..sessions import OnnxModel, check_provider
from ..tokenizer import CLIPTokenizer
from .adapters import AdapterMixin
from .checks import check_common_inputs, check_finite, check_finite_output, memory_bytes
from .guidance import ClassifierFreeGuidance
from .guidance_embedding import time_cond_proj_dim
from .prompts import PromptEncoder
from .vae import VaeCalls

logger = logging.getLogger("sdort")

@dataclass
class StableDiffusionPipelineOutput:
    """As diffusers' output: `images` (PIL list or NHWC float32 array, or latents) and the safety flags.

    `nsfw_content_detected`: one boolean per image (True: flagged, and returned black) when the model
    has a safety checker and the pipeline runs it (see `safety_checker.py`); None otherwise.
    """

    images: object
    nsfw_content_detected: list | None = None


def retrieve_timesteps(scheduler, num_inference_steps, timesteps=None, sigmas=None) -> int:
    """Set the schedule from a step count, or from custom `timesteps` or `sigmas`; returns the
    number of steps as diffusers' `retrieve_timesteps` does."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("timesteps and sigmas: pass at most one of them")
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None and name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{name}: {type(scheduler).__name__} does not take custom {name}")
    if timesteps is None and sigmas is None:
        train_steps = scheduler.config.get("num_train_timesteps", 1000)
        if num_inference_steps > train_steps:
            raise ValueError(f"num_inference_steps must be at most the scheduler's num_train_timesteps "
                             f"({train_steps}); got {num_inference_steps}")
        scheduler.set_timesteps(num_inference_steps)
        last = float(np.max(scheduler.timesteps))
        # integer timesteps index the training schedule: 1000 steps + steps_offset 1 would read
        # alphas_cumprod[1000], where diffusers fails with an IndexError
        if np.issubdtype(np.asarray(scheduler.timesteps).dtype, np.integer) and last >= train_steps:
            raise ValueError(f"num_inference_steps: {num_inference_steps} steps with this scheduler's spacing reach "
                             f"timestep {last:g}, beyond its {train_steps} training timesteps; use fewer steps")
        return num_inference_steps  # not len(timesteps): PNDM repeats one, as diffusers counts
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(sigmas=sigmas)
    return len(scheduler.timesteps)


def legacy_scheduler_fixes(scheduler):
    """Correct outdated scheduler configs as diffusers' Stable Diffusion pipelines do when built:
    `steps_offset` must be 1 and `clip_sample` False (old SD 1.x checkpoints had other values)."""
    config = scheduler.config
    fixes = {}
    if config.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if config.get("clip_sample") is True:
        fixes["clip_sample"] = False
    if not fixes:
        return scheduler
    logger.warning("sdort: scheduler config corrected as diffusers does: %s", fixes)
    return type(scheduler).from_config({**config, **fixes})


def tile_to_batch(array: np.ndarray, batch: int, name: str) -> np.ndarray:
    """Repeat a batch of k items (tiled: a, b, a, b) to `batch` items, as diffusers' `torch.cat([x] * n)`."""
    count = array.shape[0]
    if count == batch:
        return array
    if count > batch or batch % count:
        raise ValueError(f"{name}: {count} given for an effective batch size of {batch} "
                         f"(batch size = prompts x num_images_per_prompt); it must divide it")
    return np.concatenate([array] * (batch // count))


# The names diffusers' callbacks give the UNet's added inputs.
# (LCM's guidance-scale embedding, `timestep_cond`, is its `w_embedding`.)
_CALLBACK_NAMES = {"text_embeds": "add_text_embeds", "time_ids": "add_time_ids", "timestep_cond": "w_embedding"}

# What a UNet's extra input channels (beyond the latents) say about the task it was trained for.
UNET_KINDS = {0: "a text-to-image UNet: sdort txt2img or img2img", 5: "an inpainting UNet: sdort inpaint",
              1: "a depth-to-image UNet: sdort depth2img"}


def unet_in_channels(unet) -> int | None:
    """The UNet's input channels: its config's `in_channels`, else the session's static shape."""
    channels = unet.config.get("in_channels")
    if channels is None:
        channels = unet.inputs["sample"].shape[1]
    return int(channels) if isinstance(channels, (int, np.integer)) else None


class OnnxDiffusionPipeline(VaeCalls):
    """Base of sdort's Stable Diffusion pipelines: the loaded parts and the shared denoising machinery.

    What conditions the UNet is the task's own piece: prompts for `TextConditionedPipeline`
    (below), a CLIP image embedding for image variation.
    """

    # Parts (folder names) every pipeline of this class needs, and those it uses when present.
    required_parts = ("unet", "vae_decoder")
    optional_parts = ("vae_encoder",)
    # diffusers' text-conditioned SD pipelines correct old scheduler configs when built; the
    # depth and image-variation pipelines do not.
    legacy_scheduler_fix = True
    # Channels the task concatenates to the latents before the UNet, one entry per UNet kind it
    # accepts (inpainting: none for a 4-channel UNet, mask + masked image for a 9-channel one).
    conditioning_channels = (0,)
    # Tensors a `callback_on_step_end` may ask for (diffusers' `_callback_tensor_inputs`).
    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    # Settings of model_index.json that `from_pretrained` passes to the constructor.
    config_names = ()

    def __init__(self, unet, vae_decoder, scheduler, vae_encoder=None, **extra_parts):
        self.unet = unet
        self.vae_decoder = vae_decoder
        self.vae_encoder = vae_encoder
        self.scheduler = legacy_scheduler_fixes(scheduler) if self.legacy_scheduler_fix else scheduler
        for name, part in extra_parts.items():
            setattr(self, name, part)
        self._component_names = ["unet", "vae_decoder", "vae_encoder", "scheduler", *extra_parts]
        self.vae_scale_factor = 2 ** (len(vae_decoder.config.get("block_out_channels", [0] * 4)) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._progress_bar_config = {}
        for name in self.required_parts:
            if getattr(self, name, None) is None:
                raise ValueError(f"{type(self).__name__} needs the '{name}' part")
        self.unet_in_channels = unet_in_channels(unet)

    def default_size(self, height, width) -> tuple:
        """`height` and `width`, or the UNet's `sample_size` in pixels where None, as diffusers."""
        default = self.unet.config.get("sample_size", 64) * self.vae_scale_factor
        return height or default, width or default

    def check_callback_tensor_inputs(self, names) -> None:
        unknown = [k for k in names if k not in self.callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not available; "
                             f"choose from {list(self.callback_tensor_inputs)}")

    def check_unet_kind(self, given: int | None = None) -> None:
        """Refuse a UNet made for another task (a 9-channel inpainting UNet for text-to-image, ...).

        Checked when the task runs (`given`: the channels it feeds), not when it is built: as in
        diffusers, any pipeline may be loaded from a folder to share its `components`."""
        latent_channels = self.vae_decoder.config.get("latent_channels", 4)
        accepted = [given] if given is not None else [latent_channels + extra for extra in self.conditioning_channels]
        channels = self.unet_in_channels
        if channels is None or channels in accepted:
            return
        kind = UNET_KINDS.get(channels - latent_channels, "a UNet of unknown kind")
        raise ValueError(f"'unet': this model's UNet takes {channels} input channels ({kind}); "
                         f"{type(self).__name__} needs a UNet with {' or '.join(map(str, accepted))} input channels")

    @property
    def components(self) -> dict:
        """The loaded parts by name; `OtherPipeline(**pipe.components)` shares the same sessions."""
        return {name: getattr(self, name) for name in self._component_names}

    @classmethod
    def from_pretrained(cls, path, provider: str = "auto", session_options=None, precision: str = "fp32",
                        cuda_graph: bool = False, **overrides):
        """Load an exported folder (sdort's `sd-export` or Optimum's ONNX layout).

        `provider`: "auto" (CUDA where available, else the CPU), "cpu", "cuda" or "openvino";
        `precision`: the compute precision, "fp32" (diffusers' parity) or "bf16" (OpenVINO on a CPU
        with bf16 arithmetic). `cuda_graph=True` (CUDA only): the UNet, the part every step calls, runs
        as a captured CUDA graph on fixed device buffers (`OnnxModel`'s `cuda_graph`); the pipeline then
        serves one image size and batch, those of its first call. `overrides` replace loaded
        components (e.g. `scheduler=...`), as in diffusers.
        """
        check_provider(provider, precision, cuda_graph)  # before any file is read: an unusable choice fails at once
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such model folder")
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path}: not an exported model (no model_index.json)")
        # The small files first, so that a bad config fails before the sessions take their time.
        parts = {}
        index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
        for name in cls.config_names:  # the pipeline's own settings (SDXL's force_zeros_for_empty_prompt, ...)
            if name in index and name not in overrides:
                parts[name] = index[name]
        for encoder in cls.required_parts + cls.optional_parts:
            tokenizer = encoder.replace("text_encoder", "tokenizer")
            if encoder.startswith("text_encoder") and tokenizer not in overrides and (
                    encoder in cls.required_parts or (path / encoder / "model.onnx").is_file()):
                parts[tokenizer] = CLIPTokenizer.from_pretrained(path / tokenizer)
        if "scheduler" not in overrides:
            config_path = path / "scheduler" / "scheduler_config.json"
            config = read_json(config_path)
            try:
                parts["scheduler"] = get_scheduler_class(config.get("_class_name", "PNDMScheduler")).from_config(config)
            except ValueError as exc:
                raise ValueError(f"{config_path}: {exc}") from None
        for name in cls.required_parts + cls.optional_parts:
            if name in overrides:
                continue
            model_file = path / name / "model.onnx"
            if not model_file.is_file():
                if name in cls.required_parts:
                    raise FileNotFoundError(f"{model_file}: the '{name}' part is missing")
                continue
            parts[name] = OnnxModel(model_file, provider=provider, name=name, session_options=session_options,
                                    precision=precision, cuda_graph=cuda_graph and name == "unet")
        parts.update(overrides)
        return cls(**parts)

    def set_progress_bar_config(self, **kwargs):
        """As diffusers: e.g. `pipe.set_progress_bar_config(disable=True)`."""
        self._progress_bar_config = kwargs

    # ---- images --------------------------------------------------------------------------

    def is_latents(self, value) -> bool:
        """An NCHW array with the VAE's latent channels (another pipeline's `output_type="latent"`),
        which diffusers' image-to-image pipelines take as they are (an NHWC image has 1 or 3
        channels last)."""
        channels = self.vae_decoder.config.get("latent_channels", 4)
        return (isinstance(value, np.ndarray) and value.ndim == 4 and value.shape[1] == channels
                and value.shape[3] not in (1, 3, channels))

    def preprocess_image(self, value, name: str = "image", processor=None, **kwargs) -> np.ndarray:
        """`processor.preprocess(value)` (the VAE image processor by default); errors name the parameter.

        A PIL image for the VAE must be RGB: diffusers would take an RGBA one for 4-channel latents
        and fail deep inside the VAE on a greyscale or palette one.
        """
        processor = processor or self.image_processor
        if processor is self.image_processor and self.is_latents(value):
            return np.asarray(value, dtype=np.float32)
        if not (processor.config.do_convert_rgb or processor.config.do_convert_grayscale):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Image.Image) and item.mode != "RGB":
                    raise ValueError(f"{name}: a PIL image of mode {item.mode}; the VAE takes RGB images "
                                     f"(pass image.convert('RGB'))")
        try:
            return processor.preprocess(value, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from None

    # ---- latents -------------------------------------------------------------------------

    def latent_shape(self, batch: int, height: int, width: int) -> tuple:
        self.check_fits_in_memory(batch, height, width)
        channels = self.vae_decoder.config.get("latent_channels", 4)
        return (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_fits_in_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse, before anything is allocated, an image size whose decoding cannot fit in memory.

        The estimate is a lower bound: the VAE decoder's last block holds at least three float32
        activations of `block_out_channels[0]` channels at full resolution (128 for SD: 0.4 GB at
        512x512), so a size above the machine's physical memory can only end in an out-of-memory kill.
        """
        channels = min(self.vae_decoder.config.get("block_out_channels", [128]))
        needed = 3 * 4 * channels * batch * height * width
        available = memory_bytes()
        if available is not None and needed > available:
            raise ValueError(f"height and width: {height}x{width} (batch {batch}) needs at least {needed / 1e9:.1f} GB "
                             f"to decode, more than this machine's {available / 1e9:.1f} GB of memory")

    def prepare_latents(self, shape, generator, latents, scheduler) -> np.ndarray:
        """Initial noise drawn from `generator` (or the given `latents`), times the scheduler's init sigma.

        Noise is drawn in the UNet's input dtype, as diffusers draws in the model's dtype.
        """
        if latents is None:
            latents = randn_tensor(shape, generator=generator, dtype=self.unet.inputs["sample"].dtype)
        else:
            latents = np.asarray(latents)
            if latents.shape != tuple(shape):
                raise ValueError(f"latents: expected shape {tuple(shape)}, got {latents.shape}")
        return latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)

    def check_generator(self, generator, batch: int):
        generator = as_generator(generator)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"generator: a list of {len(generator)} generators was given, but the effective batch size is {batch}"
            )
        return generator

    def encode_image(self, image: np.ndarray, generator) -> np.ndarray:
        """VAE latents of NCHW images in [-1, 1], sampled from the encoder's Gaussian with `generator`
        and times `scaling_factor`; as diffusers' `retrieve_latents(vae.encode(image), generator)`.

        With a list of generators, image i is encoded alone and sampled with generator i.
        """
        if self.vae_encoder is None:
            raise ValueError(f"{type(self).__name__}: this task needs the 'vae_encoder' part, which the model lacks")
        if isinstance(generator, list):
            return np.concatenate([self.encode_image(image[i:i + 1], g) for i, g in enumerate(generator)])
        params = self.vae_encode(image)  # tiled and sliced where enabled (vae.py)
        channels = self.vae_decoder.config.get("latent_channels", 4)
        # diffusers draws this noise from `generator` whatever the graph does with it (below).
        noise = randn_tensor((params.shape[0], channels, *params.shape[2:]), generator=generator,
                             dtype=self.unet.inputs["sample"].dtype).astype(np.float32)
        if params.shape[1] != 2 * channels:
            # `latent_sample` (Optimum before 1.23): sampled inside the graph by ONNX Runtime's own
            # random op. The draw above is discarded, so the generator is where diffusers' is and
            # the noise drawn next (img2img, inpaint) is the same.
            return self.scale_latents(params)
        # DiagonalGaussianDistribution: logvar clamped to [-30, 20], sample = mean + std * noise
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        return self.scale_latents(mean + std * noise)

    def scale_latents(self, sample: np.ndarray) -> np.ndarray:
        """The VAE's sample to the UNet's latent space: times `scaling_factor`."""
        return sample * np.float32(self.vae_decoder.config.get("scaling_factor", 0.18215))

    @staticmethod
    def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
        """Where a schedule starts for `strength` (diffusers' `get_timesteps`): the last
        int(steps * strength) steps run; the scheduler's begin index is set accordingly."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        scheduler.set_begin_index(t_start * scheduler.order)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if len(timesteps) == 0:
            raise ValueError(f"strength: {strength} with {num_inference_steps} steps leaves no step to run")
        return timesteps

    def noised_image_latents(self, image, batch: int, generator, timestep, scheduler) -> np.ndarray:
        """Encode `image` and noise it to `timestep`, as diffusers' img2img `prepare_latents`:
        images are tiled to the batch (before encoding when each image has its own generator),
        and the noise is drawn after the encoder's sample."""
        init = self.image_latents(image, batch, generator)
        noise = randn_tensor(init.shape, generator=generator, dtype=self.unet.inputs["sample"].dtype)
        return scheduler.add_noise(init, noise.astype(np.float32), np.repeat(timestep, batch))

    def image_latents(self, image, batch: int, generator) -> np.ndarray:
        """The latents of `image` (NCHW in [-1, 1], or already latents) tiled to `batch`."""
        image = np.asarray(image, dtype=np.float32)
        if image.shape[1] == self.vae_decoder.config.get("latent_channels", 4):
            init = image  # already latents
        else:
            if image.shape[1] != 3:
                raise ValueError(f"image: a {image.shape[1]}-channel image cannot be encoded, the VAE takes RGB "
                                 f"(for a PIL image with alpha, grey levels or a palette: image.convert('RGB'))")
            self.check_fits_in_memory(batch, image.shape[2], image.shape[3])
            if isinstance(generator, list):
                image = tile_to_batch(image, batch, "image")
            init = self.encode_image(image, generator)
        return tile_to_batch(init, batch, "image")

    # ---- the loop ------------------------------------------------------------------------

    def _timestep_feed(self, t, batch: int) -> np.ndarray:
        """The timestep as this UNet's session wants it: a scalar or one value per batch item."""
        spec = self.unet.inputs["timestep"]
        if len(spec.shape) == 0:
            return np.asarray(t)
        size = spec.shape[0] if isinstance(spec.shape[0], int) else batch
        return np.full((size,), t)

    def denoise(
        self,
        latents: np.ndarray,
        timesteps,
        scheduler,
        prompt_embeds: np.ndarray,
        negative_prompt_embeds: np.ndarray | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        generator=None,
        eta: float = 0.0,
        conditioning: np.ndarray | None = None,
        added_inputs: dict | None = None,
        after_step: Callable | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs=("latents",),
        guidance=None,
        extra_embeds=(),
        unet_timestep: Callable | None = None,
        model_output: Callable | None = None,
        return_denoised: bool = False,
    ) -> np.ndarray:
        """The denoising loop shared by every task, as diffusers' pipelines run it.

        With guidance, the unconditional and conditional inputs go through the UNet as one batch.
        `conditioning` is concatenated to the latents on the channel axis before the UNet
        (inpainting mask and masked image, depth); `after_step(i, t, latents)` may change the
        latents after each step (inpainting with a 4-channel UNet re-imposes the known region).
        `added_inputs` are more UNet inputs for the whole UNet batch (negative half first), constant
        over the steps: SDXL's `text_embeds` and `time_ids`, which callbacks see and may replace as
        `add_text_embeds` and `add_time_ids`, as in diffusers.
        `callback_on_step_end` may return new `latents`, `prompt_embeds` or `conditioning`.

        What a pipeline with another combination of predictions changes (see `guidance.py`):
        `guidance` combines the UNet batch's outputs (default: classifier-free guidance with
        `guidance_scale` and `guidance_rescale` when there are negative embeddings), and the batch
        holds `guidance.copies` copies of the latents, conditioned by `[negative, prompt,
        *extra_embeds]`. `unet_timestep(i, t)` is the timestep the UNet gets (default `t`), and
        `model_output(i, t, noise_pred, latents)` turns the UNet's raw output into the prediction the
        scheduler takes (default: as it is), before guidance.

        `return_denoised`: return the scheduler's last `denoised` output (the LCM scheduler's x_0
        estimate) instead of the latents, as diffusers' LCM pipelines decode it; each step still
        continues from `prev_sample`, and callbacks may read and replace `denoised`.
        """
        self.check_unet_kind(latents.shape[1] + (0 if conditioning is None else conditioning.shape[1]))
        check_finite("eta", eta)
        if guidance is None and negative_prompt_embeds is not None:
            guidance = ClassifierFreeGuidance(guidance_scale, guidance_rescale)
        copies = 1 if guidance is None else guidance.copies
        parts = [prompt_embeds] if negative_prompt_embeds is None else [negative_prompt_embeds, prompt_embeds]
        embeds = np.concatenate([*parts, *extra_embeds]) if len(parts) + len(extra_embeds) > 1 else prompt_embeds
        # Constant over all steps: placed on the session's device once.
        embeds_on_device = self.unet.to_device("encoder_hidden_states", embeds)
        added_inputs = dict(added_inputs or {})
        added_on_device = {name: self.unet.to_device(name, value) for name, value in added_inputs.items()}
        # The UNet's input batch, built in one buffer made once per call: `copies` copies of the
        # scaled latents ([uncond; text] with guidance), then the conditioning channels (written
        # once into every copy, or when a callback replaces them).
        n, c = latents.shape[:2]
        model_input = np.empty((copies * n, c + (0 if conditioning is None else conditioning.shape[1]),
                                *latents.shape[2:]), np.float32)
        if conditioning is not None:
            model_input[:, c:] = np.concatenate([conditioning] * copies) if len(conditioning) == n else conditioning
        step_kwargs = {"generator": generator, "eta": eta}
        for i, t in enumerate(tqdm(timesteps, **self._progress_bar_config)):
            # scale_model_input is elementwise, so the copy scaled once equals diffusers' doubled batch
            model_input[:n, :c] = scheduler.scale_model_input(latents, t)
            for k in range(1, copies):
                model_input[k * n:(k + 1) * n, :c] = model_input[:n, :c]
            unet_t = t if unet_timestep is None else unet_timestep(i, t)
            noise_pred = self.unet(
                sample=model_input, timestep=self._timestep_feed(unet_t, model_input.shape[0]),
                encoder_hidden_states=embeds_on_device, **added_on_device,
            )["out_sample"].astype(np.float32, copy=False)
            check_finite_output(noise_pred, "unet", lambda: f"at step {i + 1} of {len(timesteps)} (timestep {t})")
            if model_output is not None:
                noise_pred = model_output(i, t, noise_pred, latents)
            if guidance is not None:
                noise_pred = guidance.combine(i, t, noise_pred)
            step_output = scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = step_output.prev_sample
            if return_denoised:
                denoised = getattr(step_output, "denoised", None)
                if denoised is None:
                    raise ValueError(f"scheduler: {type(scheduler).__name__}'s step gives no `denoised` "
                                     f"output; this pipeline needs LCMScheduler")
            if after_step is not None:
                latents = after_step(i, t, latents)
            if callback_on_step_end is not None:
                # As in diffusers, `prompt_embeds` here is the batch the UNet sees (negative first).
                values = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative_prompt_embeds,
                          **{_CALLBACK_NAMES.get(name, name): value for name, value in added_inputs.items()}}
                if return_denoised:
                    values["denoised"] = denoised
                changed = callback_on_step_end(self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = changed.get("latents", latents)
                if return_denoised:
                    denoised = changed.get("denoised", denoised)
                for name in added_inputs:
                    if _CALLBACK_NAMES.get(name, name) in changed:
                        added_inputs[name] = changed[_CALLBACK_NAMES.get(name, name)]
                        added_on_device[name] = self.unet.to_device(name, added_inputs[name])
                if "conditioning" in changed:  # the UNet batch's extra channels, in every copy
                    model_input[:, c:] = changed["conditioning"]
                if "prompt_embeds" in changed:
                    embeds = changed["prompt_embeds"]
                    embeds_on_device = self.unet.to_device("encoder_hidden_states", embeds)
        return denoised if return_denoised else latents

    def decode(self, latents: np.ndarray, output_type: str, return_nsfw: bool = False):
        """VAE decoding and postprocessing, as diffusers: decode(latents / scaling_factor), then [0, 1].

        Between the two, `run_safety_checker` (diffusers' place for it); flagged images are left
        un-denormalised, so their zeros come out black (diffusers' `do_denormalize`). With
        `return_nsfw`, returns (images, nsfw_content_detected): None for latents or without a checker.
        """
        if output_type == "latent":
            return (latents, None) if return_nsfw else latents
        check_finite_output(latents, "the denoising loop", "in the final latents")
        image = self.vae_decode(self.unscale_latents(latents))  # tiled and sliced where enabled (vae.py)
        check_finite_output(image, "vae_decoder", "when decoding the latents")
        image, has_nsfw = self.run_safety_checker(image)
        do_denormalize = None if has_nsfw is None else [not flagged for flagged in has_nsfw]
        images = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        return (images, has_nsfw) if return_nsfw else images

    def run_safety_checker(self, image: np.ndarray):
        """(images, None): the pipelines diffusers gives no safety checker check nothing; those it
        does get `SafetyCheckedPipeline.run_safety_checker`."""
        return image, None

    def unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        """What the VAE decoder takes: latents / scaling_factor."""
        return latents / np.float32(self.vae_decoder.config.get("scaling_factor", 0.18215))

    @staticmethod
    def fresh_scheduler(scheduler):
        """A copy of the scheduler for one call, so concurrent calls never share step counters."""
        return copy.deepcopy(scheduler)


class TextConditionedPipeline(AdapterMixin, OnnxDiffusionPipeline):
    """A pipeline conditioned by prompts: it has a `PromptEncoder` (tokenizer + text encoder)."""

    required_parts = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, text_encoder, tokenizer, unet, vae_decoder, scheduler, vae_encoder=None, **extra_parts):
        super().__init__(unet, vae_decoder, scheduler, vae_encoder,
                         text_encoder=text_encoder, tokenizer=tokenizer, **extra_parts)
        self.prompt_encoder = PromptEncoder(tokenizer, text_encoder)

    def check_inputs(self, prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                     negative_prompt, prompt_embeds, negative_prompt_embeds, output_type, generator,
                     callback_on_step_end_tensor_inputs):
        """The checks every prompt-conditioned task makes before any model runs (diffusers'
        `check_inputs`); returns the effective batch size and the generator(s) for it."""
        batch = check_common_inputs(prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                    negative_prompt, prompt_embeds, negative_prompt_embeds, output_type)
        self.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)
        total = batch * num_images_per_prompt
        return total, self.check_generator(generator, total)

    def uses_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """diffusers' `do_classifier_free_guidance` for SD's text-to-image, img2img and inpainting:
        guidance_scale > 1, and not for a UNet distilled for consistency (LCM), which reads the
        guidance scale's embedding as `timestep_cond` instead."""
        return guidance_scale > 1 and time_cond_proj_dim(self.unet) is None

    def encode_prompt(self, prompt, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """diffusers' `encode_prompt`: see `PromptEncoder.__call__`."""
        return self.prompt_encoder(prompt, num_images_per_prompt, do_classifier_free_guidance,
                                   negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
