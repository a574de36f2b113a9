"""sdort's k-diffusion schedulers (LMS, Heun, KDPM2, KDPM2 ancestral, EDM Euler, EDM DPM-Solver++) against
diffusers, step by step.

Both run the same loop (scale_model_input, a deterministic model function, step) with the same noise
(diffusers from a torch.Generator, sdort from an object replaying a torch.Generator seeded alike, so
that a draw of another shape or at another moment would show). After every step the samples must agree
within 1e-5 relative to max(1, |sample|); for LMS, relative to the largest term c_j d_j the step sums if
that is larger: sdort integrates the LMS weights exactly where diffusers' quad integrates a float32
polynomial (weights differ by up to ~3e-7), and the last order-4 step of a long schedule multiplies that
by its weights (tens, alternating in sign). Given diffusers' weights, sdort's LMS is bit-identical.

Schedules: timesteps derived from the timestep spacing must be equal to the bit; timesteps and sigmas
that diffusers computes through torch's float32 sqrt/log/exp/pow (MKL/SLEEF, not correctly rounded)
may differ from sdort's correctly rounded ones by at most 2 float32 ulps (timesteps: 2.5e-4 of a
training step), which the tests allow and nothing else.

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
from sdort.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler  # noqa: E402
from sdort.schedulers.lms import LMSDiscreteScheduler, lagrange_basis_integral  # noqa: E402
from scheduler_support import TorchDraws, accepted  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SHAPE = (2, 4, 6, 6)
STEPS = (1, 2, 10, 25, 50)
SPACINGS = ("linspace", "leading", "trailing")
SIGMA_SCHEDULES = (None, "karras", "exponential", "beta")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
RTOL = 1e-5
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


# ----------------------------------------------------------------------------------------- comparisons
def assert_close(ours, ref, what: str, scale: float = 1.0):
    """max |ours - ref| <= 1e-5 * max(1, |ref|, scale): 1e-5 relative to the step's largest magnitude.

    Where diffusers gives nan or inf (degenerate schedules), sdort must give the same in the same places.
    """
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    ours = np.asarray(ours, dtype=np.float64)
    assert ours.shape == ref.shape, what
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), finite, err_msg=what)
    np.testing.assert_array_equal(ours[~finite], ref[~finite], err_msg=what)
    ours, ref = ours[finite], ref[finite]
    if ref.size == 0:
        return
    scale = max(1.0, float(np.abs(ref).max()), scale)
    err = float(np.abs(ours - ref).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def assert_ulps(ours, ref, what: str, maxulp: int = 2, rtol: float = 0.0):
    """Equal float32 arrays up to ``maxulp`` units in the last place (or ``rtol``), with nan in the same places."""
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    ours = np.asarray(ours)
    assert ours.dtype == ref.dtype == np.float32, f"{what}: dtype {ours.dtype} vs {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan, err_msg=what)
    if rtol:
        np.testing.assert_allclose(ours[~nan], ref[~nan], rtol=rtol, atol=0, err_msg=what)
    else:
        np.testing.assert_array_max_ulp(ours[~nan], ref[~nan], maxulp=maxulp)


def assert_schedule(ours, ref, exact_timesteps: bool, discrete: bool = True, derived: bool = True):
    """timesteps (dtype and values) and every sigma array diffusers keeps, as the module docstring says.

    ``derived=False`` skips KDPM2's midpoint/ancestral arrays: on the 1000-step training schedule their
    differences of nearly equal sigmas turn one-ulp differences into 1e-5 relative ones.
    """
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype, (ours.timesteps.dtype, ref_t.dtype)
    if exact_timesteps:
        np.testing.assert_array_equal(ours.timesteps, ref_t)
    else:
        finite = np.isfinite(ref_t)
        np.testing.assert_array_equal(np.isfinite(ours.timesteps), finite)
        np.testing.assert_allclose(ours.timesteps[finite], ref_t[finite], rtol=1e-6, atol=2.5e-4 if discrete else 0)
    assert_ulps(ours.sigmas, ref.sigmas, "sigmas")
    # KDPM2's midpoint sigmas (float32 log and exp) and ancestral sigma_down (the square root of a
    # difference, which turns a one-ulp difference of the sigmas into a few): within 1e-6 relative
    for name in ("sigmas_interpol", "sigmas_up", "sigmas_down"):
        if derived and hasattr(ref, name):
            assert_ulps(getattr(ours, name), getattr(ref, name), name, rtol=1e-6)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


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
             seed=0, exact_timesteps=True, discrete=True):
    """Set both schedulers' timesteps, compare the schedules, then run and compare the loop from ``begin``."""
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    ref.set_timesteps(**(ref_set_kwargs if ref_set_kwargs is not None else set_kwargs))
    ours.set_timesteps(**set_kwargs)
    assert_schedule(ours, ref, exact_timesteps, discrete)
    name = type(ours).__name__

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    x_ours = start * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    if begin:
        if set_begin:
            ours.set_begin_index(begin)
            ref.set_begin_index(begin)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = ours.add_noise(start, noise, np.repeat(ours.timesteps[begin : begin + 1], SHAPE[0]))
        t0_ref = ref.timesteps[begin : begin + 1].repeat(SHAPE[0])
        x_ref = ref.add_noise(torch.from_numpy(start), torch.from_numpy(noise), t0_ref)
        assert x_ours.dtype == np.float32
        assert_close(x_ours, x_ref, f"{name} add_noise")

    step_kwargs = dict(step_kwargs or {})
    gen_ref, gen_ours = torch.Generator().manual_seed(seed + 1), TorchDraws(seed + 1)
    ref_kwargs = accepted(ref.step, {**step_kwargs, "generator": gen_ref})
    # sdort gets the pipeline's arguments whatever the class: extra ones must be accepted
    our_kwargs = {"eta": 0.0, **step_kwargs, "generator": gen_ours}

    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps[begin:], ref.timesteps[begin:])):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_close(in_ours, in_ref, f"{name} scale_model_input, step {i}")
        out_ours = model_fn(in_ours, t_ours)
        out_ref = torch.from_numpy(model_fn(in_ref.numpy(), t_ref.numpy()))
        res_ours = ours.step(out_ours, t_ours, x_ours, **our_kwargs)
        res_ref = ref.step(out_ref, t_ref, x_ref, **ref_kwargs)
        x_ours, x_ref = res_ours.prev_sample, res_ref.prev_sample
        assert isinstance(x_ours, np.ndarray) and x_ours.dtype == np.float32
        scale = lms_step_scale(ours, step_kwargs.get("order", 4)) if isinstance(ours, LMSDiscreteScheduler) else 1.0
        assert_close(x_ours, x_ref, f"{name} step {i} (t={t_ours})", scale)
        if getattr(res_ref, "pred_original_sample", None) is not None:
            assert_close(res_ours.pred_original_sample, res_ref.pred_original_sample, f"{name} x0, step {i}")
        assert ours.step_index == ref.step_index
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


