"""sdort's numpy schedulers against diffusers' torch schedulers, step by step.

Both run the same loop with the same deterministic model function and the same noise draws
(diffusers from a torch.Generator, sdort from an object replaying a torch.Generator seeded alike).
Timesteps computed in numpy on both sides (the spacings) must be equal; sigmas, and timesteps derived
from them, within the bounds scheduler_support derives from torch's float32 sqrt and log (an ulp, which
one depends on the CPU); every intermediate sample within 1e-5 relative to the largest magnitude the step
computes with (``step_scales``: before x_0 is clipped and before PNDM's large terms cancel).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sdort.schedulers as S  # noqa: E402
from sdort.schedulers import schedule  # noqa: E402
from scheduler_support import (  # noqa: E402
    U,
    assert_close,
    assert_schedule_within,
    assert_ulps,
    assert_within,
    compare_add_noise,
    log_sigma_uncertainty,
    sigma_rtol_from_alphas_cumprod,
    sigma_to_t_tolerance,
    step_arguments,
    textbook_ancestral_rtols,
    ulp,
    zero_snr_rtols,
)

# diffusers 0.42 converts tensors with np.array(..., copy=False) paths that numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 4, 6, 6)
STEPS = (1, 2, 10, 25, 50)
SPACINGS = ("linspace", "leading", "trailing")


def model_fn(x: np.ndarray, t, out_channels: int | None = None) -> np.ndarray:
    """A cheap deterministic nonlinear stand-in for the UNet."""
    t = float(np.asarray(t).reshape(-1)[0])
    out = 0.7 * np.tanh(x) + 0.3 * np.sin(1.3 * x + 0.01 * t) - 0.05 * x
    if out_channels and out_channels > x.shape[1]:
        out = np.concatenate([out, 0.5 + 0.4 * np.tanh(0.5 * x + 0.001 * t)], axis=1)  # "learned" variance
    return out.astype(np.float32)


VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")


def step_scales(ours, timestep, sample, model_output) -> tuple[float, float]:
    """(x_0 scale, x_{t-1} scale): the largest magnitudes a step computes with (Euler types: sigma_step_scales).

    Rounding (and torch's last-ulp square roots of alpha_bar) is relative to the terms of a sum, not to the
    sum: x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) has terms |x_t| / sqrt(a), hundreds where a = alpha_bar_t is
    small, which cancel to |x_0| ~ 1 and are then clipped to [-1, 1]; so x_0 is compared relative to its terms
    before the clip (v: sqrt(a)|x_t| + sqrt(1 - a)|v|; sample: the output itself). x_{t-1} = sqrt(a_prev) x_0
    + ... carries that rounding times sqrt(a_prev) (DDPM: times sqrt(a_prev) beta_t / (1 - a) <= sqrt(a_prev)).
    PNDM goes through epsilon and forms x_{t-1} = sqrt(a_prev / a) x_t - c eps: its terms are up to
    |x_t| / sqrt(a) with a at the noisier of the two timesteps it uses (t + T // n on its second step).
    """
    name = type(ours).__name__
    if name not in VP_SCHEDULERS:
        return sigma_step_scales(ours, sample, model_output)
    cfg = ours.config
    ac = ours.alphas_cumprod.astype(np.float64)
    t = int(np.asarray(timestep).reshape(-1)[0])
    x = np.abs(np.asarray(sample, dtype=np.float64))
    out = np.abs(np.asarray(model_output, dtype=np.float64)[:, : x.shape[1]])
    if name == "PNDMScheduler":
        noisier = min(t + cfg.num_train_timesteps // ours.num_inference_steps, len(ac) - 1)
        a = min(ac[t], ac[noisier])
        return 1.0, float((x.max() + out.max()) / np.sqrt(a))
    a = ac[t]
    if cfg.prediction_type == "epsilon":
        terms = (x + np.sqrt(1 - a) * out) / np.sqrt(a)
    elif cfg.prediction_type == "v_prediction":
        terms = np.sqrt(a) * x + np.sqrt(1 - a) * out
    else:
        terms = out
    x0_scale = float(terms.max())
    if name == "DDPMScheduler":
        prev_t = int(ours.previous_timestep(t))
    else:
        prev_t = t - cfg.num_train_timesteps // ours.num_inference_steps
    a_prev = ac[prev_t] if prev_t >= 0 else float(getattr(ours, "final_alpha_cumprod", 1.0))
    return x0_scale, float(np.sqrt(a_prev) * x0_scale)


def sigma_step_scales(ours, sample, model_output) -> tuple[float, float]:
    """(x_0 scale, x_next scale) of an Euler-type step: x_0 = x - sigma eps (v: c_out v + x / (sigma^2 + 1), with
    |c_out| < 1) and x_next = x + (x - x_0) / sigma * (sigma_next - sigma) are sums at the magnitude of x itself
    (up to sigma_max |noise|, hundreds with the linear betas), whatever the size of the result. Churn raises
    sigma to sigma_hat <= sqrt(2) sigma: that bound is used for the eps term either way.
    """
    sigma = float(ours.sigmas[ours.step_index if ours.step_index is not None else 0])
    x = float(np.abs(np.asarray(sample, dtype=np.float64)).max())
    out = float(np.abs(np.asarray(model_output, dtype=np.float64)).max())
    if ours.config.prediction_type == "epsilon":
        x0_scale = max(x, np.sqrt(2) * sigma * out)
    elif ours.config.prediction_type == "v_prediction":
        x0_scale = out + x / (sigma * sigma + 1)
    else:
        x0_scale = out
    return x0_scale, max(x, x0_scale)


def schedule_tolerances(ours, set_kwargs: dict):
    """(timestep tolerance or None for equality, sigma tolerance or None) of an Euler-type schedule.

    * timesteps from the spacing (linspace / leading / trailing) or given by the caller: numpy on both sides,
      equal. Given sigmas are used as given: equal.
    * sigmas interpolated from the training sigmas sqrt((1 - ac) / ac), which diffusers takes with torch's
      sqrt (an ulp): two ulps after interpolating and rounding; karras / exponential / beta ramps between two
      such sigmas likewise (each point a convex combination, or a power of one, of the ends).
    * zero terminal SNR: the training sigmas as zero_snr_rtols and
      sigma_rtol_from_alphas_cumprod derive, at the two training steps each timestep lies between.
    * log-linear interpolation: exp (torch's, an ulp) of a linspace between two float32 logs of the end sigmas:
      the ends' log_sigma_uncertainty, two ulps of each point for the linspace, plus 4U for the exps.
    * timesteps that sigma_to_t finds for karras / exponential / beta / given sigmas: sigma_to_t_tolerance,
      the located sigma differing as the ramp's ends do (2U); continuous timesteps 0.25 log sigma (torch's
      log: an ulp, sdort's rounded once) by 0.25 (d sigma / sigma + 1.5 ulp(log sigma)), 0.25 being exact.
    """
    cfg = ours.config
    sigmas = ours.sigmas.astype(np.float64)
    timesteps = ours.timesteps.astype(np.float64)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(ours.alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    converted = any(cfg.get(f"use_{k}_sigmas") for k in ("karras", "exponential", "beta"))
    given_sigmas = set_kwargs.get("sigmas") is not None
    continuous = cfg.get("timestep_type") == "continuous" and cfg.prediction_type == "v_prediction"

    if given_sigmas:
        sigma_tol, sigma_rel = None, np.zeros_like(sigmas)
    else:
        sigma_rel = np.full_like(sigmas, 4 * U)
        if cfg.rescale_betas_zero_snr:
            betas = schedule.make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                        cfg.trained_betas)
            train_rel = sigma_rtol_from_alphas_cumprod(ours.alphas_cumprod, zero_snr_rtols(betas)[1])
            train_rel[-1] = 4 * U  # alpha_bar_T is set to 2**-24 on both sides
            if converted:
                sigma_rel[:] = train_rel.max()
            else:
                lo = np.clip(np.floor(timesteps), 0, len(train_rel) - 1).astype(np.int64)
                hi = np.clip(np.ceil(timesteps), 0, len(train_rel) - 1).astype(np.int64)
                sigma_rel[:-1] = np.maximum(train_rel[lo], train_rel[hi]) + 4 * U
        if cfg.get("interpolation_type") == "log_linear":
            with np.errstate(divide="ignore"):
                ends = max(abs(log_sigmas[0]), abs(log_sigmas[-1]))
                sigma_rel = log_sigma_uncertainty(ends) + 2 * ulp(np.log(sigmas)) + 4 * U
        sigma_tol = sigma_rel * sigmas
        # the final sigma: zero, or the sigma of alpha_bar_0 (one square root; zero SNR: its bound)
        sigma_tol[-1] = 2 * ulp(sigmas[-1]) + (train_rel[0] * sigmas[-1] if cfg.rescale_betas_zero_snr else 0.0)

    if continuous:
        log_sigma = np.log(sigmas[:-1])
        timestep_tol = 0.25 * (sigma_rel[:-1] + 1.5 * ulp(log_sigma))
    elif converted or given_sigmas:
        dlog = 0.0 if given_sigmas else 2 * U + (sigma_rel.max() if cfg.rescale_betas_zero_snr else 0.0)
        timestep_tol = sigma_to_t_tolerance(timesteps, log_sigmas, dlog)
    else:
        timestep_tol = None
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
    out_channels=None,
):
    """Run diffusers' and sdort's ``name`` side by side and compare everything after every step."""
    config = dict(config or {})
    ref = getattr(diffusers, name)(**config)
    ours = getattr(S, name)(**config)
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    ref.set_timesteps(**set_kwargs)
    ours.set_timesteps(**set_kwargs)

    timestep_tol, sigma_tol = schedule_tolerances(ours, set_kwargs) if hasattr(ref, "sigmas") else (None, None)
    assert_schedule_within(ours, ref, timestep_tol, sigma_tol, name)
    # (sigma_max^2 + 1)^(1/2) with torch's square root: an ulp of the sigma, an ulp of the root
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    if hasattr(ref, "sigmas") and ours.config.get("rescale_betas_zero_snr"):
        # Zero terminal SNR: the schedule differs by up to ~1e-5 relative (the bound above: 1 / (1 - alpha_bar)
        # times the float32 ratios' roundings), the step's own tolerance. The steps are compared on one schedule,
        # sdort's, checked against diffusers' just above, so that they test the step arithmetic.
        ref.sigmas = torch.from_numpy(ours.sigmas.copy())

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    x_ours = start * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    if begin:
        if set_begin:
            ours.set_begin_index(begin)
            if hasattr(ref, "set_begin_index"):
                ref.set_begin_index(begin)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = compare_add_noise(ours, ref, start, noise, begin, f"{name} add_noise")

    # sdort gets the same arguments whatever the class: extra ones must be accepted
    ref_kwargs, our_kwargs, _, _ = step_arguments(ref, step_kwargs, seed)

    # Lockstep: after each comparison both schedulers go on from sdort's sample, and both step with the model
    # output computed from sdort's scaled input, so that each step's comparison measures that step's arithmetic
    # rather than last bits inherited from earlier ones (an ulp of diffusers' square roots at sigma_max ~ 157
    # is 6e-5 of a sample of magnitude 600, which every later step would carry at the size of its O(1) result).
    x_ref = torch.from_numpy(x_ours.copy())
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps[begin:], ref.timesteps[begin:])):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_close(in_ours, in_ref, f"{name} scale_model_input, step {i}")
        out_ours = model_fn(in_ours, t_ours, out_channels)
        x0_scale, sample_scale = step_scales(ours, t_ours, x_ours, out_ours)
        lost = False
        if name == "EulerAncestralDiscreteScheduler":
            # diffusers' sigma_down = sqrt(sigma_to^2 - sigma_up^2) cancels (sigma / sigma_to)^2 times; where that
            # leaves it no correct bit (2 steps of the linear betas: 157 to 0.01), its value is rounding noise, nan
            # if torch's sqrt rounds sigma_up above sigma_to: that step's sample is not compared (sdort's must be
            # finite)
            k = ours.step_index if ours.step_index is not None else begin
            sigma, sigma_to = ours.sigmas[k], ours.sigmas[k + 1]
            lost = sigma_to > 0 and textbook_ancestral_rtols(sigma, sigma_to)[1] >= 1
        res_ours = ours.step(out_ours, t_ours, x_ours, **our_kwargs)
        res_ref = ref.step(torch.from_numpy(out_ours.copy()), t_ref, x_ref, **ref_kwargs)
        x_ours = res_ours.prev_sample
        assert isinstance(x_ours, np.ndarray) and x_ours.dtype == np.float32
        if lost:
            assert np.isfinite(x_ours).all()
        else:
            assert_close(x_ours, res_ref.prev_sample, f"{name} step {i} (t={t_ours})", sample_scale)
        if getattr(res_ref, "pred_original_sample", None) is not None:
            assert_close(res_ours.pred_original_sample, res_ref.pred_original_sample, f"{name} x0 step {i}", x0_scale)
        if hasattr(ref, "step_index"):
            assert ours.step_index == ref.step_index
        x_ref = torch.from_numpy(x_ours.copy())
    return ours, ref


# ----------------------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction", "sample"))
def test_ddim_grid(prediction_type, spacing, steps):
    run_pair("DDIMScheduler", {"prediction_type": prediction_type, "timestep_spacing": spacing}, steps)


@pytest.mark.parametrize(
    "config, steps, step_kwargs",
    [
        ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
          "set_alpha_to_one": False, "steps_offset": 1}, 25, {}),
        ({"beta_schedule": "squaredcos_cap_v2"}, 10, {}),
        ({"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}, 10, {}),
        ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}, 25, {}),
        ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
          "clip_sample": False}, 25, {}),
        ({"clip_sample_range": 0.5}, 10, {"use_clipped_model_output": True}),
        ({}, 10, {"eta": 1.0}),
        ({"beta_schedule": "scaled_linear", "clip_sample": False}, 50, {"eta": 0.5, "use_clipped_model_output": True}),
        ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 10, {}),
    ],
)
def test_ddim_options(config, steps, step_kwargs):
    run_pair("DDIMScheduler", config, steps, step_kwargs=step_kwargs)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_part_way(spacing):
    run_pair("DDIMScheduler", {"timestep_spacing": spacing, "steps_offset": 1}, 25, begin=10, step_kwargs={"eta": 0.3})


# ----------------------------------------------------------------------------------------- PNDM
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
@pytest.mark.parametrize("skip_prk_steps", (True, False))
def test_pndm_grid(skip_prk_steps, prediction_type, spacing, steps):
    config = {"skip_prk_steps": skip_prk_steps, "prediction_type": prediction_type, "timestep_spacing": spacing}
    if not skip_prk_steps and steps < 4:
        # the Runge-Kutta warm-up needs 4 steps: diffusers fails (broadcast error), sdort says why
        with pytest.raises(ValueError):
            diffusers.PNDMScheduler(**config).set_timesteps(steps)
        with pytest.raises(ValueError, match="skip_prk_steps"):
            S.PNDMScheduler(**config).set_timesteps(steps)
        return
    run_pair("PNDMScheduler", config, steps)


@pytest.mark.parametrize("skip_prk_steps", (True, False))
def test_pndm_sd_config_and_part_way(skip_prk_steps):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False,
              "steps_offset": 1, "skip_prk_steps": skip_prk_steps}
    run_pair("PNDMScheduler", config, 50)
    run_pair("PNDMScheduler", config, 25, begin=7)


def test_pndm_step_prk_and_plms_directly():
    ref, ours = diffusers.PNDMScheduler(), S.PNDMScheduler()
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_array_equal(ours.prk_timesteps, ref.prk_timesteps)
    np.testing.assert_array_equal(ours.plms_timesteps, ref.plms_timesteps)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x)
    for t in ours.prk_timesteps:
        x = ours.step_prk(model_fn(x, t), t, x).prev_sample
        x_ref = ref.step_prk(torch.from_numpy(model_fn(x_ref.numpy(), t)), int(t), x_ref).prev_sample
        assert_close(x, x_ref, "step_prk")
    for t in ours.plms_timesteps:
        x = ours.step_plms(model_fn(x, t), t, x, return_dict=False)[0]
        x_ref = ref.step_plms(torch.from_numpy(model_fn(x_ref.numpy(), t)), int(t), x_ref, return_dict=False)[0]
        assert_close(x, x_ref, "step_plms")
    fresh = S.PNDMScheduler()
    fresh.set_timesteps(10)
    with pytest.raises(ValueError):
        fresh.step_plms(x, 900, x)


# ----------------------------------------------------------------------------------------- Euler
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction", "sample"))
def test_euler_grid(prediction_type, spacing, steps):
    run_pair("EulerDiscreteScheduler", {"prediction_type": prediction_type, "timestep_spacing": spacing}, steps)


SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("steps", (1, 2, 10, 25))
@pytest.mark.parametrize("sigmas", ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
def test_euler_sigma_schedules(sigmas, steps):
    run_pair("EulerDiscreteScheduler", {**SD, sigmas: True}, steps)


@pytest.mark.parametrize(
    "config, steps",
    [
        ({**SD, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 10),
        ({**SD, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 10),
        ({**SD, "interpolation_type": "log_linear"}, 10),
        ({**SD, "final_sigmas_type": "sigma_min", "timestep_spacing": "leading", "steps_offset": 1}, 25),
        ({**SD, "timestep_type": "continuous", "prediction_type": "v_prediction"}, 10),
        ({**SD, "timestep_type": "continuous", "prediction_type": "v_prediction", "use_karras_sigmas": True}, 25),
        ({**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 25),
        ({**SD, "rescale_betas_zero_snr": True}, 10),
        ({"beta_schedule": "squaredcos_cap_v2"}, 25),
    ],
)
def test_euler_options(config, steps):
    run_pair("EulerDiscreteScheduler", config, steps)


@pytest.mark.parametrize(
    "step_kwargs",
    [{"s_churn": 0.5}, {"s_churn": 80.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.003}],
)
def test_euler_churn(step_kwargs):
    run_pair("EulerDiscreteScheduler", SD, 25, step_kwargs=step_kwargs)


def test_euler_custom_timesteps_and_sigmas():
    run_pair("EulerDiscreteScheduler", SD, set_kwargs={"timesteps": [999, 800, 650.5, 400, 120, 3]})
    sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
    run_pair("EulerDiscreteScheduler", SD, set_kwargs={"sigmas": sigmas})
    ours = S.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError):
        ours.set_timesteps(10, timesteps=[999, 500])


@pytest.mark.parametrize("set_begin", (True, False))
@pytest.mark.parametrize("config", ({**SD}, {**SD, "use_karras_sigmas": True, "timestep_spacing": "leading"}))
def test_euler_part_way(config, set_begin):
    # with set_begin_index (as pipelines do), or with the index found from the first timestep
    run_pair("EulerDiscreteScheduler", config, 25, begin=9, set_begin=set_begin, step_kwargs={"s_churn": 1.0})


def test_euler_refuses_integer_timestep_and_matches_get_velocity():
    ours, ref = S.EulerDiscreteScheduler(**SD), diffusers.EulerDiscreteScheduler(**SD)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError):
        ours.step(x, 3, x)
    noise = np.full(SHAPE, 0.5, np.float32)
    t = ours.timesteps[[2, 5]]
    v_ours = ours.get_velocity(x, noise, t)
    v_ref = ref.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[[2, 5]])
    assert_close(v_ours, v_ref, "get_velocity")


# ----------------------------------------------------------------------------------------- Euler ancestral
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
def test_euler_ancestral_grid(prediction_type, spacing, steps):
    run_pair("EulerAncestralDiscreteScheduler", {"prediction_type": prediction_type, "timestep_spacing": spacing}, steps)


@pytest.mark.parametrize("set_begin", (True, False))
def test_euler_ancestral_options(set_begin):
    run_pair("EulerAncestralDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                                 "prediction_type": "v_prediction"}, 25)
    run_pair("EulerAncestralDiscreteScheduler", {**SD, "steps_offset": 1, "timestep_spacing": "leading"}, 30,
             begin=12, set_begin=set_begin)


# ----------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction", "sample"))
def test_ddpm_grid(prediction_type, spacing, steps):
    run_pair("DDPMScheduler", {"prediction_type": prediction_type, "timestep_spacing": spacing}, steps)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")  # fixed_large_log: sqrt(log)
@pytest.mark.parametrize("variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned", "learned_range"))
def test_ddpm_variance_types(variance_type):
    learned = variance_type.startswith("learned")
    run_pair("DDPMScheduler", {"variance_type": variance_type}, 10, out_channels=2 * SHAPE[1] if learned else None)


@pytest.mark.parametrize(
    "config, kwargs",
    [
        ({"thresholding": True, "prediction_type": "sample", "sample_max_value": 2.0}, {"steps": 25}),
        ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False,
          "prediction_type": "v_prediction"}, {"steps": 10}),
        ({"beta_schedule": "sigmoid"}, {"steps": 10}),
        ({**SD, "clip_sample": False}, {"set_kwargs": {"timesteps": [990, 700, 500, 260, 90, 10, 0]}}),
        ({**SD, "clip_sample": False, "steps_offset": 1}, {"steps": 25, "begin": 10}),
    ],
)
def test_ddpm_options(config, kwargs):
    run_pair("DDPMScheduler", config, **kwargs)


# ----------------------------------------------------------------------------------------- configuration
ALL = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
SD15 = {
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


def _public(config):
    return {k: v for k, v in dict(config).items() if k not in ("_use_default_values", "_diffusers_version")}


def test_config_round_trip_across_classes(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    ours = S.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    ref = diffusers.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert ours.config["_class_name"] == "PNDMScheduler"
    assert _public(ours.config) == _public(ref.config)
    assert ours.config.steps_offset == 1 and ours.config["_diffusers_version"] == "0.6.0"

    euler = S.EulerDiscreteScheduler.from_config(ours.config)
    euler_ref = diffusers.EulerDiscreteScheduler.from_config(ref.config)
    assert _public(euler.config) == _public(euler_ref.config)
    assert euler.config._class_name == "EulerDiscreteScheduler"
    assert euler.config.skip_prk_steps is True  # kept for the next conversion
    back = S.PNDMScheduler.from_config(euler.config)
    assert _public(back.config) == {**_public(ours.config)}
    for a, b in ((ours, ref), (euler, euler_ref)):
        a.set_timesteps(20)
        b.set_timesteps(20)
        np.testing.assert_array_equal(a.timesteps, b.timesteps.numpy())

    # every class accepts every other's config, like diffusers
    for name in ALL:
        for other in ALL:
            s = getattr(S, other).from_config(getattr(S, name)().config)
            r = getattr(diffusers, other).from_config(getattr(diffusers, name)().config)
            assert _public(s.config) == {**_public(r.config), "_class_name": other}, (name, other)

    # saved by sdort, read by diffusers (and back), unchanged
    euler.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler" and "_use_default_values" not in saved
    again_ref = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "saved")
    assert _public(again_ref.config) == _public(euler.config)
    again = S.EulerDiscreteScheduler.from_pretrained(tmp_path / "saved")
    assert _public(again.config) == _public(euler.config)


def test_config_is_frozen_with_attribute_access():
    s = S.DDIMScheduler(num_train_timesteps=500)
    assert s.config.num_train_timesteps == 500 == len(s)
    with pytest.raises(TypeError):
        s.config["num_train_timesteps"] = 3
    with pytest.raises(TypeError):
        s.config.num_train_timesteps = 3
    assert not hasattr(s.config, "no_such_key")
    s2 = S.DDIMScheduler.from_config(s.config, timestep_spacing="trailing")
    assert s2.config.timestep_spacing == "trailing" and s2.config.num_train_timesteps == 500


def test_copy_pickle_and_unused_kwargs():
    import copy
    import pickle

    s = S.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    s.set_timesteps(8)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert clone.config == s.config
        np.testing.assert_array_equal(clone.sigmas, s.sigmas)
    scheduler, unused = S.DDIMScheduler.from_config({**SD15, "extra": 1}, return_unused_kwargs=True, foo=2)
    assert isinstance(scheduler, S.DDIMScheduler)
    assert unused["extra"] == 1 and unused["foo"] == 2 and unused["skip_prk_steps"] is True


def test_unknown_key_warned_once_and_kept(caplog, tmp_path):
    config = {**SD15, "my_custom_key": 3, "another": "x"}
    with caplog.at_level(logging.WARNING, logger="sdort.schedulers"):
        s = S.EulerDiscreteScheduler.from_config(config)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "my_custom_key" in warnings[0].getMessage() and "another" in warnings[0].getMessage()
    assert "skip_prk_steps" not in warnings[0].getMessage()  # a compatible class's key: no warning
    assert s.config.my_custom_key == 3
    s.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["my_custom_key"] == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdort.schedulers"):
        S.EulerDiscreteScheduler.from_config(SD15)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")


@pytest.mark.parametrize(
    "name, config, option",
    [
        ("DDIMScheduler", {"beta_schedule": "cubic"}, "beta_schedule"),
        ("EulerDiscreteScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
        ("EulerDiscreteScheduler", {"interpolation_type": "cubic"}, "interpolation_type"),
        ("EulerDiscreteScheduler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
        ("DDIMScheduler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("EulerAncestralDiscreteScheduler", {"prediction_type": "sample"}, "prediction_type"),
        ("DDPMScheduler", {"variance_type": "huge"}, "variance_type"),
    ],
)
def test_unsupported_options_refused(name, config, option):
    with pytest.raises(ValueError, match=option):
        getattr(S, name)(**config)
    with pytest.raises(ValueError, match=option):
        getattr(S, name).from_config({**config, "_class_name": name})


def test_get_scheduler_class_and_compatibles():
    for name in ALL:
        assert S.get_scheduler_class(name) is getattr(S, name)
    assert S.get_scheduler_class(["diffusers", "PNDMScheduler"]) is S.PNDMScheduler
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        S.get_scheduler_class("NoSuchScheduler")
    # diffusers' compatibles, restricted to the classes sdort implements
    ours = {c.__name__ for c in S.DDIMScheduler().compatibles}
    theirs = {c.__name__ for c in diffusers.DDIMScheduler().compatibles}
    assert ours == theirs & set(S.__all__) and set(ALL) <= ours
    assert [e.name for e in S.KarrasDiffusionSchedulers] == [e.name for e in diffusers.schedulers.KarrasDiffusionSchedulers]


def test_step_accepts_uniform_arguments_and_outputs():
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for name in ALL:
        s = getattr(S, name)()
        s.set_timesteps(5)
        s.set_begin_index(0)
        t = s.timesteps[0]
        model_input = s.scale_model_input(x * np.float32(s.init_noise_sigma), t)
        out = s.step(x, t, model_input, eta=0.0, generator=np.random.default_rng(1), return_dict=True, foo=1)
        assert out.prev_sample.shape == SHAPE and out[0] is out.prev_sample
        assert s.step_index == 1, name
        assert isinstance(s.step(x, s.timesteps[1], x, return_dict=False), tuple)
        assert s.order == 1 and len(s) == 1000


def test_float16_stays_float16():
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)
    for name in ALL:
        s = getattr(S, name)()
        s.set_timesteps(4)
        t = s.timesteps[0]
        y = s.step(x, t, s.scale_model_input(x, t), generator=np.random.default_rng(0)).prev_sample
        assert y.dtype == np.float16 and np.isfinite(y).all(), name


# ----------------------------------------------------------------------------------------- schedule maths
def test_schedule_helpers_match_references():
    import scipy.stats

    for q in (1e-9, 0.001, 0.02, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9):
        assert schedule.beta_ppf(q, 0.6, 0.6) == pytest.approx(scipy.stats.beta.ppf(q, 0.6, 0.6), rel=1e-12, abs=1e-15)
    # torch.linspace computes each point as start + step * i (or from the end), fused into one rounding or
    # not, depending on the vector code path: sdort's single rounding is within an ulp of either
    for start, end, n in ((0.0001, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (-6, 6, 1000), (2.0, 3.0, 7)):
        ours = schedule.linspace_f32(start, end, n)
        ref = torch.linspace(start, end, n, dtype=torch.float32)
        assert_ulps(ours, ref, 1, "linspace_f32")
    # scaled_linear betas square such points: an ulp of the point is two of the square, plus its rounding
    betas = schedule.make_betas(1000, 0.00085, 0.012, "scaled_linear")
    assert_ulps(betas, diffusers.DDIMScheduler(**SD).betas, 3, "scaled_linear betas")
    # Zero terminal SNR goes through torch's square root (an ulp, which one depends on the CPU) and two
    # cancellations; compare alphas = 1 - betas (the small betas hold the ratios' rounding magnified) within
    # the bound zero_snr_rtols derives. The reference also runs in float64 (its function takes any dtype):
    # sdort's float32 result is within its own share (half) of that bound of the exact rescale.
    rescaled = schedule.rescale_zero_terminal_snr(betas)
    rescale = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr
    ratio_rtol = zero_snr_rtols(betas)[0]
    alphas = 1 - rescaled.astype(np.float64)
    assert_within(alphas, 1 - rescale(torch.from_numpy(betas)).numpy().astype(np.float64), ratio_rtol * alphas,
                  "rescaled alphas against diffusers' float32")
    exact = 1 - rescale(torch.from_numpy(betas).double()).numpy()
    assert_within(alphas, exact, ratio_rtol / 2 * alphas, "rescaled alphas against diffusers' float64")
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32) * 3
    ref_scheduler = diffusers.DDPMScheduler(thresholding=True, sample_max_value=2.5)
    np.testing.assert_allclose(
        schedule.threshold_sample(x, 0.995, 2.5), ref_scheduler._threshold_sample(torch.from_numpy(x)).numpy(), rtol=1e-6
    )


def test_import_does_not_load_torch():
    code = (
        "import sys, sdort.schedulers as s; s.EulerDiscreteScheduler(use_beta_sigmas=True).set_timesteps(5); "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
