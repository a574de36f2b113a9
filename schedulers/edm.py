"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models") on numpy.

Matches ``diffusers.EDMEulerScheduler`` and ``diffusers.EDMDPMSolverMultistepScheduler`` (0.42). Both
work on sigma directly (no betas): sigmas follow ``sigma_schedule`` "karras" (rho-spaced between
``sigma_max`` and ``sigma_min``) or "exponential" (log-spaced), the model is wrapped by EDM's
preconditioning (``precondition_inputs`` c_in, ``precondition_noise`` c_noise = log(sigma) / 4, which
gives the ``timesteps``, and ``precondition_outputs`` c_skip / c_out with ``sigma_data``), and
``final_sigmas_type`` chooses the last sigma (0 or sigma_min).

EDMEulerScheduler: Euler steps with optional churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``,
noise from ``generator``); ``set_timesteps(num_inference_steps, device, sigmas)`` where, as in
diffusers, ``sigmas`` is a custom *ramp* in [0, 1] put through the sigma schedule; ``step`` accepts a
ready ``pred_original_sample``. Prediction types epsilon and v_prediction.

EDMDPMSolverMultistepScheduler: DPM-Solver++ of order 1-3 (``solver_order``), algorithm_type
dpmsolver++ or sde-dpmsolver++ (noise from ``generator`` at every step), solver_type midpoint or heun,
``lower_order_final``, ``euler_at_final``, dynamic ``thresholding``. Prediction types epsilon and
v_prediction. As in diffusers, algorithm_type "deis" becomes "dpmsolver++" (final_sigmas_type "zero"
is then refused) and solver_type "logrho", "bh1", "bh2" become "midpoint".

Limitations: prediction_type "sample" (accepted by diffusers' EDMDPMSolverMultistepScheduler
constructor, refused by its first step) is refused when the scheduler is built, and so is the
third-order sde-dpmsolver++ update that diffusers does not define. diffusers' sigmas for the
DPM-Solver's karras schedule and for both exponential schedules, and its timesteps, come from torch's
float32 pow/exp/log, which are not correctly rounded; sdort rounds them correctly, so single values can
differ by one float32 ulp. The sample is computed in float32 (float64 stays float64) and returned in
``model_output``'s dtype, also where torch mixes float16 model outputs into float16 products.
Kept as in diffusers: with final_sigmas_type "sigma_min", the schedule ends with a zero-length
step (sigma_min to sigma_min); from 15 steps on, the heun and third-order updates then divide 0 by 0
and return nan there.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput, register_to_config
from .k_diffusion import SigmaNoiseMixin, churn, euler_step, to_d, working_arrays
from .noise import randn_tensor
from .numerics import exp_f32, linear_combination, linspace_f32, linspace_f64, log_f32, upcast
from .options import UnsupportedOptionError, check_option
from .schedule import exponential_sigmas_f32, karras_sigmas_from_ramp, threshold_sample

EDMEulerSchedulerOutput = SchedulerOutput


