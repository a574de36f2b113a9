"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", arXiv 2302.04867) on numpy.

Matches ``diffusers.UniPCMultistepScheduler`` (0.42.1): UniP predictor and UniC corrector of any
order (solver_order, lower_order_final), B(h) variants bh1 / bh2 (midpoint, heun and logrho are
mapped to bh2 as diffusers does), predict_x0 (data or noise prediction), disable_corrector,
solver_p (another scheduler as predictor), karras / exponential / beta sigmas (with sigma_min /
sigma_max), flow-matching sigmas (flow_shift, dynamic shifting with ``mu``, shift_terminal, custom
``sigmas``), final_sigmas_type zero / sigma_min, dynamic thresholding, zero-SNR rescaling, the three
timestep spacings; ``step(model_output, timestep, sample, return_dict)``.

Limitations: ``generator`` is accepted (keyword only) and ignored, UniPC being deterministic.
With final_sigmas_type="zero", diffusers' last step is NaN for predict_x0=False, for
lower_order_final=False (order > 1) and for solver_type="bh1": sdort refuses the first two with a
ValueError and, for bh1, returns the limit (the first-order data-prediction step to sigma = 0, i.e.
x_0) where diffusers multiplies a zero residual by an infinite B(h). The coefficient systems of
order 3 and up are solved in float64 and rounded to float32 where torch solves them in float32, a
difference of a few float32 ulps in the coefficients. Sample arithmetic is float32
(float64 kept), returned in the sample's dtype.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput, register_to_config
from .log_snr import SOLVER_PREDICTION_TYPES, LogSNRSolverMixin, _sample_argument
from .numerics import compute_dtype, expm1_f32, linear_combination
from .options import UnsupportedOptionError, check_option
from .schedule import (
    TIMESTEP_SPACINGS,
    chosen_sigma_schedule,
    configured_sigma_schedule,
    converted_sigmas,
    final_sigma,
    flow_shift_sigmas,
    interp_sigmas,
    solver_timesteps,
)
from .schedule import stretch_shift_to_terminal as _stretch_shift_to_terminal
from .schedule import time_shift as _time_shift


def _solve_f32(a, b) -> np.ndarray:
    # torch solves in float32; float64 then one rounding is at least as accurate
    return np.linalg.solve(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)


def unipc_rhos(rks, hh, solver_type: str, order: int, corrector: bool):
    """(rhos, phi_1, B(h)) of the UniP (``corrector=False``) or UniC update of ``order``, in float32.

    With phi_1 = e^hh - 1 and phi_{k+1} = phi_k / hh - 1/(k+1)!  (hh = -h for data prediction), the
    rhos solve sum_k rho_k r_k^(i-1) = phi_(i+1)(hh) * i! / B(h), B(h) = hh (bh1) or e^hh - 1 (bh2),
    over the k < order - 1 history points for UniP and over those and r = 1 (the new output) for UniC.
    The order-2 predictor and the order-1 corrector use rho = 1/2; the order-1 predictor has none.
    """
    f32 = np.float32
    h_phi_1 = expm1_f32(hh)
    h_phi_k = h_phi_1 / hh - f32(1)
    B_h = hh if solver_type == "bh1" else h_phi_1
    R, b = [], []
    factorial_i = 1
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * f32(factorial_i) / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - f32(1 / factorial_i)
    R, b = np.stack(R), np.asarray(b, dtype=np.float32)
    if corrector and order > 1:
        rhos = _solve_f32(R, b)
    elif corrector or order == 2:
        rhos = np.array([0.5], dtype=np.float32)
    elif order == 1:
        rhos = np.zeros(0, dtype=np.float32)
    else:
        rhos = _solve_f32(R[:-1, :-1], b[:-1])
    return rhos, h_phi_1, B_h


