"""sdort's k-diffusion schedulers (LMS, Heun, KDPM2, KDPM2 ancestral, EDM Euler, EDM DPM-Solver++) against
diffusers, step by step.

Both run the same loop (scale_model_input, a deterministic model function, step) with the same noise
(diffusers from a torch.Generator, sdort from an object replaying a torch.Generator seeded alike, so
that a draw of another shape or at another moment would show). After every step the samples must agree
within 1e-5 relative to the largest magnitude the step computes with (``sigma_step_scales``: the sample it
starts from, up to sigma_max |noise|, and sigma |eps|, before they cancel to the result); for LMS, relative
to the largest term c_j d_j the step sums if that is larger: sdort integrates the LMS weights exactly
where diffusers' quad integrates a float32 polynomial (weights differ by up to ~3e-7), and the last
order-4 step of a long schedule multiplies that by its weights (tens, alternating in sign). Given
diffusers' weights, sdort's LMS is bit-identical.

Schedules: timesteps derived from the timestep spacing are numpy on both sides and must be equal to the
bit. Sigmas go through torch's float32 sqrt (diffusers' training sigmas) or pow/exp (EDM's ramps), within an
ulp but not always the correctly rounded value sdort computes (which ulp depends on the CPU): two ulps. What
diffusers derives from them is bounded by what those ulps move it (scheduler_support): timesteps that
sigma_to_t finds (karras, exponential, beta sigmas, KDPM2's midpoints) by sigma_to_t_tolerance, KDPM2's
midpoint and ancestral sigmas by ``kdpm2_schedule_tolerances``. The ancestral sigma_down of diffusers'
formula, sqrt(sigma_next^2 - sigma_up^2), is a cancellation that turns an ulp of torch's sigma_up into
(sigma / sigma_next)^2 ulps; sdort evaluates the same quantity without the cancellation
(``test_kdpm2_ancestral_sigmas_are_accurate``).

Steps run in lockstep: both schedulers go on from sdort's sample and step with the model output computed
from sdort's scaled input, so that each step's comparison measures that step's arithmetic, not last bits
inherited from earlier steps.

Grids cover every prediction type, timestep spacing and sigma schedule of each class; the step
counts 1, 2, 10, 25, 50 rotate over the grid (so each is paired with every value of every option), and
every grid point also runs a schedule started part-way through with set_begin_index, as image-to-image
pipelines do.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdort.schedulers.edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler  # noqa: E402
from sdort.schedulers.heun import HeunDiscreteScheduler  # noqa: E402
from sdort.schedulers.kdpm2 import (  # noqa: E402
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    double_after_first,
)
from sdort.schedulers.lms import LMSDiscreteScheduler, lagrange_basis_integral  # noqa: E402
from sdort.schedulers.schedule import sigma_to_t, sigmas_from_alphas_cumprod  # noqa: E402
from scheduler_support import (  # noqa: E402
    U,
    assert_close,
    assert_ulps,
    assert_within,
    compare_add_noise,
    integer_timestep_tolerance,
    log_sigma_uncertainty,
    sigma_to_t_tolerance,
    step_arguments,
    textbook_ancestral_rtols,
    ulp,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SHAPE = (2, 4, 6, 6)
STEPS = (1, 2, 10, 25, 50)
SPACINGS = ("linspace", "leading", "trailing")
SIGMA_SCHEDULES = (None, "karras", "exponential", "beta")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CLASSES = {
    c.__name__: c
    for c in (
        LMSDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        EDMEulerScheduler,
        EDMDPMSolverMultistepScheduler,
    )
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny tensors: threads only add overhead (and the cores are shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_fn(x: np.ndarray, t) -> np.ndarray:
    """A cheap deterministic nonlinear stand-in for the UNet."""
    t = float(np.asarray(t).reshape(-1)[0])
    return (0.7 * np.tanh(x) + 0.3 * np.sin(1.3 * x + 0.01 * t) - 0.05 * x).astype(np.float32)


_KDPM2 = (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)
SIGMA_ULPS = 2  # sigmas: torch's sqrt of the training schedule (an ulp), then interpolated and rounded


def timesteps_from_sigmas(ours) -> bool:
    """True where ``timesteps`` come from sigma_to_t (karras / exponential / beta sigmas), not from the spacing."""
    return any(ours.config.get(f"use_{k}_sigmas") for k in ("karras", "exponential", "beta"))


def train_log_sigmas(ours) -> np.ndarray:
    return np.log(sigmas_from_alphas_cumprod(ours.alphas_cumprod))


def step_timestep_tolerance(ours, timesteps) -> np.ndarray:
    """Tolerance of a discrete scheduler's step timesteps (not KDPM2's midpoints).

    From the spacing (or given): equal. From sigma_to_t: the ramp's sigmas are within an ulp of each other
    (their ends are two training sigmas, 2U), so sigma_to_t_tolerance with dlog = 2U. KDPM2 rounds its
    karras timesteps: equal, except where the unrounded value lies within that tolerance of a half-integer.
    """
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if not timesteps_from_sigmas(ours):
        return np.zeros_like(timesteps)
    log_sigmas = train_log_sigmas(ours)
    if isinstance(ours, _KDPM2) and ours.config.use_karras_sigmas:
        # the n step timesteps, in order: round(sigma_to_t(sigma_i)) (sdort's float32 sigmas stand in for the
        # float64 ramp: 2U more)
        step_sigmas = ours.sigmas[np.r_[0, 1 : 2 * ours.num_inference_steps - 1 : 2]].astype(np.float64)
        unrounded = sigma_to_t(step_sigmas, log_sigmas)
        assert np.array_equal(np.round(unrounded), timesteps)
        return integer_timestep_tolerance(unrounded, sigma_to_t_tolerance(unrounded, log_sigmas, 4 * U), "round")
    return sigma_to_t_tolerance(timesteps, log_sigmas, 2 * U)


def midpoint_rtol(a, b, rel_b, torch_kernels: bool) -> np.ndarray:
    """Relative error bound of exp(lerp(log a, log b, 1/2)) in float32 (KDPM2's midpoint sigma) against the
    exact sqrt(a b), ``b`` itself within ``rel_b`` of its exact value.

    Each float32 log is off by an ulp of the log (torch) or half of one (sdort, rounded once), b's error adds
    rel_b to its log, and the lerp halves both; lerp = log b - (log b - log a) / 2 rounds twice
    (U |log b - log a| / 2 + U |log mid|); the exp adds 2U (torch) or U (sdort).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))
        lm = 0.5 * (la + lb)
        logs = ulp(la) + ulp(lb) if torch_kernels else 0.5 * (ulp(la) + ulp(lb))
        return 0.5 * (logs + rel_b) + 0.5 * U * np.abs(lb - la) + U * np.abs(lm) + (2 * U if torch_kernels else U)


