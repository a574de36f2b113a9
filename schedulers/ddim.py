"""DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models") on numpy.

Matches ``diffusers.DDIMScheduler`` (0.42): same config, ``set_timesteps(num_inference_steps)``,
``step(model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise,
return_dict)``, ``add_noise``, ``get_velocity``; prediction types epsilon / sample / v_prediction,
clip_sample, dynamic thresholding, zero-terminal-SNR rescaling, the three timestep spacings.

Limitations: no custom ``timesteps`` (diffusers' DDIM has none either). float16/bfloat16 inputs are
computed in float32 and returned in their own dtype, where torch rounds some intermediates to
float16; float32 results agree with diffusers to float32 rounding. The previous timestep is
t - T // n, as in diffusers, so a step index is kept only for the pipelines' benefit.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .noise import randn_tensor
from .numerics import compute_dtype
from .options import check_option
from .schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    int_timestep,
    spaced_timesteps,
    training_schedule,
)
from .vp import VPVelocityMixin, vp_prediction_to_x0_eps

DDIMSchedulerOutput = SchedulerOutput


class DDIMScheduler(VPVelocityMixin):
    """Denoising diffusion implicit models: a deterministic (eta = 0) or stochastic step between VP timesteps."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        name = type(self).__name__
        check_option(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name,
            rescale_zero_snr=rescale_betas_zero_snr,
        )
        # alpha_bar used after the last step: 1, or alpha_bar_0 ("set_alpha_to_one")
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        """DDIM needs no input scaling: returns ``sample``."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Compute the ``num_inference_steps`` int64 timesteps (descending) for the configured spacing."""
        self._check_step_count(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(
            num_inference_steps,
            self.config.num_train_timesteps,
            self.config.timestep_spacing,
            self.config.steps_offset,
            owner=type(self).__name__,
        ).astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def _get_variance(self, timestep, prev_timestep):
        # sigma_t^2 / eta^2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)   (eq. 16)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
        **kwargs,
    ):
        """One DDIM update x_t -> x_{t-1} (eq. 12 of the paper); extra keyword arguments are ignored."""
        self._check_ready()
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        out_dtype = model_output.dtype
        work = compute_dtype(model_output, sample)
        eps_in, x_t = model_output.astype(work, copy=False), sample.astype(work, copy=False)

        timestep = int_timestep(timestep)
        # 1. previous timestep t - T // n
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps

        # 2. alpha_bar_t and alpha_bar_{t-1}
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        # 3. predicted x_0 and epsilon ("predicted x_0" of eq. 12)
        pred_original_sample, pred_epsilon = vp_prediction_to_x0_eps(
            self.config.prediction_type, eps_in, x_t, alpha_prod_t, beta_prod_t
        )

        # 4. clip or threshold x_0
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # 5. sigma_t = eta * sqrt(variance)   (eq. 16)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * np.sqrt(variance)

        if use_clipped_model_output:
            # epsilon re-derived from the clipped x_0 (Glide)
            pred_epsilon = (x_t - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)

        # 6. "direction pointing to x_t" = sqrt(1 - alpha_bar_{t-1} - sigma_t^2) * eps
        pred_sample_direction = np.sqrt(1 - alpha_prod_t_prev - std_dev_t * std_dev_t) * pred_epsilon
        # 7. x_{t-1} = sqrt(alpha_bar_{t-1}) * x_0 + direction (+ sigma_t * noise)
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * np.asarray(variance_noise).astype(work, copy=False)

        self._count_step(timestep)
        prev_sample = prev_sample.astype(out_dtype, copy=False)
        pred_original_sample = pred_original_sample.astype(out_dtype, copy=False)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
