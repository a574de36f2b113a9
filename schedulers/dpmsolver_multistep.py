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

The parts shared with DPM-Solver singlestep, UniPC and DEIS are in ``log_snr.LogSNRSolverMixin``, the
DPM-Solver coefficient table in ``dpm_solver``.

Limitations: sample arithmetic is done in float32 (float64 kept as float64) and returned in the
model output's dtype; float16 inputs are upcast where torch would round intermediates to float16.
Scalar coefficients are computed in float32 like diffusers, with exp/log rounded once from float64,
so they may differ from torch's by an ulp. sde-dpmsolver has no third-order update in diffusers
(it fails at the first third-order step); sdort refuses that step with a ValueError.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput, register_to_config
from .dpm_solver import (
    ALGORITHM_TYPES,
    SOLVER_TYPES,
    DPMCoefficients,
    check_algorithm,
    dpm_coefficients,
    dpm_update,
)
from .log_snr import SOLVER_PREDICTION_TYPES, LogSNRSolverMixin, _sample_argument
from .noise import randn_tensor
from .numerics import compute_dtype
from .options import UnsupportedOptionError, check_option
from .schedule import TIMESTEP_SPACINGS, chosen_sigma_schedule, final_sigma, solver_timesteps

__all__ = [
    "ALGORITHM_TYPES",
    "SOLVER_PREDICTION_TYPES",
    "SOLVER_TYPES",
    "DPMCoefficients",
    "DPMSolverMultistepScheduler",
    "LogSNRSolverMixin",
    "check_algorithm",
    "dpm_coefficients",
    "dpm_update",
]


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
            self._apply_mu(mu)
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

        # diffusers' precedence here: karras, Lu lambdas, exponential, beta; the cosine betas' karras and Lu
        # timesteps are left unrounded
        sigmas, timesteps, _ = self._solver_sigmas(
            timesteps, num_inference_steps, ("karras", "lu", "exponential", "beta"),
            round_karras=cfg.beta_schedule != "squaredcos_cap_v2",
        )
        sigma_last = final_sigma(cfg.final_sigmas_type, self.alphas_cumprod)
        self._set_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps)

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        """The model output as the solver uses it: x_0 (dpmsolver++, sde-dpmsolver++) or eps (the others)."""
        sample = _sample_argument(sample, args, 1)
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample)

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