def kdpm2_schedule_tolerances(ours) -> dict:
    """Absolute tolerances of KDPM2's derived arrays against diffusers', in their interleaved layout.

    The step sigmas s agree within SIGMA_ULPS (rel_s = 4U). First-order error of each evaluation against the
    exact value (U per rounding; torch's sqrt, log and exp one ulp, 2U), summed over the two sides, plus what
    the sigmas' own difference moves the exact value:

    * ancestral sigma_up and sigma_down: diffusers' error as textbook_ancestral_rtols derives it (the
      cancellation in sigma_down), sdort's one rounding (U), and what the sigmas' difference moves the exact
      values (sigma_down = s_next^2 / s: 3 rel_s; sigma_up: (1 + 2 s_next^2 / (s^2 - s_next^2)) rel_s).
    * the midpoint exp(lerp(log a, log b, 1/2)) (a = s_i; b = sigma_down_i, or s_{i-1} without noise): the
      logs' errors (an ulp of each log for torch, half for sdort, plus b's relative error), halved by the
      lerp, the lerp's roundings (U |log b - log a| / 2 + U |log mid|), the exp (2U torch, U sdort).
    * the midpoints' timesteps: numpy's float32 log of the midpoint on both sides (log_sigma_uncertainty of
      two inputs within the midpoint's tolerance), then sigma_to_t_tolerance.
    """
    n = ours.num_inference_steps
    ancestral = isinstance(ours, KDPM2AncestralDiscreteScheduler)
    s = ours.sigmas[np.r_[0, 1 : 2 * n : 2]].astype(np.float64)  # the n + 1 step sigmas, the last 0
    rel_s = 2 * SIGMA_ULPS * U
    tol = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if ancestral:
            sn = np.append(s[1:], 0.0)
            sq, sqn = s * s, sn * sn
            rel_up, rel_down = textbook_ancestral_rtols(s, sn)
            cond_up = 1 + 2 * sqn / (sq - sqn)
            up, down = np.sqrt(sqn * (sq - sqn) / sq), sn * sn / s
            rel_up_total = rel_up + U + cond_up * rel_s
            rel_down_total = rel_down + U + 3 * rel_s
            # Where that reaches 100% diffusers' sigma_down has no correct bit: sigma_up^2 rounds to sigma_next^2
            # or above it, sigma_down is 0 or nan, and log(0) makes the midpoint sigma and timestep nan (cosine
            # betas, trailing, 10 steps, when the square root is correctly rounded: numpy's, so sdort's before it
            # left the textbook form, and torch's on CPUs whose kernel rounds that value so). Those are not
            # compared (an infinite tolerance).
            lost = (sn > 0) & (rel_down >= 1)
            tol["sigmas_up"] = np.where(sn == 0, 0.0, rel_up_total * up)
            tol["sigmas_down"] = np.where(lost, np.inf, np.where(sn == 0, 0.0, rel_down_total * down))
            b, rel_b_ref, rel_b_ours = down, np.where(lost, np.inf, rel_down + 3 * rel_s), U
            rel_in = 2 * rel_s  # sqrt(s * s_next^2 / s): half of s's and of sigma_down's
        else:
            b = np.roll(s, 1)
            rel_b_ref = rel_b_ours = 0.0
            rel_in = rel_s
        rel_mid_ref = midpoint_rtol(s, b, rel_b_ref, torch_kernels=True)
        rel_mid_ours = midpoint_rtol(s, b, rel_b_ours, torch_kernels=False)
        mid = np.sqrt(s * b)
        mid_tol = (rel_mid_ref + rel_mid_ours + rel_in) * mid
        exact_zero = (b == 0) | (s == 0)  # log 0: a midpoint of 0 (or nan) on both sides
        mid_tol = np.where(exact_zero, 0.0, mid_tol)
        if ancestral:
            mid_tol = np.where(lost, np.inf, mid_tol)
            mid_tol[-2:] = 0.0  # set to 0 on both sides
        tol["sigmas_interpol"] = mid_tol
        log_mid = np.log(np.where(mid > 0, mid, 1.0))
        dlog = np.where(mid > 0, log_sigma_uncertainty(log_mid) + mid_tol / np.where(mid > 0, mid, 1.0), 0.0)
    t_mid = sigma_to_t(np.where(np.isfinite(mid), mid, 1.0), train_log_sigmas(ours))
    t_mid_tol = np.where(np.isfinite(mid), sigma_to_t_tolerance(t_mid, train_log_sigmas(ours), dlog), 0.0)
    step_tol = step_timestep_tolerance(ours, ours.timesteps[np.r_[0, 2 : 2 * n - 1 : 2]])
    mid_part = t_mid_tol[:-2] if ancestral else t_mid_tol[1:-1]
    tol["timesteps"] = np.concatenate([step_tol[:1], np.stack([mid_part, step_tol[1:]], axis=-1).reshape(-1)])
    for name in ("sigmas_up", "sigmas_down", "sigmas_interpol"):
        if name in tol:
            tol[name] = double_after_first(tol[name])
    return tol