class _EDMBase(SigmaNoiseMixin):
    """EDM's sigma schedules and preconditioning, shared by the two EDM schedulers."""

    _compatibles: list = []

    def _check_common(self, sigma_schedule, prediction_type, final_sigmas_type):
        name = type(self).__name__
        check_option(name, "sigma_schedule", sigma_schedule, ("karras", "exponential"))
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_option(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))

    @property
    def init_noise_sigma(self) -> float:
        # sqrt(sigma_max^2 + 1)
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _compute_karras_sigmas(self, ramp, sigma_min=None, sigma_max=None) -> np.ndarray:
        """(sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, in the ramp's dtype."""
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        return karras_sigmas_from_ramp(ramp, sigma_min, sigma_max, self.config.rho)

    def _compute_exponential_sigmas(self, ramp, sigma_min=None, sigma_max=None) -> np.ndarray:
        """exp(linspace(log sigma_max, log sigma_min, len(ramp))) in float32 (only the ramp's length counts)."""
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        return exponential_sigmas_f32(sigma_min, sigma_max, len(ramp))

    def _schedule(self, ramp) -> np.ndarray:
        if self.config.sigma_schedule == "karras":
            return self._compute_karras_sigmas(ramp)
        return self._compute_exponential_sigmas(ramp)

    def _get_conditioning_c_in(self, sigma):
        # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        sigma = np.float32(sigma)
        return np.float32(1) / np.sqrt(sigma * sigma + np.float32(self.config.sigma_data**2))

    def precondition_inputs(self, sample, sigma):
        """c_in * sample, the model input at noise level sigma."""
        sample = np.asarray(sample)
        return (sample * self._get_conditioning_c_in(sigma)).astype(sample.dtype, copy=False)

    def precondition_noise(self, sigma) -> np.ndarray:
        """c_noise = log(sigma) / 4 (float32), the model's timestep; a number gives a 1-element array."""
        if np.ndim(sigma) == 0 and not isinstance(sigma, np.ndarray):
            sigma = [sigma]
        # the log in float64, rounded once to float32
        log_sigma = np.log(np.asarray(sigma, dtype=np.float32).astype(np.float64)).astype(np.float32)
        return np.float32(0.25) * log_sigma

    def precondition_outputs(self, sample, model_output, sigma):
        """D(x; sigma) = c_skip x + c_out F(x), with

        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
        c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)  (+ for epsilon, - for v_prediction).
        """
        sigma = np.float32(sigma)
        sigma_data = np.float32(self.config.sigma_data)
        sigma_data2 = np.float32(self.config.sigma_data**2)
        # (torch evaluates number / tensor as reciprocal(tensor) * number: two roundings, kept here)
        c_skip = (np.float32(1) / (sigma * sigma + sigma_data2)) * sigma_data2
        sign = sigma if self.config.prediction_type == "epsilon" else -sigma
        c_out = sign * sigma_data / np.sqrt(sigma * sigma + sigma_data2)
        return c_skip * np.asarray(sample) + c_out * np.asarray(model_output)

    def scale_model_input(self, sample, timestep=None):
        """The preconditioned model input c_in * sample at the current sigma."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self._step_index])


class EDMEulerScheduler(_EDMBase):
    """Euler steps of dx/dsigma = (x - D(x; sigma)) / sigma with EDM preconditioning, optionally with churn."""

    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        self._check_common(sigma_schedule, prediction_type, final_sigmas_type)
        self.num_inference_steps = None
        # the training ramp: arange(T + 1) / T (float64)
        self._set_sigmas(np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps)
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def _set_sigmas(self, ramp):
        sigmas = self._schedule(ramp).astype(np.float32)
        self.timesteps = self.precondition_noise(sigmas)
        sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, np.full(1, sigma_last, dtype=np.float32)])

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None):
        """Compute ``sigmas`` (float32, final sigma appended) and ``timesteps`` = c_noise(sigmas).

        ``sigmas`` is, as in diffusers, a custom ramp (values in [0, 1], 0 = sigma_max) given to the
        sigma schedule instead of linspace(0, 1, num_inference_steps).
        """
        self.num_inference_steps = num_inference_steps
        if sigmas is None:
            ramp = linspace_f64(0, 1, self.num_inference_steps)
        else:
            ramp = np.asarray(sigmas, dtype=np.float64)
        self._set_sigmas(ramp)
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
        pred_original_sample=None,
        **kwargs,
    ):
        """One Euler step from sigmas[i] to sigmas[i+1]; extra keyword arguments (eta…) are ignored."""
        self._begin_step(timestep, refuse_integer=True, warn_unscaled=True)

        output, sample, out_dtype = working_arrays(model_output, sample)

        i = self._step_index
        sample, sigma_hat = churn(sample, self.sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator, model_output)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, output, sigma_hat)

        # x_next = x + (x - D) / sigma_hat * (sigma_next - sigma_hat)
        derivative = to_d(sample, sigma_hat, pred_original_sample)
        prev_sample = euler_step(sample, derivative, self.sigmas[i + 1] - sigma_hat).astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EDMEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EDMDPMSolverMultistepScheduler(_EDMBase):
    """DPM-Solver++ (Lu et al. 2022) in EDM's sigma parametrisation: alpha_t = 1, lambda = -log sigma."""

    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        name = type(self).__name__
        if algorithm_type == "deis":
            # diffusers maps "deis" to "dpmsolver++", but only with a non-zero final sigma
            if final_sigmas_type == "zero":
                raise UnsupportedOptionError(
                    f"{name}: final_sigmas_type='zero' is not supported for algorithm_type='deis'; use 'sigma_min'"
                )
            self.register_to_config(algorithm_type="dpmsolver++")
            algorithm_type = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
            solver_type = "midpoint"
        check_option(name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_option(name, "solver_type", solver_type, ("midpoint", "heun"))
        self._check_common(sigma_schedule, prediction_type, final_sigmas_type)
        if int(solver_order) < 1:
            raise UnsupportedOptionError(f"{name}: solver_order={solver_order!r} is not supported; use 1, 2 or 3")
        if algorithm_type == "sde-dpmsolver++" and solver_order >= 3:
            raise UnsupportedOptionError(
                f"{name}: solver_order={solver_order!r} is not supported with algorithm_type='sde-dpmsolver++' "
                "(diffusers has no third-order SDE update); use solver_order 1 or 2"
            )

        # the training ramp is float32 here (torch.linspace's default dtype)
        sigmas = self._schedule(linspace_f32(0, 1, num_train_timesteps))
        self.timesteps = self.precondition_noise(sigmas)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=sigmas.dtype)])
        self.num_inference_steps = None
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int = None, device=None):
        """Compute ``sigmas`` (float32, final sigma appended) and ``timesteps`` = c_noise(sigmas); reset the history."""
        self.num_inference_steps = num_inference_steps
        sigmas = self._schedule(linspace_f32(0, 1, self.num_inference_steps)).astype(np.float32)
        self.timesteps = self.precondition_noise(sigmas)
        sigma_last = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, np.array([sigma_last], dtype=np.float32)])
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule; an unknown timestep means the last step, as in diffusers."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        matches = np.flatnonzero(np.asarray(schedule_timesteps) == np.asarray(timestep).reshape(-1)[0])
        if matches.size == 0:
            return len(self.timesteps) - 1
        return int(matches[1] if matches.size > 1 else matches[0])

    def _sigma_to_alpha_sigma_t(self, sigma):
        # the inputs are preconditioned before the model, so alpha_t = 1 and sigma_t = sigma
        return np.float32(1), sigma

    def convert_model_output(self, model_output, sample):
        """The denoised x_0 = precondition_outputs(...) at the current sigma (thresholded if configured)."""
        x0_pred = self.precondition_outputs(sample, model_output, self.sigmas[self._step_index])
        if self.config.thresholding:
            x0_pred = threshold_sample(x0_pred, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0_pred

    def _lambdas(self, *sigmas):
        # lambda = log(alpha) - log(sigma) = -log(sigma)  (inf at sigma = 0)
        with np.errstate(divide="ignore"):
            return [-log_f32(s) for s in sigmas]

    def dpm_solver_first_order_update(self, model_output, sample, noise=None):
        """DPM-Solver++(1) from sigmas[i] to sigmas[i+1] (DDIM in x_0 form), optionally as an SDE."""
        i = self._step_index
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        lambda_t, lambda_s = self._lambdas(sigma_t, sigma_s)
        h = np.float32(lambda_t - lambda_s)
        if self.config.algorithm_type == "dpmsolver++":
            # x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D
            return linear_combination(
                (sigma_t / sigma_s, sample),
                (-(exp_f32(-h) - np.float32(1)), model_output),
            )
        # x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z
        e2h = exp_f32(np.float32(-2.0) * h)
        return linear_combination(
            (sigma_t / sigma_s * exp_f32(-h), sample),
            (np.float32(1) - e2h, model_output),
            (sigma_t * np.sqrt(np.float32(1) - e2h), noise),
        )

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample, noise=None):
        """DPM-Solver++(2M) with the last two denoised outputs (midpoint or heun form), optionally as an SDE."""
        i = self._step_index
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]
        lambda_t, lambda_s0, lambda_s1 = self._lambdas(sigma_t, sigma_s0, sigma_s1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        # h = lambda_t - lambda_s0, r0 = h_0 / h;  D0 = m0, D1 = (m0 - m1) / r0
        h, h_0 = np.float32(lambda_t - lambda_s0), np.float32(lambda_s0 - lambda_s1)
        r0 = h_0 / h
        d0, d1 = m0, (np.float32(1) / r0) * (m0 - m1)
        one = np.float32(1)
        if self.config.algorithm_type == "dpmsolver++":
            phi = exp_f32(-h) - one  # e^-h - 1
            if self.config.solver_type == "midpoint":
                # x_t = (sigma_t / sigma_s0) x - (e^-h - 1) D0 - 1/2 (e^-h - 1) D1
                return linear_combination((sigma_t / sigma_s0, sample), (-phi, d0), (-(np.float32(0.5) * phi), d1))
            # heun: x_t = (sigma_t / sigma_s0) x - (e^-h - 1) D0 + ((e^-h - 1) / h + 1) D1
            return linear_combination((sigma_t / sigma_s0, sample), (-phi, d0), (phi / h + one, d1))
        e2h = exp_f32(np.float32(-2.0) * h)
        noise_term = (sigma_t * np.sqrt(one - e2h), noise)
        first = (sigma_t / sigma_s0 * exp_f32(-h), sample)
        if self.config.solver_type == "midpoint":
            # x_t = (sigma_t / sigma_s0) e^-h x + (1 - e^-2h) D0 + 1/2 (1 - e^-2h) D1 + sigma_t sqrt(1 - e^-2h) z
            return linear_combination(first, (one - e2h, d0), (np.float32(0.5) * (one - e2h), d1), noise_term)
        # heun: ... + ((1 - e^-2h) / (-2h) + 1) D1 + ...
        return linear_combination(first, (one - e2h, d0), ((one - e2h) / (np.float32(-2.0) * h) + one, d1), noise_term)

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample, noise=None):
        """DPM-Solver++(3M) with the last three denoised outputs."""
        i = self._step_index
        sigma_t, sigma_s0, sigma_s1, sigma_s2 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]
        lambda_t, lambda_s0, lambda_s1, lambda_s2 = self._lambdas(sigma_t, sigma_s0, sigma_s1, sigma_s2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h = np.float32(lambda_t - lambda_s0)
        h_0, h_1 = np.float32(lambda_s0 - lambda_s1), np.float32(lambda_s1 - lambda_s2)
        r0, r1 = h_0 / h, h_1 / h
        one = np.float32(1)
        # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1;
        # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1);  D2 = (D1_0 - D1_1) / (r0 + r1)
        d1_0, d1_1 = (one / r0) * (m0 - m1), (one / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (one / (r0 + r1)) * (d1_0 - d1_1)
        phi = exp_f32(-h) - one
        # x_t = (sigma_t / sigma_s0) x - (e^-h - 1) D0 + ((e^-h - 1) / h + 1) D1 - ((e^-h - 1 + h) / h^2 - 1/2) D2
        return linear_combination(
            (sigma_t / sigma_s0, sample),
            (-phi, m0),
            (phi / h + one, d1),
            (-((phi + h) / (h * h) - np.float32(0.5)), d2),
        )

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One multistep DPM-Solver++ step; extra keyword arguments (eta…) are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n = len(self.timesteps)
        # the last step(s) fall back to lower orders: always for a final sigma of 0, and for short schedules
        lower_order_final = self._step_index == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        lower_order_second = self._step_index == n - 2 and cfg.lower_order_final and n < 15

        output, sample, out_dtype = working_arrays(model_output, sample)
        model_output = self.convert_model_output(output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]

        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = upcast(randn_tensor(model_output.shape, generator=generator, dtype=out_dtype))

        # (a zero-length last step, sigma_min to sigma_min, divides by h = 0 as in diffusers: no numpy warnings)
        with np.errstate(divide="ignore", invalid="ignore"):
            if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample, noise=noise)
            elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self.multistep_dpm_solver_second_order_update(
                    self.model_outputs, sample=sample, noise=noise
                )
            else:
                prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1

        self._step_index += 1
        prev_sample = prev_sample.astype(out_dtype, copy=False)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
