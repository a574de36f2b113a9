"""The exponential-integrator solvers' family (DPM-Solver multistep and singlestep, UniPC, DEIS).

``LogSNRSolverMixin`` holds what diffusers copies between those classes: the VP schedule in log-SNR
lambda = log(alpha_t) - log(sigma_t), the choice of sigma schedule (``schedule.converted_sigmas``),
model-output conversion, the step lookup and add_noise (``k_diffusion.SigmaNoiseMixin`` with VP coefficients).
"""

from __future__ import annotations

import numpy as np

from .base import KARRAS_COMPATIBLES
from .k_diffusion import SigmaNoiseMixin
from .numerics import log_f32
from .schedule import (
    BETA_SCHEDULES,
    SIGMA_SCHEDULES,
    beta_sigmas,
    configured_sigma_schedule,
    converted_sigmas,
    exponential_sigmas,
    flow_sigmas,
    interp_sigmas,
    karras_sigmas,
    lu_lambdas,
    sigma_range,
    sigma_to_alpha_sigma_t,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    training_schedule,
)

SOLVER_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _sample_argument(sample, args, position: int, what: str = "sample"):
    # diffusers' update methods still accept their old positional (timestep, prev_timestep, sample) form
    if sample is None:
        if len(args) > position:
            return args[position]
        raise ValueError(f"missing `{what}` as a required keyword argument")
    return sample


class LogSNRSolverMixin(SigmaNoiseMixin):
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

    def _apply_mu(self, mu) -> None:
        # dynamic shifting: flow_shift = e^mu
        cfg = self.config
        if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
            raise ValueError("set_timesteps: `mu` needs use_dynamic_shifting=True")
        self.register_to_config(flow_shift=float(np.exp(mu)))

    def _solver_sigmas(self, timesteps, num_inference_steps, precedence=SIGMA_SCHEDULES, round_karras=True):
        """(sigmas, timesteps, schedule) before the final sigma: a karras / lu / exponential / beta schedule (the
        first set, in ``precedence``), flow-matching sigmas, or the training sigmas interpolated at ``timesteps``."""
        cfg = self.config
        sigmas = self._train_sigmas()
        log_sigmas = np.log(sigmas)
        schedule = configured_sigma_schedule(cfg, precedence)
        if schedule is not None:
            sigmas, timesteps = converted_sigmas(
                schedule, np.flip(sigmas), num_inference_steps, log_sigmas, cfg.get("sigma_min"), cfg.get("sigma_max"),
                round_karras,
            )
        elif cfg.use_flow_sigmas:
            schedule = "flow"
            sigmas = flow_sigmas(num_inference_steps, cfg.num_train_timesteps, cfg.flow_shift)
            timesteps = sigmas * cfg.num_train_timesteps
        else:
            sigmas = interp_sigmas(timesteps, sigmas)
        return sigmas, timesteps, schedule

    def _reset_history(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _set_schedule(self, sigmas, timesteps) -> None:
        """Keep ``sigmas`` (final sigma included) as float32 and ``timesteps`` as int64; restart the history."""
        self.sigmas = np.asarray(sigmas).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._step_index = None
        self._begin_index = None

    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) for a k-diffusion sigma (or a flow-matching sigma with use_flow_sigmas)."""
        return sigma_to_alpha_sigma_t(sigma, flow=bool(self.config.get("use_flow_sigmas", False)))

    def _noise_scales(self, sigma):
        # add_noise: x_t = alpha_t x_0 + sigma_t noise
        return self._sigma_to_alpha_sigma_t(sigma)

    def _coefficients(self, index: int):
        """(alpha, sigma, lambda) at ``self.sigmas[index]`` as float32 scalars."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        with np.errstate(divide="ignore"):
            # sigma = 0 at the end of the schedule gives lambda = +inf, as in diffusers
            lam = log_f32(alpha) - log_f32(sigma)
        return np.float32(alpha), np.float32(sigma), np.float32(lam)

    def _lambdas(self, *offsets):
        # (alpha, sigma, lambda) at step_index + offset for each offset
        return [self._coefficients(self._step_index + k) for k in offsets]

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

    # ------------------------------------------------------------------ step counter
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
