"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv 2206.00927 and 2211.01095) on numpy.

Matches ``diffusers.DPMSolverSinglestepScheduler`` (0.42.1): algorithm types dpmsolver++,
dpmsolver and sde-dpmsolver++ (``deis`` mapped to dpmsolver++); solver orders 1-3 arranged in
``order_list`` (each order-k step spends k model calls between two anchor samples); solver_type
midpoint / heun; lower_order_final (switched on, with a warning, where diffusers switches it on);
final_sigmas_type zero / sigma_min; karras, exponential and beta sigmas; flow-matching sigmas;
lambda_min_clipped; variance_type learned / learned_range; dynamic thresholding; custom
``timesteps``; ``step(model_output, timestep, sample, generator, return_dict)``.

The DPM-Solver coefficient table comes from ``dpm_solver`` and the shared log-SNR machinery from
``log_snr``; only the choice of differences and anchor points is singlestep-specific.

Limitations: as diffusers, no timestep_spacing (linspace only) and no zero-SNR rescaling. The
sample is kept in the dtype diffusers keeps it in (no float32 upcast); float16 inputs are computed in
float32. algorithm_type="dpmsolver" with thresholding fails in diffusers (it indexes alpha_t with an
undefined timestep); sdort refuses it with a ValueError at the first step.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput, logger, register_to_config
from .dpm_solver import check_algorithm, dpm_coefficients, dpm_update
from .log_snr import SOLVER_PREDICTION_TYPES, LogSNRSolverMixin, _sample_argument
from .noise import randn_tensor
from .numerics import compute_dtype
from .options import UnsupportedOptionError, check_option
from .schedule import chosen_sigma_schedule, final_sigma, solver_timesteps

SINGLESTEP_ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")

# Orders of the steps, repeated: an order-k group spends k model calls on one step of the solver.
# With lower_order_final the tail is shortened so that the last group ends on the last timestep.
ORDER_PATTERNS = {1: [1], 2: [1, 2], 3: [1, 2, 3]}


