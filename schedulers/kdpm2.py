"""DPM-Solver-2 samplers in sigma space (k-diffusion ``sample_dpm_2`` and ``sample_dpm_2_ancestral``) on numpy.

Matches ``diffusers.KDPM2DiscreteScheduler`` and ``diffusers.KDPM2AncestralDiscreteScheduler`` (0.42).
Each sampling step takes two calls of ``step``: an Euler step to the geometric midpoint sigma_mid =
exp((log sigma_i + log sigma_{i+1}) / 2) (to sigma_down for the ancestral sampler), then a step from
sigma_i with the slope evaluated at the midpoint. The predictor's sample is kept in between
(``sample``; ``state_in_first_order``). As in diffusers, ``timesteps`` interleave the step timesteps
with the midpoints' fractional timesteps, ``sigmas``/``sigmas_interpol`` (and ``sigmas_up``/
``sigmas_down``) hold every value after the first twice and the last once more, and ``order = 2``. The
ancestral sampler adds fresh noise of standard deviation sigma_up after each corrector, drawn from
``generator`` as diffusers draws it.

Supported: prediction types epsilon and v_prediction; the three timestep spacings with
``steps_offset``; karras (timesteps rounded), exponential and beta sigmas (between ``sigma_min``/
``sigma_max`` when a converted config carries them). ``timesteps`` are float32, or float64 with
karras/exponential/beta sigmas, exactly as diffusers leaves them.

Limitations: ``sample`` prediction is refused when the scheduler is built (diffusers raises
NotImplementedError at the first step); no custom timesteps/sigmas and no zero-terminal-SNR
rescaling (diffusers' classes have neither). The midpoint sigmas need float32 log/exp, which sdort
rounds correctly while torch's may be off by one ulp, so ``sigmas_interpol`` and the midpoint
timesteps can differ from diffusers' in the last float32 bit. The ancestral sampler's sigma_up and
sigma_down are computed without the cancellation of diffusers' sqrt(sigma_next^2 - sigma_up^2)
(``schedule.ancestral_sigmas``): within an ulp of their exact values, where diffusers' carry
(sigma / sigma_next)^2 ulps of rounding noise, and with them the midpoint (which is sigma_next in exact
arithmetic) and its timestep; diffusers' nan midpoints (cosine betas, where the noise is all of
sigma_down) are finite here. The sample is computed in float32
(float64 stays float64) and returned in ``model_output``'s dtype.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .k_diffusion import (
    SigmaSchedulerMixin,
    add_ancestral_noise,
    euler_step,
    repeat_inner,
    to_d,
    to_denoised,
    working_arrays,
)
from .options import check_option
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    ancestral_sigmas,
    chosen_sigma_schedule,
    discrete_sigma_schedule,
    sigma_to_t_f32,
    training_schedule,
)

KDPM2DiscreteSchedulerOutput = SchedulerOutput
KDPM2AncestralDiscreteSchedulerOutput = SchedulerOutput


def double_after_first(values) -> np.ndarray:
    """[v0, v1, v1, ..., v_last, v_last, v_last]: every value but the first twice, then the last once more."""
    values = np.asarray(values)
    return np.concatenate([repeat_inner(values, head=1), values[-1:]])


def log_midpoint_f32(a, b) -> np.ndarray:
    """exp(lerp(log a, log b, 1/2)) in float32, as torch evaluates ``a.log().lerp(b.log(), 0.5).exp()``.

    lerp at weight 1/2 is end - (end - start) * 1/2; log and exp are taken in float64 and rounded once.
    log 0 = -inf gives 0 (and nan where both ends are 0 or one is inf), as in torch.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_a = np.log(np.asarray(a, dtype=np.float64)).astype(np.float32)
        log_b = np.log(np.asarray(b, dtype=np.float64)).astype(np.float32)
        mid = log_b - (log_b - log_a) * np.float32(0.5)
        return np.exp(mid.astype(np.float64)).astype(np.float32)


