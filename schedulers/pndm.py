"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") on numpy.

Matches ``diffusers.PNDMScheduler`` (0.42): Runge-Kutta warm-up (``step_prk``, 4 model calls per
step over the first 3 steps) followed by the linear multistep method (``step_plms``), or PLMS only
with ``skip_prk_steps`` (the Stable Diffusion default); prediction types epsilon and v_prediction;
the three timestep spacings; same ``timesteps`` (int64, with the repeated warm-up timesteps).

Limitations: no custom timesteps, no ``sample`` prediction and no beta rescaling (as diffusers).
``set_begin_index`` is accepted for the pipelines' uniform loop but, as in diffusers (which lacks
it), the multistep history always starts at the first ``step`` call. float16 inputs are computed in
float32 and returned in their dtype.
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_to_config
from .numerics import compute_dtype
from .options import check_option
from .schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, int_timestep, spaced_timesteps, training_schedule
from .vp import VPNoiseMixin

# Adams-Bashforth coefficients of the linear multistep update, newest model output first,
# by the number of outputs in the history: e' = sum(c_i * e_i) / d.
PLMS_COEFFICIENTS = {
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
}


class PNDMScheduler(VPNoiseMixin):
    """Pseudo numerical methods: Runge-Kutta warm-up then 4th-order linear multistep on the DDIM transfer."""

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
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        name = type(self).__name__
        check_option(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_option(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, BETA_SCHEDULES, name
        )
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        # PNDM uses a 4th-order Runge-Kutta warm-up and a 4th-order multistep method
        self.pndm_order = 4
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Compute ``prk_timesteps``, ``plms_timesteps`` and their concatenation ``timesteps`` (int64)."""
        self.num_inference_steps = num_inference_steps
        T = self.config.num_train_timesteps
        ascending = spaced_timesteps(
            num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset, owner=type(self).__name__
        )[::-1]
        self._timesteps = ascending.astype(np.int64)

        if self.config.skip_prk_steps:
            # PLMS only: the second-to-last value is repeated (its first use is the Euler-like warm-up)
            self.prk_timesteps = np.array([], dtype=np.int64)
            t = self._timesteps
            self.plms_timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy()
        else:
            if len(self._timesteps) < self.pndm_order:
                raise ValueError(
                    f"{type(self).__name__}: the Runge-Kutta warm-up needs num_inference_steps >= {self.pndm_order} "
                    f"(got {num_inference_steps}); use more steps or skip_prk_steps=True"
                )
            # Runge-Kutta on the last 4 (highest) timesteps, each visited at t, t - dt/2 (twice) and t - dt
            half_step = T // num_inference_steps // 2
            prk = np.array(self._timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, half_step]), self.pndm_order
            )
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()

        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.ets = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, *args, **kwargs):
        """PNDM needs no input scaling: returns ``sample``."""
        return sample

    def step(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        """Dispatch to ``step_prk`` during the warm-up and ``step_plms`` after it; extra kwargs are ignored."""
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output=model_output, timestep=timestep, sample=sample, return_dict=return_dict)
        return self.step_plms(model_output=model_output, timestep=timestep, sample=sample, return_dict=return_dict)

    def _prepare(self, model_output, sample):
        self._check_ready()
        model_output, sample = np.asarray(model_output), np.asarray(sample)
        work = compute_dtype(model_output, sample)
        return model_output.astype(work, copy=False), sample.astype(work, copy=False), sample.dtype

    def _advance(self, timestep, prev_sample, out_dtype, return_dict):
        self.counter += 1
        self._count_step(timestep)
        prev_sample = prev_sample.astype(out_dtype, copy=False)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_prk(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        """Runge-Kutta warm-up step: accumulates e = (e1 + 2 e2 + 2 e3 + e4) / 6 over four calls."""
        model_output, sample, out_dtype = self._prepare(model_output, sample)
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        given_timestep = timestep
        prev_timestep = int_timestep(timestep) - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]

        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        # every evaluation restarts from the sample at the beginning of the RK step
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        return self._advance(given_timestep, prev_sample, out_dtype, return_dict)

    def step_plms(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        """Linear multistep step using the last four model outputs (fewer at the start)."""
        model_output, sample, out_dtype = self._prepare(model_output, sample)
        given_timestep = timestep
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{type(self).__name__}.step_plms can only run after 12 step_prk iterations "
                "(or set skip_prk_steps=True)"
            )
        step_size = self.config.num_train_timesteps // self.num_inference_steps
        timestep = int_timestep(timestep)
        prev_timestep = timestep - step_size

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # second call of the skip_prk warm-up: evaluate again at the same timestep pair
            prev_timestep = timestep
            timestep = timestep + step_size

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            # Heun-like correction of the first step: e' = (e_new + e_0) / 2 from the saved sample
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) in PLMS_COEFFICIENTS:
            coefficients, denominator = PLMS_COEFFICIENTS[len(self.ets)]
            model_output = _combine(coefficients, self.ets[::-1]) / denominator
        else:
            # e' = (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24
            model_output = (1 / 24) * _combine((55, -59, 37, -9), self.ets[::-1])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        return self._advance(given_timestep, prev_sample, out_dtype, return_dict)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        # Transfer part of PNDM, eq. (9) of the paper:
        # x_{t-d} = sqrt(a_{t-d}/a_t) x_t - (a_{t-d} - a_t) e / (a_t sqrt(1 - a_{t-d}) + sqrt(a_t (1 - a_t) a_{t-d}))
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            # epsilon = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t
            model_output = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        model_output_denom_coeff = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        )
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff


def _combine(coefficients, values):
    # sum_i c_i * v_i, evaluated left to right (the order diffusers uses, for identical rounding)
    total = coefficients[0] * values[0]
    for c, v in zip(coefficients[1:], values[1:]):
        total = total + c * v if c > 0 else total - (-c) * v
    return total
