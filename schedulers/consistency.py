"""The consistency-distilled schedulers' family (LCM, TCD): their distillation schedule, custom timesteps
and the mixin they share (DDPM betas, timestep bookkeeping, VP noising)."""

from __future__ import annotations

import numpy as np

from .base import logger
from .options import check_option
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES, int_timestep, training_schedule
from .vp import VPVelocityMixin


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


def check_step_counts(num_inference_steps: int, num_train_timesteps: int, origin, original_steps, strength) -> None:
    """Refuse more inference steps than training timesteps, than the schedule ``origin`` holds, or than
    ``original_steps`` (unless None: TCD's schedule of every training timestep)."""
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} cannot be larger than num_train_timesteps={num_train_timesteps}"
        )
    if original_steps is None:
        return
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


class ConsistencySchedulerMixin(VPVelocityMixin):
    """Shared by LCM and TCD: DDPM betas, the timestep bookkeeping, VP noising (``vp.VPVelocityMixin``)."""

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

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = int(np.flatnonzero(self.timesteps == int_timestep(timestep))[0])
            if index == self.timesteps.shape[0] - 1:
                return np.int64(-1)
            return self.timesteps[index + 1]
        return timestep - 1