class _KDPM2Base(SigmaSchedulerMixin):
    """What the two DPM-Solver-2 schedulers share: configuration, betas and the step-index bookkeeping."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    def _setup(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
               timestep_spacing, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name
        )
        self.is_scale_input_called = False
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self._step_index = None
        self._begin_index = None

    def _step_sigmas(self, num_inference_steps, num_train_timesteps):
        """(timesteps, sigmas with 0 appended (float32), float32 log training sigmas) before interleaving."""
        cfg = self.config
        name = type(self).__name__
        self.num_inference_steps = num_inference_steps
        schedule = chosen_sigma_schedule(cfg.use_karras_sigmas, cfg.use_exponential_sigmas, cfg.use_beta_sigmas, name)
        timesteps, sigmas, log_sigmas = discrete_sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            num_train_timesteps or cfg.num_train_timesteps,
            cfg.timestep_spacing,
            cfg.steps_offset,
            sigma_schedule=schedule,
            sigma_min=cfg.get("sigma_min"),
            sigma_max=cfg.get("sigma_max"),
            owner=name,
            round_karras=True,  # diffusers rounds karras timesteps here (of the discrete schedulers, only here)
        )
        self.log_sigmas = log_sigmas
        return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32), log_sigmas

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (first) half."""
        return self.sample is None

    def _denoised(self, output, sample, sigma_input):
        return to_denoised(self.config.prediction_type, output, sample, sigma_input)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """DPM-Solver-2: Euler to the log-midpoint sigma, then the full step with the midpoint's slope."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
                    timestep_spacing, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None):
        """Compute ``timesteps``, ``sigmas`` and ``sigmas_interpol`` for ``num_inference_steps`` steps."""
        timesteps, sigmas, log_sigmas = self._step_sigmas(num_inference_steps, num_train_timesteps)
        # sigma_mid_i = exp((log sigma_i + log sigma_{i-1}) / 2)  (sigmas_interpol[0] is nan, never used)
        sigmas_interpol = log_midpoint_f32(sigmas, np.roll(sigmas, 1))
        self.sigmas = double_after_first(sigmas)
        self.sigmas_interpol = double_after_first(sigmas_interpol)
        # [t0, t_mid1, t1, t_mid2, t2, ...]: each step timestep preceded by its midpoint's fractional timestep
        timesteps_interpol = sigma_to_t_f32(sigmas_interpol, log_sigmas).astype(timesteps.dtype)
        interleaved = np.stack([timesteps_interpol[1:-1], timesteps[1:]], axis=-1).reshape(-1)
        self.timesteps = np.concatenate([timesteps[:1], interleaved])
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def _input_sigma(self):
        # scale_model_input: the midpoint sigma in the corrector half
        return (self.sigmas if self.state_in_first_order else self.sigmas_interpol)[self._step_index]

    def step(self, model_output, timestep, sample, return_dict: bool = True, generator=None, **kwargs):
        """One half of a DPM-Solver-2 step; extra keyword arguments (eta, generator…) are ignored."""
        self._begin_step(timestep)
        output, sample, out_dtype = working_arrays(model_output, sample)
        i = self._step_index
        first = self.state_in_first_order
        if first:
            sigma, sigma_interpol, sigma_next = self.sigmas[i], self.sigmas_interpol[i + 1], self.sigmas[i + 1]
        else:
            sigma, sigma_interpol, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]

        pred_original_sample = self._denoised(output, sample, sigma if first else sigma_interpol)
        if first:
            # predictor: x_mid = x + (x - D) / sigma * (sigma_mid - sigma)
            derivative, dt = to_d(sample, sigma, pred_original_sample), sigma_interpol - sigma
            self.sample = sample
        else:
            # corrector: x_next = x + (x_mid - D_mid) / sigma_mid * (sigma_next - sigma)
            derivative, dt = to_d(sample, sigma_interpol, pred_original_sample), sigma_next - sigma
            sample, self.sample = self.sample, None
        self._step_index += 1
        prev_sample = euler_step(sample, derivative, dt).astype(out_dtype, copy=False)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return KDPM2DiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """Ancestral DPM-Solver-2: midpoint between sigma_i and sigma_down, then noise of std sigma_up."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
                    timestep_spacing, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None):
        """Compute ``timesteps``, ``sigmas``, ``sigmas_interpol``, ``sigmas_up`` and ``sigmas_down``."""
        timesteps, sigmas, log_sigmas = self._step_sigmas(num_inference_steps, num_train_timesteps)
        sigmas_next = np.roll(sigmas, -1)
        sigmas_next[-1] = 0.0
        # sigma_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2), sigma_down = sqrt(s_next^2 - sigma_up^2) = s_next^2 / s,
        # in the form without cancellation (see ancestral_sigmas). The last entries, where s = 0, are nan and
        # unused: sigmas_down's is set to 0 as in diffusers.
        sigmas_up, sigmas_down = ancestral_sigmas(sigmas, sigmas_next)
        sigmas_down[-1] = 0.0
        # sigma_mid_i = exp((log sigma_i + log sigma_down_i) / 2), which is sigma_{i+1} in exact arithmetic
        sigmas_interpol = log_midpoint_f32(sigmas, sigmas_down)
        sigmas_interpol[-2:] = 0.0

        self.sigmas = double_after_first(sigmas)
        self.sigmas_interpol = double_after_first(sigmas_interpol)
        self.sigmas_up = double_after_first(sigmas_up)
        self.sigmas_down = double_after_first(sigmas_down)
        # [t0, t_mid0, t1, t_mid1, t2, ...]
        timesteps_interpol = sigma_to_t_f32(sigmas_interpol, log_sigmas).astype(timesteps.dtype)
        interleaved = np.stack([timesteps_interpol[:-2], timesteps[1:]], axis=-1).reshape(-1)
        self.timesteps = np.concatenate([timesteps[:1], interleaved])
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def _input_sigma(self):
        # scale_model_input: the midpoint sigma in the corrector half
        if self.state_in_first_order:
            return self.sigmas[self._step_index]
        return self.sigmas_interpol[self._step_index - 1]

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One half of an ancestral DPM-Solver-2 step (noise drawn in the corrector half); eta… are ignored."""
        self._begin_step(timestep)
        output, sample, out_dtype = working_arrays(model_output, sample)
        i = self._step_index
        first = self.state_in_first_order
        if first:
            sigma, sigma_interpol = self.sigmas[i], self.sigmas_interpol[i]
            sigma_up, sigma_down = self.sigmas_up[i], self.sigmas_down[i - 1]
        else:
            sigma, sigma_interpol = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]

        pred_original_sample = self._denoised(output, sample, sigma if first else sigma_interpol)
        if first:
            # predictor: x_mid = x + (x - D) / sigma * (sigma_mid - sigma)
            self.sample = sample
            self.dt = sigma_interpol - sigma
            prev_sample = euler_step(sample, to_d(sample, sigma, pred_original_sample), self.dt)
        else:
            # corrector: x_next = x + (x_mid - D_mid) / sigma_mid * (sigma_down - sigma) + sigma_up * noise
            derivative = to_d(sample, sigma_interpol, pred_original_sample)
            sample, self.sample = self.sample, None
            prev_sample = euler_step(sample, derivative, sigma_down - sigma)
            prev_sample = add_ancestral_noise(prev_sample, sigma_up, generator, np.asarray(model_output))
        prev_sample = prev_sample.astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
