"""Trajectory Consistency Distillation sampling (Zheng et al. 2024, arXiv 2402.19159) on numpy.

Matches ``diffusers.TCDScheduler`` (0.42.1): the strategic stochastic sampler; ``set_timesteps(
num_inference_steps, device, original_inference_steps, timesteps, strength)`` with diffusers' two
schedule sources (the ``original_inference_steps`` distillation schedule, or every training timestep
when ``original_inference_steps`` is passed explicitly) and custom timesteps;
``step(model_output, timestep, sample, eta=0.3, generator, return_dict)`` where ``eta`` is the
paper's gamma: the step goes from t to s = floor((1 - gamma) t_prev) along the predicted
trajectory and re-noises from s to t_prev with noise from ``generator``. Prediction types
epsilon / sample / v_prediction; zero-SNR rescaling. ``step`` returns ``prev_sample`` and
``pred_noised_sample``.

Limitations: as in diffusers, clip_sample, thresholding and timestep_spacing are stored but not
used by ``step``; floor((1 - gamma) t_prev) is computed in float32 like diffusers. float16 inputs are
computed in float32.
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
class TCDSchedulerOutput:
    """``prev_sample`` (x at the next timestep) and ``pred_noised_sample`` (the estimate at the intermediate s)."""

    prev_sample: np.ndarray
    pred_noised_sample: np.ndarray | None = None

    to_tuple = SchedulerOutput.to_tuple
    __getitem__ = SchedulerOutput.__getitem__


class TCDScheduler(ConsistencySchedulerMixin):
    """Strategic stochastic sampling: predict x_0, move along the trajectory to s, re-noise to the next timestep."""

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

    def _get_variance(self, timestep, prev_timestep):
        # (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
    ):
        """Choose ``timesteps`` (int64) from the distillation schedule (or all training timesteps), or custom ones."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: give exactly one of `num_inference_steps` or `timesteps`")
        original_steps = original_inference_steps
        if original_inference_steps is None:
            original_steps = self.config.original_inference_steps
            if original_steps > T:
                raise ValueError(
                    f"original_inference_steps={original_steps} cannot be larger than num_train_timesteps={T}"
                )
            origin = distillation_timesteps(T, original_steps, strength)
        else:
            # an explicit original_inference_steps selects from every training timestep (diffusers' behaviour)
            origin = np.asarray(list(range(0, int(T * strength))))
        if timesteps is not None:
            check_custom_timesteps(timesteps, origin, T, strength, original_steps if original_steps is not None else T)
            timesteps = np.array(timesteps, dtype=np.int64)
        else:
            check_step_counts(num_inference_steps, T, origin, original_steps, strength)
            timesteps = subsample_schedule(origin, num_inference_steps)
        self._finish_timesteps(timesteps, num_inference_steps, strength)

    def step(
        self, model_output, timestep, sample, eta: float = 0.3, generator=None, return_dict: bool = True, **kwargs
    ):
        """One TCD step with gamma = ``eta`` (0: deterministic; 1: like LCM); extra keyword arguments are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        if not 0 <= eta <= 1.0:
            raise ValueError(f"TCDScheduler.step: eta (gamma) must be in [0, 1], got {eta}")
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        work = compute_dtype(model_output, sample)
        out_dtype = np.result_type(model_output.dtype, sample.dtype)
        eps_in, x_t = model_output.astype(work, copy=False), sample.astype(work, copy=False)
        f32 = np.float32

        t = int_timestep(timestep)
        prev_step_index = self._step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else 0
        # intermediate timestep s = floor((1 - gamma) * t_prev), in float32 as diffusers computes it
        timestep_s = int(np.floor(f32(1 - eta) * f32(prev_timestep)))

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        beta_prod_s = f32(1) - alpha_prod_s

        # x_0 and eps from the model, then the point at s on the predicted trajectory:
        # x_s = sqrt(alpha_bar_s) x_0 + sqrt(1 - alpha_bar_s) eps
        pred_x0, pred_eps = vp_prediction_to_x0_eps(
            self.config.prediction_type, eps_in, x_t, alpha_prod_t, f32(1) - alpha_prod_t
        )
        pred_noised_sample = np.sqrt(alpha_prod_s) * pred_x0 + np.sqrt(beta_prod_s) * pred_eps

        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            # re-noise from s to t_prev: x_prev = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z
            noise = randn_tensor(model_output.shape, generator=generator, dtype=pred_noised_sample.dtype)
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_sample = np.sqrt(ratio) * pred_noised_sample + np.sqrt(f32(1) - ratio) * noise
        else:
            prev_sample = pred_noised_sample

        self._step_index += 1
        prev_sample = prev_sample.astype(out_dtype, copy=False)
        pred_noised_sample = pred_noised_sample.astype(out_dtype, copy=False)
        if not return_dict:
            return (prev_sample, pred_noised_sample)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)
