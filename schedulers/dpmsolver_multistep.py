"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022, arXiv 2206.00927 and 2211.01095) on numpy.

Matches ``diffusers.DPMSolverMultistepScheduler`` (0.42.1): algorithm types dpmsolver++,
dpmsolver, sde-dpmsolver++ and sde-dpmsolver (``deis`` is mapped to dpmsolver++ as diffusers
does); solver orders 1-3; solver_type midpoint / heun (bh1, bh2, logrho mapped to midpoint);
lower_order_final, euler_at_final, final_sigmas_type zero / sigma_min; karras, exponential, beta
and Lu-lambda sigmas; flow-matching sigmas (use_flow_sigmas, flow_shift, ``mu`` with
use_dynamic_shifting); lambda_min_clipped; variance_type learned / learned_range (the first three
channels are the prediction); dynamic thresholding; zero-terminal-SNR rescaling; the three timestep
spacings; custom ``timesteps`` in ``set_timesteps`` (diffusers takes no custom sigmas here);
``step(model_output, timestep, sample, generator, variance_noise, return_dict)``.

This module also holds ``LogSNRSolverMixin``, the parts shared with DPM-Solver singlestep, UniPC
and DEIS (diffusers copies them between those classes): the VP schedule in log-SNR
lambda = log(alpha_t) - log(sigma_t), the sigma schedules, model-output conversion, add_noise.

Limitations: sample arithmetic is done in float32 (float64 kept as float64) and returned in the
model output's dtype; float16 inputs are upcast where torch would round intermediates to float16.
Scalar coefficients are computed in float32 like diffusers, with exp/log rounded once from float64,
so they may differ from torch's by an ulp. sde-dpmsolver has no third-order update in diffusers
(it fails at the first third-order step); sdort refuses that step with a ValueError.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from .base import (
    KARRAS_COMPATIBLES,
    SchedulerMixin,
    SchedulerOutput,
    UnsupportedOptionError,
    broadcast_to_ndim,
    check_option,
    compute_dtype,
    register_to_config,
)
from .noise import randn_tensor
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    beta_sigmas,
    chosen_sigma_schedule,
    exp_f32,
    exponential_sigmas,
    flow_sigmas,
    interp_sigmas,
    karras_sigmas,
    linear_combination,
    log_f32,
    lu_lambdas,
    sigma_range,
    sigma_to_alpha_sigma_t,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    solver_timesteps,
    sqrt_f32,
    training_schedule,
)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
SOLVER_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


