"""Heun's second-order sampler in sigma space (Karras et al. 2022, Algorithm 1) on numpy.

Matches ``diffusers.HeunDiscreteScheduler`` (0.42). Each sampling step takes two calls of ``step``: an
Euler predictor from sigma_i to sigma_{i+1}, then a corrector that averages the two slopes. The
scheduler keeps the predictor's slope, step size and sample in between (``prev_derivative``, ``dt``,
``sample``; ``state_in_first_order`` tells which half comes next). As in diffusers, ``timesteps`` and
``sigmas`` hold every timestep and sigma but the first twice, so that the loop simply walks through
them (``order = 2``).

Supported: ``set_timesteps(num_inference_steps, device, num_train_timesteps, timesteps)`` with custom
timesteps; prediction types epsilon, v_prediction and sample; ``clip_sample``/``clip_sample_range``;
the three timestep spacings with ``steps_offset``; karras, exponential and beta sigmas (between
``sigma_min``/``sigma_max`` when a converted config carries them); beta schedules linear,
scaled_linear, squaredcos_cap_v2 and exp.

Limitations: no zero-terminal-SNR rescaling and no custom ``sigmas`` (diffusers' class has neither).
The sample is computed in float32 (float64 stays float64) and returned in ``model_output``'s dtype;
float16 inputs are upcast first, where torch computes in float16. Schedule values that torch computes
with float32 sqrt can differ from sdort's (correctly rounded) ones by one float32 ulp.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .k_diffusion import SigmaSchedulerMixin, euler_step, repeat_inner, to_d, to_denoised, working_arrays
from .options import UnsupportedOptionError, check_option
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    alphas_from_betas,
    betas_for_alpha_bar,
    chosen_sigma_schedule,
    discrete_sigma_schedule,
    make_betas,
)

HeunDiscreteSchedulerOutput = SchedulerOutput


class HeunDiscreteScheduler(SigmaSchedulerMixin):
    """Heun predictor-corrector on dx/dsigma = (x - D(x; sigma)) / sigma."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        clip_sample: bool | None = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None and beta_schedule == "exp":
            # alpha_bar(t) = exp(-12 t)
            self.betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="exp")
        else:
            self.betas = make_betas(
                num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES + ("exp",), name
            )
        self.alphas, self.alphas_cumprod = alphas_from_betas(self.betas)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        num_train_timesteps: int | None = None,
        timesteps=None,
    ):
        """Compute ``timesteps`` and ``sigmas`` (float32, inner values doubled, final 0 appended).

        Give ``num_inference_steps`` or ``timesteps`` (descending training timesteps, not with
        karras/exponential/beta sigmas). ``num_train_timesteps`` overrides the config's for the spacing.
        """
        cfg = self.config
        name = type(self).__name__
        if num_inference_steps is None and timesteps is None:
            raise ValueError(f"{name}.set_timesteps: give one of `num_inference_steps` or `timesteps`")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: give only one of `num_inference_steps` or `timesteps`")
        schedule = chosen_sigma_schedule(cfg.use_karras_sigmas, cfg.use_exponential_sigmas, cfg.use_beta_sigmas, name)
        if timesteps is not None and schedule is not None:
            raise UnsupportedOptionError(
                f"{name}.set_timesteps: custom `timesteps` cannot be used with use_{schedule}_sigmas=True"
            )
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps
        num_train_timesteps = num_train_timesteps or cfg.num_train_timesteps

        timesteps, sigmas, _ = discrete_sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            num_train_timesteps,
            cfg.timestep_spacing,
            cfg.steps_offset,
            timesteps=timesteps,
            sigma_schedule=schedule,
            sigma_min=cfg.get("sigma_min"),
            sigma_max=cfg.get("sigma_max"),
            owner=name,
        )
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]  and  [t0, t1, t1, ..., t_{n-1}, t_{n-1}]
        self.sigmas = repeat_inner(sigmas, head=1, tail=1)
        self.timesteps = repeat_inner(timesteps.astype(np.float32), head=1)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (first) half."""
        return self.dt is None

    def step(self, model_output, timestep, sample, return_dict: bool = True, generator=None, **kwargs):
        """One half of a Heun step; extra keyword arguments (eta, generator…) are ignored."""
        self._begin_step(timestep)
        output, sample, out_dtype = working_arrays(model_output, sample)
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]

        # the predictor denoises at sigma, the corrector at sigma_next
        sigma_input = sigma if first else sigma_next
        pred_original_sample = to_denoised(self.config.prediction_type, output, sample, sigma_input)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        if first:
            # x_next = x + d * (sigma_next - sigma), d = (x - D) / sigma
            derivative = to_d(sample, sigma, pred_original_sample)
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            # x_next = x + (d + d') / 2 * dt from the predictor's x, d' = (x_pred - D') / sigma_next
            derivative = (self.prev_derivative + to_d(sample, sigma_next, pred_original_sample)) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = euler_step(sample, derivative, dt).astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
