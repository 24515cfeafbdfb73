"""The training noise schedule against diffusers' PyTorch DDPMScheduler (the oracle)."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from t2i_flax.diffusion.noise import load_noise_schedule, schedule_from_config

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon", num_train_timesteps=500),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_diffusers_ddpm(config):
    oracle = DDPMScheduler(**config)
    ours = schedule_from_config(dict(oracle.config))
    np.testing.assert_allclose(ours.alphas_cumprod, oracle.alphas_cumprod.numpy(), rtol=1e-6, atol=0)  # measured 3.8e-7
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
    noise = rng.normal(size=(4, 4, 8, 8)).astype(np.float32)
    timesteps = np.array([0, 17, 499, ours.num_train_timesteps - 1])
    expected_noisy = oracle.add_noise(torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps))
    np.testing.assert_allclose(np.asarray(ours.add_noise(latents, noise, timesteps)), expected_noisy.numpy(),
                               rtol=1e-5, atol=1e-5)
    expected_target = noise if config["prediction_type"] == "epsilon" else oracle.get_velocity(
        torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps)).numpy()
    np.testing.assert_allclose(np.asarray(ours.target(latents, noise, timesteps)), expected_target,
                               rtol=1e-5, atol=1e-5)


def test_flag_overrides_config_and_bad_values_are_refused(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        '{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}')
    assert load_noise_schedule(str(tmp_path)).prediction_type == "epsilon"
    assert load_noise_schedule(str(tmp_path), "v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        schedule_from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        schedule_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="has no scheduler/scheduler_config.json"):
        load_noise_schedule(str(tmp_path / "scheduler"))