class UniPCMultistepScheduler(LogSNRSolverMixin):
    """Unified predictor-corrector: each step corrects the last sample with the new model output, then predicts."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],  # noqa: B006 (diffusers' default, never mutated)
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        allowed = SOLVER_PREDICTION_TYPES if predict_x0 else SOLVER_PREDICTION_TYPES[:3]
        check_option(name, "prediction_type", prediction_type, allowed)
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_option(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_option(name, "time_shift_type", time_shift_type, ("exponential", "linear"))
        if final_sigmas_type == "zero" and (not predict_x0 or (not lower_order_final and solver_order > 1)):
            # at sigma = 0 these updates multiply 0 by infinity: diffusers returns NaN there
            option = "predict_x0=False" if not predict_x0 else "lower_order_final=False"
            raise UnsupportedOptionError(
                f"{name}: {option} is not supported with final_sigmas_type='zero' (the last step is undefined "
                "and diffusers returns NaN); use final_sigmas_type='sigma_min'"
            )
        if shift_terminal is not None and not use_flow_sigmas:
            raise UnsupportedOptionError(f"{name}: shift_terminal is only supported with use_flow_sigmas=True")
        if solver_type not in ("midpoint", "heun", "logrho"):
            check_option(name, "solver_type", solver_type, ("bh1", "bh2"))
        self._init_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if solver_type in ("midpoint", "heun", "logrho"):
            # the DPM-Solver and DEIS solver types become UniPC's default, as in diffusers
            self.register_to_config(solver_type="bh2")
        self.predict_x0 = predict_x0
        self.model_outputs = [None] * solver_order
        self.timestep_list = [None] * solver_order
        self.lower_order_nums = 0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self.last_sample = None
        self.this_order = None

    def time_shift(self, mu: float, sigma: float, t):
        """Dynamic shifting of flow sigmas (exponential or linear, per time_shift_type)."""
        return _time_shift(mu, sigma, t, self.config.time_shift_type)

    def stretch_shift_to_terminal(self, t):
        """Stretch flow sigmas so that the last one equals config.shift_terminal."""
        return _stretch_shift_to_terminal(t, self.config.shift_terminal)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None):
        """Compute ``timesteps`` (int64) and ``sigmas`` (float32, final sigma appended).

        Custom ``sigmas`` (descending, without the final one) are accepted with use_flow_sigmas only;
        ``mu`` is required with use_dynamic_shifting.
        """
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("set_timesteps: `mu` must be given when use_dynamic_shifting=True")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("set_timesteps: custom `sigmas` are only supported with use_flow_sigmas=True")
            num_inference_steps = len(sigmas)
        T = cfg.num_train_timesteps
        timesteps = solver_timesteps(
            num_inference_steps, T, cfg.timestep_spacing, cfg.steps_offset, owner=type(self).__name__
        )

        def final(sigma_min_value):
            return sigma_min_value if cfg.final_sigmas_type == "sigma_min" else 0

        schedule = configured_sigma_schedule(cfg)
        if schedule is not None:
            base = np.asarray(sigmas) if sigmas is not None else self._train_sigmas()
            # a karras ramp over flow sigmas is mapped back to flow sigmas s / (s + 1), timesteps s * T
            flow_karras = schedule == "karras" and cfg.use_flow_sigmas
            sigmas, timesteps = converted_sigmas(
                schedule, np.flip(base), num_inference_steps, None if flow_karras else np.log(base),
                cfg.get("sigma_min"), cfg.get("sigma_max"), round_karras=True,
            )
            if flow_karras:
                sigmas = sigmas / (sigmas + 1)
                timesteps = sigmas * T
            sigma_last = final(sigmas[-1])
        elif cfg.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / T, num_inference_steps + 1)[:-1]
            sigmas = np.array(sigmas)
            if cfg.use_dynamic_shifting:
                sigmas = self.time_shift(mu, 1.0, sigmas)
            else:
                sigmas = flow_shift_sigmas(sigmas, cfg.flow_shift)
            if cfg.shift_terminal:
                sigmas = self.stretch_shift_to_terminal(sigmas)
            # keep the first sigma below 1, where alpha_t = 1 - sigma would vanish
            eps = 1e-6
            if np.fabs(sigmas[0] - 1) < eps:
                sigmas[0] -= eps
            timesteps = sigmas * T
            sigma_last = final(sigmas[-1])
        else:
            base = np.asarray(sigmas) if sigmas is not None else self._train_sigmas()
            sigmas = interp_sigmas(timesteps, base)
            sigma_last = final_sigma(cfg.final_sigmas_type, self.alphas_cumprod)

        self._set_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps)
        self.last_sample = None
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        """The model output as the solver uses it: x_0 (predict_x0, thresholded if configured) or eps."""
        sample = _sample_argument(sample, args, 1)
        if self.predict_x0:
            return self._data_prediction(model_output, sample)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample  # v_prediction

    def _bh_update(self, sample, m0, history, t_index: int, s0_index: int, order: int, corrector: bool, model_t=None):
        """Shared UniP / UniC update from s0 to t with the differences D1_k = (m_k - m0) / r_k of ``history``.

        history[k-1] is the model output at step s0_index - k;  r_k = (lambda_{s_k} - lambda_{s0}) / h.
        Data prediction:  x_t = (sigma_t/sigma_s0) x - alpha_t phi_1 m0 - alpha_t B(h) sum_k rho_k D1_k
        Noise prediction: x_t = (alpha_t/alpha_s0) x - sigma_t phi_1 m0 - sigma_t B(h) sum_k rho_k D1_k
        The corrector adds D1_t = m_t - m0 (the new model output) with the last rho.
        """
        alpha_t, sigma_t, lambda_t = self._coefficients(t_index)
        alpha_s0, sigma_s0, lambda_s0 = self._coefficients(s0_index)
        h = lambda_t - lambda_s0
        rks, D1s = [], []
        for k in range(1, order):
            lambda_sk = self._coefficients(s0_index - k)[2]
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            D1s.append((history[k - 1] - m0) / rk)
        rks = np.asarray(rks + [1.0], dtype=np.float32)
        hh = -h if self.predict_x0 else h
        rhos, h_phi_1, B_h = unipc_rhos(rks, hh, self.config.solver_type, order, corrector)

        if self.predict_x0:
            x_coef, scale = sigma_t / sigma_s0, alpha_t
        else:
            x_coef, scale = alpha_t / alpha_s0, sigma_t
        terms = [(x_coef, sample), (-(scale * h_phi_1), m0)]
        residual_terms = list(zip(rhos[: len(D1s)], D1s))
        if corrector:
            residual_terms.append((rhos[-1], model_t - m0))
        if residual_terms:
            terms.append((-(scale * B_h), linear_combination(*residual_terms)))
        return linear_combination(*terms)

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        """UniP: predict x at t_{i+1} from the history of converted model outputs (order ``order``)."""
        sample = _sample_argument(sample, args, 1)
        if order is None:
            if len(args) <= 2:
                raise ValueError("missing `order` as a required keyword argument")
            order = args[2]
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        outputs = self.model_outputs
        history = [outputs[-(k + 1)] for k in range(1, order)]
        i = self._step_index
        x_t = self._bh_update(sample, outputs[-1], history, i + 1, i, order, corrector=False)
        return x_t.astype(sample.dtype, copy=False)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        """UniC: correct ``this_sample`` (at t_i) using its model output and the history before it."""
        last_sample = _sample_argument(last_sample, args, 1, "last_sample")
        this_sample = _sample_argument(this_sample, args, 2, "this_sample")
        if order is None:
            if len(args) <= 3:
                raise ValueError("missing `order` as a required keyword argument")
            order = args[3]
        outputs = self.model_outputs
        history = [outputs[-(k + 1)] for k in range(1, order)]
        i = self._step_index
        x_t = self._bh_update(
            last_sample, outputs[-1], history, i, i - 1, order, corrector=True, model_t=this_model_output
        )
        return x_t.astype(last_sample.dtype, copy=False)

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, generator=None, **kwargs):
        """Correct the current sample (UniC) then predict the next one (UniP); extra keyword arguments are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        out_dtype = sample.dtype
        work = compute_dtype(model_output, sample)
        sample = sample.astype(work, copy=False)

        use_corrector = (
            self._step_index > 0 and self._step_index - 1 not in self.disable_corrector and self.last_sample is not None
        )
        converted = self.convert_model_output(model_output.astype(work, copy=False), sample=sample)
        if use_corrector:
            with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 steps give unused infinities
                sample = self.multistep_uni_c_bh_update(
                    this_model_output=converted, last_sample=self.last_sample, this_sample=sample, order=self.this_order
                )

        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        if cfg.lower_order_final:
            this_order = min(cfg.solver_order, len(self.timesteps) - self._step_index)
        else:
            this_order = cfg.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up with lower orders
        self.last_sample = sample
        with np.errstate(divide="ignore", invalid="ignore"):
            prev_sample = self.multistep_uni_p_bh_update(
                model_output=model_output, sample=sample, order=self.this_order
            )
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1

        prev_sample = np.asarray(prev_sample).astype(out_dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
