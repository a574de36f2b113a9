"""Schedule maths shared by the schedulers, as pure numpy functions.

Every function reproduces the arithmetic of diffusers 0.42 (which computes these arrays with
torch in float32, or with numpy in float64 where it drops to numpy), so that schedules agree
to the last bit or within one float32 rounding:

* betas and alphas from the config (``training_schedule``), with torch's float32 linspace and cumprod
  (``numerics.linspace_f32``, ``numerics.cumprod_f32``);
* timestep spacings (``spaced_timesteps``, ``solver_timesteps``);
* sigma schedules (karras, exponential, beta, lu) and ``sigma_to_t`` work in float64 like diffusers;
  callers cast to float32 where diffusers does. Which schedule a config asks for and the sigmas and
  timesteps it gives are chosen in one place: ``configured_sigma_schedule`` and ``converted_sigmas``
  (``discrete_sigma_schedule`` for the k-diffusion discrete schedulers); ``final_sigma`` is the sigma
  appended after the last step. ``beta_distribution.beta_ppf`` replaces ``scipy.stats.beta.ppf``.
* the exception: ``ancestral_sigmas`` evaluates the ancestral step's sigmas without the cancellation of
  diffusers' formula, so they are within an ulp of the exact values where diffusers' float32 ones carry
  (sigma / sigma_next)^2 ulps of rounding noise.

Names follow the reference: alpha_bar (``alphas_cumprod``), beta, sigma = sqrt((1-alpha_bar)/alpha_bar).
"""

from __future__ import annotations

import math

import numpy as np

from .beta_distribution import beta_ppf
from .numerics import cumprod_f32, linspace_f32
from .options import UnsupportedOptionError, check_option

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# ---------------------------------------------------------------------------- betas and alphas
def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"):
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) for a continuous alpha_bar(t), in float32."""
    if alpha_transform_type == "cosine":
        # alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2   (Nichol & Dhariwal "squaredcos_cap_v2")
        def alpha_bar_fn(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "laplace":
        # lmb = -0.5 * sign(0.5 - t) * log(1 - 2|0.5 - t| + 1e-6);  alpha_bar = sqrt(snr / (1 + snr)), snr = exp(lmb)
        def alpha_bar_fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    elif alpha_transform_type == "exp":
        # alpha_bar(t) = exp(-12 t)
        def alpha_bar_fn(t):
            return math.exp(t * -12.0)

    else:
        check_option("betas_for_alpha_bar", "alpha_transform_type", alpha_transform_type, ("cosine", "laplace", "exp"))

    betas = [
        min(1 - alpha_bar_fn((i + 1) / num_diffusion_timesteps) / alpha_bar_fn(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    supported=BETA_SCHEDULES,
    owner: str = "scheduler",
) -> np.ndarray:
    """The training betas (float32) from the config; ``supported`` lists the schedules the class accepts."""
    if trained_betas is not None:
        return np.array(trained_betas, dtype=np.float32)
    check_option(owner, "beta_schedule", beta_schedule, supported)
    if beta_schedule == "linear":
        return linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        # betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2   (Stable Diffusion)
        return np.square(linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps))
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    if beta_schedule == "sigmoid":
        # betas = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start   (GeoDiff)
        x = linspace_f32(-6, 6, num_train_timesteps)
        sig = (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
        return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise AssertionError(beta_schedule)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Rescale betas so that alpha_bar_T = 0 (zero terminal SNR, Lin et al. 2023, Algorithm 1), in float32."""
    betas = np.asarray(betas, dtype=np.float32)
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1) - betas))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    # shift so the last value is 0, scale so the first is unchanged
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = np.square(alphas_bar_sqrt)
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # revert the cumprod
    return (np.float32(1) - alphas).astype(np.float32)


def alphas_from_betas(betas):
    """(alphas, alphas_cumprod) = (1 - beta, prod_{s<=t} alpha_s), float32."""
    alphas = (np.float32(1) - np.asarray(betas, dtype=np.float32)).astype(np.float32)
    return alphas, cumprod_f32(alphas)


