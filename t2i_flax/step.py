"""The training state (one pytree) and the pure, sharded train step.

    train_step(state, frozen, batch) -> (state, metrics)

VAE encode -> posterior sample x scaling_factor -> noise (+ offset) and timesteps -> add_noise ->
the text encoders' conditioning (the model family's: SD's CLIP last hidden state; SDXL's two penultimate
states, pooled embedding and time ids; outside the gradient when the encoders are frozen, inside it with
--train_text_encoder: the trainable's hooks) -> UNet -> float32 MSE against the config's target (noise or velocity)
-> clip + the optimizer (AdamW by default) -> EMA. Frozen VAE/text encoder parameters are arguments, not closed-over
constants, and so are the optimizer's and EMA's numbers (frozen["hyperparameters"], optim.Hyperparameters: runs that
differ only in them share the compiled program).

The pieces (`draw_randomness`, `encode_latents`, `conditioned_loss`, `diffusion_loss`, `loss_and_grads`,
`apply_gradients`) are separate so that tests can check each against diffusers' PyTorch training math.
`held_out_losses` is the same math without gradients, at fixed timesteps and noise (--validation_split's loss)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from t2i_flax import sharding
from t2i_flax.family import STABLE_DIFFUSION, Modules
from t2i_flax.trainable import FULL_UNET
from t2i_flax.diffusion.noise import NoiseSchedule

# Independent random streams, each folded from (seed key, step): no key is used twice. A stream an option needs
# (--input_perturbation's) is drawn only when the option is on, so without it the program is unchanged.
STREAM_POSTERIOR, STREAM_NOISE, STREAM_TIMESTEPS, STREAM_DROPOUT, STREAM_NOISE_OFFSET, STREAM_PERTURBATION = range(6)


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: updates applied so far
    params: Any            # the trained params (trainable.py: the UNet's, or LoRA adapters), float32
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
    # --input_perturbation gamma: the UNet's input is noised with noise + gamma x fresh noise; the target: the noise.
    input_perturbation: float = 0.0
    # --timestep_bias_*: a TimestepBias (t2i_flax/diffusion/timestep_bias.py) whose weights the timesteps are drawn
    # from (categorical); None draws them uniformly, as before.
    timestep_bias: Any = None
    # --dream_training: DREAM's detail preservation p (None: off); one more UNet forward without gradients.
    dream_detail_preservation: float | None = None
    # What the trained params are (t2i_flax/trainable.py): the UNet's own, or LoRA adapters on frozen["unet"] (and,
    # --train_text_encoder, on the frozen text encoders).
    trainable: Any = FULL_UNET
    family: Any = STABLE_DIFFUSION  # how the UNet is conditioned on the batch's captions (t2i_flax/family.py)
    text_encoder_2: Any = None      # SDXL's second text encoder
    # optim.Hyperparameters whose numbers the step reads from frozen["hyperparameters"] (arrays) instead of compiling
    # them in (then `optimizer`, `learning_rate` and `ema_decay` are its constants, used to build the state); None:
    # the step uses `optimizer`, `learning_rate` and `ema_decay` as they are.
    hyperparameters: Any = None

    @property
    def modules(self) -> Modules:
        return Modules(self.unet, self.vae, self.text_encoder, self.text_encoder_2)


def init_state(config: StepConfig, params, seed: int) -> TrainState:
    """Builds the state from (already placed) UNet params; call under jit with out_shardings."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=config.optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if config.use_ema else None,
                      rng=jax.random.PRNGKey(seed))


def ema_decay_at(update_index, max_decay: float):
    """diffusers' EMAModel decay for its n-th update (0-based): 0 for the first (the EMA becomes the
    parameters), then min((1 + n) / (10 + n), max_decay): 2/11, 3/12, ..."""
    n = jnp.asarray(update_index, jnp.float32)
    return jnp.where(n == 0, 0.0, jnp.minimum((1.0 + n) / (10.0 + n), max_decay))


def exported_params(state: TrainState):
    """What is exported and drawn from: the EMA with --use_ema (as the PyTorch script), else the weights."""
    return state.params if state.ema_params is None else state.ema_params


def step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(state.rng, state.step)


