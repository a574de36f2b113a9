"""sdort's multistep and consistency schedulers against diffusers' torch ones, step by step.

DPM-Solver (multistep and singlestep), UniPC, DEIS, LCM and TCD. For each configuration both
run the same loop with the same deterministic model function (a noisy stand-in for a denoiser,
computed in numpy) and the same noise: diffusers draws from a torch.Generator, sdort from an object
replaying a torch.Generator seeded alike. The loop runs in lockstep: after each step both go on from
sdort's sample, with the model output of sdort's input, so that each comparison measures one step.

Timesteps computed in numpy on both sides (the spacings, flow sigmas) must be equal; integer timesteps
rounded from sigma_to_t (karras, Lu, exponential, beta schedules) equal too, except where the value
rounded lies within sigma_to_t_tolerance of the rounding boundary (``schedule_tolerances``). Sigmas within
the ulps of torch's square root they come from (scheduler_support). After every step each sample must agree
within 1e-5 of its scale (max |sdort - diffusers| <= 1e-5 * max(1, max |diffusers|)).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdort.schedulers.deis import DEISMultistepScheduler  # noqa: E402
from sdort.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler  # noqa: E402
from sdort.schedulers.dpmsolver_singlestep import DPMSolverSinglestepScheduler  # noqa: E402
from sdort.schedulers.lcm import LCMScheduler  # noqa: E402
from sdort.schedulers.tcd import TCDScheduler  # noqa: E402
from sdort.schedulers.unipc import UniPCMultistepScheduler  # noqa: E402
from sdort.schedulers import schedule  # noqa: E402
from scheduler_support import assert_close as support_assert_close  # noqa: E402
from scheduler_support import (  # noqa: E402
    U,
    TorchDraws,
    accepted,
    assert_schedule_within,
    compare_add_noise,
    integer_timestep_tolerance,
    log_sigma_uncertainty,
    sigma_rtol_from_alphas_cumprod,
    sigma_to_t_tolerance,
    step_arguments,
    ulp,
    zero_snr_rtols,
)

# diffusers' schedulers mix torch tensors into numpy calls, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

OURS = {
    cls.__name__: cls
    for cls in (
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        UniPCMultistepScheduler,
        DEISMultistepScheduler,
        LCMScheduler,
        TCDScheduler,
    )
}

SHAPE = (2, 4, 6, 6)
SPACINGS = ("linspace", "leading", "trailing")
SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion betas

# The scheduler_config.json of Stable Diffusion 1.5
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@functools.lru_cache(maxsize=8)
def target_image(shape) -> np.ndarray:
    """The x_0 the stand-in model denoises towards: smooth, partly outside [-1, 1] (for thresholding)."""
    grid = np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
    return 1.6 * np.sin(3.0 * grid) + 0.3 * np.cos(7.0 * grid)


def model_fn(x, t, prediction_type: str, alphas_cumprod, num_train_timesteps=1000, out_channels=None):
    """A deterministic imperfect denoiser: the exact epsilon of x relative to ``target_image``, perturbed.

    Computed in float64 from the sample it is given, returned in float32, in the requested
    parameterisation (epsilon, sample, v_prediction or flow_prediction).
    """
    x = np.asarray(x, dtype=np.float64)
    t = float(np.asarray(t).reshape(-1)[0])
    x0 = target_image(x.shape)
    if prediction_type == "flow_prediction":
        b = max(t / num_train_timesteps, 1e-3)
        a = 1.0 - b
    else:
        ab = float(alphas_cumprod[int(round(t))])
        a, b = np.sqrt(ab), np.sqrt(1.0 - ab)
    wobble = 0.1 * np.tanh(x) + 0.05 * np.sin(x + 0.01 * t)
    eps = 0.9 * (x - a * x0) / b + wobble
    x0_hat = x0 + wobble
    out = {
        "epsilon": eps,
        "sample": x0_hat,
        "v_prediction": a * eps - b * x0_hat,
        "flow_prediction": eps - x0_hat,
    }[prediction_type]
    if out_channels:  # learned variance: extra channels after the prediction
        out = np.concatenate([out, np.tanh(out)], axis=1)[:, :out_channels]
    return out.astype(np.float32)


# every element compared (a nan fails), dtypes equal
assert_close = functools.partial(support_assert_close, same_dtype=True, nonfinite_alike=False)


def solver_step_scale(ours, k: int, sample) -> float:
    """The magnitude an exponential-integrator step from sigmas[k] to sigmas[k + 1] computes with.

    In noise form x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps, in data form the x_0 it combines,
    (x_s - sigma_s eps) / alpha_s, carries |x_s| / alpha_s: either way terms of (alpha_t / alpha_s) |x_s|,
    hundreds where alpha_s is small (flow sigmas near 1, zero terminal SNR), however small the result. torch's
    log of alpha_s (an ulp of |log alpha_s|) moves e^h, and so those terms, by several ulps. (Singlestep
    solvers start each group from the sample they stored.)
    """
    sigmas = ours.sigmas.astype(np.float64)
    k = min(k, len(sigmas) - 2)
    if ours.config.get("use_flow_sigmas"):
        alpha = 1 - sigmas
    else:
        alpha = 1 / np.sqrt(sigmas * sigmas + 1)
    x = float(np.abs(sample).max())
    stored = getattr(ours, "sample", None)
    if stored is not None:
        x = max(x, float(np.abs(stored).max()))
    with np.errstate(divide="ignore"):
        ratio = alpha[k + 1] / alpha[k] if alpha[k] > 0 else 1.0
    return x * max(1.0, float(ratio))


def schedule_tolerances(ours, set_kwargs: dict):
    """(integer timestep tolerance or None for equality, sigma tolerance or None) of a solver's schedule.

    * Spacing, given timesteps, flow sigmas: numpy on both sides, equal (flow sigmas too, unless UniPC maps a
      karras ramp over the training sigmas to them).
    * Sigmas from the training sigmas sqrt((1 - ac) / ac) (torch's sqrt: an ulp), interpolated or as the ends of
      a karras / exponential / beta ramp: two ulps. Lu lambdas are a ramp between two float32 logs of such
      sigmas, exponentiated: log_sigma_uncertainty of the log, plus 4U. Zero terminal SNR: zero_snr_rtols and
      sigma_rtol_from_alphas_cumprod at the training step of each timestep (the largest for a ramp).
    * Timesteps from sigma_to_t, rounded (karras, Lu; DPM-Solver multistep leaves the cosine betas' unrounded)
      or truncated by astype(int64) (exponential, beta): equal, except where the value lies within
      sigma_to_t_tolerance of the boundary (a half-integer or an integer); the ramp's sigma differs by the
      ends' 2U, and sdort's float32 sigmas stand in for the float64 ramp (4U more).
    """
    cfg = ours.config
    ramp = next((k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")), None)
    if cfg.get("use_lu_lambdas"):
        ramp = "lu"
    flow = cfg.get("use_flow_sigmas")
    if not hasattr(ours, "sigmas") or (flow and not ramp) or "sigmas" in set_kwargs:
        return None, None
    sigmas = ours.sigmas.astype(np.float64)
    timesteps = np.asarray(ours.timesteps)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(ours.alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    if flow:
        # UniPC's karras ramp over the training sigmas, mapped to flow sigmas s / (s + 1) (which shrinks relative
        # differences), timesteps s * T truncated
        sigma_tol = 6 * U * sigmas
        unrounded = sigmas[: len(timesteps)] * cfg.num_train_timesteps
        tol = sigma_tol[: len(timesteps)] * cfg.num_train_timesteps + 2 * ulp(unrounded)
        return integer_timestep_tolerance(unrounded, tol, "trunc"), sigma_tol

    sigma_rel = np.full_like(sigmas, 4 * U)
    if ramp == "lu":
        sigma_rel[:-1] = log_sigma_uncertainty(np.abs(log_sigmas).max()) + 4 * U
    if cfg.get("rescale_betas_zero_snr"):
        betas = schedule.make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                    cfg.trained_betas)
        train_rel = sigma_rtol_from_alphas_cumprod(ours.alphas_cumprod, zero_snr_rtols(betas)[1]) + 4 * U
        train_rel[-1] = 4 * U  # alpha_bar_T is set to 2**-24 on both sides
        if ramp:
            sigma_rel[:-1] += train_rel.max()
        else:
            sigma_rel[: len(timesteps)] = train_rel[timesteps]
        sigma_rel[-1] = train_rel[0]  # zero, or the sigma of alpha_bar_0
    sigma_tol = sigma_rel * sigmas

    timestep_tol = None
    if ramp:
        rounds = ramp in ("karras", "lu") and not (
            isinstance(ours, DPMSolverMultistepScheduler) and cfg.beta_schedule == "squaredcos_cap_v2"
        )
        unrounded = schedule.sigma_to_t(sigmas[: len(timesteps)], log_sigmas)
        dlog = 6 * U + sigma_rel[: len(timesteps)]
        tol = sigma_to_t_tolerance(unrounded, log_sigmas, dlog)
        timestep_tol = integer_timestep_tolerance(unrounded, tol, "round" if rounds else "trunc")
    return timestep_tol, sigma_tol


def run_pair(
    name,
    config=None,
    steps=10,
    begin=0,
    set_begin=True,
    set_kwargs=None,
    step_kwargs=None,
    seed=0,
    shape=SHAPE,
    out_channels=None,
    ref_scheduler=None,
    our_scheduler=None,
    shared_sigmas=False,
    ref_nan_at_end=False,
):
    """Run diffusers' and sdort's scheduler ``name`` side by side and compare after every step."""
    config = dict(config or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = ref_scheduler or getattr(diffusers, name)(**config)
        ours = our_scheduler or OURS[name](**config)
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    ref.set_timesteps(**set_kwargs)
    ours.set_timesteps(**set_kwargs)

    timestep_tol, sigma_tol = schedule_tolerances(ours, set_kwargs)
    assert_schedule_within(ours, ref, timestep_tol, sigma_tol, name)
    assert ours.num_inference_steps == ref.num_inference_steps
    if shared_sigmas or (hasattr(ref, "sigmas") and ours.config.get("rescale_betas_zero_snr")):
        # Both integrate on sdort's sigmas (equal to diffusers' within the bounds checked above): for
        # badly conditioned coefficients, where one ulp of sigma moves the result beyond 1e-5, and for
        # zero terminal SNR, whose schedule differs by up to ~1e-5 relative (1 / (1 - alpha_bar) times
        # the float32 ratios' roundings), the steps' own tolerance.
        ref.sigmas = torch.from_numpy(ours.sigmas.copy())
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    prediction_type = ours.config.prediction_type
    ac = ours.alphas_cumprod
    T = ours.config.num_train_timesteps

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(shape).astype(np.float32)
    x_ours, x_ref = start.copy(), torch.from_numpy(start.copy())
    if set_begin:  # as the pipelines do; otherwise the first timestep is searched for
        ours.set_begin_index(begin)
        ref.set_begin_index(begin)
    if begin:
        noise = rng.standard_normal(shape).astype(np.float32)
        x0 = target_image(shape).astype(np.float32)
        x_ours = compare_add_noise(ours, ref, x0, noise, begin, f"{name} add_noise", close=assert_close)

    # sdort gets what the pipelines pass to every scheduler (extra arguments must be accepted);
    # diffusers' pipelines pass eta and generator only where step takes them
    ref_kwargs, our_kwargs, _, _ = step_arguments(ref, step_kwargs, seed, eta_to_reference=True)

    # lockstep (module docstring): both go on from sdort's sample, with the output of sdort's input
    x_ref = torch.from_numpy(x_ours.copy())
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps[begin:], ref.timesteps[begin:])):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_close(in_ours, in_ref, f"{name} scale_model_input, step {i}")
        out_ours = model_fn(in_ours, t_ours, prediction_type, ac, T, out_channels)
        k = ours.step_index if ours.step_index is not None else begin
        scale = solver_step_scale(ours, k, x_ours) if hasattr(ours, "sigmas") else 1.0
        res_ours = ours.step(out_ours, t_ours, x_ours, **our_kwargs)
        res_ref = ref.step(torch.from_numpy(out_ours.copy()), t_ref, x_ref, **ref_kwargs)
        if ref_nan_at_end and i == len(ours.timesteps) - begin - 1:
            # diffusers' last step is 0 * inf here; sdort returns the finite limit
            assert not torch.isfinite(res_ref.prev_sample).all() and np.isfinite(res_ours.prev_sample).all()
            return ours, ref
        assert_close(res_ours.prev_sample, res_ref.prev_sample, f"{name} step {i} (t={t_ref.item()})", scale)
        for extra in ("denoised", "pred_noised_sample"):
            if getattr(res_ref, extra, None) is not None:
                assert_close(getattr(res_ours, extra), getattr(res_ref, extra), f"{name} step {i} {extra}")
        assert ours.step_index == ref.step_index
        x_ours = res_ours.prev_sample
        x_ref = torch.from_numpy(x_ours.copy())
    assert np.isfinite(x_ours).all()
    return ours, ref


def grid(**axes):
    """pytest params for the product of the axes (each a name -> list of values), with readable ids."""
    names = list(axes)
    params = []
    for values in itertools.product(*axes.values()):
        case = dict(zip(names, values))
        params.append(pytest.param(case, id="-".join(f"{v}" for v in values)))
    return params


def merge(*grids):
    return [p for g in grids for p in g]


def case_args(case):
    """Split a grid case into (config, run_pair keyword arguments)."""
    case = dict(case)
    keys = ("steps", "begin", "set_begin", "step_kwargs", "set_kwargs", "shape", "out_channels")
    run = {k: case.pop(k) for k in keys if k in case}
    for flag in SIGMA_SCHEDULES + ("use_lu_lambdas",):
        if case.pop(flag.removeprefix("use_").removesuffix("_sigmas").removesuffix("_lambdas"), None):
            case[flag] = True
    if case.pop("sigmas", None) not in (None, "default"):
        raise AssertionError("use the sigma schedule names as values of 'schedule'")
    schedule = case.pop("schedule", "default")
    if schedule != "default":
        case[f"use_{schedule}_sigmas" if schedule != "lu" else "use_lu_lambdas"] = True
    return case, run


# ---------------------------------------------------------------------------- DPM-Solver multistep
DPM_MS = "DPMSolverMultistepScheduler"
DPM_MS_GRID = merge(
    # every algorithm type, order and solver type
    grid(
        algorithm_type=("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"),
        solver_order=(1, 2, 3),
        solver_type=("midpoint", "heun"),
        steps=(10,),
        set_begin=(False,),
    ),
    # step counts, with and without lower_order_final / euler_at_final
    grid(algorithm_type=("dpmsolver++", "sde-dpmsolver++"), solver_order=(2, 3), steps=(1, 2, 25, 50)),
    grid(
        solver_order=(3,),
        lower_order_final=(False,),
        final_sigmas_type=("zero", "sigma_min"),
        steps=(2, 25),
    ),
    grid(final_sigmas_type=("sigma_min",), steps=(10, 50)),
    grid(algorithm_type=("dpmsolver++",), euler_at_final=(True,), final_sigmas_type=("sigma_min",), steps=(2, 10)),
    # prediction types and timestep spacings
    grid(
        algorithm_type=("dpmsolver++", "dpmsolver"),
        prediction_type=("epsilon", "sample", "v_prediction"),
        timestep_spacing=SPACINGS,
        steps=(10,),
    ),
    # sigma schedules (Lu lambdas included), with the SD and the cosine betas
    grid(
        schedule=("karras", "exponential", "beta", "lu"),
        beta_schedule=("scaled_linear", "squaredcos_cap_v2"),
        final_sigmas_type=("zero", "sigma_min"),
        steps=(25,),
    ),
    grid(algorithm_type=("sde-dpmsolver++",), schedule=("karras", "exponential", "beta", "lu"), steps=(25,)),
    grid(schedule=("karras", "lu"), solver_order=(3,), steps=(2, 10, 50)),
    # dynamic thresholding, for both parameterisations
    grid(
        algorithm_type=("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
        prediction_type=("epsilon", "sample"),
        thresholding=(True,),
        sample_max_value=(1.5,),
        steps=(10,),
    ),
    # zero terminal SNR (v-prediction, trailing, as its paper recommends)
    grid(
        rescale_betas_zero_snr=(True,),
        prediction_type=("v_prediction", "epsilon"),
        timestep_spacing=("trailing", "leading"),
        steps=(25,),
    ),
    grid(
        rescale_betas_zero_snr=(True,),
        prediction_type=("v_prediction",),
        algorithm_type=("sde-dpmsolver++",),
        steps=(10,),
    ),
    # image-to-image: starting part-way (set_begin_index, add_noise)
    grid(
        algorithm_type=("dpmsolver++", "sde-dpmsolver++", "dpmsolver"),
        solver_order=(2, 3),
        steps=(25,),
        begin=(3,),
    ),
    grid(schedule=("karras",), steps=(25,), begin=(10,)),
    grid(steps=(10,), begin=(4,), set_begin=(False,)),  # start found by searching the timestep
    # DeepFloyd IF style: cosine betas, lambda_min_clipped, learned variance channels
    grid(
        beta_schedule=("squaredcos_cap_v2",),
        lambda_min_clipped=(-5.1,),
        variance_type=("learned_range",),
        thresholding=(True, False),
        algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
        steps=(25,),
        shape=((2, 3, 6, 6),),
        out_channels=(6,),
    ),
    # flow matching sigmas
    grid(
        use_flow_sigmas=(True,),
        prediction_type=("flow_prediction",),
        flow_shift=(1.0, 3.0),
        algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
        steps=(10,),
    ),
)


def dpm_config(case):
    config, run = case_args(case)
    if config.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver"):
        config.setdefault("final_sigmas_type", "sigma_min")
        if config["final_sigmas_type"] == "zero":
            config["final_sigmas_type"] = "sigma_min"
    return {**SD, **config}, run


@pytest.mark.parametrize("case", DPM_MS_GRID)
def test_dpm_multistep(case):
    config, run = dpm_config(case)
    if config.get("algorithm_type") == "sde-dpmsolver" and config.get("solver_order") == 3:
        with pytest.raises(ValueError, match="sde-dpmsolver"):
            run_pair(DPM_MS, config, **run)
        return
    run_pair(DPM_MS, config, **run)


def test_dpm_multistep_custom_timesteps_and_dynamic_shift():
    run_pair(DPM_MS, SD, set_kwargs={"timesteps": [999, 850, 700, 500, 420, 300, 120, 40, 5]})
    run_pair(DPM_MS, {**SD, "algorithm_type": "sde-dpmsolver++"}, set_kwargs={"timesteps": [901, 500, 100]})
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    ours, _ = run_pair(DPM_MS, flow, set_kwargs={"num_inference_steps": 8, "mu": 0.7})
    assert ours.config.flow_shift == pytest.approx(np.exp(0.7))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpm_multistep_refusals():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepScheduler(algorithm_type="dpm-solver-3000")
    with pytest.raises(ValueError, match="solver_type"):
        DPMSolverMultistepScheduler(solver_type="rk4")
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        )
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        DPMSolverMultistepScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverMultistepScheduler().step(np.zeros(SHAPE, np.float32), 999, np.zeros(SHAPE, np.float32))
    # diffusers' aliases: DEIS / UniPC names map to DPM-Solver++ midpoint
    mapped = DPMSolverMultistepScheduler(algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min")
    assert (mapped.config.algorithm_type, mapped.config.solver_type) == ("dpmsolver++", "midpoint")


def test_dpm_multistep_variance_noise_and_tuple_output():
    config = {**SD, "algorithm_type": "sde-dpmsolver++"}
    ref, ours = diffusers.DPMSolverMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        out = model_fn(x, t_ours, "epsilon", ours.alphas_cumprod)
        z = rng.standard_normal(SHAPE).astype(np.float32)
        (x,) = ours.step(out, t_ours, x, None, z, False)
        (x_ref,) = ref.step(torch.from_numpy(out), t_ref, x_ref, None, torch.from_numpy(z), False)
        assert_close(x, x_ref, "variance_noise")


# ---------------------------------------------------------------------------- DPM-Solver singlestep
DPM_SS = "DPMSolverSinglestepScheduler"
DPM_SS_GRID = merge(
    grid(
        algorithm_type=("dpmsolver++", "sde-dpmsolver++", "dpmsolver"),
        solver_order=(1, 2, 3),
        solver_type=("midpoint", "heun"),
        steps=(10,),
    ),
    grid(
        algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
        solver_order=(3,),
        solver_type=("midpoint", "heun"),
        steps=(25,),
    ),
    # lower_order_final stays off only for step counts divisible by the order and a sigma_min end
    grid(
        solver_order=(2, 3),
        final_sigmas_type=("zero", "sigma_min"),
        steps=(1, 2, 12, 50),
    ),
    grid(
        prediction_type=("epsilon", "sample", "v_prediction"),
        algorithm_type=("dpmsolver++", "dpmsolver"),
        steps=(10,),
    ),
    grid(schedule=("karras", "exponential", "beta"), solver_order=(2, 3), steps=(25,)),
    grid(schedule=("karras",), final_sigmas_type=("sigma_min",), steps=(24,)),
    grid(thresholding=(True,), prediction_type=("epsilon", "sample"), sample_max_value=(1.5,), steps=(10,)),
    grid(solver_order=(2, 3), algorithm_type=("dpmsolver++", "sde-dpmsolver++"), steps=(10,), begin=(3, 4)),
    grid(
        beta_schedule=("squaredcos_cap_v2",),
        lambda_min_clipped=(-5.1,),
        variance_type=("learned_range",),
        steps=(10,),
        shape=((2, 3, 6, 6),),
        out_channels=(6,),
    ),
    grid(use_flow_sigmas=(True,), prediction_type=("flow_prediction",), flow_shift=(3.0,), steps=(10,)),
)


@pytest.mark.parametrize("case", DPM_SS_GRID)
def test_dpm_singlestep(case):
    config, run = dpm_config(case)
    ours, ref = run_pair(DPM_SS, config, **run)
    assert ours.order_list == ref.order_list
    assert ours.config.lower_order_final == ref.config.lower_order_final


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpm_singlestep_custom_timesteps_and_refusals():
    run_pair(DPM_SS, SD, set_kwargs={"timesteps": [999, 800, 650, 400, 230, 60]})
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverSinglestepScheduler(solver_order=4)
    ours = DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min")
    ours.set_timesteps(4)
    with pytest.raises(ValueError, match="thresholding"):
        ours.step(np.zeros(SHAPE, np.float32), ours.timesteps[0], np.zeros(SHAPE, np.float32))


# ---------------------------------------------------------------------------- UniPC
UNIPC = "UniPCMultistepScheduler"
UNIPC_GRID = merge(
    grid(
        solver_type=("bh1", "bh2"),
        predict_x0=(True, False),
        solver_order=(1, 2, 3, 4),
        steps=(10,),
        set_begin=(False,),
    ),
    grid(solver_order=(2, 3), steps=(1, 2, 25, 50)),
    grid(solver_order=(2, 3), lower_order_final=(False,), steps=(10,)),
    grid(
        prediction_type=("epsilon", "sample", "v_prediction"),
        predict_x0=(True, False),
        timestep_spacing=SPACINGS,
        steps=(10,),
    ),
    grid(schedule=("karras", "exponential", "beta"), final_sigmas_type=("zero", "sigma_min"), steps=(25,)),
    grid(schedule=("karras",), solver_order=(3,), steps=(25,)),
    grid(schedule=("karras",), sigma_min=(0.1,), sigma_max=(10.0,), steps=(10,)),
    grid(disable_corrector=([0], [0, 1, 2], [5]), steps=(10,)),
    grid(thresholding=(True,), prediction_type=("epsilon", "sample"), sample_max_value=(1.5,), steps=(10,)),
    grid(
        rescale_betas_zero_snr=(True,),
        prediction_type=("v_prediction",),
        timestep_spacing=("trailing", "leading"),
        steps=(25,),
    ),
    grid(solver_order=(2, 3), predict_x0=(True, False), steps=(25,), begin=(3,)),
    grid(steps=(10,), begin=(4,), set_begin=(False,)),
    grid(
        use_flow_sigmas=(True,),
        prediction_type=("flow_prediction",),
        flow_shift=(1.0, 3.0),
        final_sigmas_type=("zero", "sigma_min"),
        steps=(10,),
    ),
)


@pytest.mark.parametrize("case", UNIPC_GRID)
def test_unipc(case):
    config, run = case_args(case)
    zero_final = config.get("final_sigmas_type", "zero") == "zero"
    if zero_final and (not config.get("predict_x0", True) or not config.get("lower_order_final", True)):
        # refused by sdort (NaN in diffusers, see test_unipc_nan_configurations): compare on sigma_min
        config["final_sigmas_type"] = "sigma_min"
    elif zero_final and config.get("solver_type") == "bh1":
        run["ref_nan_at_end"] = True
    run_pair(UNIPC, {**SD, **config}, **run)


def test_unipc_nan_configurations():
    """Where diffusers' last step at sigma = 0 is NaN, sdort refuses the option or returns the limit."""
    for option in ({"predict_x0": False}, {"lower_order_final": False}):
        with pytest.raises(ValueError, match=next(iter(option))):
            UniPCMultistepScheduler(**option)
        run_pair(UNIPC, {**SD, **option, "final_sigmas_type": "sigma_min"}, steps=10)
    # bh1: the last step (order 1, from sigma_s to 0) is x_0 predicted at sigma_s
    ours = UniPCMultistepScheduler(**SD, solver_type="bh1")
    ours.set_timesteps(3)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in ours.timesteps:
        out = model_fn(x, t, "epsilon", ours.alphas_cumprod)
        prev = ours.step(out, t, x).prev_sample
        if t == ours.timesteps[-1]:
            ours._step_index -= 1
            np.testing.assert_allclose(prev, ours.convert_model_output(out, sample=x), rtol=1e-6)
        x = prev


def test_unipc_flow_options():
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    run_pair(UNIPC, flow, set_kwargs={"sigmas": np.array([1.0, 0.8, 0.55, 0.3, 0.1])})
    run_pair(UNIPC, {**flow, "shift_terminal": 0.05, "flow_shift": 2.0}, steps=10)
    run_pair(UNIPC, {**flow, "use_dynamic_shifting": True}, set_kwargs={"num_inference_steps": 10, "mu": 1.1})
    run_pair(UNIPC, {**flow, "use_karras_sigmas": True}, steps=10)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        UniPCMultistepScheduler().set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="mu"):
        UniPCMultistepScheduler(**flow, use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="shift_terminal"):
        UniPCMultistepScheduler(shift_terminal=0.1)
    with pytest.raises(ValueError, match="solver_type"):
        UniPCMultistepScheduler(solver_type="bh3")
    assert UniPCMultistepScheduler(solver_type="midpoint").config.solver_type == "bh2"


def test_unipc_solver_p():
    """A DPM-Solver++ predictor with the UniC corrector (``solver_p``)."""
    ref = diffusers.UniPCMultistepScheduler(**SD, solver_p=diffusers.DPMSolverMultistepScheduler(**SD))
    ours = UniPCMultistepScheduler(**SD, solver_p=DPMSolverMultistepScheduler(**SD))
    run_pair(UNIPC, steps=10, ref_scheduler=ref, our_scheduler=ours)


# ---------------------------------------------------------------------------- DEIS
DEIS = "DEISMultistepScheduler"
DEIS_GRID = merge(
    grid(solver_order=(1, 2, 3), steps=(1, 2, 10, 25, 50)),
    grid(solver_order=(1, 2, 3), steps=(10,), set_begin=(False,)),
    grid(solver_order=(2, 3), lower_order_final=(False,), steps=(10,)),
    grid(prediction_type=("epsilon", "sample", "v_prediction"), timestep_spacing=SPACINGS, steps=(10,)),
    grid(prediction_type=("v_prediction",), solver_order=(3,), timestep_spacing=("trailing",), steps=(10,)),
    grid(schedule=("karras", "exponential", "beta"), solver_order=(2, 3), steps=(25,)),
    grid(thresholding=(True,), prediction_type=("epsilon", "sample"), sample_max_value=(1.5,), steps=(10,)),
    grid(solver_order=(2, 3), steps=(25,), begin=(3,)),
    grid(steps=(10,), begin=(4,), set_begin=(False,)),
    grid(beta_schedule=("squaredcos_cap_v2",), solver_order=(3,), steps=(10,)),
    grid(use_flow_sigmas=(True,), prediction_type=("flow_prediction",), flow_shift=(1.0, 3.0), steps=(10,)),
)


@pytest.mark.parametrize("case", DEIS_GRID)
def test_deis(case):
    config, run = case_args(case)
    # DEIS's third-order coefficients are differences of nearly equal float32 numbers: one ulp of
    # sigma (torch's float32 sqrt, which ulp depends on the CPU) moves them by ~3e-5 relative at 25 steps
    # and ~1e-4 at 50, more the closer the sigmas, so whether a given step count stays within 1e-5 is a
    # matter of which sigmas the CPU rounded differently: every third-order run steps on sdort's sigmas.
    shared = config.get("solver_order") == 3
    run_pair(DEIS, {**SD, **config}, shared_sigmas=shared, **run)


def test_deis_aliases_and_refusals():
    mapped = DEISMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint")
    assert (mapped.config.algorithm_type, mapped.config.solver_type) == ("deis", "logrho")
    with pytest.raises(ValueError, match="algorithm_type"):
        DEISMultistepScheduler(algorithm_type="unipc")
    with pytest.raises(ValueError, match="solver_type"):
        DEISMultistepScheduler(solver_type="bh3")


# ---------------------------------------------------------------------------- LCM and TCD
LCM_TCD_COMMON = merge(
    grid(steps=(1, 2, 4, 8, 25, 50)),
    grid(prediction_type=("epsilon", "sample", "v_prediction"), steps=(4,)),
    grid(thresholding=(True,), clip_sample=(False, True), steps=(4,)),
    grid(clip_sample=(True,), clip_sample_range=(1.2,), steps=(4,)),
    grid(rescale_betas_zero_snr=(True,), prediction_type=("v_prediction",), set_alpha_to_one=(False,), steps=(4,)),
    grid(original_inference_steps=(100,), timestep_scaling=(5.0,), steps=(10,)),
    grid(beta_schedule=("linear", "squaredcos_cap_v2"), steps=(4,)),
    grid(steps=(8, 25), begin=(2,)),
    grid(set_kwargs=(
        {"num_inference_steps": 4, "original_inference_steps": 30},
        {"num_inference_steps": 4, "strength": 0.6},
        {"timesteps": [999, 759, 499, 259]},
        {"timesteps": [799, 600, 259, 1], "strength": 0.5},
    ),),
)


def consistency_case(case):
    config, run = case_args(case)
    if "set_kwargs" in run:
        run["set_kwargs"] = dict(run["set_kwargs"])
    return config, run


@pytest.mark.parametrize("case", LCM_TCD_COMMON)
def test_lcm(case):
    config, run = consistency_case(case)
    run_pair("LCMScheduler", config, **run)


TCD_GRID = merge(
    [pytest.param({**p.values[0], "eta": 0.3}, id=p.id + "-0.3") for p in LCM_TCD_COMMON],
    grid(eta=(0.0, 0.7, 1.0), steps=(4, 25)),
    grid(eta=(0.0, 1.0), steps=(8,), begin=(2,)),
)


@pytest.mark.parametrize("case", TCD_GRID)
def test_tcd(case):
    case = dict(case)
    eta = case.pop("eta")
    config, run = consistency_case(case)
    run_pair("TCDScheduler", config, step_kwargs={"eta": eta}, **run)


def test_lcm_tcd_details():
    # diffusers' TCD takes every training timestep when original_inference_steps is given explicitly
    run_pair(
        "TCDScheduler",
        set_kwargs={"num_inference_steps": 7, "original_inference_steps": 20},
        step_kwargs={"eta": 0.5},
    )
    for cls in (LCMScheduler, TCDScheduler):
        ours = cls()
        ref = getattr(diffusers, cls.__name__)()
        ours.set_timesteps(4)
        ref.set_timesteps(4)
        for t in ref.timesteps:
            assert int(ours.previous_timestep(t.item())) == int(ref.previous_timestep(t))
        with pytest.raises(ValueError, match="num_inference_steps"):
            ours.set_timesteps(60)
        with pytest.raises(ValueError, match="descending"):
            ours.set_timesteps(timesteps=[500, 700])
        x = np.ones(SHAPE, np.float32)
        ours.set_timesteps(2)
        result = ours.step(x, ours.timesteps[0], x, generator=TorchDraws(0), return_dict=False)
        assert len(result) == 2
    tcd = TCDScheduler()
    tcd.set_timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)