def assert_schedule(ours, ref, discrete: bool = True):
    """timesteps (dtype and values) and every sigma array diffusers keeps, within the bounds the module
    docstring describes (exact where both sides compute in numpy)."""
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype, (ours.timesteps.dtype, ref_t.dtype)
    kdpm2 = kdpm2_schedule_tolerances(ours) if isinstance(ours, _KDPM2) else {}
    if kdpm2:
        assert_within(ours.timesteps, ref_t, kdpm2["timesteps"], "timesteps")
    elif not discrete:
        # EDM: 0.25 log sigma (torch's log: an ulp; sdort's: rounded once); 0.25 is exact
        sigma_rel = 2 * SIGMA_ULPS * U
        with np.errstate(divide="ignore"):
            timestep_tol = 0.25 * (sigma_rel + 1.5 * ulp(np.log(ours.sigmas[: len(ref_t)].astype(np.float64))))
        assert_within(ours.timesteps, ref_t, timestep_tol, "timesteps")
    else:
        assert_within(ours.timesteps, ref_t, step_timestep_tolerance(ours, ours.timesteps), "timesteps")
    assert_ulps(ours.sigmas, ref.sigmas, SIGMA_ULPS, "sigmas")
    for name, tol in kdpm2.items():
        if name != "timesteps":
            assert_within(getattr(ours, name), getattr(ref, name), tol, name)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


def sigma_step_scales(ours, sample, model_output) -> tuple[float, float]:
    """(x_0 scale, x_next scale): the magnitudes a sigma-space step computes with, before the cancellation.

    x_0 = x - sigma eps (v-prediction and EDM: c_skip x + c_out out, terms up to |x| + |out|) and
    x_next = x + (x - x_0) / sigma * (sigma_next - sigma) (Heun's and KDPM2's corrector start again from the
    sample they stored): sums at the magnitude of x, up to sigma_max |noise|, whatever the size of the result;
    sigma is the larger of the step's two (the corrector's input sigma is the midpoint or the previous one).
    """
    i = ours.step_index if ours.step_index is not None else 0
    sigma = float(np.max(ours.sigmas[max(i - 1, 0) : i + 2]))
    x = float(np.abs(sample).max())
    stored = getattr(ours, "sample", None)
    if stored is not None:
        x = max(x, float(np.abs(stored).max()))
    out = float(np.abs(model_output).max())
    x0_scale = max(x, sigma * out) if ours.config.prediction_type == "epsilon" else x + out
    return x0_scale, max(x, x0_scale)


def lms_step_scale(ours, max_order: int = 4) -> float:
    """Largest |c_j d_j| of the LMS step just taken: the magnitude its float32 sum works at.

    At the last steps of long schedules the order-4 weights grow to tens with alternating signs, so the
    step cancels large terms and amplifies earlier float32 differences (from diffusers' float32
    integrand inside scipy's quad) by the same factor; 1e-5 relative is measured against these terms.
    """
    i = ours.step_index - 1
    order = min(i + 1, max_order)
    weights = [ours.get_lms_coefficient(order, i, j) for j in range(order)]
    return max(abs(w) * float(np.abs(d).max()) for w, d in zip(weights, reversed(ours.derivatives)))