def draw_randomness(key, latents_shape, num_train_timesteps: int, input_perturbation: bool = False,
                    timestep_weights=None) -> dict:
    """Every random number one step uses, each from its own stream of the step's key: posterior_noise
    (the VAE posterior sample's N(0, 1), like latents), noise (N(0, 1), like latents), offset_noise
    (N(0, 1) per sample and channel, for --noise_offset), timesteps (B,) and the UNet's dropout key; with
    `input_perturbation`, perturbation_noise (N(0, 1), like latents). Timesteps are uniform over
    [0, num_train_timesteps), or drawn from `timestep_weights` (T,) (--timestep_bias_*, which sum to 1)."""
    stream = lambda index: jax.random.fold_in(key, index)  # noqa: E731
    batch, channels = latents_shape[:2]
    drawn = {"posterior_noise": jax.random.normal(stream(STREAM_POSTERIOR), latents_shape, jnp.float32),
             "noise": jax.random.normal(stream(STREAM_NOISE), latents_shape, jnp.float32),
             "offset_noise": jax.random.normal(stream(STREAM_NOISE_OFFSET), (batch, channels, 1, 1), jnp.float32),
             "timesteps": draw_timesteps(stream(STREAM_TIMESTEPS), batch, num_train_timesteps, timestep_weights),
             "dropout_key": stream(STREAM_DROPOUT)}
    if input_perturbation:
        drawn["perturbation_noise"] = jax.random.normal(stream(STREAM_PERTURBATION), latents_shape, jnp.float32)
    return drawn


def draw_timesteps(key, batch: int, num_train_timesteps: int, weights=None):
    """(B,) int32 timesteps: uniform over [0, num_train_timesteps), or categorical with probabilities `weights` (T,)
    (a zero weight is never drawn: its log is -inf)."""
    if weights is None:
        return jax.random.randint(key, (batch,), 0, num_train_timesteps)
    logits = jnp.log(jnp.asarray(weights, jnp.float32))
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def step_randomness(config: StepConfig, key, latents_shape) -> dict:
    """`draw_randomness` with the step's options (--input_perturbation, --timestep_bias_*)."""
    schedule = config.noise_schedule
    weights = None if config.timestep_bias is None else config.timestep_bias.weights(schedule.num_train_timesteps)
    return draw_randomness(key, latents_shape, schedule.num_train_timesteps, bool(config.input_perturbation), weights)


