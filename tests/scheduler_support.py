"""Helpers shared by the step-by-step scheduler comparisons with diffusers.

What may differ, and by how much
--------------------------------
sdort computes in numpy; diffusers computes its schedules partly in numpy and partly with torch, and its
steps with torch. Three kinds of arithmetic meet in a comparison:

* numpy on both sides (diffusers builds many schedules in numpy before converting to torch): the same
  formula on the same inputs gives the same bits on any CPU, so those results are compared for equality.
* torch's +, -, *, / (and sdort's numpy equivalents) are IEEE operations, correctly rounded on every CPU:
  the same bits again, given the same inputs.
* torch's float32 sqrt, log, exp and pow on the CPU are vector-math library routines (MKL's in the CPU
  wheels, as far as can be seen: torch's own ATEN_CPU_CAPABILITY does not change them), whose code path
  the library picks by CPU. They are faithfully rounded (within one ulp of the exact value) but not always
  correctly rounded; numpy's sqrt is, and sdort takes log and exp in float64 and rounds once. On an AVX2
  AMD EPYC (torch 2.13) torch's float32 sqrt misses the correctly rounded value for 17% of inputs and its
  log for 3%, by one ulp (``TORCH_KERNEL_ULPS``); on the Intel CPU the tests were first tuned on, exact
  comparisons of values taken through them passed, so there they were correctly rounded for these inputs.
  A value diffusers takes through one of these functions may therefore differ from sdort's by an ulp,
  which ulp depending on the CPU, and a comparison of anything computed from it is bounded by what that
  ulp moves the compared value: the bounds below, each derived at first order from the formula that
  computes the value (rounding errors are at most ``U`` relative per operation and per side, so two
  evaluations of one formula on inputs within the bound differ by at most the propagated input difference
  plus ``2U`` per operation).

numpy's own float32 log and exp are SIMD polynomials (not correctly rounded either: 3 and 2 ulps from the
correctly rounded value here), but where both sides call them they agree to the bit.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

U = 2.0**-24  # float32 unit roundoff: a correctly rounded result is within U relative (an ulp is <= 2U |x|)
TORCH_KERNEL_ULPS = 1  # torch's float32 sqrt/log/exp/pow: within this many ulps of the exact value


class TorchDraws:
    """An sdort generator (``randn(shape, dtype)``) replaying the draws of a seeded torch.Generator,
    so that both schedulers see identical noise; `shapes` records what was drawn."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.shapes = []

    def randn(self, shape, dtype=np.float32):
        self.shapes.append(tuple(shape))
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).numpy().astype(dtype)