def run_pair(ours, ref, steps=None, *, begin=0, set_begin=True, set_kwargs=None, ref_set_kwargs=None, step_kwargs=None,
             seed=0, discrete=True):
    """Set both schedulers' timesteps, compare the schedules, then run and compare the loop from ``begin``."""
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    ref.set_timesteps(**(ref_set_kwargs if ref_set_kwargs is not None else set_kwargs))
    ours.set_timesteps(**set_kwargs)
    assert_schedule(ours, ref, discrete)
    name = type(ours).__name__
    if isinstance(ours, KDPM2AncestralDiscreteScheduler):
        # diffusers' sigma_down (and with it the midpoint) carries its cancellation: (sigma / sigma_next)^2 ulps,
        # so its predictor moves by (sigma / sigma_next) ulps of the sample, hundreds on the first steps. The
        # schedules were compared above within that bound; the steps are compared on sdort's, so that they test
        # the step arithmetic.
        for array in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
            setattr(ref, array, torch.from_numpy(getattr(ours, array).copy()))

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    x_ours = start * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    if begin:
        if set_begin:
            ours.set_begin_index(begin)
            ref.set_begin_index(begin)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = compare_add_noise(ours, ref, start, noise, begin, f"{name} add_noise")

    step_kwargs = dict(step_kwargs or {})
    # sdort gets the pipeline's arguments whatever the class: extra ones must be accepted
    ref_kwargs, our_kwargs, gen_ref, gen_ours = step_arguments(ref, step_kwargs, seed)

    # lockstep (module docstring): both go on from sdort's sample, with the output of sdort's scaled input
    x_ref = torch.from_numpy(x_ours.copy())
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps[begin:], ref.timesteps[begin:])):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_close(in_ours, in_ref, f"{name} scale_model_input, step {i}")
        out_ours = model_fn(in_ours, t_ours)
        x0_scale, scale = sigma_step_scales(ours, x_ours, out_ours)
        # EDM's sigma_min schedule ends with a step of length zero in exact arithmetic (the ramp ends at sigma_min,
        # then sigma_min is appended): 0 / 0 in the heun and third-order updates (nan) where the two float32
        # sigmas, or their float32 log-SNRs, come out equal, else an update divided by the ulp they differ by.
        # Which one depends on the rounding of the ramp's pow / exp (torch's: the CPU's). Neither carries a
        # correct bit: that step's sample is not compared.
        zero_length = (isinstance(ours, EDMDPMSolverMultistepScheduler) and ours.config.final_sigmas_type == "sigma_min"
                       and i == len(ours.timesteps) - begin - 1)
        res_ours = ours.step(out_ours, t_ours, x_ours, **our_kwargs)
        res_ref = ref.step(torch.from_numpy(out_ours.copy()), t_ref, x_ref, **ref_kwargs)
        x_ours = res_ours.prev_sample
        assert isinstance(x_ours, np.ndarray) and x_ours.dtype == np.float32
        assert ours.step_index == ref.step_index
        if not zero_length:
            if isinstance(ours, LMSDiscreteScheduler):
                scale = max(scale, lms_step_scale(ours, step_kwargs.get("order", 4)))
            assert_close(x_ours, res_ref.prev_sample, f"{name} step {i} (t={t_ours})", scale)
            if getattr(res_ref, "pred_original_sample", None) is not None:
                assert_close(res_ours.pred_original_sample, res_ref.pred_original_sample, f"{name} x0, step {i}",
                             x0_scale)
        x_ref = torch.from_numpy(x_ours.copy())
    # the noise (if any) was drawn in the same shapes, at the same moments: the replay stayed in step
    assert torch.equal(gen_ours.generator.get_state(), gen_ref.get_state())
    return ours, ref


def pair(name, config, reference=None):
    """(sdort scheduler, diffusers scheduler) built from the same config."""
    return CLASSES[name](**config), reference if reference is not None else getattr(diffusers, name)(**config)


def begin_for(steps: int, order: int) -> int:
    """Where an image-to-image run at strength 0.6 starts: (steps - int(0.6 steps)) * order."""
    return (steps - int(0.6 * steps)) * order


def rotating_grid(*axes):
    """The product of ``axes``, each point with a step count for a full run and one for a part-way run.

    Step counts rotate along the product so that each is paired with every value of every axis.
    """
    points = list(itertools.product(*axes))
    return [(*p, STEPS[k % len(STEPS)], STEPS[(k + 2) % len(STEPS)]) for k, p in enumerate(points)]


def sigma_config(schedule):
    return {f"use_{schedule}_sigmas": True} if schedule else {}


def run_grid_point(name, config, steps, part_way_steps, order, step_kwargs=None, reference=None):
    ours, ref = pair(name, config, reference)
    run_pair(ours, ref, steps, step_kwargs=step_kwargs)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, order), step_kwargs=step_kwargs)


# ----------------------------------------------------------------------------------------- LMS
@pytest.mark.parametrize(
    "prediction_type, spacing, schedule, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction", "sample"), SPACINGS, SIGMA_SCHEDULES),
)
def test_lms_grid(prediction_type, spacing, schedule, steps, part_way_steps):
    config = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
              **sigma_config(schedule)}
    # (diffusers' LMS steps are slow, scipy's quad over torch scalars: part-way runs are kept to 10 steps)
    run_grid_point("LMSDiscreteScheduler", config, steps, min(part_way_steps, 10), 1)


