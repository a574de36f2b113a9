"""Ancestral Euler sampler (k-diffusion ``sample_euler_ancestral``) on numpy.

Matches ``diffusers.EulerAncestralDiscreteScheduler`` (0.42): each step goes deterministically
down to sigma_down and adds fresh noise of standard deviation sigma_up, drawn from ``generator``
at every step (the last one included) exactly as diffusers draws it. Prediction types epsilon and
v_prediction, the three timestep spacings, zero-terminal-SNR rescaling.

Limitations: no custom timesteps/sigmas and no karras sigmas (diffusers' class has none either);
``sample`` prediction is refused (diffusers raises NotImplementedError at step time, sdort when
the scheduler is built). float16 model outputs are computed in float32 and returned in float16.
sigma_up and sigma_down are computed without the cancellation of diffusers' sqrt(sigma_to^2 - sigma_up^2)
(``schedule.ancestral_sigmas``), so they are within an ulp of their exact values where diffusers' carry
(sigma_from / sigma_to)^2 ulps of rounding noise.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .k_diffusion import SigmaSchedulerMixin, add_ancestral_noise, euler_step, to_d, to_denoised, working_arrays
from .options import check_option
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    ancestral_sigmas,
    interp_sigmas,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    training_schedule,
)

EulerAncestralDiscreteSchedulerOutput = SchedulerOutput


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Euler step to sigma_down plus fresh noise sigma_up (ancestral sampling)."""

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
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        name = type(self).__name__
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name,
            rescale_zero_snr=rescale_betas_zero_snr,
        )
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32)
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy()
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Compute ``timesteps`` (float32) and ``sigmas`` (float32, 0 appended)."""
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            num_inference_steps,
            cfg.num_train_timesteps,
            cfg.timestep_spacing,
            cfg.steps_offset,
            round_linspace=False,
            owner=type(self).__name__,
        ).astype(np.float32)
        sigmas = interp_sigmas(timesteps, sigmas_from_alphas_cumprod(self.alphas_cumprod))
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One ancestral step; extra keyword arguments (eta…) are ignored."""
        self._begin_step(timestep, refuse_integer=True, warn_unscaled=True)

        # diffusers computes the step in float32
        eps, sample, out_dtype = working_arrays(model_output, sample, np.float32)
        sigma, sigma_to = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]

        pred_original_sample = to_denoised(self.config.prediction_type, eps, sample, sigma)
        # sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2);
        # sigma_down = sqrt(sigma_to^2 - sigma_up^2), evaluated without its cancellation (see ancestral_sigmas)
        sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_to)
        # Euler step to sigma_down, then fresh noise of std sigma_up
        prev_sample = euler_step(sample, to_d(sample, sigma, pred_original_sample), sigma_down - sigma)
        prev_sample = add_ancestral_noise(prev_sample, sigma_up, generator, model_output).astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