@pytest.mark.parametrize("name", OURS)
def test_float16(name):
    """float16 in, float16 out where diffusers returns float16, values within float16 rounding."""
    config = {"algorithm_type": "sde-dpmsolver++"} if name.startswith("DPM") else {}
    ref, ours = getattr(diffusers, name)(**SD, **config), OURS[name](**SD, **config)
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    x_ours = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)
    x_ref = torch.from_numpy(x_ours.copy())
    gen_ref, gen_ours = torch.Generator().manual_seed(0), TorchDraws(0)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        out = model_fn(x_ours, t_ours, "epsilon", ours.alphas_cumprod).astype(np.float16)
        out_ref = model_fn(x_ref.float().numpy(), t_ref, "epsilon", ours.alphas_cumprod)
        out_ref = torch.from_numpy(out_ref.astype(np.float16))
        x_ours = ours.step(out, t_ours, x_ours, generator=gen_ours).prev_sample
        x_ref = ref.step(out_ref, t_ref, x_ref, **accepted(ref.step, {"generator": gen_ref})).prev_sample
        assert x_ours.dtype == np.float16 and x_ref.dtype == torch.float16
        scale = max(1.0, float(x_ref.abs().max()))
        assert float(np.abs(x_ours.astype(np.float32) - x_ref.float().numpy()).max()) <= 1e-2 * scale


