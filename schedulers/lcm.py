"""Latent Consistency Models multistep sampling (Luo et al. 2023, arXiv 2310.04378) on numpy.

Matches ``diffusers.LCMScheduler`` (0.42.1): the timesteps are a subset of the
``original_inference_steps``-point distillation schedule (``set_timesteps(num_inference_steps,
device, original_inference_steps, timesteps, strength)``, custom descending timesteps included);
each step maps x_t to the consistency function's x_0 estimate with the boundary-condition scalings
(c_skip, c_out at timestep * timestep_scaling) and re-noises it to the next timestep with noise drawn
from ``generator``; prediction types epsilon / sample / v_prediction; clip_sample, dynamic
thresholding, zero-SNR rescaling. ``step`` returns ``prev_sample`` and ``denoised``.

Limitations: the boundary scalings are computed in float32, as diffusers does for a tensor timestep
(the pipelines' case; a Python int timestep makes diffusers compute them in float64).
``timestep_spacing`` is stored but unused, as in diffusers. float16 inputs are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SchedulerOutput, register_to_config
from .consistency import (
    ConsistencySchedulerMixin,
    check_custom_timesteps,
    check_step_counts,
    distillation_timesteps,
    subsample_schedule,
)
from .noise import randn_tensor
from .numerics import compute_dtype
from .schedule import int_timestep
from .vp import vp_prediction_to_x0_eps


@dataclass
class LCMSchedulerOutput:
    """``prev_sample`` (x at the next timestep) and ``denoised`` (the consistency function's x_0)."""

    prev_sample: np.ndarray
    denoised: np.ndarray | None = None

    to_tuple = SchedulerOutput.to_tuple
    __getitem__ = SchedulerOutput.__getitem__


class LCMScheduler(ConsistencySchedulerMixin):
    """Multistep consistency sampling: denoise with the consistency function, re-noise to the next timestep."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_vp(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, set_alpha_to_one,
            rescale_betas_zero_snr, prediction_type,
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
    ):
        """Choose ``timesteps`` (int64) from the distillation schedule, or take custom descending ones."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: give exactly one of `num_inference_steps` or `timesteps`")
        original_steps = original_inference_steps
        if original_steps is None:
            original_steps = self.config.original_inference_steps
        if original_steps > T:
            raise ValueError(f"original_inference_steps={original_steps} cannot be larger than num_train_timesteps={T}")
        origin = distillation_timesteps(T, original_steps, strength)
        if timesteps is not None:
            check_custom_timesteps(timesteps, origin, T, strength, original_steps)
            timesteps = np.array(timesteps, dtype=np.int64)
        else:
            check_step_counts(num_inference_steps, T, origin, original_steps, strength)
            timesteps = subsample_schedule(origin, num_inference_steps)
        self._finish_timesteps(timesteps, num_inference_steps, strength)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) = (s_d^2 / (t'^2 + s_d^2), t' / sqrt(t'^2 + s_d^2)), t' = t * timestep_scaling, s_d = 0.5."""
        self.sigma_data = 0.5
        f32 = np.float32
        scaled_timestep = f32(int_timestep(timestep)) * f32(self.config.timestep_scaling)
        sd2 = f32(self.sigma_data**2)
        c_skip = sd2 / (scaled_timestep * scaled_timestep + sd2)
        c_out = scaled_timestep / np.sqrt(scaled_timestep * scaled_timestep + sd2)
        return c_skip, c_out

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """Denoise to the consistency estimate, then re-noise to the next timestep (not after the last step)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        work = compute_dtype(model_output, sample)
        out_dtype = np.result_type(model_output.dtype, sample.dtype)
        eps_in, x_t = model_output.astype(work, copy=False), sample.astype(work, copy=False)

        t = int_timestep(timestep)
        prev_step_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else t

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t_prev = np.float32(1) - alpha_prod_t_prev
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)

        # x_0 estimate, then the consistency boundary condition: denoised = c_out x_0 + c_skip x_t
        pred_x0, _ = vp_prediction_to_x0_eps(
            self.config.prediction_type, eps_in, x_t, alpha_prod_t, np.float32(1) - alpha_prod_t
        )
        pred_x0 = self._clip_or_threshold(pred_x0)
        denoised = c_out * pred_x0 + c_skip * x_t

        if self._step_index != self.num_inference_steps - 1:
            # x_prev = sqrt(alpha_bar_prev) denoised + sqrt(1 - alpha_bar_prev) z
            noise = randn_tensor(model_output.shape, generator=generator, dtype=denoised.dtype)
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        prev_sample = prev_sample.astype(out_dtype, copy=False)
        denoised = denoised.astype(out_dtype, copy=False)
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
