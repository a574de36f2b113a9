"""Linear multistep sampler in sigma space (k-diffusion ``sample_lms``) on numpy.

Matches ``diffusers.LMSDiscreteScheduler`` (0.42): ``set_timesteps(num_inference_steps, device)``;
``step(model_output, timestep, sample, order=4, return_dict)`` combining the last ``order``
derivatives with Adams-Bashforth-like weights; prediction types epsilon, v_prediction and sample;
the three timestep spacings with ``steps_offset``; karras, exponential and beta sigmas.
``timesteps`` and ``sigmas`` are float32 (final sigma 0 appended), as in diffusers.

The weights are integrals of Lagrange basis polynomials over one step. diffusers integrates them
numerically with ``scipy.integrate.quad`` (evaluating the polynomial in float32); sdort integrates the
polynomial exactly in float64 (scipy is not a dependency). The two agree to ~3e-7 relative; given the
same weights the steps are bit-identical. The last order-4 step of a long karras/exponential schedule
has weights in the tens with alternating signs, which magnifies that difference (up to ~2e-5 of the
sample with a model whose derivative grows as 1/sigma).

Limitations: no custom ``timesteps``/``sigmas`` and no zero-terminal-SNR rescaling (diffusers' class has
none either). As in diffusers, karras sigmas ignore ``sigma_min``/``sigma_max`` from a converted config
while exponential and beta sigmas use them. The sample is computed in float32 (float64 stays float64)
and returned in ``model_output``'s dtype; float16 inputs are upcast first, where torch computes in float16.
Schedule values computed by torch with float32 sqrt can differ from sdort's (correctly rounded) ones
by one float32 ulp.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .k_diffusion import SigmaSchedulerMixin, to_d, to_denoised, working_arrays
from .numerics import linear_combination
from .options import check_option
from .schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    chosen_sigma_schedule,
    discrete_sigma_schedule,
    training_schedule,
)

LMSDiscreteSchedulerOutput = SchedulerOutput


def lagrange_basis_integral(nodes, j: int, a: float, b: float) -> float:
    """Integral from a to b of the Lagrange basis polynomial of ``nodes[j]``, exactly (float64).

    l_j(tau) = prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]); the polynomial is expanded around
    ``a`` (u = tau - a), integrated term by term and evaluated at u = b - a.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    others = np.delete(nodes, j)
    denominator = np.prod(nodes[j] - others)
    coefficients = np.atleast_1d(np.poly(others - a)) / denominator  # of u, highest power first
    antiderivative = np.polyint(coefficients)  # zero at u = 0
    return float(np.polyval(antiderivative, b - a))


class LMSDiscreteScheduler(SigmaSchedulerMixin):
    """Linear multistep: x_{i+1} = x_i + sum_j c_{ij} d_{i-j}, d = (x - D(x; sigma)) / sigma."""

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
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        name = type(self).__name__
        chosen_sigma_schedule(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, name)
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name
        )
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None)
        self.derivatives = []
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Compute ``timesteps`` (float32) and ``sigmas`` (float32, 0 appended); forget past derivatives."""
        cfg = self.config
        name = type(self).__name__
        self.num_inference_steps = num_inference_steps
        schedule = chosen_sigma_schedule(cfg.use_karras_sigmas, cfg.use_exponential_sigmas, cfg.use_beta_sigmas, name)
        # diffusers' LMS takes sigma_min/sigma_max (present only in a config converted from another class)
        # for exponential and beta sigmas, but not for karras sigmas.
        bounds = (None, None) if schedule == "karras" else (cfg.get("sigma_min"), cfg.get("sigma_max"))
        timesteps, sigmas, _ = discrete_sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            cfg.num_train_timesteps,
            cfg.timestep_spacing,
            cfg.steps_offset,
            sigma_schedule=schedule,
            sigma_min=bounds[0],
            sigma_max=bounds[1],
            owner=name,
        )
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Weight of the derivative ``current_order`` steps back in the order-``order`` update at step ``t``.

        c = integral_{sigma_t}^{sigma_{t+1}} prod_{k != j} (tau - sigma_{t-k}) / (sigma_{t-j} - sigma_{t-k}) dtau,
        j = current_order
        """
        nodes = [self.sigmas[t - k] for k in range(order)]
        return lagrange_basis_integral(nodes, current_order, self.sigmas[t], self.sigmas[t + 1])

    def step(
        self,
        model_output,
        timestep,
        sample,
        order: int = 4,
        return_dict: bool = True,
        generator=None,
        **kwargs,
    ):
        """One LMS step of order min(step + 1, ``order``); extra keyword arguments (eta, generator…) are ignored."""
        self._begin_step(timestep, warn_unscaled=True)
        output, sample, out_dtype = working_arrays(model_output, sample)
        sigma = self.sigmas[self._step_index]

        # d_i = (x_i - D(x_i; sigma_i)) / sigma_i, the last `order` of them kept
        pred_original_sample = to_denoised(self.config.prediction_type, output, sample, sigma)
        derivative = to_d(sample, sigma, pred_original_sample)
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # x_{i+1} = x_i + sum_j c_j d_{i-j}; a schedule started part-way has fewer derivatives than
        # coefficients, and (as in diffusers) only the first ones are used.
        order = min(self._step_index + 1, order)
        weights = [derivative.dtype.type(self.get_lms_coefficient(order, self._step_index, j)) for j in range(order)]
        update = linear_combination(*zip(weights, reversed(self.derivatives)))
        prev_sample = (sample + update).astype(out_dtype, copy=False)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return LMSDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