def run_grid_point(name, config, steps, part_way_steps, order, exact_timesteps, step_kwargs=None, reference=None):
    ours, ref = pair(name, config, reference)
    run_pair(ours, ref, steps, exact_timesteps=exact_timesteps, step_kwargs=step_kwargs)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, order), exact_timesteps=exact_timesteps, step_kwargs=step_kwargs)


# ----------------------------------------------------------------------------------------- LMS
@pytest.mark.parametrize(
    "prediction_type, spacing, schedule, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction", "sample"), SPACINGS, SIGMA_SCHEDULES),
)
def test_lms_grid(prediction_type, spacing, schedule, steps, part_way_steps):
    config = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
              **sigma_config(schedule)}
    # (diffusers' LMS steps are slow, scipy's quad over torch scalars: part-way runs are kept to 10 steps)
    run_grid_point("LMSDiscreteScheduler", config, steps, min(part_way_steps, 10), 1, exact_timesteps=schedule is None)


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
    """Given diffusers' own (quad) weights, sdort's LMS steps reproduce diffusers' samples to the bit: the
    only difference between the two is exact integration against quad over a float32 integrand."""
    config = {**SD, "prediction_type": "sample", "use_exponential_sigmas": True, "timestep_spacing": "trailing"}
    ours, ref = pair("LMSDiscreteScheduler", config)
    weights = diffusers.LMSDiscreteScheduler(**config)
    for scheduler in (ours, ref, weights):
        scheduler.set_timesteps(25)
    ours.get_lms_coefficient = weights.get_lms_coefficient
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        out = model_fn(ours.scale_model_input(x, t_ours), t_ours)
        out_ref = torch.from_numpy(model_fn(ref.scale_model_input(x_ref, t_ref).numpy(), t_ref.numpy()))
        x, x_ref = ours.step(out, t_ours, x).prev_sample, ref.step(out_ref, t_ref, x_ref).prev_sample
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
    run_grid_point("HeunDiscreteScheduler", config, steps, part_way_steps, 2, exact_timesteps=schedule is None)


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
    run_pair(*pair("HeunDiscreteScheduler", config), 10, exact_timesteps="use_exponential_sigmas" not in config)


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
    # the midpoints' timesteps come from float32 log/exp: within 2.5e-4 of a training step
    run_grid_point(name, {**SD, **options}, steps, part_way_steps, 2, exact_timesteps=False,
                   reference=kdpm2_reference(name, options))


