"""DEIS multistep (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator",
arXiv 2204.13902), the log-rho variant, on numpy.

Matches ``diffusers.DEISMultistepScheduler`` (0.42.1): orders 1-3 with lower_order_final (below 15
steps); algorithm_type deis (dpmsolver / dpmsolver++ mapped to deis) and solver_type logrho
(midpoint, heun, bh1, bh2 mapped to logrho) as diffusers does; prediction types epsilon, sample,
v_prediction, flow_prediction; dynamic thresholding; karras, exponential and beta sigmas (the final
sigma repeats the last one); flow-matching sigmas (flow_shift, ``mu``); the three timestep
spacings; ``step(model_output, timestep, sample, return_dict)``.

The update integrates the noise prediction in rho = sigma_t / alpha_t with a Lagrange polynomial
through the last model outputs (Adams-Bashforth in log rho):
    x_t = alpha_t (x_s0 / alpha_s0 + sum_k c_k eps_k),  c_k = integral over [rho_s0, rho_t] of l_k.

Limitations: no custom timesteps or sigmas and no zero-SNR rescaling (as diffusers). ``generator``
is accepted (keyword only) and ignored. The sample keeps the dtype diffusers keeps (no float32
upcast); float16 inputs are computed in float32.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput, register_to_config
from .log_snr import SOLVER_PREDICTION_TYPES, LogSNRSolverMixin, _sample_argument
from .numerics import compute_dtype, exp_f32, linear_combination
from .options import check_option
from .schedule import TIMESTEP_SPACINGS, chosen_sigma_schedule, final_sigma, solver_timesteps


def _log(x):
    # diffusers evaluates the log-rho integrals with numpy's float32 log
    return np.log(np.float32(x))


def deis_second_order_integral(t, b, c):
    """Integral up to rho = t of the Lagrange basis polynomial (in log rho) that is 1 at b and 0 at c.

    t (-log c + log t - 1) / (log b - log c)
    """
    return t * (-_log(c) + _log(t) - np.float32(1)) / (_log(b) - _log(c))


def deis_third_order_integral(t, b, c, d):
    """Integral up to rho = t of the quadratic Lagrange basis polynomial (in log rho) that is 1 at b, 0 at c and d.

    t (log c (log d - log t + 1) - log d log t + log d + log^2 t - 2 log t + 2) / ((log b - log c)(log b - log d))
    """
    f32 = np.float32
    lt, lc, ld, lb = _log(t), _log(c), _log(d), _log(b)
    numerator = t * (lc * (ld - lt + f32(1)) - ld * lt + ld + lt * lt - f32(2) * lt + f32(2))
    denominator = (lb - lc) * (lb - ld)
    return numerator / denominator


class DEISMultistepScheduler(LogSNRSolverMixin):
    """DEIS: exponential-integrator multistep with polynomial extrapolation of eps in log rho."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        check_option(name, "prediction_type", prediction_type, SOLVER_PREDICTION_TYPES)
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_option(name, "time_shift_type", time_shift_type, ("exponential",))
        if algorithm_type not in ("dpmsolver", "dpmsolver++"):
            check_option(name, "algorithm_type", algorithm_type, ("deis",))
        if solver_type not in ("midpoint", "heun", "bh1", "bh2"):
            check_option(name, "solver_type", solver_type, ("logrho",))
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        # the DPM-Solver / UniPC names become DEIS's own, as in diffusers
        if algorithm_type != "deis":
            self.register_to_config(algorithm_type="deis")
        if solver_type != "logrho":
            self.register_to_config(solver_type="logrho")
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None):
        """Compute ``timesteps`` (int64) and ``sigmas`` (float32, final sigma appended)."""
        cfg = self.config
        if mu is not None:
            self._apply_mu(mu)
            cfg = self.config
        timesteps = solver_timesteps(
            num_inference_steps, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset,
            owner=type(self).__name__,
        )
        sigmas, timesteps, schedule = self._solver_sigmas(timesteps, num_inference_steps)
        # after a karras / exponential / beta or flow schedule the last step stays at its last sigma
        last = sigmas[-1:] if schedule is not None else [final_sigma("sigma_min", self.alphas_cumprod)]
        self._set_schedule(np.concatenate([sigmas, last]), timesteps)

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        """eps as DEIS integrates it: (x - alpha_t x_0) / sigma_t, x_0 predicted (and thresholded if configured)."""
        sample = _sample_argument(sample, args, 1)
        x0_pred = self._data_prediction(model_output, sample)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        return (sample - alpha_t * x0_pred) / sigma_t

    def _rhos(self, *offsets):
        # rho = sigma_t / alpha_t at step_index + offset, and alpha there
        out = []
        for k in offsets:
            alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index + k])
            out.append((np.float32(alpha), np.float32(sigma)))
        return out

    def deis_first_order_update(self, model_output, *args, sample=None, **kwargs):
        """x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s  (DDIM)."""
        sample = _sample_argument(sample, args, 2)
        alpha_t, sigma_t, lambda_t = self._coefficients(self._step_index + 1)
        alpha_s, _, lambda_s = self._coefficients(self._step_index)
        h = lambda_t - lambda_s
        return linear_combination(
            (alpha_t / alpha_s, sample), (-(sigma_t * (exp_f32(h) - np.float32(1))), model_output)
        )

    def multistep_deis_second_order_update(self, model_output_list, *args, sample=None, **kwargs):
        """x_t = alpha_t (x_s0/alpha_s0 + c0 eps_0 + c1 eps_1), linear extrapolation of eps in log rho."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1) = self._rhos(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        rho_t, rho_s0, rho_s1 = sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1
        F = deis_second_order_integral
        coef1 = F(rho_t, rho_s0, rho_s1) - F(rho_s0, rho_s0, rho_s1)
        coef2 = F(rho_t, rho_s1, rho_s0) - F(rho_s0, rho_s1, rho_s0)
        return alpha_t * linear_combination((np.float32(1) / alpha_s0, sample), (coef1, m0), (coef2, m1))

    def multistep_deis_third_order_update(self, model_output_list, *args, sample=None, **kwargs):
        """x_t = alpha_t (x_s0/alpha_s0 + c0 eps_0 + c1 eps_1 + c2 eps_2), quadratic extrapolation in log rho."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1), (alpha_s2, sigma_s2) = self._rhos(1, 0, -1, -2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        rho_t, rho_s0, rho_s1, rho_s2 = sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1, sigma_s2 / alpha_s2
        F = deis_third_order_integral
        coef1 = F(rho_t, rho_s0, rho_s1, rho_s2) - F(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = F(rho_t, rho_s1, rho_s2, rho_s0) - F(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = F(rho_t, rho_s2, rho_s0, rho_s1) - F(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * linear_combination((np.float32(1) / alpha_s0, sample), (coef1, m0), (coef2, m1), (coef3, m2))

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, generator=None, **kwargs):
        """One multistep DEIS step; extra keyword arguments (eta, generator…) are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        n, i = len(self.timesteps), self._step_index
        lower_order_final = i == n - 1 and cfg.lower_order_final and n < 15
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15

        model_output, sample = np.asarray(model_output), np.asarray(sample)
        out_dtype = np.result_type(model_output.dtype, sample.dtype)
        work = compute_dtype(model_output, sample)
        sample = sample.astype(work, copy=False)
        converted = self.convert_model_output(model_output.astype(work, copy=False), sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        with np.errstate(divide="ignore", invalid="ignore"):  # the repeated final sigma gives h = 0
            if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self.deis_first_order_update(converted, sample=sample)
            elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
            else:
                prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1

        prev_sample = prev_sample.astype(out_dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
