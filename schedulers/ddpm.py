"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") on numpy.

Matches ``diffusers.DDPMScheduler`` (0.42): posterior mean of eq. (7) from the predicted x_0, noise
of the chosen ``variance_type`` (fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned,
learned_range, the learned ones reading the variance from the second half of the model output's
channels), clip_sample / thresholding, prediction types epsilon / sample / v_prediction, custom
descending ``timesteps``, beta schedules linear / scaled_linear / squaredcos_cap_v2 / sigmoid,
zero-terminal-SNR rescaling; ``previous_timestep``; timesteps int64.

Limitations: float16 inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .noise import randn_tensor
from .numerics import compute_dtype
from .options import check_option
from .schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, int_timestep, spaced_timesteps, training_schedule
from .vp import VPVelocityMixin, vp_prediction_to_x0_eps

DDPMSchedulerOutput = SchedulerOutput
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(VPVelocityMixin):
    """Ancestral sampling of the DDPM reverse process, on any subset of the training timesteps."""

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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        name = type(self).__name__
        check_option(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_option(name, "variance_type", variance_type, VARIANCE_TYPES)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"), name,
            rescale_zero_snr=rescale_betas_zero_snr,
        )
        self.one = np.float32(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self.variance_type = variance_type
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        """DDPM needs no input scaling: returns ``sample``."""
        return sample

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None):
        """Timesteps from the configured spacing, or custom descending ``timesteps`` below num_train_timesteps."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("set_timesteps: give only one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("set_timesteps: custom `timesteps` must be in descending order")
            if timesteps[0] >= T:
                raise ValueError(f"set_timesteps: `timesteps` must start below num_train_timesteps={T}")
            timesteps = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: give `num_inference_steps` or `timesteps`")
            self._check_step_count(num_inference_steps)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            timesteps = spaced_timesteps(
                num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset, owner=type(self).__name__
            ).astype(np.int64)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in ``timesteps`` (-1 after the last), or t - 1 before set_timesteps."""
        timestep = int_timestep(timestep)
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == timestep)[0])
            return -1 if index == self.timesteps.shape[0] - 1 else int(self.timesteps[index + 1])
        return timestep - 1

    def _alpha_prev(self, prev_timestep: int):
        # alpha_bar at the previous timestep, 1 after the last one
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.one

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_t)
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev

        # posterior variance beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (eq. 7), kept above 1e-20
        variance = np.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, np.float32(1e-20))

        if variance_type is None:
            variance_type = self.config.variance_type
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":
            # returned as a standard deviation: exp(0.5 log beta~_t)
            return np.exp(0.5 * np.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return np.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        # learned_range (Improved DDPM): log variance interpolated between log beta~_t and log beta_t
        min_log, max_log = np.log(variance), np.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One reverse step x_t -> x_{t-1}; extra keyword arguments (eta…) are ignored."""
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        out_dtype = model_output.dtype
        work = compute_dtype(model_output, sample)
        model_output, x_t = model_output.astype(work, copy=False), sample.astype(work, copy=False)

        t = int_timestep(timestep)
        prev_t = self.previous_timestep(t)

        predicted_variance = None
        if model_output.shape[1] == x_t.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = np.split(model_output, [x_t.shape[1]], axis=1)

        # 1. alphas and betas
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 2. predicted x_0 (eq. 15)
        pred_original_sample, _ = vp_prediction_to_x0_eps(
            self.config.prediction_type, model_output, x_t, alpha_prod_t, beta_prod_t
        )

        # 3. clip or threshold x_0
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # 4. posterior mean mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
        #                         + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t   (eq. 7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        current_sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * x_t

        # 5. add noise, except at t = 0
        if t > 0:
            variance_noise = randn_tensor(model_output.shape, generator=generator, dtype=out_dtype).astype(work)
            if self.variance_type == "fixed_small_log":
                variance = self._get_variance(t, predicted_variance=predicted_variance) * variance_noise
            elif self.variance_type == "learned_range":
                variance = self._get_variance(t, predicted_variance=predicted_variance)
                variance = np.exp(0.5 * variance) * variance_noise
            else:
                variance = np.sqrt(self._get_variance(t, predicted_variance=predicted_variance)) * variance_noise
            pred_prev_sample = pred_prev_sample + variance

        self._count_step(t)
        pred_prev_sample = pred_prev_sample.astype(out_dtype, copy=False)
        pred_original_sample = pred_original_sample.astype(out_dtype, copy=False)
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)