@pytest.mark.parametrize("name", ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"))
def test_kdpm2_freshly_built_and_other_betas(name):
    config = {"beta_schedule": "linear", "use_karras_sigmas": True}
    if name == "KDPM2AncestralDiscreteScheduler":
        config = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}
    run_pair(*pair(name, config), 10, exact_timesteps=False)


# ----------------------------------------------------------------------------------------- EDM Euler
@pytest.mark.parametrize(
    "prediction_type, schedule, final_sigmas_type, churn, steps, part_way_steps",
    rotating_grid(("epsilon", "v_prediction"), ("karras", "exponential"), ("zero", "sigma_min"), (False, True)),
)
def test_edm_euler_grid(prediction_type, schedule, final_sigmas_type, churn, steps, part_way_steps):
    config = {"prediction_type": prediction_type, "sigma_schedule": schedule, "final_sigmas_type": final_sigmas_type}
    step_kwargs = {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003} if churn else None
    ours, ref = pair("EDMEulerScheduler", config)
    run_pair(ours, ref, steps, exact_timesteps=False, discrete=False, step_kwargs=step_kwargs)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, 1), exact_timesteps=False, discrete=False,
             step_kwargs=step_kwargs)


def test_edm_euler_options_custom_ramp_and_preconditioning():
    config = {"sigma_min": 0.01, "sigma_max": 20.0, "sigma_data": 0.7, "rho": 5.0, "num_train_timesteps": 500}
    ours, ref = pair("EDMEulerScheduler", config)
    assert_schedule(ours, ref, exact_timesteps=False, discrete=False)  # the training schedule
    run_pair(ours, ref, 10, exact_timesteps=False, discrete=False)
    ramp = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]
    ours.set_timesteps(sigmas=ramp)  # diffusers wants a tensor here; sdort takes any array-like
    ref.set_timesteps(sigmas=torch.tensor(ramp))
    assert_schedule(ours, ref, exact_timesteps=False, discrete=False)
    run_pair(ours, ref, set_kwargs={"sigmas": np.array(ramp)}, ref_set_kwargs={"sigmas": torch.tensor(ramp)},
             exact_timesteps=False, discrete=False)

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
    run_pair(ours, ref, steps, exact_timesteps=False, discrete=False)
    steps = max(part_way_steps, 2)
    run_pair(ours, ref, steps, begin=begin_for(steps, 1), exact_timesteps=False, discrete=False)


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
    assert_schedule(ours, ref, exact_timesteps=False, discrete=False)  # the training schedule
    assert ours.config.algorithm_type == ref.config.algorithm_type
    assert ours.config.solver_type == ref.config.solver_type
    run_pair(ours, ref, steps, exact_timesteps=False, discrete=False)


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
    run_pair(ours, ref, 10, begin=4 * order, set_begin=False, exact_timesteps=False,
             discrete=not name.startswith("EDM"), step_kwargs=step_kwargs)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_interface_config_and_outputs(name, tmp_path):
    config, order = ALL_CONFIGS[name]
    ours, ref = pair(name, config)
    assert type(ours).order == type(ref).order == order
    assert len(ours) == len(ref)
    assert ours.compatibles and type(ours) in ours.compatibles
    assert_schedule(ours, ref, exact_timesteps=False, discrete=not name.startswith("EDM"), derived=False)
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
    run_pair(ours, ref, 10, exact_timesteps=False)
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