def test_lms_coefficients_are_the_exact_integrals():
    """The weights integrate the Lagrange basis polynomials exactly (scipy's quad, in float64, agrees to
    1e-12); diffusers' quad over a float32 integrand agrees to float32 rounding."""
    integrate = pytest.importorskip("scipy.integrate")
    config = {**SD, "use_exponential_sigmas": True, "timestep_spacing": "trailing"}
    ours, ref = pair("LMSDiscreteScheduler", config)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    sigmas = ours.sigmas.astype(np.float64)
    for t in (0, 1, 2, 3, 12, 23, 24):
        order = min(t + 1, 4)
        for j in range(order):
            nodes = [sigmas[t - k] for k in range(order)]

            def basis(tau, nodes=nodes, j=j):
                return np.prod([(tau - s) / (nodes[j] - s) for k, s in enumerate(nodes) if k != j])

            exact = integrate.quad(basis, sigmas[t], sigmas[t + 1], epsabs=1e-15, epsrel=1e-13)[0]
            mine = ours.get_lms_coefficient(order, t, j)
            assert mine == pytest.approx(exact, rel=1e-12, abs=1e-14)
            assert mine == pytest.approx(ref.get_lms_coefficient(order, t, j), rel=2e-6, abs=1e-9)
    # the integral of a constant, a line and a cubic
    assert lagrange_basis_integral([2.0], 0, 2.0, 0.5) == -1.5
    assert lagrange_basis_integral([2.0, 1.0], 0, 1.0, 3.0) == pytest.approx(2.0)  # (tau - 1) from 1 to 3
    assert lagrange_basis_integral([0.0, 1.0, 2.0, 3.0], 3, 0.0, 3.0) == pytest.approx(3 / 8)


def test_lms_with_diffusers_weights_is_bit_identical():
    """Given diffusers' own (quad) weights and schedule, sdort's LMS steps reproduce diffusers' samples to the bit:
    the only difference between the two is exact integration against quad over a float32 integrand.

    The step is +, -, *, / only, correctly rounded on every CPU, so bit-identity is a claim about the formulas.
    The parts that go through torch's sqrt are given to both sides alike: diffusers' sigmas (from its training
    sigmas, within SIGMA_ULPS of sdort's: test_lms_grid) and the model output, computed from sdort's scaled input
    (scale_model_input divides by torch's sqrt(sigma^2 + 1), within an ulp: compared in run_pair).
    """
    config = {**SD, "prediction_type": "sample", "use_exponential_sigmas": True, "timestep_spacing": "trailing"}
    ours, ref = pair("LMSDiscreteScheduler", config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(25)
    ours.get_lms_coefficient = ref.get_lms_coefficient  # reads only ref's sigmas
    ours.sigmas = ref.sigmas.numpy().copy()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        out = model_fn(ours.scale_model_input(x, t_ours), t_ours)
        ref.scale_model_input(x_ref, t_ref)
        x, x_ref = ours.step(out, t_ours, x).prev_sample, ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
        np.testing.assert_array_equal(x, x_ref.numpy())


@pytest.mark.parametrize("order", (1, 2, 3))
def test_lms_lower_order_argument(order):
    ours, ref = pair("LMSDiscreteScheduler", SD)
    run_pair(ours, ref, 10, step_kwargs={"order": order})


# ----------------------------------------------------------------------------------------- Heun
@pytest.mark.parametrize(
    "prediction_type, spacing, schedule, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction", "sample"), SPACINGS, SIGMA_SCHEDULES),
)
def test_heun_grid(prediction_type, spacing, schedule, steps, part_way_steps):
    config = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
              **sigma_config(schedule)}
    run_grid_point("HeunDiscreteScheduler", config, steps, part_way_steps, 2)


@pytest.mark.parametrize(
    "config",
    [
        {**SD, "clip_sample": True, "clip_sample_range": 0.8, "prediction_type": "sample"},
        {**SD, "clip_sample": True, "prediction_type": "v_prediction", "use_karras_sigmas": True},
        {"beta_schedule": "linear"},
        {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
        {"beta_schedule": "exp", "use_exponential_sigmas": True},
        {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    ],
)
def test_heun_options(config):
    run_pair(*pair("HeunDiscreteScheduler", config), 10)


def test_heun_custom_timesteps_and_train_timesteps():
    ours, ref = pair("HeunDiscreteScheduler", SD)
    run_pair(ours, ref, set_kwargs={"timesteps": [999, 800, 650.5, 400, 120, 3]})
    run_pair(ours, ref, set_kwargs={"num_inference_steps": 10, "num_train_timesteps": 500})
    karras = HeunDiscreteScheduler(**SD, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="timesteps"):
        karras.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError):
        ours.set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError):
        ours.set_timesteps()


# ----------------------------------------------------------------------------------------- KDPM2
_KDPM2_REFERENCES: dict = {}


def kdpm2_reference(name, config):
    """A diffusers KDPM2 scheduler for ``config``.

    Their constructors spend most of a second on a 1000-step schedule (a per-element loop over torch
    tensors) that set_timesteps replaces; the grid builds one per class and sets the options it varies
    (which the constructor only records) with register_to_config.
    """
    if name not in _KDPM2_REFERENCES:
        _KDPM2_REFERENCES[name] = getattr(diffusers, name)(**SD)
    ref = copy.deepcopy(_KDPM2_REFERENCES[name])
    ref.register_to_config(**config)
    assert {k: ref.config[k] for k in config} == config
    return ref


