"""The sigma-parameterised primitives of k-diffusion (Karras et al. 2022; crowsonkb/k-diffusion's
``sampling.py``), written once for Euler, Euler ancestral, Heun, LMS, KDPM2 (and ancestral) and EDM.

A sigma scheduler works on x = x_0 + sigma * eps with the denoiser D(x; sigma) (x_0 predicted from the model
output: ``to_denoised``); every sampler's step is built from

* ``to_d``: the ODE derivative dx/dsigma = (x - D) / sigma,
* ``euler_step``: x + d * dt,
* ``churn``: Algorithm 2's stochastic churn (gamma, sigma_hat = sigma (gamma + 1), noise added),
* ``add_ancestral_noise``: the ancestral step's fresh noise of std sigma_up (sigma_up and sigma_down come
  from ``schedule.ancestral_sigmas``, evaluated without diffusers' cancellation on purpose).

Each primitive performs the float32 operations of diffusers' code in the same order, so that steps built
from them agree with diffusers as closely as the code they replaced. Also here: ``SigmaNoiseMixin``, the
add_noise of every sigma-indexed scheduler (x = alpha_t x_0 + sigma_t noise at the step's sigma), and
``SigmaSchedulerMixin``, the input scaling and noise level of the k-diffusion discrete schedulers.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerMixin, logger
from .noise import randn_tensor
from .numerics import broadcast_to_ndim, upcast


def refuse_integer_timestep(timestep, owner: str) -> None:
    """Sigma schedulers take a value of ``timesteps``, not a loop index (diffusers raises the same)."""
    if isinstance(timestep, (int, np.integer)) or (
        isinstance(timestep, np.ndarray) and np.issubdtype(timestep.dtype, np.integer)
    ):
        raise ValueError(
            f"{owner}.step got an integer timestep; pass one of scheduler.timesteps, "
            "not an index from enumerate(timesteps)"
        )


def repeat_inner(values: np.ndarray, head: int = 1, tail: int = 0) -> np.ndarray:
    """``values`` with every element twice except the first ``head`` and the last ``tail`` (kept once).

    The layout of the two-call-per-step schedulers: [v0, v1, v1, v2, v2, ..., v_last].
    """
    values = np.asarray(values)
    end = len(values) - tail
    return np.concatenate([values[:head], np.repeat(values[head:end], 2), values[end:]])


def to_denoised(prediction_type: str, model_output, sample, sigma):
    """The denoised sample D(x; sigma) of a k-diffusion sigma scheduler.

    epsilon:      D = x - sigma * eps
    v_prediction: D = -sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1)
    sample (also "original_sample"): D = model_output
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        c = sigma * sigma + np.float32(1)
        return model_output * (-sigma / np.sqrt(c)) + (sample / c)
    return model_output


def to_d(sample, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (k-diffusion ``to_d``)."""
    return (sample - denoised) / sigma


def euler_step(sample, derivative, dt):
    """One Euler step x + d * dt, dt = sigma_next - sigma."""
    return sample + derivative * dt


def churn(sample, sigmas, index: int, s_churn, s_tmin, s_tmax, s_noise, generator, noise_like):
    """(x_hat, sigma_hat) of Karras et al. Algorithm 2's churn at ``sigmas[index]``.

    gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax (else 0), N = len(sigmas) - 1;
    sigma_hat = sigma (gamma + 1); for gamma > 0, x_hat = x + sqrt(sigma_hat^2 - sigma^2) * s_noise * z with z
    drawn like ``noise_like`` (shape and dtype) from ``generator``, as diffusers draws it.
    """
    sigma = sigmas[index]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * np.float32(gamma + 1)
    if gamma > 0:
        noise = randn_tensor(noise_like.shape, generator=generator, dtype=noise_like.dtype)
        sample = sample + upcast(noise * s_noise) * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
    return sample, sigma_hat


def add_ancestral_noise(sample, sigma_up, generator, noise_like):
    """x + sigma_up * z, z drawn like ``noise_like`` (shape and dtype) from ``generator``: the ancestral noise."""
    noise = randn_tensor(noise_like.shape, generator=generator, dtype=noise_like.dtype)
    return sample + upcast(noise) * sigma_up


def working_arrays(model_output, sample, sample_dtype=None):
    """(model output, sample, result dtype) of a step: the output in its working dtype (``upcast``), the sample in
    ``sample_dtype`` (default: the output's), neither copied when already so; the result is returned in the
    model output's dtype."""
    model_output = np.asarray(model_output)
    output = upcast(model_output)
    sample = np.asarray(sample).astype(output.dtype if sample_dtype is None else sample_dtype, copy=False)
    return output, sample, model_output.dtype


def scaled_input(sample, sigma):
    """sample / sqrt(sigma^2 + 1): the input scaling of the k-diffusion denoiser, in the sample's dtype."""
    sample = np.asarray(sample)
    return (sample / np.sqrt(sigma * sigma + np.float32(1))).astype(sample.dtype, copy=False)


class SigmaNoiseMixin(SchedulerMixin):
    """add_noise of the schedulers indexed by step (sigma schedulers, EDM, the log-SNR solvers).

    x = alpha_t x_0 + sigma_t noise at the sigma of each timestep's step index (``_step_indices_for``), with
    ``_noise_scales(sigma)`` giving (alpha_t, sigma_t): (1, sigma) here, VP coefficients in the log-SNR solvers.
    """

    def _noise_scales(self, sigma):
        return 1, sigma

    def _begin_step(self, timestep, refuse_integer: bool = False, warn_unscaled: bool = False) -> None:
        # what diffusers' sigma schedulers check at the start of step, then the step counter
        if refuse_integer:
            refuse_integer_timestep(timestep, type(self).__name__)
        if warn_unscaled and not self.is_scale_input_called:
            logger.warning("call scale_model_input before step so that the model input is scaled correctly")
        if self._step_index is None:
            self._init_step_index(timestep)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha_t x_0 + sigma_t noise (here x_0 + noise * sigma), sigma picked by step index (diffusers)."""
        original_samples = np.asarray(original_samples)
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = broadcast_to_ndim(sigmas[self._step_indices_for(timesteps)], original_samples.ndim)
        alpha_t, sigma_t = self._noise_scales(sigma)
        return alpha_t * original_samples + sigma_t * np.asarray(noise)


class SigmaSchedulerMixin(SigmaNoiseMixin):
    """Shared parts of schedulers working on sigma = sqrt((1 - alpha_bar) / alpha_bar) (Euler, Heun, LMS…).

    Expects ``self.sigmas`` (float32, with the final sigma appended), ``self.timesteps`` and
    ``self.alphas_cumprod``.
    """

    @property
    def init_noise_sigma(self) -> float:
        # Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max**2 + 1) for "leading".
        max_sigma = np.float32(np.max(self.sigmas))
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1)))

    def _input_sigma(self):
        # the sigma the model input is scaled for (two-call schedulers: the midpoint's in the corrector half)
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample, timestep=None):
        """sample / sqrt(sigma**2 + 1): the input scaling of the k-diffusion denoiser."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._input_sigma()
        self.is_scale_input_called = True
        return scaled_input(sample, sigma)
