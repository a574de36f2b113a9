"""The variance-preserving family indexed by timestep: DDIM, DDPM, PNDM, LCM and TCD.

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with alpha_bar read at the timestep itself (not at
a step index, as the sigma schedulers do): the conversion of a model output to (x_0, eps), ``add_noise`` and
``get_velocity``, written once here. (``VPNoiseMixin`` gives add_noise; ``VPVelocityMixin`` adds
get_velocity where diffusers' class has it: not PNDM.)
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerMixin
from .numerics import broadcast_to_ndim
from .options import check_option
from .schedule import PREDICTION_TYPES


def vp_prediction_to_x0_eps(prediction_type, model_output, sample, alpha_prod_t, beta_prod_t):
    """(predicted x_0, predicted epsilon) from a model output, for x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps.

    epsilon:      x_0 = (x_t - sqrt(beta_prod_t) eps) / sqrt(alpha_prod_t)
    sample:       eps = (x_t - sqrt(alpha_prod_t) x_0) / sqrt(beta_prod_t)
    v_prediction: x_0 = sqrt(alpha_prod_t) x_t - sqrt(beta_prod_t) v;  eps = sqrt(alpha_prod_t) v + sqrt(beta_prod_t) x_t
    """
    sqrt_a, sqrt_b = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    check_option("scheduler", "prediction_type", prediction_type, PREDICTION_TYPES)


def add_noise_vp(alphas_cumprod, original_samples, noise, timesteps) -> np.ndarray:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, per batch item, in the samples' dtype."""
    original_samples = np.asarray(original_samples)
    ac = np.asarray(alphas_cumprod).astype(original_samples.dtype)[np.asarray(timesteps, dtype=np.int64)]
    sqrt_alpha_prod = broadcast_to_ndim(np.sqrt(ac), original_samples.ndim)
    sqrt_one_minus_alpha_prod = broadcast_to_ndim(np.sqrt(1 - ac), original_samples.ndim)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * np.asarray(noise)


def velocity_vp(alphas_cumprod_t, sample, noise) -> np.ndarray:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 for per-batch alpha_bar_t values."""
    sample = np.asarray(sample)
    ac = np.asarray(alphas_cumprod_t).astype(sample.dtype)
    sqrt_alpha_prod = broadcast_to_ndim(np.sqrt(ac), sample.ndim)
    sqrt_one_minus_alpha_prod = broadcast_to_ndim(np.sqrt(1 - ac), sample.ndim)
    return sqrt_alpha_prod * np.asarray(noise) - sqrt_one_minus_alpha_prod * sample


class VPNoiseMixin(SchedulerMixin):
    """add_noise of the timestep-indexed VP schedulers, and alpha_bar before a timestep."""

    def _alpha_prev(self, prev_timestep: int):
        # alpha_bar at the previous timestep; after the last one, final_alpha_cumprod (1, or alpha_bar_0)
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def _clip_or_threshold(self, pred_original_sample):
        # x_0 dynamically thresholded (thresholding) or clipped to [-r, r] (clip_sample, r = clip_sample_range)
        if self.config.thresholding:
            return self._threshold_sample(pred_original_sample)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            return np.clip(pred_original_sample, -r, r)
        return pred_original_sample

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)


class VPVelocityMixin(VPNoiseMixin):
    """``VPNoiseMixin`` and the velocity v of v-prediction training."""

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0."""
        return velocity_vp(self.alphas_cumprod[np.asarray(timesteps, dtype=np.int64)], sample, noise)