# ---------------------------------------------------------------------------- configs
ALL = (DPM_MS, DPM_SS, UNIPC, DEIS, "LCMScheduler", "TCDScheduler")


@pytest.mark.parametrize("name", ALL)
def test_from_sd15_pndm_config(name, tmp_path):
    """A Stable Diffusion 1.5 scheduler_config.json (PNDM) moved to each class, as users do."""
    ours = OURS[name].from_config(SD15_PNDM_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, name).from_config(SD15_PNDM_CONFIG)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in public} == public
    assert ours.config["_class_name"] == name
    run_pair(name, steps=8, ref_scheduler=ref, our_scheduler=ours)
    # and back through scheduler_config.json
    ours.save_config(tmp_path)
    again = OURS[name].from_pretrained(tmp_path)
    assert {k: again.config[k] for k in public} == {k: ours.config[k] for k in public}


@pytest.mark.parametrize("name", ALL)
def test_signatures_follow_diffusers(name):
    """Positional parameters of the public methods are diffusers' own, in the same order."""
    ours, ref = OURS[name], getattr(diffusers, name)
    for method in ("__init__", "set_timesteps", "step", "add_noise", "scale_model_input"):
        def positional(fn):
            return [
                p.name
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
            ]

        assert positional(getattr(ours, method)) == positional(getattr(ref, method)), method
    assert ours.order == ref.order
    assert "kwargs" in inspect.signature(ours.step).parameters
    assert sorted(c.__name__ for c in ours().compatibles if c.__name__ in ALL) == sorted(
        c.__name__ for c in ref().compatibles if c.__name__ in ALL
    )


def test_compatible_conversions():
    """Configs move between the solver classes as in diffusers (aliases included)."""
    cases = [
        (DPM_MS, {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, UNIPC),
        (UNIPC, {**SD, "solver_type": "bh1", "rescale_betas_zero_snr": True}, DPM_MS),
        (DEIS, {**SD, "solver_order": 3}, DPM_SS),
        (DPM_SS, {**SD, "final_sigmas_type": "sigma_min"}, DEIS),
    ]
    for source, config, target in cases:
        src_ours, src_ref = OURS[source](**config), getattr(diffusers, source)(**config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(diffusers, target).from_config(src_ref.config)
        ours = OURS[target].from_config(src_ours.config)
        public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
        assert {k: ours.config[k] for k in public} == public, (source, target)
        run_pair(target, steps=10, ref_scheduler=ref, our_scheduler=ours)
