"""Our pure-function schedulers against diffusers' PyTorch ones (the oracle): config resolution as
`from_config` does it, timestep/sigma tables, init_noise_sigma, and every step of a loop driven by a
synthetic model output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from oracle import rel_err
from t2i_flax import errors
from t2i_flax.diffusion import schedulers

ORACLES = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
           "dpm++2m": DPMSolverMultistepScheduler}
# SD 1.5's scheduler_config.json (no timestep_spacing: each scheduler takes its own default).
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
# SD 2.1's (v-prediction, DDIM).
SD21 = dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")
# The trainer's DDPM config (the conftest pipeline's); DDIM's clip_sample and set_alpha_to_one come from it.
TRAINING = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}
CONFIGS = {
    "sd15": SD15, "sd21": SD21, "training": TRAINING,
    "defaults": {},  # every key the scheduler's own default (DDIM: clip_sample and set_alpha_to_one true)
    "trailing": dict(SD21, timestep_spacing="trailing"),
    "linspace_cosine": dict(SD15, timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2",
                            num_train_timesteps=500),
    "leading_sigma_min_heun": dict(SD15, timestep_spacing="leading", final_sigmas_type="sigma_min",
                                   solver_type="heun"),
    # Zero terminal SNR as --rescale_betas_zero_snr exports it (v-prediction; PNDM ignores the key, as diffusers').
    "zero_snr": dict(SD21, timestep_spacing="trailing", rescale_betas_zero_snr=True),
}
STEP_COUNTS = (1, 2, 7, 25, 50)
# One step of ours vs diffusers, started from the same sample: max |diff| / max |reference|, worst over
# the steps of a case. Measured at most 3.3e-7 over all cases below (float32 rounding).
STEP_TOL = 1e-6
# Zero terminal SNR: torch's vectorised float32 sqrt is not correctly rounded on 3 of the 1000 alphas_cumprod of the
# rescale (1 ulp, numpy's is), and its shift sqrt(a) - sqrt(a_last) turns that into up to 1.4e-6 relative on the
# last alphas (measured); the steps then agree to 2.6e-6 (measured, Euler).
ZERO_SNR_RTOL = 5e-6
ZERO_SNR_STEP_TOL = 1e-5
# Compiled once per scheduler kind and prediction type (the tables are arguments).
STEP = jax.jit(schedulers.step)
SCALE = jax.jit(schedulers.scale_model_input)


def oracle(name: str, config: dict):
    # diffusers' PNDM defaults to skip_prk_steps=False; ours is PLMS (see schedulers' docstring).
    extra = {"skip_prk_steps": True} if name == "pndm" and config.get("skip_prk_steps") is None else {}
    return ORACLES[name].from_config(config, **extra)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_config_resolves_as_from_config(name, config_name):
    config = CONFIGS[config_name]
    reference = oracle(name, config).config
    assert schedulers.resolve_config(name, config) == {key: reference[key] for key in schedulers.DEFAULTS[name]}


def test_from_config_of_a_loaded_scheduler_drops_the_keys_it_defaulted():
    """pipe.scheduler.config holds timestep_spacing="leading" from PNDM's defaults (listed in
    _use_default_values): Euler built from it takes its own "linspace", as diffusers' from_config."""
    loaded = dict(PNDMScheduler.from_config(SD15).config)
    assert loaded["timestep_spacing"] == "leading" and "timestep_spacing" in loaded["_use_default_values"]
    euler = EulerDiscreteScheduler.from_config(loaded)
    assert schedulers.resolve_config("euler", loaded)["timestep_spacing"] == "linspace" == euler.config.timestep_spacing
    euler.set_timesteps(25)
    np.testing.assert_array_equal(schedulers.make_scheduler(loaded, 25, "euler").timesteps, euler.timesteps.numpy())
    # A config that holds timestep_spacing keeps it.
    assert schedulers.resolve_config("euler", dict(SD15, timestep_spacing="leading"))["timestep_spacing"] == "leading"