@pytest.mark.parametrize("ancestral", (False, True), ids=("KDPM2", "KDPM2Ancestral"))
@pytest.mark.parametrize(
    "prediction_type, spacing, schedule, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction"), SPACINGS, SIGMA_SCHEDULES),
)
def test_kdpm2_grid(ancestral, prediction_type, spacing, schedule, steps, part_way_steps):
    name = "KDPM2AncestralDiscreteScheduler" if ancestral else "KDPM2DiscreteScheduler"
    options = {"prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
               "use_karras_sigmas": schedule == "karras", "use_exponential_sigmas": schedule == "exponential",
               "use_beta_sigmas": schedule == "beta"}
    run_grid_point(name, {**SD, **options}, steps, part_way_steps, 2, reference=kdpm2_reference(name, options))


@pytest.mark.parametrize("name", ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"))
def test_kdpm2_freshly_built_and_other_betas(name):
    config = {"beta_schedule": "linear", "use_karras_sigmas": True}
    if name == "KDPM2AncestralDiscreteScheduler":
        config = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}
    run_pair(*pair(name, config), 10)


def textbook_ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Exact (sigma_up, sigma_down) of diffusers' formula, sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2) and
    sigma_down = sqrt(s'^2 - sigma_up^2), evaluated with 50 significant digits on the float32 sigmas given."""
    import decimal

    with decimal.localcontext(decimal.Context(prec=50)):
        s, n = decimal.Decimal(float(sigma)), decimal.Decimal(float(sigma_next))
        up2 = n * n * (s * s - n * n) / (s * s)
        return float(up2.sqrt()), float((n * n - up2).sqrt())


@pytest.mark.parametrize("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
def test_kdpm2_ancestral_sigmas_are_accurate(beta_schedule):
    """The ancestral step's sigmas are the float32 roundings of the exact values of diffusers' formula, and the
    midpoint is the next step's sigma (which it is in exact arithmetic) within its float32 logs' rounding.

    diffusers evaluates sigma_down = sqrt(sigma_next^2 - sigma_up^2) in float32 after torch's square root of
    sigma_up^2: the subtraction cancels all but sigma_next^4 / sigma^2, and an ulp of sigma_up becomes
    (sigma / sigma_next)^2 / 2 ulps of sigma_down: 40 on Stable Diffusion's first step of three, thousands with
    the linear betas, millions on the cosine betas' first steps (where no bit is left: sigma_down 0 and a nan
    midpoint, or 38% off). The midpoint exp((log sigma + log sigma_down) / 2) = sigma_next and its timestep
    inherit half of that. sdort used the same expression, so its schedule held the rounding noise of its own
    square root: 43 ulps of sigma_down for Stable Diffusion's 3 steps, the midpoint timestep 499.49988 where the
    exact value is 499.50042 (diffusers' on an AVX2 AMD CPU: 499.50104), and a nan midpoint timestep for the
    cosine betas with trailing spacing and 10 steps. sdort now computes sigma_down = sigma_next^2 / sigma and
    sigma_up without the cancellation (499.50046). These checks are against exact arithmetic (numpy and
    decimal only), so they hold on every CPU.
    """
    for spacing, karras, steps in itertools.product(SPACINGS, (False, True), (2, 3, 10, 25)):
        ours = KDPM2AncestralDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing=spacing,
                                               use_karras_sigmas=karras)
        ours.set_timesteps(steps)
        where = f"{beta_schedule} {spacing} karras={karras} {steps} steps"
        s = ours.sigmas[np.r_[0, 1 : 2 * steps : 2]]  # the step sigmas, the last 0
        exact = np.array([textbook_ancestral_sigmas(a, b) for a, b in zip(s[:-1], s[1:])])
        first = np.r_[0, 1 : 2 * steps - 1 : 2]  # each step's entry in the interleaved arrays
        assert_within(ours.sigmas_up[first], exact[:, 0], ulp(exact[:, 0]), f"sigma_up, {where}")
        assert_within(ours.sigmas_down[first], exact[:, 1], ulp(exact[:, 1]), f"sigma_down, {where}")
        # the midpoints of all steps but the last (whose sigma_next is 0): sigma_next, up to float32 logs
        nxt = s[1:-1].astype(np.float64)
        mid_rtol = midpoint_rtol(s[:-2], exact[:-1, 1], U, torch_kernels=False)
        assert_within(ours.sigmas_interpol[first[:-1]], nxt, mid_rtol * nxt, f"midpoint sigma, {where}")
        log_sigmas = train_log_sigmas(ours)
        t_exact = sigma_to_t(nxt, log_sigmas)
        dlog = mid_rtol + log_sigma_uncertainty(np.log(nxt))
        assert_within(ours.timesteps[1 : 2 * steps - 2 : 2], t_exact, sigma_to_t_tolerance(t_exact, log_sigmas, dlog),
                      f"midpoint timesteps, {where}")


# ----------------------------------------------------------------------------------------- EDM Euler
@pytest.mark.parametrize(
    "prediction_type, schedule, final_sigmas_type, churn, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction"), ("karras", "exponential"), ("zero", "sigma_min"), (False, True)),
)
def test_edm_euler_grid(prediction_type, schedule, final_sigmas_type, churn, steps, part_way_steps):
    config = {"prediction_type": prediction_type, "sigma_schedule": schedule, "final_sigmas_type": final_sigmas_type}
    step_kwargs = {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003} if churn else None
    ours, ref = pair("EDMEulerScheduler", config)
    run_pair(ours, ref, steps, discrete=False, step_kwargs=step_kwargs)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, 1), discrete=False,
             step_kwargs=step_kwargs)