def latent_shape(config: StepConfig, pixel_values_shape) -> tuple[int, ...]:
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    batch, _, height, width = pixel_values_shape
    return (batch, config.vae.latent_channels, height // factor, width // factor)


def batch_latent_shape(config: StepConfig, batch: dict) -> tuple[int, ...]:
    if "latent_mean" in batch:  # cached latents (--cache_latents): the stored posterior moments
        return tuple(batch["latent_mean"].shape)
    return latent_shape(config, batch["pixel_values"].shape)


def batch_latents(config: StepConfig, frozen: dict, batch: dict, posterior_noise):
    """The posterior sample x scaling_factor: from the images through the frozen VAE encoder, or from the
    cached posterior moments (the same formula, the same noise; the VAE is not needed)."""
    if "latent_mean" in batch:
        sample = batch["latent_mean"].astype(jnp.float32) + batch["latent_std"].astype(jnp.float32) * posterior_noise
        return sample * config.vae.scaling_factor
    return encode_latents(config, frozen, batch["pixel_values"], posterior_noise)


def posterior_moments(vae, vae_params, pixel_values):
    """Images (B, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), float32 (B, C, h, w)."""
    posterior = vae.apply({"params": vae_params}, pixel_values, method=vae.encode).latent_dist
    return posterior.mean.astype(jnp.float32), posterior.std.astype(jnp.float32)


def encode_latents(config: StepConfig, frozen: dict, pixel_values, posterior_noise):
    """Images (B, 3, H, W) in [-1, 1] -> a posterior sample x scaling_factor, float32 (B, C, h, w)."""
    mean, std = posterior_moments(config.vae, frozen["vae"], pixel_values)
    return (mean + std * posterior_noise) * config.vae.scaling_factor


def predict(config: StepConfig, params, frozen: dict, noisy_latents, timesteps, encoder_hidden_states, dropout_key,
            added_cond_kwargs=None):
    """The UNet's output with the trained params: the UNet's own, or adapters on the frozen UNet."""
    added = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    return config.trainable.apply_unet(config.unet, params, frozen, noisy_latents, timesteps, encoder_hidden_states,
                                       train=True, rngs={"dropout": dropout_key}, **added).sample


def diffusion_loss(config: StepConfig, params, frozen: dict, latents, encoder_hidden_states, randomness,
                   added_cond_kwargs=None):
    """Float32 MSE between the UNet's prediction on the noised latents and the schedule's target."""
    schedule = config.noise_schedule
    noise, timesteps = randomness["noise"], randomness["timesteps"]
    if config.noise_offset:  # a per-sample, per-channel constant shift (the PyTorch script's --noise_offset)
        noise = noise + config.noise_offset * randomness["offset_noise"]
    if config.input_perturbation:  # train_text_to_image.py's: only the input is perturbed, the target is `noise`
        perturbed = noise + config.input_perturbation * randomness["perturbation_noise"]
        noisy_latents = schedule.add_noise(latents, perturbed, timesteps)
    else:
        noisy_latents = schedule.add_noise(latents, noise, timesteps)
    target = schedule.target(latents, noise, timesteps)
    if config.dream_detail_preservation is not None:
        noisy_latents, target = dream_latents_and_target(config, params, frozen, noisy_latents, target, noise,
                                                         timesteps, encoder_hidden_states, randomness["dropout_key"],
                                                         added_cond_kwargs)
    prediction = predict(config, params, frozen, noisy_latents, timesteps, encoder_hidden_states,
                         randomness["dropout_key"], added_cond_kwargs)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def dream_latents_and_target(config: StepConfig, params, frozen: dict, noisy_latents, target, noise, timesteps,
                             encoder_hidden_states, dropout_key, added_cond_kwargs=None):
    """DREAM (Zhou et al. 2024), as diffusers' compute_dream_and_update_latents (epsilon prediction): the UNet's own
    prediction on the noised latents, without gradients, moves both the input and the target towards what it
    predicted: delta = sqrt(1 - a_t)^p (noise - prediction); input + sqrt(1 - a_t) delta, target + delta."""
    alphas_cumprod = jnp.asarray(config.noise_schedule.alphas_cumprod)[timesteps].reshape(-1, 1, 1, 1)
    sqrt_one_minus = jnp.sqrt(1.0 - alphas_cumprod)
    predicted_noise = jax.lax.stop_gradient(predict(config, params, frozen, noisy_latents, timesteps,
                                                    encoder_hidden_states, dropout_key, added_cond_kwargs))
    delta = (noise - predicted_noise.astype(jnp.float32)) * sqrt_one_minus ** config.dream_detail_preservation
    return (noisy_latents + (sqrt_one_minus * delta).astype(noisy_latents.dtype)), target + delta


def conditioned_loss(config: StepConfig, params, frozen: dict, batch: dict, latents, randomness, frozen_conditioning):
    """`diffusion_loss` with the conditioning the trained params give: `frozen_conditioning` as it is where the text
    encoders are frozen, else (--train_text_encoder) the text encoders with their adapters, so that the gradients
    reach them (trainable.py's `condition`)."""
    encoder_hidden_states, added_cond_kwargs = config.trainable.condition(config.family, config.modules, params, frozen,
                                                                          batch, frozen_conditioning)
    return diffusion_loss(config, params, frozen, latents, encoder_hidden_states, randomness, added_cond_kwargs)


def loss_and_grads(config: StepConfig, params, frozen: dict, batch: dict, key):
    """(loss, gradients w.r.t. the trained params) of one batch with the step key `key`. What the frozen text encoders
    give is computed outside the differentiated function (None where the text encoders are trained)."""
    randomness = step_randomness(config, key, batch_latent_shape(config, batch))
    latents = batch_latents(config, frozen, batch, randomness["posterior_noise"])
    frozen_conditioning = config.trainable.frozen_conditioning(config.family, config.modules, frozen, batch)
    return jax.value_and_grad(conditioned_loss, argnums=1)(config, params, frozen, batch, latents, randomness,
                                                           frozen_conditioning)


def held_out_losses(config: StepConfig, params, frozen: dict, batch: dict, key, timesteps_K):
    """Each sample's diffusion loss (B,), averaged over the fixed timesteps `timesteps_K` (K,), without gradients: the
    held-out loss's (t2i_flax/held_out.py). Every random number comes from `key` and the sample's
    batch["held_out_index"] (its posterior sample's noise, then one noise per timestep), so a sample's loss is the same
    whatever batch, layout or step it is measured in. The plain objective, the run's prediction type on its schedule:
    no noise offset, input perturbation, DREAM or timestep bias (training's options), no dropout."""
    schedule = config.noise_schedule
    latents_shape = batch_latent_shape(config, batch)
    sample_keys = jax.vmap(lambda index: jax.random.fold_in(key, index))(batch["held_out_index"])

    def normal(stream):  # (B, C, h, w): each sample's own N(0, 1) of the stream
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), latents_shape[1:]))(sample_keys)

    latents = batch_latents(config, frozen, batch, normal(0))
    frozen_conditioning = config.trainable.frozen_conditioning(config.family, config.modules, frozen, batch)
    encoder_hidden_states, added_cond_kwargs = config.trainable.condition(config.family, config.modules, params, frozen,
                                                                          batch, frozen_conditioning)
    added = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}

    def loss_at(_, stream_and_timestep):  # one UNet forward in the program, run K times (a scan)
        stream, timestep = stream_and_timestep
        noise = normal(stream)
        timesteps = jnp.full((latents_shape[0],), timestep, jnp.int32)
        noisy_latents = schedule.add_noise(latents, noise, timesteps)
        target = schedule.target(latents, noise, timesteps)
        prediction = config.trainable.apply_unet(config.unet, params, frozen, noisy_latents, timesteps,
                                                 encoder_hidden_states, train=False, **added).sample
        error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
        return None, jnp.mean(error, axis=tuple(range(1, error.ndim)))

    timesteps_K = jnp.asarray(timesteps_K, jnp.int32)
    streams_K = 1 + jnp.arange(timesteps_K.shape[0], dtype=jnp.int32)
    _, losses_KB = jax.lax.scan(loss_at, None, (streams_K, timesteps_K))
    return jnp.mean(jax.lax.stop_gradient(losses_KB), axis=0)