class LogSNRSolverMixin(SchedulerMixin):
    """Shared parts of the exponential-integrator solvers working in log-SNR lambda_t = log(alpha_t / sigma_t).

    Subclasses call ``_init_schedule`` in ``__init__`` and keep ``self.sigmas`` as the float32 inference
    sigmas (k-diffusion sigma = sigma_t / alpha_t) with the final sigma appended.
    """

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def _init_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale=False):
        name = type(self).__name__
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name,
            rescale_zero_snr=rescale,
        )
        if rescale:
            # alpha_bar_T = 0 would give an infinite sigma: use the smallest float32 step instead
            self.alphas_cumprod[-1] = 2**-24
        # VP coefficients of x_t = alpha_t x_0 + sigma_t eps, and lambda_t = log alpha_t - log sigma_t
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(np.float32(1) - self.alphas_cumprod)
        self.lambda_t = (np.log(self.alpha_t) - np.log(self.sigma_t)).astype(np.float32)
        self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._step_index = None
        self._begin_index = None

    # ------------------------------------------------------------------ sigma schedules
    def _train_sigmas(self) -> np.ndarray:
        # sigma = sqrt((1 - alpha_bar) / alpha_bar) at every training timestep, ascending in t, float32
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def _sigma_bounds(self, in_sigmas):
        # the config's sigma_min / sigma_max where the class has them, else the ends of in_sigmas
        return sigma_range(in_sigmas, self.config.get("sigma_min"), self.config.get("sigma_max"))

    def _convert_to_karras(self, in_sigmas, num_inference_steps):
        return karras_sigmas(*self._sigma_bounds(in_sigmas), num_inference_steps)

    def _convert_to_exponential(self, in_sigmas, num_inference_steps):
        return exponential_sigmas(*self._sigma_bounds(in_sigmas), num_inference_steps)

    def _convert_to_beta(self, in_sigmas, num_inference_steps, alpha: float = 0.6, beta: float = 0.6):
        return beta_sigmas(*self._sigma_bounds(in_sigmas), num_inference_steps, alpha, beta)

    def _convert_to_lu(self, in_lambdas, num_inference_steps):
        return lu_lambdas(float(in_lambdas[-1]), float(in_lambdas[0]), num_inference_steps)

    def _sigma_to_t(self, sigma, log_sigmas):
        return sigma_to_t(sigma, log_sigmas)

    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) for a k-diffusion sigma (or a flow-matching sigma with use_flow_sigmas)."""
        return sigma_to_alpha_sigma_t(sigma, flow=bool(self.config.get("use_flow_sigmas", False)))

    def _coefficients(self, index: int):
        """(alpha, sigma, lambda) at ``self.sigmas[index]`` as float32 scalars."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        with np.errstate(divide="ignore"):
            # sigma = 0 at the end of the schedule gives lambda = +inf, as in diffusers
            lam = log_f32(alpha) - log_f32(sigma)
        return np.float32(alpha), np.float32(sigma), np.float32(lam)

    # ------------------------------------------------------------------ model outputs
    def _data_prediction(self, model_output, sample):
        """x_0 predicted from the model output at the current step (thresholded if configured).

        epsilon: x_0 = (x - sigma_t eps) / alpha_t;  v: x_0 = alpha_t x - sigma_t v;
        flow: x_0 = x - sigma v;  sample: x_0 = model output.
        """
        prediction_type = self.config.prediction_type
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        if prediction_type == "epsilon":
            if self.config.get("variance_type") in ("learned", "learned_range"):
                model_output = model_output[:, :3]
            x0_pred = (sample - sigma_t * model_output) / alpha_t
        elif prediction_type == "sample":
            x0_pred = model_output
        elif prediction_type == "v_prediction":
            x0_pred = alpha_t * sample - sigma_t * model_output
        else:  # flow_prediction
            x0_pred = sample - sigma * model_output
        if self.config.thresholding:
            x0_pred = self._threshold_sample(x0_pred)
        return x0_pred

    def _noise_prediction(self, model_output, sample):
        """eps predicted from the model output at the current step, x_0 thresholded if configured.

        sample: eps = (x - alpha_t x_0) / sigma_t;  v: eps = alpha_t v + sigma_t x.
        """
        prediction_type = self.config.prediction_type
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        if prediction_type == "epsilon":
            learned = self.config.get("variance_type") in ("learned", "learned_range")
            epsilon = model_output[:, :3] if learned else model_output
        elif prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            epsilon = alpha_t * model_output + sigma_t * sample
        if self.config.thresholding:
            x0_pred = self._threshold_sample((sample - sigma_t * epsilon) / alpha_t)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    # ------------------------------------------------------------------ step counter and noising
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (second match if repeated); the last step if absent (diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        value = np.asarray(timestep).reshape(-1)[0]
        matches = np.flatnonzero(np.asarray(schedule_timesteps) == value)
        if matches.size == 0:
            return len(self.timesteps) - 1
        return int(matches[1] if matches.size > 1 else matches[0])

    def scale_model_input(self, sample, *args, **kwargs):
        """These solvers need no input scaling: returns ``sample``."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha_t x_0 + sigma_t noise, with sigma picked by step index as diffusers does."""
        original_samples = np.asarray(original_samples)
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = broadcast_to_ndim(sigmas[self._step_indices_for(timesteps)], original_samples.ndim)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * np.asarray(noise)


class DPMCoefficients(NamedTuple):
    """Coefficients of x_t = x * x_s + d0 * D0 + d1 * D1 + d2 * D2 + noise * z (one DPM-Solver step s -> t)."""

    x: np.float32
    d0: np.float32
    d1_midpoint: np.float32  # first difference, midpoint (2nd-order) solver
    d1: np.float32  # first difference, Heun / phi_2 form (also the 3rd-order solver's)
    d2: np.float32 | None  # second difference (3rd order); None where diffusers has no such update
    noise: np.float32 | None


def dpm_coefficients(algorithm_type, h, alpha_t, sigma_t, alpha_s, sigma_s) -> DPMCoefficients:
    """The DPM-Solver coefficient table for a step of log-SNR length h = lambda_t - lambda_s, in float32.

    Names follow diffusers: D0 is the model output at s, D1 ~ h * dD/dlambda, D2 ~ h^2 * d2D/dlambda2.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # h = inf at a final sigma of 0: only the first-order coefficients are used there
        return _dpm_coefficients(algorithm_type, np.float32(h), alpha_t, sigma_t, alpha_s, sigma_s)


def _dpm_coefficients(algorithm_type, h, alpha_t, sigma_t, alpha_s, sigma_s) -> DPMCoefficients:
    f32 = np.float32
    if algorithm_type == "dpmsolver++":
        # data prediction:  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) D0 + ...
        em1 = exp_f32(-h) - f32(1)
        return DPMCoefficients(
            x=sigma_t / sigma_s,
            d0=-(alpha_t * em1),
            d1_midpoint=-(f32(0.5) * (alpha_t * em1)),
            d1=alpha_t * (em1 / h + f32(1)),  # alpha_t ((e^-h - 1)/h + 1)
            d2=-(alpha_t * ((em1 + h) / (h * h) - f32(0.5))),  # -alpha_t ((e^-h - 1 + h)/h^2 - 1/2)
            noise=None,
        )
    if algorithm_type == "dpmsolver":
        # noise prediction:  x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) D0 + ...
        ep1 = exp_f32(h) - f32(1)
        return DPMCoefficients(
            x=alpha_t / alpha_s,
            d0=-(sigma_t * ep1),
            d1_midpoint=-(f32(0.5) * (sigma_t * ep1)),
            d1=-(sigma_t * (ep1 / h - f32(1))),  # -sigma_t ((e^h - 1)/h - 1)
            d2=-(sigma_t * ((ep1 - h) / (h * h) - f32(0.5))),  # -sigma_t ((e^h - 1 - h)/h^2 - 1/2)
            noise=None,
        )
    if algorithm_type == "sde-dpmsolver++":
        # x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D0 + ... + sigma_t sqrt(1 - e^-2h) z
        two_h = f32(-2) * h
        one_m = f32(1) - exp_f32(two_h)  # 1 - e^-2h
        return DPMCoefficients(
            x=sigma_t / sigma_s * exp_f32(-h),
            d0=alpha_t * one_m,
            d1_midpoint=f32(0.5) * (alpha_t * one_m),
            d1=alpha_t * (one_m / two_h + f32(1)),  # alpha_t ((1 - e^-2h)/(-2h) + 1)
            d2=alpha_t * ((one_m + two_h) / (two_h * two_h) - f32(0.5)),  # alpha_t ((1 - e^-2h - 2h)/(2h)^2 - 1/2)
            noise=sigma_t * sqrt_f32(one_m),
        )
    if algorithm_type == "sde-dpmsolver":
        # x_t = (alpha_t/alpha_s) x_s - 2 sigma_t (e^h - 1) D0 + ... + sigma_t sqrt(e^2h - 1) z
        ep1 = exp_f32(h) - f32(1)
        return DPMCoefficients(
            x=alpha_t / alpha_s,
            d0=-(f32(2) * (sigma_t * ep1)),
            d1_midpoint=-(sigma_t * ep1),
            d1=-(f32(2) * (sigma_t * (ep1 / h - f32(1)))),
            d2=None,
            noise=sigma_t * sqrt_f32(exp_f32(f32(2) * h) - f32(1)),
        )
    raise AssertionError(algorithm_type)


def dpm_update(coefficients: DPMCoefficients, sample, D0, D1=None, D2=None, noise=None, midpoint=False):
    """x_t from the coefficient table and the differences (D1 with the midpoint or the Heun coefficient)."""
    terms = [(coefficients.x, sample), (coefficients.d0, D0)]
    if D1 is not None:
        terms.append((coefficients.d1_midpoint if midpoint else coefficients.d1, D1))
    if D2 is not None:
        terms.append((coefficients.d2, D2))
    if coefficients.noise is not None:
        if noise is None:
            raise ValueError("the SDE solvers need `noise`")
        terms.append((coefficients.noise, noise))
    return linear_combination(*terms)


def _sample_argument(sample, args, position: int, what: str = "sample"):
    # diffusers' update methods still accept their old positional (timestep, prev_timestep, sample) form
    if sample is None:
        if len(args) > position:
            return args[position]
        raise ValueError(f"missing `{what}` as a required keyword argument")
    return sample


def check_algorithm(owner: str, algorithm_type: str, solver_type: str, final_sigmas_type: str, algorithms):
    """Validate (algorithm_type, solver_type) as diffusers does; returns the names to register.

    ``deis`` becomes dpmsolver++ and the UniPC/DEIS solver types become midpoint. dpmsolver and
    sde-dpmsolver need final_sigmas_type="sigma_min" (the data is not defined at sigma = 0).
    """
    if algorithm_type == "deis":
        algorithm_type_out = "dpmsolver++"
    else:
        check_option(owner, "algorithm_type", algorithm_type, algorithms)
        algorithm_type_out = algorithm_type
    if solver_type in ("logrho", "bh1", "bh2"):
        solver_type_out = "midpoint"
    else:
        check_option(owner, "solver_type", solver_type, SOLVER_TYPES)
        solver_type_out = solver_type
    check_option(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
        raise UnsupportedOptionError(
            f"{owner}: final_sigmas_type='zero' is not supported for algorithm_type={algorithm_type!r}; "
            "choose final_sigmas_type='sigma_min'"
        )
    if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
        warnings.warn(
            f"algorithm_type {algorithm_type} is deprecated in diffusers; choose dpmsolver++ or sde-dpmsolver++",
            FutureWarning,
            stacklevel=4,  # the caller of the scheduler's __init__
        )
    return algorithm_type_out, solver_type_out


class DPMSolverMultistepScheduler(LogSNRSolverMixin):
    """Multistep DPM-Solver(++): each step reuses the last one or two model outputs (orders 2 and 3)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        algorithm, solver = check_algorithm(
            name, algorithm_type, solver_type, final_sigmas_type, ALGORITHM_TYPES
        )
        # flow_prediction is a data prediction: only the x_0 parameterisations take it
        data_prediction = algorithm in ("dpmsolver++", "sde-dpmsolver++")
        allowed = SOLVER_PREDICTION_TYPES if data_prediction else SOLVER_PREDICTION_TYPES[:3]
        check_option(name, "prediction_type", prediction_type, allowed)
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_option(name, "time_shift_type", time_shift_type, ("exponential",))
        self._init_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if (algorithm, solver) != (algorithm_type, solver_type):
            self.register_to_config(algorithm_type=algorithm, solver_type=solver)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float | None = None, timesteps=None):
        """Compute ``timesteps`` (int64, descending) and ``sigmas`` (float32, final sigma appended).

        Give ``num_inference_steps`` or custom descending ``timesteps``; ``mu`` sets flow_shift = e^mu
        (use_dynamic_shifting).
        """
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError("set_timesteps: `mu` needs use_dynamic_shifting=True")
            self.register_to_config(flow_shift=float(np.exp(mu)))
            cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("set_timesteps: give one of `num_inference_steps` or `timesteps`")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("set_timesteps: give only one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            for option in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[option]:
                    raise ValueError(f"set_timesteps: custom `timesteps` cannot be used with {option}=True")
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            # lambda_min_clipped cuts off the noisiest steps, where lambda falls below it (cosine schedules)
            clipped_idx = int(np.searchsorted(np.flip(self.lambda_t), cfg.lambda_min_clipped))
            timesteps = solver_timesteps(
                num_inference_steps, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset,
                last_timestep=cfg.num_train_timesteps - clipped_idx, owner=type(self).__name__,
            )

        sigmas = self._train_sigmas()
        log_sigmas = np.log(sigmas)
        round_timesteps = cfg.beta_schedule != "squaredcos_cap_v2"
        if cfg.use_karras_sigmas:
            sigmas = self._convert_to_karras(np.flip(sigmas), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if round_timesteps else timesteps
        elif cfg.use_lu_lambdas:
            # uniform steps in log sigma (Lu et al.): the karras ramp with rho = 1 on log sigma
            lambdas = self._convert_to_lu(np.flip(log_sigmas), num_inference_steps)
            sigmas = np.exp(lambdas)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if round_timesteps else timesteps
        elif cfg.use_exponential_sigmas:
            sigmas = self._convert_to_exponential(np.flip(sigmas), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        elif cfg.use_beta_sigmas:
            sigmas = self._convert_to_beta(np.flip(sigmas), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        elif cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, cfg.num_train_timesteps, cfg.flow_shift)
            timesteps = sigmas * cfg.num_train_timesteps
        else:
            sigmas = interp_sigmas(timesteps, sigmas)

        if cfg.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((1 - ac0) / ac0)
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        """The model output as the solver uses it: x_0 (dpmsolver++, sde-dpmsolver++) or eps (the others)."""
        sample = _sample_argument(sample, args, 1)
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample)

    def _lambdas(self, *offsets):
        # (alpha, sigma, lambda) at step_index + offset for each offset
        return [self._coefficients(self._step_index + k) for k in offsets]

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        """One first-order step (DDIM in the data or noise parameterisation) from sigmas[i] to sigmas[i+1]."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t, lambda_t), (alpha_s, sigma_s, lambda_s) = self._lambdas(1, 0)
        c = dpm_coefficients(self.config.algorithm_type, lambda_t - lambda_s, alpha_t, sigma_t, alpha_s, sigma_s)
        return dpm_update(c, sample, model_output, noise=noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Second-order multistep step using the model outputs at s0 = t_i and s1 = t_{i-1}."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1) = self._lambdas(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        # D0 = m0, D1 = (m0 - m1) / r0
        D0, D1 = m0, (np.float32(1) / r0) * (m0 - m1)
        c = dpm_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, alpha_s0, sigma_s0)
        return dpm_update(c, sample, D0, D1, noise=noise, midpoint=self.config.solver_type == "midpoint")

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Third-order multistep step using the model outputs at t_i, t_{i-1}, t_{i-2}."""
        sample = _sample_argument(sample, args, 2)
        if self.config.algorithm_type == "sde-dpmsolver":
            raise UnsupportedOptionError(
                "DPMSolverMultistepScheduler: solver_order=3 has no third-order update for "
                "algorithm_type='sde-dpmsolver' (diffusers fails here too); use solver_order=2"
            )
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1), (_, _, lambda_s2) = (
            self._lambdas(1, 0, -1, -2)
        )
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        one = np.float32(1)
        # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1;  D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1);  D2 = (D1_0 - D1_1)/(r0+r1)
        D1_0, D1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (one / (r0 + r1)) * (D1_0 - D1_1)
        c = dpm_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, alpha_s0, sigma_s0)
        return dpm_update(c, sample, m0, D1, D2, noise=noise)

    def step(
        self,
        model_output,
        timestep,
        sample,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
        **kwargs,
    ):
        """One multistep DPM-Solver step from timestep to the next; extra keyword arguments (eta…) are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n, i = len(self.timesteps), self._step_index
        # the last steps fall back to lower orders (more stable with few steps, required at sigma = 0)
        lower_order_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15

        model_output, sample = np.asarray(model_output), np.asarray(sample)
        out_dtype = model_output.dtype
        work = compute_dtype(model_output, sample)
        sample = sample.astype(work, copy=False)
        converted = self.convert_model_output(model_output.astype(work, copy=False), sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        noise = None
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn_tensor(converted.shape, generator=generator, dtype=np.float32)
            else:
                noise = np.asarray(variance_noise).astype(np.float32)
            noise = noise.astype(work, copy=False)

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            update, first = self.dpm_solver_first_order_update, converted
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            update, first = self.multistep_dpm_solver_second_order_update, self.model_outputs
        else:
            update, first = self.multistep_dpm_solver_third_order_update, self.model_outputs
        # (a zero-length step, h = 0, gives infinite ratios whose terms vanish, as with torch)
        with np.errstate(divide="ignore", invalid="ignore"):
            prev_sample = update(first, sample=sample, noise=noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1

        prev_sample = prev_sample.astype(out_dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