def accepted(fn, kwargs: dict) -> dict:
    """The subset of `kwargs` that `fn` takes (diffusers' schedulers differ in their step arguments)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


# ----------------------------------------------------------------------------------------- comparisons
def as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def ulp(x) -> np.ndarray:
    """One float32 ulp at |x| (float64)."""
    return np.spacing(np.abs(np.asarray(x, dtype=np.float64)).astype(np.float32)).astype(np.float64)


def assert_within(ours, ref, tol, what: str):
    """|ours - ref| <= tol elementwise (``tol`` an array or a scalar); nan and inf in the same places.

    An infinite tolerance marks an element the reference's rounding has left without a correct bit (its value,
    nan included, says nothing): it is not compared.
    """
    ref = as_numpy(ref).astype(np.float64)
    ours = np.asarray(ours).astype(np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), ref.shape)
    compared = ~np.isposinf(tol)
    ours, ref, tol = ours[compared], ref[compared], tol[compared]
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), finite, err_msg=what)
    np.testing.assert_array_equal(ours[~finite], ref[~finite], err_msg=what)
    tol = tol[finite]
    err = np.abs(ours[finite] - ref[finite])
    if err.size and not (err <= tol).all():
        i = int(np.argmax(err - tol))
        raise AssertionError(
            f"{what}: |difference| {err[i]:.3g} > bound {tol[i]:.3g} at finite element {i} "
            f"(ours {ours[finite][i]!r}, reference {ref[finite][i]!r}); {int((err > tol).sum())} beyond the bound"
        )


def assert_ulps(ours, ref, maxulp: float, what: str):
    """float32 arrays equal up to ``maxulp`` ulps of the reference (same dtype, shape and nan places)."""
    ref_array = as_numpy(ref)
    ours = np.asarray(ours)
    assert ours.dtype == ref_array.dtype == np.float32, f"{what}: dtype {ours.dtype} vs {ref_array.dtype}"
    assert_within(ours, ref_array, maxulp * ulp(ref_array), what)


# ----------------------------------------------------------------------------------------- schedule bounds
def log_sigma_uncertainty(log_sigma) -> np.ndarray:
    """How far apart two float32 logs of sigmas within one ulp of each other can be.

    One ulp of sigma (2U relative) moves its log by 2U; numpy's float32 log of two inputs an ulp apart adds
    at most two ulps of max(|log sigma|, 1) to that difference (measured: 1.7 ulps on 4e6 inputs).
    """
    return 2 * U + 2 * ulp(np.maximum(np.abs(log_sigma), 1.0))


def sigma_to_t_tolerance(t, log_sigmas, dlog) -> np.ndarray:
    """Bound on |t - t'| for two evaluations of diffusers' ``_sigma_to_t`` (t = k + w, w = (L_k - l) / (L_k - L_k+1)).

    ``dlog`` bounds the difference of the two log sigmas l located (scalar or per element); the training log
    sigmas L may differ by ``log_sigma_uncertainty``. At first order w moves by
    (|dl| + (1 - w)|dL_k| + w|dL_k+1|) / (L_k - L_k+1): the log-sigma gap of the training step divides every
    difference. The gap is taken as the smallest of steps k - 1, k, k + 1 (t may sit on either side of an
    integer); clipping w to [0, 1] only shrinks differences. Two ulps of t cover each side's final rounding.
    """
    t = np.asarray(t, dtype=np.float64)
    log_sigmas = np.asarray(log_sigmas, dtype=np.float64)
    gaps = np.abs(np.diff(log_sigmas))
    k = np.clip(np.floor(t).astype(np.int64), 0, len(gaps) - 1)
    gap = np.minimum.reduce([gaps[np.clip(k + d, 0, len(gaps) - 1)] for d in (-1, 0, 1)])
    dL = log_sigma_uncertainty(np.maximum(np.abs(log_sigmas[k]), np.abs(log_sigmas[k + 1])))
    return (np.asarray(dlog, dtype=np.float64) + dL) / gap + 2 * ulp(t)


def textbook_ancestral_rtols(sigma, sigma_next):
    """Relative error bounds of diffusers' float32 ancestral sigmas against their exact values.

    sigma_up = sqrt(arg), arg = s'^2 (s^2 - s'^2) / s^2: the squares' roundings weighted by
    (s^2 + s'^2) / (s^2 - s'^2), five more roundings (U each), halved by torch's square root, which adds an ulp
    (2U). sigma_down = sqrt(s'^2 - sigma_up^2): the errors of s'^2 and sigma_up^2 divided by
    sigma_down^2 = s'^4 / s^2 (the cancellation: (s / s')^2 times), halved by the root, plus its ulp.
    Returns (sigma_up's, sigma_down's); sigma_down's reaches 1 where diffusers' value has no correct bit left.
    """
    s = np.asarray(sigma, dtype=np.float64)
    sn = np.asarray(sigma_next, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq, sqn = s * s, sn * sn
        up2, down2 = sqn * (sq - sqn) / sq, sqn * sqn / sq
        rel_up = 0.5 * U * ((sq + sqn) / (sq - sqn) + 5) + 2 * U
        rel_down = 0.5 * ((U * sqn + (2 * rel_up + U) * up2) / down2 + U) + 2 * U
    return rel_up, rel_down


def integer_timestep_tolerance(unrounded, tol, mode: str) -> np.ndarray:
    """Tolerance of integer timesteps made from fractional ones (``mode``: "round", or "trunc" for astype(int64)).

    0 (equal) where every value within ``tol`` of ``unrounded`` gives the same integer, 1 where the rounding
    boundary (a half-integer, or an integer) lies within ``tol``: a claim of equality that holds on any CPU.
    """
    frac = np.asarray(unrounded, dtype=np.float64) % 1.0
    distance = np.abs(frac - 0.5) if mode == "round" else np.minimum(frac, 1.0 - frac)
    return np.where(distance <= tol, 1.0, 0.0)


def zero_snr_rtols(betas):
    """Relative bounds on the difference of two float32 evaluations of zero-terminal-SNR schedules.

    Lin et al.'s Algorithm 1 as diffusers computes it: a = sqrt(cumprod(1 - betas)) (torch: within an ulp),
    a' = (a - a_T) * a_0 / (a_0 - a_T), alpha_bar = a'^2, alpha_i = alpha_bar_i / alpha_bar_{i-1} (returned as
    betas = 1 - alpha), then the scheduler's cumprod of the alphas. Per element, first order, both sides'
    roundings counted (2U each):

    * a_i: an ulp (2U, torch's sqrt); a_i - a_T: 2U (a_i + a_T) / (a_i - a_T) + 2U (the shift cancels near the
      end of the schedule); the scale a_0 / (a_0 - a_T): likewise at i = 0, plus 2U for a_0 and 2U for the
      quotient; a' = (a_i - a_T) * scale: the sum of the two, plus 2U;
    * alpha_bar = a'^2: twice that, plus 2U;
    * the ratio alpha_i: alpha_bar_i's and alpha_bar_{i-1}'s, plus its rounding e_i (2U; and where alpha < 1/2,
      2U / alpha for the rounding of 1 - alpha);
    * alphas_cumprod: the product of the ratios telescopes, cumprod_t = alpha_bar_t * prod_{i<=t} (1 + e_i), so
      its difference is alpha_bar_t's plus the sum of the ratios' roundings up to t (the worst case, which
      grows along t), plus 2U for rounding the float64 cumprod.

    Returns (alpha ratios' bound, alphas_cumprod's bound), one per training step.
    """
    ac0 = np.cumprod(1 - np.asarray(betas, dtype=np.float64))
    a = np.sqrt(ac0)
    a_0, a_T = a[0], a[-1]
    last = a == a_T  # a_T - a_T: alpha_bar_T, alpha_T and alphas_cumprod_T are exactly 0 on both sides
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = 2 * U * (a + a_T) / (a - a_T) + 2 * U
        scale = 2 * U * (a_0 + a_T) / (a_0 - a_T) + 6 * U
        rel_alpha_bar = 2 * (shift + scale + 2 * U) + 2 * U
        alpha_bar = ((a - a_T) * (a_0 / (a_0 - a_T))) ** 2
        ratios = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
        rounding = 2 * U + np.where(ratios < 0.5, 2 * U / ratios, 0.0)
    ratio_rtol = rel_alpha_bar + np.concatenate([[0.0], rel_alpha_bar[:-1]]) + rounding
    cumprod_rtol = rel_alpha_bar + np.cumsum(np.where(last, 0.0, rounding)) + 2 * U
    return np.where(last, 0.0, ratio_rtol), np.where(last, 0.0, cumprod_rtol)


def sigma_rtol_from_alphas_cumprod(alphas_cumprod, ac_rtol) -> np.ndarray:
    """Relative bound on sigma = sqrt((1 - ac) / ac) (torch's sqrt: an ulp) given ``ac_rtol`` on alphas_cumprod.

    d sigma / sigma = -(d ac / ac) / (2 (1 - ac)): near ac = 1 (the low-noise end) the difference 1 - ac
    multiplies the relative error of ac by 1 / (2 (1 - ac)). Plus the roundings of 1 - ac, the quotient and
    the square root (torch's: an ulp).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * ac_rtol / np.maximum(1 - ac, 1e-300) + 2 * U + 2 * U * TORCH_KERNEL_ULPS + 2 * U


# ----------------------------------------------------------------------------------------- the lockstep runs
RTOL = 1e-5  # a step's samples agree within 1e-5 of the largest magnitude it computes with


def assert_close(ours, ref, what: str, scale: float = 1.0, *, same_dtype: bool = False, nonfinite_alike: bool = True):
    """max |ours - ref| <= RTOL * max(1, max |ref|, scale): 1e-5 relative to the largest magnitude of the step.

    Same shape always, same dtype with ``same_dtype``. With ``nonfinite_alike`` (degenerate schedules, diffusers'
    fixed_large_log, which takes the sqrt of a log) a nan or inf in the reference must be the same value in the same
    place in sdort's and only the finite ones are compared; without it every element is (a nan fails).
    """
    ref = as_numpy(ref)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    if same_dtype:
        assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    ours = ours.astype(np.float64)
    if nonfinite_alike:
        finite = np.isfinite(ref)
        np.testing.assert_array_equal(np.isfinite(ours), finite, err_msg=what)
        np.testing.assert_array_equal(ours[~finite], ref[~finite], err_msg=what)
        ours, ref = ours[finite], ref[finite]
        if ref.size == 0:
            return
    scale = max(1.0, float(np.abs(ref).max()), scale)
    err = float(np.abs(ours - ref).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def assert_schedule_within(ours, ref, timestep_tol, sigma_tol, name: str):
    """timesteps (same dtype) and, where diffusers keeps them, float32 sigmas: equal where the tolerance is None,
    else within it (``assert_within``)."""
    ref_timesteps = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_timesteps.dtype
    if timestep_tol is None:
        np.testing.assert_array_equal(ours.timesteps, ref_timesteps)
    else:
        assert_within(ours.timesteps, ref_timesteps, timestep_tol, f"{name} timesteps")
    if hasattr(ref, "sigmas"):
        ref_sigmas = ref.sigmas.numpy()
        assert ours.sigmas.dtype == ref_sigmas.dtype == np.float32
        if sigma_tol is None:
            np.testing.assert_array_equal(ours.sigmas, ref_sigmas)
        else:
            assert_within(ours.sigmas, ref_sigmas, sigma_tol, f"{name} sigmas")


def compare_add_noise(ours, ref, x0, noise, begin: int, what: str, close=assert_close) -> np.ndarray:
    """Both schedulers noise ``x0`` to their timestep at ``begin`` (repeated per batch item), as image-to-image
    pipelines start; the float32 results are compared with ``close``. Returns sdort's."""
    t_ours = np.repeat(ours.timesteps[begin : begin + 1], x0.shape[0])
    t_ref = ref.timesteps[begin : begin + 1].repeat(x0.shape[0])
    x_ours = ours.add_noise(x0, noise, t_ours)
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_ref)
    assert x_ours.dtype == np.float32
    close(x_ours, x_ref, what)
    return x_ours


def step_arguments(ref, step_kwargs, seed: int, eta_to_reference: bool = False):
    """(diffusers' step kwargs, sdort's step kwargs, torch generator, replaying generator) for a lockstep run.

    Both draw noise from generators seeded ``seed + 1`` alike. sdort gets what the pipelines pass to every
    scheduler, eta = 0 unless given (extra arguments must be accepted); diffusers gets the kwargs its step takes,
    eta = 0 included with ``eta_to_reference`` (its pipelines pass eta only where step takes it).
    """
    step_kwargs = dict(step_kwargs or {})
    if eta_to_reference:
        step_kwargs = {"eta": 0.0, **step_kwargs}
    gen_ref, gen_ours = torch.Generator().manual_seed(seed + 1), TorchDraws(seed + 1)
    ref_kwargs = accepted(ref.step, {**step_kwargs, "generator": gen_ref})
    our_kwargs = {"eta": 0.0, **step_kwargs, "generator": gen_ours}
    return ref_kwargs, our_kwargs, gen_ref, gen_ours