def test_edm_euler_options_custom_ramp_and_preconditioning():
    config = {"sigma_min": 0.01, "sigma_max": 20.0, "sigma_data": 0.7, "rho": 5.0, "num_train_timesteps": 500}
    ours, ref = pair("EDMEulerScheduler", config)
    assert_schedule(ours, ref, discrete=False)  # the training schedule
    run_pair(ours, ref, 10, discrete=False)
    ramp = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]
    ours.set_timesteps(sigmas=ramp)  # diffusers wants a tensor here; sdort takes any array-like
    ref.set_timesteps(sigmas=torch.tensor(ramp))
    assert_schedule(ours, ref, discrete=False)
    run_pair(ours, ref, set_kwargs={"sigmas": np.array(ramp)}, ref_set_kwargs={"sigmas": torch.tensor(ramp)},
             discrete=False)

    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    out = model_fn(x, 0)
    for sigma in (0.01, 0.7, 13.0):
        assert_close(ours.precondition_inputs(x, sigma),
                     ref.precondition_inputs(torch.from_numpy(x), torch.tensor(sigma)), "precondition_inputs")
        assert_close(ours.precondition_outputs(x, out, sigma),
                     ref.precondition_outputs(torch.from_numpy(x), torch.from_numpy(out), torch.tensor(sigma)),
                     "precondition_outputs")
        np.testing.assert_allclose(ours.precondition_noise(sigma), ref.precondition_noise(sigma).numpy(), rtol=1e-6)

    # a ready x_0 is used as given
    ours.set_timesteps(5)
    t = ours.timesteps[0]
    ours.scale_model_input(x, t)
    given = np.zeros_like(x)
    prev = ours.step(out, t, x, pred_original_sample=given).prev_sample
    sigma, sigma_next = ours.sigmas[0], ours.sigmas[1]
    np.testing.assert_allclose(prev, x + x / sigma * (sigma_next - sigma), rtol=1e-6)
    with pytest.raises(ValueError, match="integer"):
        ours.step(out, 3, x)


# ----------------------------------------------------------------------------------------- EDM DPM-Solver++
EDM_DPM_AXES = (
    ("epsilon", "v_prediction"),
    ("karras", "exponential"),
    ("zero", "sigma_min"),
    ("dpmsolver++", "sde-dpmsolver++"),
    (1, 2, 3),
    ("midpoint", "heun"),
)


@pytest.mark.parametrize(
    "prediction_type, schedule, final_sigmas_type, algorithm_type, solver_order, solver_type, steps, part_way_steps",
    [p for p in rotating_grid(*EDM_DPM_AXES) if not (p[3] == "sde-dpmsolver++" and p[4] == 3)],
)
def test_edm_dpm_grid(prediction_type, schedule, final_sigmas_type, algorithm_type, solver_order, solver_type, steps,
                      part_way_steps):
    config = {"prediction_type": prediction_type, "sigma_schedule": schedule, "final_sigmas_type": final_sigmas_type,
              "algorithm_type": algorithm_type, "solver_order": solver_order, "solver_type": solver_type}
    ours, ref = pair("EDMDPMSolverMultistepScheduler", config)
    run_pair(ours, ref, steps, discrete=False)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, 1), discrete=False)