def training_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas=None,
                      supported=BETA_SCHEDULES, owner: str = "scheduler", rescale_zero_snr: bool = False):
    """(betas, alphas, alphas_cumprod) of the training noise schedule, as diffusers' schedulers build
    them when created: the betas (or `trained_betas`), rescaled to zero terminal SNR if asked, then
    alpha = 1 - beta and alpha_bar, its running product; float32."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, supported, owner)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas, alphas_cumprod = alphas_from_betas(betas)
    return betas, alphas, alphas_cumprod


# ---------------------------------------------------------------------------- timesteps
def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    round_linspace: bool = True,
    owner: str = "scheduler",
) -> np.ndarray:
    """The inference timesteps, descending, as float64 (callers cast to int64 or float32).

    linspace: linspace(0, T-1, n) (rounded unless ``round_linspace`` is False);
    leading:  arange(n) * (T // n) + steps_offset;
    trailing: round(arange(T, 0, -T/n)) - 1  (Lin et al. 2023, table 2).
    """
    check_option(owner, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n)
        if round_linspace:
            timesteps = timesteps.round()
        return timesteps[::-1].copy()
    if timestep_spacing == "leading":
        step_ratio = T // n
        return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    step_ratio = T / n
    return np.round(np.arange(T, 0, -step_ratio)) - 1


# ---------------------------------------------------------------------------- sigmas
def sigmas_from_alphas_cumprod(alphas_cumprod) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), same dtype as the input (ascending in t)."""
    ac = np.asarray(alphas_cumprod)
    return np.sqrt((1 - ac) / ac)


def interp_sigmas(timesteps, sigmas) -> np.ndarray:
    """sigma at fractional timesteps by linear interpolation of the training sigmas (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_range(in_sigmas, sigma_min=None, sigma_max=None):
    """(sigma_min, sigma_max) as Python floats: the config's values, else the ends of descending ``in_sigmas``."""
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    return sigma_min, sigma_max


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho  (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def lu_lambdas(lambda_min: float, lambda_max: float, num_inference_steps: int) -> np.ndarray:
    """Lambdas uniform in log-SNR (Lu et al. DPM-Solver): the karras ramp with rho = 1."""
    return karras_sigmas(lambda_min, lambda_max, num_inference_steps, rho=1.0)


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """sigmas evenly spaced in log: exp(linspace(log sigma_max, log sigma_min, n))."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """sigma_i = sigma_min + ppf_{Beta(alpha, beta)}(1 - i/(n-1)) * (sigma_max - sigma_min)  ("Beta Sampling is All You Need")."""
    quantiles = 1 - np.linspace(0, 1, num_inference_steps)
    return np.array([sigma_min + beta_ppf(q, alpha, beta) * (sigma_max - sigma_min) for q in quantiles])


def sigma_to_t(sigma, log_sigmas) -> np.ndarray:
    """Fractional timestep of ``sigma`` by linear interpolation of log sigma between training steps.

    ``log_sigmas`` are the log training sigmas in ascending-t order. Same arithmetic (and dtypes) as
    diffusers' ``_sigma_to_t``, vectorised: float64 result of ``sigma``'s shape.
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # index of the last training sigma not above sigma, kept below the top so that high = low + 1 exists
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def ancestral_sigmas(sigma_from, sigma_to):
    """(sigma_up, sigma_down) of an ancestral step from ``sigma_from`` to ``sigma_to`` (k-diffusion, eta = 1).

    The noise added has variance sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 and the
    deterministic part ends at sigma_down^2 = sigma_to^2 - sigma_up^2, which is exactly sigma_to^4 / sigma_from^2.
    Evaluated in that textbook form (diffusers' float32 one), sigma_down^2 is the difference of two nearly equal
    squares: one ulp of the rounded sigma_up becomes (sigma_from / sigma_to)^2 ulps of sigma_down^2 (82 on
    Stable Diffusion's first step of three, millions with the cosine betas' first steps), so that its last bits,
    or all of them, are the noise of how the square root was rounded (a correctly rounded root can even give
    sigma_down = 0 and a nan midpoint). Here, without the cancellation:

        sigma_down = sigma_to^2 / sigma_from,
        sigma_up = sigma_to * sqrt((sigma_from - sigma_to) (sigma_from + sigma_to)) / sigma_from,

    in float64 (where the difference and the sum of two float32 sigmas are exact) and rounded once to float32:
    both within an ulp of the exact values. float32 in, float32 out (scalars stay scalars); sigma_from = 0 gives
    nan (0/0) as the textbook form does, sigma_to = 0 gives 0 and 0.
    """
    s = np.asarray(sigma_from, dtype=np.float64)
    s_next = np.asarray(sigma_to, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_down = s_next * s_next / s
        sigma_up = s_next * np.sqrt((s - s_next) * (s + s_next)) / s
    return sigma_up.astype(np.float32)[()], sigma_down.astype(np.float32)[()]


def sigma_to_alpha_sigma_t(sigma, flow: bool = False):
    """(alpha_t, sigma_t) of the VP process for a k-diffusion sigma: alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha_t.

    With ``flow`` (flow-matching sigmas): alpha_t = 1 - sigma, sigma_t = sigma.
    """
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / np.sqrt(sigma * sigma + 1)
    return alpha_t, sigma * alpha_t


# ---------------------------------------------------------------------------- dynamic thresholding
def _quantile_like_torch(x2d: np.ndarray, q: float) -> np.ndarray:
    # torch.quantile(linear): rank = q * (n - 1) in the input dtype, then lerp between the neighbours.
    n = x2d.shape[1]
    rank = x2d.dtype.type(q) * x2d.dtype.type(n - 1)
    below, above = int(math.floor(rank)), int(math.ceil(rank))
    weight = float(rank - x2d.dtype.type(below))
    part = np.partition(x2d, sorted({below, above}), axis=1)
    lo, hi = part[:, below].astype(np.float64), part[:, above].astype(np.float64)
    if weight < 0.5:
        value = lo + weight * (hi - lo)
    else:
        value = hi - (hi - lo) * (1.0 - weight)
    return value.astype(x2d.dtype)


def threshold_sample(sample, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0) -> np.ndarray:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): clip x_0 to [-s, s] and divide by s.

    s = clamp(quantile(|x_0|, ratio) per batch item, 1, sample_max_value).
    """
    sample = np.asarray(sample)
    dtype = sample.dtype
    batch_size, channels, *remaining_dims = sample.shape
    work = sample if dtype in (np.float32, np.float64) else sample.astype(np.float32)
    work = work.reshape(batch_size, channels * int(np.prod(remaining_dims)))
    s = _quantile_like_torch(np.abs(work), dynamic_thresholding_ratio)
    s = np.minimum(np.maximum(s, 1), sample_max_value).astype(work.dtype)[:, None]
    work = np.clip(work, -s, s) / s
    return work.reshape(sample.shape).astype(dtype, copy=False)


# ---------------------------------------------------------------------------- exponential-integrator solvers
# Shared by DPM-Solver (multistep and singlestep), UniPC and DEIS.
def solver_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    last_timestep: int | None = None,
    owner: str = "scheduler",
) -> np.ndarray:
    """The int64 timesteps (descending) of the multistep solvers: n + 1 points, the last (t = 0) dropped.

    linspace: round(linspace(0, last - 1, n + 1))[::-1][:-1];
    leading:  (arange(n + 1) * (last // (n + 1)))[::-1][:-1] + steps_offset;
    trailing: round(arange(last, 0, -T / n)) - 1.
    ``last_timestep`` (default T) is where ``lambda_min_clipped`` cuts the schedule.
    """
    check_option(owner, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    n, T = int(num_inference_steps), int(num_train_timesteps)
    last = T if last_timestep is None else int(last_timestep)
    if timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    step_ratio = T / n
    return np.arange(last, 0, -step_ratio).round().astype(np.int64) - 1


def flow_shift_sigmas(sigmas, shift: float) -> np.ndarray:
    """Resolution shift of flow-matching sigmas: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """Descending shifted flow-matching sigmas, float64: s = 1 - linspace(1, 1/T, n + 1), shifted, reversed, last dropped."""
    sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    return np.flip(flow_shift_sigmas(sigmas, shift))[:-1].copy()


def time_shift(mu: float, sigma: float, t, shift_type: str = "exponential"):
    """Dynamic (resolution-dependent) shifting of flow sigmas t.

    exponential: e^mu / (e^mu + (1/t - 1)^sigma);  linear: mu / (mu + (1/t - 1)^sigma).
    """
    if shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


def stretch_shift_to_terminal(t, shift_terminal: float):
    """Stretch flow sigmas so that the last one becomes ``shift_terminal``: 1 - (1 - t) / ((1 - t_last) / (1 - shift_terminal))."""
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - one_minus_z / scale_factor


# ---------------------------------------------------------------------------- k-diffusion discrete schedules
# Shared by LMS, Heun, KDPM2 and KDPM2 ancestral (discrete schedules) and by the EDM schedulers (ramps).
def chosen_sigma_schedule(
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, owner: str = "scheduler"
):
    """"karras", "exponential", "beta" or None from the three ``use_*_sigmas`` flags; more than one is refused."""
    flags = {"karras": use_karras_sigmas, "exponential": use_exponential_sigmas, "beta": use_beta_sigmas}
    chosen = [name for name, flag in flags.items() if flag]
    if len(chosen) > 1:
        raise UnsupportedOptionError(
            f"{owner}: only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used"
        )
    return chosen[0] if chosen else None


SIGMA_SCHEDULES = ("karras", "exponential", "beta")


def configured_sigma_schedule(config, precedence=SIGMA_SCHEDULES):
    """The first schedule of ``precedence`` whose flag is set in ``config``, else None.

    The flags are ``use_<name>_sigmas`` (``use_lu_lambdas`` for "lu"). diffusers' ``set_timesteps`` tests them
    in this order (DPM-Solver multistep: karras, lu, exponential, beta); that at most one of the sigma flags is
    set is checked when a scheduler is built (``chosen_sigma_schedule``).
    """
    flags = {name: "use_lu_lambdas" if name == "lu" else f"use_{name}_sigmas" for name in precedence}
    return next((name for name in precedence if config.get(flags[name])), None)


def converted_sigmas(
    schedule, in_sigmas, num_inference_steps, log_sigmas=None, sigma_min=None, sigma_max=None, round_karras=False
):
    """(sigmas, timesteps) of a karras / exponential / beta / lu schedule, float64.

    karras, exponential, beta: between ``sigma_range(in_sigmas, sigma_min, sigma_max)`` (``in_sigmas`` descending);
    lu: exp of lambdas uniform between the ends of the training ``log_sigmas`` (no config bounds, as in diffusers).
    timesteps: ``sigma_to_t(sigmas, log_sigmas)``, rounded for karras and lu with ``round_karras``; None
    without ``log_sigmas``.
    """
    check_option("scheduler", "sigma schedule", schedule, SIGMA_SCHEDULES + ("lu",))
    if schedule == "lu":
        # uniform steps in log sigma (Lu et al.): the karras ramp with rho = 1 on log sigma
        sigmas = np.exp(lu_lambdas(float(log_sigmas[0]), float(log_sigmas[-1]), num_inference_steps))
    else:
        ramp = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[schedule]
        sigmas = ramp(*sigma_range(in_sigmas, sigma_min, sigma_max), num_inference_steps)
    if log_sigmas is None:
        return sigmas, None
    timesteps = sigma_to_t(sigmas, log_sigmas)
    if round_karras and schedule in ("karras", "lu"):
        timesteps = timesteps.round()
    return sigmas, timesteps


def final_sigma(final_sigmas_type: str, alphas_cumprod):
    """The sigma appended after the last step: that of alpha_bar_0 ("sigma_min", float32) or 0 ("zero")."""
    if final_sigmas_type == "sigma_min":
        ac0 = alphas_cumprod[0]
        return np.sqrt((1 - ac0) / ac0)
    return 0


def discrete_sigma_schedule(
    alphas_cumprod,
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    timesteps=None,
    sigma_schedule=None,
    sigma_min=None,
    sigma_max=None,
    owner: str = "scheduler",
    round_karras: bool = False,
):
    """Timesteps and sigmas of diffusers' k-diffusion discrete schedulers, before the final sigma is appended.

    t: the spaced timesteps (float32), or ``timesteps`` given by the caller;
    sigma(t): linear interpolation of the training sigmas sqrt((1 - alpha_bar) / alpha_bar) (float64);
    with ``sigma_schedule`` (karras / exponential / beta between ``sigma_min`` and ``sigma_max``, by default
    the ends of sigma(t)): ``converted_sigmas`` (t float64, rounded for karras with ``round_karras``).
    Returns (timesteps, sigmas, log_sigmas) with log_sigmas the float32 log training sigmas.
    """
    if timesteps is None:
        timesteps = spaced_timesteps(
            num_inference_steps, num_train_timesteps, timestep_spacing, steps_offset, round_linspace=False, owner=owner
        ).astype(np.float32)
    else:
        timesteps = np.array(timesteps, dtype=np.float32)
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    sigmas = interp_sigmas(timesteps, train_sigmas)
    if sigma_schedule is not None:
        check_option(owner, "sigma schedule", sigma_schedule, SIGMA_SCHEDULES)
        sigmas, timesteps = converted_sigmas(
            sigma_schedule, sigmas, num_inference_steps, log_sigmas, sigma_min, sigma_max, round_karras
        )
    return timesteps, sigmas, log_sigmas


def sigma_to_t_f32(sigma, log_sigmas) -> np.ndarray:
    """``sigma_to_t`` with every operation in float32 (what diffusers computes when handed torch tensors).

    log sigma = log(max(sigma, 1e-10)); w = (low - log sigma) / (low - high) clipped to [0, 1];
    t = (1 - w) * low_idx + w * high_idx, all float32.
    """
    sigma = np.asarray(sigma, dtype=np.float32)
    log_sigmas = np.asarray(log_sigmas, dtype=np.float32)
    log_sigma = np.log(np.maximum(sigma, np.float32(1e-10))).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), np.float32(0), np.float32(1))
    t = (np.float32(1) - w) * low_idx.astype(np.float32) + w * high_idx.astype(np.float32)
    return t.reshape(sigma.shape)


def karras_sigmas_from_ramp(ramp, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """sigma = (sigma_max^(1/rho) + ramp * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in the ramp's dtype.

    The EDM schedulers' form of Karras et al. (2022) eq. 5, for a given ramp in [0, 1]. With a float32 ramp
    the sum is float32, as in torch, and the power is taken in float64 and rounded once.
    """
    ramp = np.asarray(ramp)
    dtype = ramp.dtype.type if ramp.dtype in (np.float32, np.float64) else np.float64
    ramp = ramp.astype(dtype)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    base = dtype(max_inv_rho) + ramp * dtype(min_inv_rho - max_inv_rho)
    return (base.astype(np.float64) ** rho).astype(dtype)


def exponential_sigmas_f32(sigma_min: float, sigma_max: float, num: int) -> np.ndarray:
    """EDM's exponential schedule in float32: exp(linspace_f32(log sigma_min, log sigma_max, n)), descending.

    The exp is taken in float64 and rounded once.
    """
    log_ramp = linspace_f32(math.log(sigma_min), math.log(sigma_max), num)
    return np.exp(log_ramp.astype(np.float64)).astype(np.float32)[::-1].copy()


def int_timestep(timestep) -> int:
    """A timestep given as a Python/numpy scalar or a 1-element array, as an int (discrete schedulers)."""
    return int(np.asarray(timestep).reshape(-1)[0])
