"""Euler sampler in sigma space (Karras et al. 2022, Algorithm 2) on numpy.

Matches ``diffusers.EulerDiscreteScheduler`` (0.42): ``set_timesteps(num_inference_steps, device,
timesteps, sigmas)`` with custom timesteps or sigmas; ``step(model_output, timestep, sample,
s_churn, s_tmin, s_tmax, s_noise, generator, return_dict)`` including the stochastic "churn";
interpolation_type linear / log_linear; karras, exponential and beta sigmas (sigma_min/sigma_max
overrides); final_sigmas_type zero / sigma_min; timestep_type discrete / continuous (continuous
v-prediction timesteps 0.25 log sigma); zero-terminal-SNR rescaling; prediction types epsilon,
v_prediction, sample (also "original_sample"). ``timesteps`` are float32 and ``sigmas`` float32
with the final sigma appended, as in diffusers.

Limitations: the sample is computed in float32 and returned in ``model_output``'s dtype, as diffusers
does; float16 model outputs are upcast first, where torch rounds some products to float16.
Beta sigmas use sdort's own Beta quantile (scipy not needed), equal to scipy's to ~1e-15.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .k_diffusion import (
    SigmaSchedulerMixin,
    churn,
    euler_step,
    refuse_integer_timestep,
    to_d,
    to_denoised,
    working_arrays,
)
from .numerics import linspace_f32
from .options import check_option
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    chosen_sigma_schedule,
    configured_sigma_schedule,
    converted_sigmas,
    final_sigma,
    interp_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    training_schedule,
)
from .vp import velocity_vp

EulerDiscreteSchedulerOutput = SchedulerOutput


def continuous_timesteps(sigmas) -> np.ndarray:
    """t = 0.25 log(sigma) (EDM's c_noise), float32; the log is rounded once, as torch's scalar log is."""
    return (np.float32(0.25) * np.log(np.asarray(sigmas, dtype=np.float64)).astype(np.float32)).astype(np.float32)


class EulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, optionally with churn."""

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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        check_option(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_option(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        check_option(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))

        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name,
            rescale_zero_snr=rescale_betas_zero_snr,
        )
        if rescale_betas_zero_snr:
            # alpha_bar_T = 0 would give an infinite sigma: use the smallest float32 step instead
            self.alphas_cumprod[-1] = 2**-24

        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)[::-1].copy()
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = continuous_timesteps(sigmas)
        else:
            self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None):
        """Compute ``timesteps`` (float32) and ``sigmas`` (float32, final sigma appended).

        Give exactly one of ``num_inference_steps``, ``timesteps`` (descending training timesteps)
        or ``sigmas`` (descending, final sigma included).
        """
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("set_timesteps: give only one of `timesteps` or `sigmas`")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("set_timesteps: give one of `num_inference_steps`, `timesteps` or `sigmas`")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("set_timesteps: give only one of `num_inference_steps`, `timesteps` or `sigmas`")
        if timesteps is not None:
            for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[option]:
                    raise ValueError(f"set_timesteps: custom `timesteps` cannot be used with {option}=True")
            if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
                raise ValueError(
                    "set_timesteps: custom `timesteps` cannot be used with continuous v_prediction timesteps"
                )
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # ascending in t, float32
        log_sigmas = np.log(train_sigmas)

        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_timesteps(
                    num_inference_steps,
                    cfg.num_train_timesteps,
                    cfg.timestep_spacing,
                    cfg.steps_offset,
                    round_linspace=False,
                    owner=type(self).__name__,
                ).astype(np.float32)

            if cfg.interpolation_type == "linear":
                sigmas = interp_sigmas(timesteps, train_sigmas)
            else:
                # log-linear: sigmas evenly spaced in log sigma between the training extremes
                ramp = linspace_f32(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), num_inference_steps + 1)
                sigmas = np.exp(ramp.astype(np.float64)).astype(np.float32)

            schedule = configured_sigma_schedule(cfg)
            if schedule is not None:
                sigmas, timesteps = converted_sigmas(
                    schedule, sigmas, num_inference_steps, log_sigmas, cfg.sigma_min, cfg.sigma_max
                )
            sigma_last = final_sigma(cfg.final_sigmas_type, self.alphas_cumprod)
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        self.sigmas = sigmas.astype(np.float32)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self.timesteps = continuous_timesteps(self.sigmas[:-1])
        else:
            self.timesteps = np.asarray(timesteps).astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
        **kwargs,
    ):
        """One Euler step from sigmas[i] to sigmas[i+1]; extra keyword arguments (eta…) are ignored."""
        self._begin_step(timestep, refuse_integer=True, warn_unscaled=True)

        # diffusers computes the step in float32
        eps, sample, out_dtype = working_arrays(model_output, sample, np.float32)

        i = self._step_index
        sample, sigma_hat = churn(sample, self.sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator, model_output)
        # D(x; sigma): epsilon at the churned sigma_hat, v (as in diffusers) at sigma
        prediction_type = self.config.prediction_type
        sigma_input = sigma_hat if prediction_type == "epsilon" else self.sigmas[i]
        pred_original_sample = to_denoised(prediction_type, eps, sample, sigma_input)

        # x_next = x + (x - D) / sigma_hat * (sigma_next - sigma_hat)
        derivative = to_d(sample, sigma_hat, pred_original_sample)
        prev_sample = euler_step(sample, derivative, self.sigmas[i + 1] - sigma_hat).astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0.

        As in diffusers, alpha_bar is read at the *step index* of each timestep in ``timesteps``.
        """
        refuse_integer_timestep(timesteps, type(self).__name__)
        step_indices = [self.index_for_timestep(t, self.timesteps) for t in np.asarray(timesteps).reshape(-1)]
        return velocity_vp(self.alphas_cumprod[step_indices], sample, noise)