@pytest.mark.parametrize(
    "config, steps",
    [
        ({"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
        ({"solver_order": 3, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 25),
        ({"thresholding": True, "sample_max_value": 2.0, "dynamic_thresholding_ratio": 0.9}, 10),
        ({"algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min"}, 10),  # remapped
        ({"sigma_min": 0.02, "sigma_max": 14.6, "sigma_data": 1.0, "rho": 6.0, "num_train_timesteps": 800}, 16),
    ],
)
def test_edm_dpm_options(config, steps):
    ours, ref = pair("EDMDPMSolverMultistepScheduler", config)
    assert_schedule(ours, ref, discrete=False)  # the training schedule
    assert ours.config.algorithm_type == ref.config.algorithm_type
    assert ours.config.solver_type == ref.config.solver_type
    run_pair(ours, ref, steps, discrete=False)


# ----------------------------------------------------------------------------------------- all classes
ALL_CONFIGS = {
    "LMSDiscreteScheduler": ({**SD, "use_karras_sigmas": True}, 1),
    "HeunDiscreteScheduler": ({**SD, "timestep_spacing": "leading", "steps_offset": 1}, 2),
    "KDPM2DiscreteScheduler": ({**SD, "use_karras_sigmas": True}, 2),
    "KDPM2AncestralDiscreteScheduler": ({**SD, "timestep_spacing": "trailing"}, 2),
    "EDMEulerScheduler": ({}, 1),
    "EDMDPMSolverMultistepScheduler": ({"solver_order": 3}, 1),
}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_part_way_without_set_begin_index(name):
    """Without set_begin_index the step index is found from the first timestep (the second of a repeated one)."""
    config, order = ALL_CONFIGS[name]
    ours, ref = pair(name, config)
    step_kwargs = {"s_churn": 1.0} if name == "EDMEulerScheduler" else None
    run_pair(ours, ref, 10, begin=4 * order, set_begin=False,
             discrete=not name.startswith("EDM"), step_kwargs=step_kwargs)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_interface_config_and_outputs(name, tmp_path):
    config, order = ALL_CONFIGS[name]
    ours, ref = pair(name, config)
    assert type(ours).order == type(ref).order == order
    assert len(ours) == len(ref)
    assert ours.compatibles and type(ours) in ours.compatibles
    assert_schedule(ours, ref, discrete=not name.startswith("EDM"))
    # config: same keys and values as diffusers', saved and loaded back
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in public} == public
    ours.save_config(tmp_path)
    again = type(ours).from_pretrained(tmp_path)
    assert {k: again.config[k] for k in public} == public
    # same positional arguments as diffusers (sdort may add keyword ones after them, and **kwargs)
    ref_params = [p for p in inspect.signature(ref.step).parameters]
    our_params = [p for p in inspect.signature(ours.step).parameters]
    assert our_params[: len(ref_params)] == ref_params
    our_set, ref_set = inspect.signature(ours.set_timesteps), inspect.signature(ref.set_timesteps)
    assert list(our_set.parameters)[: len(ref_set.parameters)] == list(ref_set.parameters)

    ours.set_timesteps(4)
    x = np.ones(SHAPE, np.float32)
    t = ours.timesteps[0]
    out = ours.step(model_fn(ours.scale_model_input(x, t), t), t, x, return_dict=False,
                    generator=np.random.default_rng(0), eta=0.3, unknown_option=1)
    assert isinstance(out, tuple) and out[0].shape == SHAPE
    # float16 in, float16 out
    ours.set_timesteps(4)
    ours.scale_model_input(x, t)
    half = ours.step(model_fn(x, t).astype(np.float16), t, x.astype(np.float16), generator=np.random.default_rng(0))
    assert half.prev_sample.dtype == np.float16 and np.isfinite(half.prev_sample).all()


@pytest.mark.parametrize(
    "name, schedule",
    [
        ("LMSDiscreteScheduler", "karras"),
        ("LMSDiscreteScheduler", "exponential"),
        ("HeunDiscreteScheduler", "karras"),
        ("HeunDiscreteScheduler", "beta"),
        ("KDPM2DiscreteScheduler", "exponential"),
        ("KDPM2AncestralDiscreteScheduler", "karras"),
    ],
)
def test_config_converted_from_another_class(name, schedule):
    """An Euler config with sigma_min/sigma_max and zero-SNR (keys these classes do not take) behaves as in
    diffusers: the keys are kept, the sigma schedules use the bounds (except LMS's karras sigmas)."""
    source = {**SD, "sigma_min": 0.1, "sigma_max": 10.0, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              f"use_{schedule}_sigmas": True, "_class_name": "EulerDiscreteScheduler"}
    ref = getattr(diffusers, name).from_config(source)
    ours = CLASSES[name].from_config(source)
    assert ours.config["sigma_min"] == ref.config["sigma_min"] == 0.1
    assert ours.config["rescale_betas_zero_snr"] is ref.config["rescale_betas_zero_snr"] is True
    run_pair(ours, ref, 10)
    bounded = not (name == "LMSDiscreteScheduler" and schedule == "karras")
    assert (ours.sigmas[0] == np.float32(10.0)) == bounded


@pytest.mark.parametrize(
    "name, config, option",
    [
        ("KDPM2DiscreteScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("KDPM2AncestralDiscreteScheduler", {"prediction_type": "x0"}, "prediction_type"),
        ("LMSDiscreteScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_"),
        ("HeunDiscreteScheduler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("HeunDiscreteScheduler", {"beta_schedule": "cosine"}, "beta_schedule"),
        ("EDMEulerScheduler", {"sigma_schedule": "linear"}, "sigma_schedule"),
        ("EDMEulerScheduler", {"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
        ("EDMDPMSolverMultistepScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ("EDMDPMSolverMultistepScheduler", {"solver_type": "ddim"}, "solver_type"),
        ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "solver_order"),
    ],
)
def test_unsupported_options_refused(name, config, option):
    with pytest.raises(ValueError, match=option):
        CLASSES[name](**config)


def test_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import sdort.schedulers.lms, sdort.schedulers.heun, sdort.schedulers.kdpm2, "
            "sdort.schedulers.edm; assert 'torch' not in sys.modules and 'scipy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


logging.getLogger("sdort.schedulers").setLevel(logging.ERROR)