def update_rule(config: StepConfig, frozen: dict | None):
    """(optimizer, learning-rate schedule, EMA decay) the step applies: built from frozen["hyperparameters"] where the
    config's hyperparameters are step inputs, else the config's own."""
    if config.hyperparameters is None:
        return config.optimizer, config.learning_rate, config.ema_decay
    values = frozen["hyperparameters"]
    hyper = config.hyperparameters
    return hyper.optimizer(values), hyper.learning_rate_schedule(values), hyper.ema_decay_value(values)


def apply_gradients(config: StepConfig, state: TrainState, grads, frozen: dict | None = None) -> TrainState:
    """Clip + the optimizer (the chain of t2i_flax/optim.py), then the EMA update."""
    optimizer, _, ema_decay = update_rule(config, frozen)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if config.use_ema:
        decay = ema_decay_at(state.step, ema_decay)
        ema_params = jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema_params, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)


def train_step(config: StepConfig, state: TrainState, frozen: dict, batch: dict):
    loss, grads = loss_and_grads(config, state.params, frozen, batch, step_key(state))
    learning_rate = update_rule(config, frozen)[1]
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32)}
    return apply_gradients(config, state, grads, frozen), metrics


def state_shardings(config: StepConfig, mesh, params_shape, seed: int = 0):
    abstract = jax.eval_shape(lambda p: init_state(config, p, seed), params_shape)
    return abstract, sharding.tree_shardings(mesh, abstract)


VAE_ENCODER_PARAMS = ("encoder", "quant_conv")


def frozen_params(vae_params, text_params, unet_params=None, text_2_params=None) -> dict:
    """What the step reads of the frozen models: the VAE's encoder half (None: the latents are cached), the
    text encoder(s), and with LoRA the UNet the adapters sit on."""
    frozen = {"text_encoder": text_params}
    if text_2_params is not None:
        frozen["text_encoder_2"] = text_2_params
    if vae_params is not None:
        frozen["vae"] = {name: vae_params[name] for name in VAE_ENCODER_PARAMS}
    if unet_params is not None:
        frozen["unet"] = unet_params
    return frozen


def compile_train_step(config: StepConfig, mesh, state_sharding, frozen_sharding):
    """One jax.jit of the pure step with explicit shardings; the state buffer is donated."""
    metrics_sharding = {name: sharding.replicated(mesh) for name in ("loss", "grad_norm", "learning_rate")}
    batch_sharding = sharding.batch_sharding(mesh)
    # keep_unused: every input stays an argument of the program, also a hyperparameter this run does not read (the EMA
    # decay without EMA), so that the compiled arguments line up with the inputs (aot reads their layouts).
    return jax.jit(lambda state, frozen, batch: train_step(config, state, frozen, batch),
                   in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, metrics_sharding), donate_argnums=(0,), keep_unused=True)


def create_state(config: StepConfig, mesh, params, seed: int):
    """Places host params on the mesh by the partition rules and builds the optimizer/EMA state there."""
    abstract, state_sharding = state_shardings(config, mesh, jax.eval_shape(lambda: params), seed)
    params = sharding.put(params, state_sharding.params)
    state = jax.jit(lambda p: init_state(config, p, seed), out_shardings=state_sharding, donate_argnums=0)(params)
    return state, state_sharding
