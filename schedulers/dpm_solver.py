"""DPM-Solver's coefficient table and option checks, shared by the multistep and singlestep schedulers
(Lu et al. 2022, arXiv 2206.00927 and 2211.01095)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from .numerics import exp_f32, linear_combination, sqrt_f32
from .options import UnsupportedOptionError, check_option

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


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