class DPMSolverSinglestepScheduler(LogSNRSolverMixin):
    """Singlestep DPM-Solver(++): intermediate model calls between anchors, no history across groups."""

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        algorithm, solver = check_algorithm(
            name, algorithm_type, solver_type, final_sigmas_type, SINGLESTEP_ALGORITHM_TYPES
        )
        allowed = SOLVER_PREDICTION_TYPES if algorithm != "dpmsolver" else SOLVER_PREDICTION_TYPES[:3]
        check_option(name, "prediction_type", prediction_type, allowed)
        check_option(name, "time_shift_type", time_shift_type, ("exponential",))
        if solver_order > 3:
            raise UnsupportedOptionError(f"{name}: solver_order={solver_order} is not supported; choose 1, 2 or 3")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if (algorithm, solver) != (algorithm_type, solver_type):
            self.register_to_config(algorithm_type=algorithm, solver_type=solver)
        self.model_outputs = [None] * solver_order
        self.sample = None
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list:
        """The solver order of each step, e.g. [1, 2, 1, 2, ...] for order 2."""
        steps, order = int(num_inference_steps), self.config.solver_order
        if order > 3:
            raise ValueError("DPMSolverSinglestepScheduler: solver_order > 3 is not supported")
        pattern = ORDER_PATTERNS[order]
        if not self.config.lower_order_final:
            orders = pattern * (steps // order)
        elif order == 1:
            orders = [1] * steps
        elif order == 2:
            orders = pattern * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else pattern * (steps // 2) + [1]
        elif steps % 3 == 0:
            orders = pattern * (steps // 3 - 1) + [1, 2] + [1]
        elif steps % 3 == 1:
            orders = pattern * (steps // 3) + [1]
        else:
            orders = pattern * (steps // 3) + [1, 2]
        if self.config.final_sigmas_type == "zero":
            # the last step ends at sigma = 0, where only the first-order update is defined
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float | None = None, timesteps=None):
        """Compute ``timesteps`` (int64), ``sigmas`` (float32, final sigma appended) and ``order_list``."""
        cfg = self.config
        if mu is not None:
            self._apply_mu(mu)
            cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: give exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[option]:
                    raise ValueError(f"set_timesteps: custom `timesteps` cannot be used with {option}=True")
        num_inference_steps = num_inference_steps or len(timesteps)

        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            clipped_idx = int(np.searchsorted(np.flip(self.lambda_t), cfg.lambda_min_clipped))
            timesteps = solver_timesteps(
                num_inference_steps, cfg.num_train_timesteps, "linspace",
                last_timestep=cfg.num_train_timesteps - clipped_idx, owner=type(self).__name__,
            )
        sigmas, timesteps, _ = self._solver_sigmas(timesteps, num_inference_steps)
        sigma_last = final_sigma(cfg.final_sigmas_type, self.alphas_cumprod)
        self._set_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps)
        self.num_inference_steps = num_inference_steps

        if not cfg.lower_order_final and num_inference_steps % cfg.solver_order != 0:
            logger.warning(
                "%s: num_inference_steps=%d is not a multiple of solver_order=%d; lower_order_final is set to True",
                type(self).__name__, num_inference_steps, cfg.solver_order,
            )
            self.register_to_config(lower_order_final=True)
        if not self.config.lower_order_final and cfg.final_sigmas_type == "zero":
            logger.warning(
                "%s: final_sigmas_type='zero' needs lower_order_final; lower_order_final is set to True",
                type(self).__name__,
            )
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(num_inference_steps)

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.sample = None

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        """The model output as the solver uses it: x_0 (dpmsolver++, sde-dpmsolver++) or eps (dpmsolver)."""
        sample = _sample_argument(sample, args, 1)
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return self._data_prediction(model_output, sample)
        if self.config.thresholding:
            raise UnsupportedOptionError(
                "DPMSolverSinglestepScheduler: thresholding=True is not supported with algorithm_type='dpmsolver' "
                "(diffusers fails here too); use algorithm_type='dpmsolver++'"
            )
        return self._noise_prediction(model_output, sample)

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        """One first-order step from sigmas[i] to sigmas[i+1]."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t, lambda_t), (alpha_s, sigma_s, lambda_s) = self._lambdas(1, 0)
        c = dpm_coefficients(self.config.algorithm_type, lambda_t - lambda_s, alpha_t, sigma_t, alpha_s, sigma_s)
        return dpm_update(c, sample, model_output, noise=noise)

    def singlestep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Second-order step from the anchor s1 = t_{i-1} to t_{i+1}, using the model output at s0 = t_i."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t, lambda_t), (_, _, lambda_s0), (alpha_s1, sigma_s1, lambda_s1) = self._lambdas(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
        r0 = h_0 / h
        # D0 = m1 (at the anchor), D1 = (m0 - m1) / r0
        D0, D1 = m1, (np.float32(1) / r0) * (m0 - m1)
        c = dpm_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, alpha_s1, sigma_s1)
        return dpm_update(c, sample, D0, D1, noise=noise, midpoint=self.config.solver_type == "midpoint")

    def singlestep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Third-order step from the anchor s2 = t_{i-2} to t_{i+1}, using the model outputs at t_{i-1} and t_i."""
        sample = _sample_argument(sample, args, 2)
        (alpha_t, sigma_t, lambda_t), (_, _, lambda_s0), (_, _, lambda_s1), (alpha_s2, sigma_s2, lambda_s2) = (
            self._lambdas(1, 0, -1, -2)
        )
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        one = np.float32(1)
        # D0 = m2;  D1_0 = (m1 - m2)/r1,  D1_1 = (m0 - m2)/r0
        D1_0, D1_1 = (one / r1) * (m1 - m2), (one / r0) * (m0 - m2)
        c = dpm_coefficients(self.config.algorithm_type, h, alpha_t, sigma_t, alpha_s2, sigma_s2)
        if self.config.solver_type == "midpoint":
            # x_t = c.x x_s2 + c.d0 D0 + c.d1 D1_1
            return dpm_update(c, sample, m2, D1_1, noise=noise)
        # D1 = (r0 D1_0 - r1 D1_1)/(r0 - r1),  D2 = 2 (D1_1 - D1_0)/(r0 - r1)
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = np.float32(2) * (D1_1 - D1_0) / (r0 - r1)
        return dpm_update(c, sample, m2, D1, D2, noise=noise)

    def singlestep_dpm_solver_update(self, model_output_list, *args, sample=None, order=None, noise=None, **kwargs):
        """The update of the given ``order`` (1, 2 or 3) from the group's anchor sample."""
        sample = _sample_argument(sample, args, 2)
        if order is None:
            if len(args) <= 3:
                raise ValueError("missing `order` as a required keyword argument")
            order = args[3]
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        if order == 3:
            return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)
        raise ValueError(f"order must be 1, 2 or 3, got {order}")

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        """One singlestep DPM-Solver step; extra keyword arguments (eta…) are ignored."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        work = compute_dtype(model_output, sample)
        sample = sample.astype(work, copy=False)
        converted = self.convert_model_output(model_output.astype(work, copy=False), sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(converted.shape, generator=generator, dtype=model_output.dtype)
            noise = noise.astype(work, copy=False)

        order = self.order_list[self._step_index]
        # a group started before the history begins (set_begin_index) falls back to what is there
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample  # the anchor of this group
        with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 steps, as in the multistep solver
            prev_sample = self.singlestep_dpm_solver_update(
                self.model_outputs, sample=self.sample, order=order, noise=noise
            )
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
