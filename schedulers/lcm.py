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

from .base import (
    SchedulerMixin,
    SchedulerOutput,
    check_option,
    compute_dtype,
    logger,
    register_to_config,
)
from .noise import randn_tensor
from .schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    add_noise_vp,
    training_schedule,
    velocity_vp,
    vp_prediction_to_x0_eps,
)


@dataclass
class LCMSchedulerOutput:
    """``prev_sample`` (x at the next timestep) and ``denoised`` (the consistency function's x_0)."""

    prev_sample: np.ndarray
    denoised: np.ndarray | None = None

    to_tuple = SchedulerOutput.to_tuple
    __getitem__ = SchedulerOutput.__getitem__


def scalar_timestep(timestep) -> int:
    return int(np.asarray(timestep).reshape(-1)[0])


def distillation_timesteps(num_train_timesteps: int, original_steps: int, strength: float = 1.0) -> np.ndarray:
    """The ascending timesteps of the distillation schedule: k - 1, 2k - 1, ... with k = T // original_steps."""
    k = num_train_timesteps // original_steps
    return np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1


def check_custom_timesteps(timesteps, origin, num_train_timesteps: int, strength: float, max_len: int) -> None:
    """Validate custom timesteps (strictly descending, below T) and warn where diffusers warns."""
    train = set(np.asarray(origin).tolist())
    off_schedule = []
    for i in range(1, len(timesteps)):
        if timesteps[i] >= timesteps[i - 1]:
            raise ValueError("custom `timesteps` must be in descending order")
        if timesteps[i] not in train:
            off_schedule.append(timesteps[i])
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(f"custom `timesteps` must start below num_train_timesteps={num_train_timesteps}")
    if strength == 1.0 and timesteps[0] != num_train_timesteps - 1:
        logger.warning(
            "the first custom timestep is %s, not num_train_timesteps - 1 = %s; results may be unexpected",
            timesteps[0], num_train_timesteps - 1,
        )
    if off_schedule:
        logger.warning(
            "custom timesteps %s are not on the distillation schedule; results may be unexpected", off_schedule
        )
    if len(timesteps) > max_len:
        logger.warning(
            "%d custom timesteps exceed the %d of the training schedule; results may be unexpected",
            len(timesteps),
            max_len,
        )


def subsample_schedule(origin, num_inference_steps: int) -> np.ndarray:
    """``num_inference_steps`` timesteps taken evenly (floor of a linspace, no endpoint) from reversed ``origin``."""
    origin = origin[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[indices]


class ConsistencySchedulerMixin(SchedulerMixin):
    """Shared by LCM and TCD: DDPM betas, timestep lookup by value, VP noising, thresholding."""

    order = 1

    def _init_vp(
        self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, set_alpha_to_one, rescale,
        prediction_type,
    ):
        name = type(self).__name__
        check_option(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name,
            rescale_zero_snr=rescale,
        )
        # alpha_bar after the last step: 1, or alpha_bar_0 ("set_alpha_to_one")
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        """No input scaling: returns ``sample``."""
        return sample

    def _alpha_prev(self, prev_timestep: int):
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def _finish_timesteps(self, timesteps, num_inference_steps, strength):
        # custom timesteps: keep the last `strength` fraction of them
        self.num_inference_steps = len(timesteps) if num_inference_steps is None else num_inference_steps
        if num_inference_steps is None:
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            t_start = max(self.num_inference_steps - init_timestep, 0)
            timesteps = timesteps[t_start * self.order :]
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self._step_index = None
        self._begin_index = None

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0."""
        return velocity_vp(self.alphas_cumprod[np.asarray(timesteps, dtype=np.int64)], sample, noise)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == scalar_timestep(timestep))[0])
            if index == self.timesteps.shape[0] - 1:
                return np.int64(-1)
            return self.timesteps[index + 1]
        return timestep - 1


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
            if num_inference_steps > T:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} cannot be larger than num_train_timesteps={T}"
                )
            if len(origin) // num_inference_steps < 1:
                raise ValueError(
                    f"original_inference_steps x strength = {original_steps} x {strength} is smaller than "
                    f"num_inference_steps={num_inference_steps}: reduce num_inference_steps or raise strength"
                )
            if num_inference_steps > original_steps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} cannot be larger than "
                    f"original_inference_steps={original_steps}"
                )
            timesteps = subsample_schedule(origin, num_inference_steps)
        self._finish_timesteps(timesteps, num_inference_steps, strength)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) = (s_d^2 / (t'^2 + s_d^2), t' / sqrt(t'^2 + s_d^2)), t' = t * timestep_scaling, s_d = 0.5."""
        self.sigma_data = 0.5
        f32 = np.float32
        scaled_timestep = f32(scalar_timestep(timestep)) * f32(self.config.timestep_scaling)
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

        t = scalar_timestep(timestep)
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
        if self.config.thresholding:
            pred_x0 = self._threshold_sample(pred_x0)
        elif self.config.clip_sample:
            pred_x0 = np.clip(pred_x0, -self.config.clip_sample_range, self.config.clip_sample_range)
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
