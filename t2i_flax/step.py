"""The training state (one pytree) and the pure, sharded train step.

    train_step(state, frozen, batch) -> (state, metrics)

VAE encode -> posterior sample x scaling_factor -> noise (+ offset) and timesteps -> add_noise ->
frozen CLIP last hidden state -> UNet -> float32 MSE against the config's target (noise or velocity)
-> clip + AdamW -> EMA. Frozen VAE/CLIP parameters are arguments, not closed-over constants."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from t2i_flax import sharding
from t2i_flax.noise import NoiseSchedule

# Independent random streams, each folded from (seed key, step): no key is used twice.
STREAM_POSTERIOR, STREAM_NOISE, STREAM_TIMESTEPS, STREAM_DROPOUT, STREAM_NOISE_OFFSET = range(5)


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: updates applied so far
    params: Any            # UNet parameters, float32
    opt_state: Any
    ema_params: Any        # EMA of the UNet parameters (None when --use_ema is off)
    rng: jax.Array         # uint32[2] seed key; per-step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    unet: Any
    vae: Any
    text_encoder: Any
    noise_schedule: NoiseSchedule
    optimizer: optax.GradientTransformation
    learning_rate: Any            # schedule: update count -> lr (for the metrics)
    use_ema: bool = False
    ema_decay: float = 0.9999
    noise_offset: float = 0.0


def init_state(config: StepConfig, params, seed: int) -> TrainState:
    """Builds the state from (already placed) UNet params; call under jit with out_shardings."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=config.optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if config.use_ema else None,
                      rng=jax.random.PRNGKey(seed))


def ema_decay_at(step, max_decay: float):
    """diffusers' EMAModel warmup: min((1 + n) / (10 + n), max_decay) for the n-th update (0-based)."""
    step = step.astype(jnp.float32)
    return jnp.minimum((1.0 + step) / (10.0 + step), max_decay)


def train_step(config: StepConfig, state: TrainState, frozen: dict, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    key = lambda stream: jax.random.fold_in(step_key, stream)  # noqa: E731

    vae, unet, schedule = config.vae, config.unet, config.noise_schedule
    posterior = vae.apply({"params": frozen["vae"]}, batch["pixel_values"], method=vae.encode).latent_dist
    latents = posterior.sample(key(STREAM_POSTERIOR)).astype(jnp.float32) * vae.scaling_factor  # (B, C, h, w)
    noise = jax.random.normal(key(STREAM_NOISE), latents.shape, jnp.float32)
    if config.noise_offset:  # per-sample, per-channel constant shift (the PyTorch script's --noise_offset)
        noise = noise + config.noise_offset * jax.random.normal(
            key(STREAM_NOISE_OFFSET), latents.shape[:2] + (1, 1), jnp.float32)
    timesteps = jax.random.randint(key(STREAM_TIMESTEPS), (latents.shape[0],), 0, schedule.num_train_timesteps)
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    target = schedule.target(latents, noise, timesteps)
    encoder_hidden_states = config.text_encoder.apply(
        {"params": frozen["text_encoder"]}, batch["input_ids"]).last_hidden_state

    def loss_fn(params):
        prediction = unet.apply({"params": params}, noisy_latents, timesteps, encoder_hidden_states, train=True,
                                rngs={"dropout": key(STREAM_DROPOUT)}).sample
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if config.use_ema:
        decay = ema_decay_at(state.step, config.ema_decay)
        ema_params = jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(config.learning_rate(state.step), jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics


def state_shardings(config: StepConfig, mesh, params_shape, seed: int = 0):
    abstract = jax.eval_shape(lambda p: init_state(config, p, seed), params_shape)
    return abstract, sharding.tree_shardings(mesh, abstract)


def frozen_params(vae_params, text_params) -> dict:
    """What the step reads of the frozen models: the VAE's encoder half and the text encoder."""
    return {"vae": {name: vae_params[name] for name in ("encoder", "quant_conv")}, "text_encoder": text_params}


def compile_train_step(config: StepConfig, mesh, state_sharding, frozen_sharding):
    """One jax.jit of the pure step with explicit shardings; the state buffer is donated."""
    metrics_sharding = {name: sharding.replicated(mesh) for name in ("loss", "grad_norm", "learning_rate")}
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(lambda state, frozen, batch: train_step(config, state, frozen, batch),
                   in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, metrics_sharding), donate_argnums=(0,))


def create_state(config: StepConfig, mesh, params, seed: int):
    """Places host params on the mesh by the partition rules and builds the optimizer/EMA state there."""
    abstract, state_sharding = state_shardings(config, mesh, jax.eval_shape(lambda: params), seed)
    params = jax.device_put(params, state_sharding.params)
    state = jax.jit(lambda p: init_state(config, p, seed), out_shardings=state_sharding, donate_argnums=0)(params)
    return state, state_sharding
