"""The training noise schedule (DDPM forward process), read from the model's scheduler_config.json.

The documented Flax trainer hard-coded scaled_linear/epsilon; SD 2.x v-prediction models need the
schedule and target from their own config."""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from t2i_flax.errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod[t] for t in [0, num_train_timesteps) and what the UNet is trained to predict."""
    alphas_cumprod: np.ndarray  # float32 (T,)
    prediction_type: str = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def add_noise(self, latents, noise, timesteps):
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per sample (latents NCHW, timesteps (B,))."""
        alpha, sigma = self._coefficients(timesteps, latents.ndim)
        return (alpha * latents.astype(jnp.float32) + sigma * noise.astype(jnp.float32)).astype(latents.dtype)

    def velocity(self, latents, noise, timesteps):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (the v-prediction target)."""
        alpha, sigma = self._coefficients(timesteps, latents.ndim)
        return (alpha * noise.astype(jnp.float32) - sigma * latents.astype(jnp.float32)).astype(latents.dtype)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.velocity(latents, noise, timesteps)

    def _coefficients(self, timesteps, ndim):
        alphas_cumprod = jnp.asarray(self.alphas_cumprod)[timesteps]
        shape = (-1,) + (1,) * (ndim - 1)
        return jnp.sqrt(alphas_cumprod).reshape(shape), jnp.sqrt(1.0 - alphas_cumprod).reshape(shape)


def betas_for(config: dict) -> np.ndarray:
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return np.linspace(start, end, steps, dtype=np.float32)
    if kind == "scaled_linear":  # linear in sqrt(beta), as the SD checkpoints were trained
        return np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t):
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        t = np.arange(steps, dtype=np.float64)
        return np.minimum(1 - alpha_bar((t + 1) / steps) / alpha_bar(t / steps), 0.999).astype(np.float32)
    raise ModelError(f"scheduler config beta_schedule={kind!r} is not supported "
                     f"(use linear, scaled_linear or squaredcos_cap_v2)")


def schedule_from_config(config: dict, prediction_type: str | None = None) -> NoiseSchedule:
    """`prediction_type` (the --prediction_type flag) overrides the config's."""
    prediction = prediction_type or config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"prediction_type {prediction!r} is not supported (use epsilon or v_prediction)")
    check_zero_terminal_snr(config, prediction)
    return NoiseSchedule(alphas_cumprod_for(config), prediction)


def check_zero_terminal_snr(config: dict, prediction_type: str) -> None:
    """Zero terminal SNR with epsilon prediction is refused: at the last timestep the input is pure noise, so the
    noise target is the input itself and a sampler's x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) divides by 0."""
    if config.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
        raise ModelError("zero terminal SNR (rescale_betas_zero_snr) needs v-prediction: with epsilon the last "
                         "timestep cannot be denoised; add --prediction_type v_prediction")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (Common Diffusion Noise Schedules and Sample Steps are Flawed), algorithm 1, as diffusers'
    schedulers apply it to their float32 betas: sqrt(alphas_cumprod) shifted so that its last value is 0 and scaled
    so that its first is unchanged; the betas of that schedule (the last is 1)."""
    root = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root ** 2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).astype(np.float32)


def zero_terminal_snr_config(config: dict) -> dict:
    """A scheduler config with zero terminal SNR (--rescale_betas_zero_snr): the rescaled betas, and timesteps that
    start at the last one when sampling ("trailing"), as the paper and diffusers' docs pair them."""
    return dict(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def alphas_cumprod_for(config: dict) -> np.ndarray:
    """float32 prod(1 - beta) over the schedule, accumulated in float64 as torch's CPU cumprod does (a
    float32 cumprod drifts by ~1e-6 over 1000 factors, which the small sigmas near t = 0 magnify)."""
    betas = betas_for(config)
    if config.get("rescale_betas_zero_snr"):  # the last alphas_cumprod becomes exactly 0
        betas = rescale_zero_terminal_snr(betas)
    return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)


def read_scheduler_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ModelError(f"{model_dir} has no scheduler/scheduler_config.json: is it a diffusers pipeline folder?")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path}: {error}") from None


def load_noise_schedule(model_dir: str, prediction_type: str | None = None) -> NoiseSchedule:
    return schedule_from_config(read_scheduler_config(model_dir), prediction_type)