def test_default_name_is_the_config_class():
    assert schedulers.default_name(SD15) == "pndm"
    assert schedulers.default_name(SD21) == "ddim"
    assert schedulers.default_name({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert schedulers.default_name({"_class_name": "DPMSolverMultistepScheduler"}) == "dpm++2m"
    assert schedulers.default_name(TRAINING) == schedulers.DEFAULT_NAME == "pndm"


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("config_name", ["sd15", "trailing", "linspace_cosine", "leading_sigma_min_heun", "zero_snr"])
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_tables_match_diffusers(name, config_name, steps):
    config = CONFIGS[config_name]
    reference = oracle(name, config)
    reference.set_timesteps(steps)
    ours = schedulers.make_scheduler(config, steps, name)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert ours.num_steps == (steps + 1 if name == "pndm" and steps > 1 else steps)
    np.testing.assert_allclose(ours.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-6)
    rtol = ZERO_SNR_RTOL if config_name == "zero_snr" else 1e-6
    if name == "euler":
        np.testing.assert_allclose(ours.tables["sigma"], reference.sigmas.numpy()[:-1], rtol=rtol)
        np.testing.assert_allclose(ours.tables["sigma_next"], reference.sigmas.numpy()[1:], rtol=rtol)
    if name == "ddim":
        np.testing.assert_allclose(ours.tables["alpha"], reference.alphas_cumprod.numpy()[reference.timesteps.numpy()],
                                   rtol=rtol)


@pytest.mark.parametrize("prediction_type,config_name",
                         [(p, c) for p in ("epsilon", "v_prediction")
                          for c in ("sd15", "training", "defaults", "trailing", "leading_sigma_min_heun")]
                         + [("v_prediction", "zero_snr")])
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_each_step_matches_diffusers(name, config_name, prediction_type):
    """A 20-step loop (PNDM: 21) driven by model_output = tanh(model input) + noise; each of our steps starts
    from diffusers' sample of the step before, so every step is judged on its own, multistep history included."""
    config = dict(CONFIGS[config_name], prediction_type=prediction_type)
    steps = 20
    reference = oracle(name, config)
    reference.set_timesteps(steps)
    ours = schedulers.make_scheduler(config, steps, name)
    rng = np.random.default_rng(0)
    sample_BCHW = rng.normal(size=(2, 4, 8, 8)) * float(reference.init_noise_sigma)
    sample_BCHW = torch.from_numpy(sample_BCHW.astype(np.float32))
    state = schedulers.init_state(ours, tuple(sample_BCHW.shape))
    worst = 0.0
    for i, t in enumerate(reference.timesteps):
        model_input = reference.scale_model_input(sample_BCHW, t)
        worst = max(worst, rel_err(SCALE(ours, jnp.asarray(sample_BCHW.numpy()), i), model_input.numpy()))
        model_output = (np.tanh(model_input.numpy()) + 0.3 * rng.normal(size=model_input.shape)).astype(np.float32)
        ours_next, state = STEP(ours, state, jnp.asarray(model_output), i, jnp.asarray(sample_BCHW.numpy()))
        sample_BCHW = reference.step(torch.from_numpy(model_output), t, sample_BCHW).prev_sample
        worst = max(worst, rel_err(ours_next, sample_BCHW.numpy()))
    assert worst < (ZERO_SNR_STEP_TOL if config_name == "zero_snr" else STEP_TOL), worst


def test_step_state_is_float32_under_bf16_model_outputs():
    ours = schedulers.make_scheduler(SD15, 4, "dpm++2m")
    state = schedulers.init_state(ours, (1, 4, 2, 2))
    prev, state = schedulers.step(ours, state, jnp.ones((1, 4, 2, 2), jnp.bfloat16), 0,
                                  jnp.ones((1, 4, 2, 2), jnp.bfloat16))
    assert prev.dtype == jnp.float32 and state.model_outputs.dtype == jnp.float32


@pytest.mark.parametrize("name, config, error, match", [
    ("lms", SD15, errors.FlagError, "scheduler 'lms' is not one of: ddim, pndm, euler, dpm\\+\\+2m"),
    ("euler", dict(SD15, use_karras_sigmas=True), errors.ModelError, "use_karras_sigmas=True is not supported"),
    ("ddim", dict(SD15, thresholding=True), errors.ModelError, "thresholding=True is not supported"),
    ("ddim", dict(SD15, prediction_type="sample"), errors.ModelError, "prediction_type='sample' is not supported"),
    ("pndm", dict(SD15, skip_prk_steps=False), errors.ModelError, "skip_prk_steps=False is not supported"),
    ("dpm++2m", dict(SD15, algorithm_type="sde-dpmsolver++"), errors.ModelError, "algorithm_type="),
    ("dpm++2m", dict(SD15, solver_order=3), errors.ModelError, "solver_order=3 is not supported"),
    ("euler", dict(SD15, beta_schedule="sigmoid"), errors.ModelError, "beta_schedule='sigmoid' is not supported"),
    ("ddim", dict(SD15, rescale_betas_zero_snr=True), errors.ModelError, "zero terminal SNR .* needs v-prediction"),
    ("euler", dict(SD15, rescale_betas_zero_snr=True), errors.ModelError, "zero terminal SNR .* needs v-prediction"),
])
def test_unsupported_configs_are_one_line_errors(name, config, error, match):
    with pytest.raises(error, match=match) as raised:
        schedulers.make_scheduler(config, 10, name)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_must_fit_the_training_schedule(steps):
    with pytest.raises(errors.FlagError, match="must be between 1 and the model's num_train_timesteps \\(1000\\)"):
        schedulers.make_scheduler(SD15, steps, "ddim")


def test_pndm_from_a_config_without_skip_prk_steps_is_plms():
    """The training DDPM config has no skip_prk_steps: PLMS, S + 1 UNet calls (diffusers' PNDM, from the
    same config, would run 12 Runge-Kutta calls first)."""
    ours = schedulers.make_scheduler(TRAINING, 10, "pndm")
    assert ours.num_steps == 11
    plain = DDPMScheduler.from_config(TRAINING)
    assert PNDMScheduler.from_config(plain.config).config.skip_prk_steps is False  # what diffusers would do
