"""One abstract training setup: everything a run compiles, from the typed config, the mesh and the plan, with no
weights loaded. The trainer (train.run), `python -m t2i_flax.aot` and bench/train_step.py all build it here, so
they compile the same program.

    base = setup.read_base_model(model_dir, config.model)  # family, scheduler config, tokenizers (no weights)
    plan = setup.Plan.make(config, device_count, local_device_count, num_examples, steps_per_epoch)
    built = setup.build(config, base, mesh, plan)
    built.state, built.frozen, built.batch       # sharded ShapeDtypeStructs: state, frozen models, global batch
    compiled = built.lower().compile()           # the train step (built.lower((w, h)): at an aspect-ratio bucket)
    frozen = built.place_frozen(params)          # the loaded frozen models, cast and placed as the step expects
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import family as families
from t2i_flax import optim, sharding, step, trainable
from t2i_flax.config import RunConfig
from t2i_flax.diffusion.noise import (NoiseSchedule, read_scheduler_config, schedule_from_config,
                                      zero_terminal_snr_config)
from t2i_flax.diffusion.timestep_bias import TimestepBias
from t2i_flax.errors import FlagError

COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the configuration comes to on these devices and this dataset."""
    global_batch_size: int
    host_batch_size: int
    learning_rate: float          # after --scale_lr
    num_examples: int
    steps_per_epoch: int
    max_train_steps: int          # --max_train_steps, or epochs x steps per epoch
    num_train_epochs: int
    num_held_out: int = 0         # images --validation_split keeps out of training (not in num_examples)

    @classmethod
    def make(cls, config: RunConfig, device_count: int, local_device_count: int, num_examples: int,
             steps_per_epoch: int, num_held_out: int = 0) -> "Plan":
        per_device = config.train.train_batch_size
        global_batch_size = per_device * device_count
        learning_rate = config.optimizer.learning_rate
        if config.optimizer.scale_lr:
            learning_rate *= global_batch_size
        if config.train.max_train_steps is None:  # as the reference: --max_train_steps wins over epochs
            max_steps, epochs = config.train.num_train_epochs * steps_per_epoch, config.train.num_train_epochs
        else:
            max_steps = config.train.max_train_steps
            epochs = math.ceil(max_steps / steps_per_epoch)
        return cls(global_batch_size, per_device * local_device_count, learning_rate, num_examples,
                   steps_per_epoch, max_steps, epochs, num_held_out)

    @classmethod
    def without_data(cls, config: RunConfig, device_count: int, local_device_count: int) -> "Plan":
        """For compiling without a dataset (aot, bench): the data sets only the schedule's length, not the step's
        memory; without --max_train_steps, one step an epoch."""
        return cls.make(config, device_count, local_device_count, config.train.train_batch_size * device_count, 1)


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The base model's folder as far as a setup needs it before any weights: what family it is, its training
    noise schedule's config and its tokenizers (one per text encoder)."""
    model_dir: str
    family: object                # family.StableDiffusion | family.StableDiffusionXL
    scheduler_config: dict
    tokenizers: tuple
    vae_dir: str | None = None    # --pretrained_vae_model_name_or_path: a VAE replacing the pipeline's

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def tokenizer_2(self):
        return self.tokenizers[1] if len(self.tokenizers) > 1 else None

    def modules(self, model_config, dtype) -> families.Modules:
        return self.family.modules(self.model_dir, dtype, variant=model_config.variant,
                                   attention=model_config.attention, vae_dir=self.vae_dir)

    def load(self, model_config, dtype, **which) -> tuple[families.Modules, dict]:
        return self.family.load(self.model_dir, dtype, variant=model_config.variant, attention=model_config.attention,
                                vae_dir=self.vae_dir, **which)

    def loader_options(self) -> dict:
        """What the data pipeline makes for this family (data.build_train_loader's keywords)."""
        return {"tokenizer_2": self.tokenizer_2, "size_conditioning": self.family.size_conditioning}


def read_base_model(model_dir: str, model_config=None) -> BaseModel:
    """ModelError (one line) for a folder that is not a pipeline of a supported family; the modules' configs are
    checked too (before any data is read)."""
    family = families.detect(model_dir)  # first: a folder of another kind is named as such
    scheduler_config = read_scheduler_config(model_dir)
    if getattr(model_config, "rescale_betas_zero_snr", False):  # trains, validates and exports with it
        scheduler_config = zero_terminal_snr_config(scheduler_config)
    vae_dir = getattr(model_config, "pretrained_vae_model_name_or_path", None)
    base = BaseModel(model_dir, family, scheduler_config, family.tokenizers(model_dir), vae_dir)
    if model_config is not None:
        base.modules(model_config, jnp.float32)  # configs only: ModelError for what does not fit together
    return base


@dataclasses.dataclass
class TrainSetup:
    """What a run compiles, abstract: the step's arguments as sharded ShapeDtypeStructs and the step."""
    config: RunConfig
    base: BaseModel
    mesh: jax.sharding.Mesh
    plan: Plan
    modules: families.Modules
    noise_schedule: NoiseSchedule
    dtype: object                 # the compute dtype
    trained: object               # trainable.FullUNet | LoraAdapters | TextEncoderLora: what is trained
    step_config: step.StepConfig
    state: step.TrainState        # sharded ShapeDtypeStructs
    state_sharding: object
    frozen: dict                  # sharded ShapeDtypeStructs of what the step reads of the frozen models
    frozen_sharding: object
    batch: dict                   # sharded ShapeDtypeStructs of one global batch (at --resolution, square)

    @property
    def unet(self):
        return self.modules.unet

    @property
    def vae(self):
        return self.modules.vae

    @property
    def text_encoder(self):
        return self.modules.text_encoder

    @property
    def family(self):
        return self.base.family

    def train_step(self):
        """The jitted step (explicit shardings, the state donated)."""
        return step.compile_train_step(self.step_config, self.mesh, self.state_sharding, self.frozen_sharding)

    def batch_at(self, size: tuple[int, int]) -> dict:
        """The global batch's ShapeDtypeStructs for images of (width, height)."""
        return abstract_batch(self.mesh, self.plan.global_batch_size, size,
                              tuple(int(t.model_max_length) for t in self.base.tokenizers), self.modules.vae,
                              self.config.data.cache_latents, self.base.family)

    def lower(self, size: tuple[int, int] | None = None):
        """The step lowered for a global batch of images of `size` (width, height); default the square batch."""
        return self.train_step().lower(self.state, self.frozen, self.batch if size is None else self.batch_at(size))

    def frozen_params(self, params: dict) -> dict:
        """The step's frozen tree from the loaded host params ({component: tree}), in the compute dtype (as the
        PyTorch script casts the frozen models; with LoRA the UNet too)."""
        tree = step.frozen_params(None if self.config.data.cache_latents else params["vae"], params["text_encoder"],
                                  self.trained.frozen_unet(params.get("unet")), params.get("text_encoder_2"))
        tree = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(self.dtype), tree)
        return dict(tree, hyperparameters=self.step_config.hyperparameters.arrays())

    def place_frozen(self, params: dict) -> dict:
        return sharding.put(self.frozen_params(params), self.frozen_sharding)

    @property
    def sampling_scheduler_config(self) -> dict:
        """The base model's scheduler config with the prediction type trained for: what validation draws with and
        what the export writes (a --prediction_type other than the base's changes both)."""
        return dict(self.base.scheduler_config, prediction_type=self.noise_schedule.prediction_type)

    def sampler_models(self, state, frozen: dict) -> tuple[dict, dict]:
        """({"unet", "text_encoder"[, "text_encoder_2"]: the sampler's params}, {"unet_fn", "text_encoder_fn": its
        hooks (None: the plain module)}) for the weights that are exported (the EMA with --use_ema); arrays or
        ShapeDtypeStructs."""
        trained = step.exported_params(state)
        unet_params, unet_fn = self.trained.sampler_unet(self.unet, trained, frozen)
        text_params, text_encoder_fn = self.trained.sampler_text_encoders(trained, frozen)
        return {"unet": unet_params, **text_params}, {"unet_fn": unet_fn, "text_encoder_fn": text_encoder_fn}


def abstract_batch(mesh, global_batch_size: int, size, max_length, vae, cache_latents: bool,
                   family=families.STABLE_DIFFUSION) -> dict:
    """The global batch's ShapeDtypeStructs: images of `size` (a side, or (width, height)), or with --cache_latents
    the VAE posterior's moments, and what the family's conditioning reads (token ids of each tokenizer:
    `max_length` an int or one per tokenizer)."""
    where = sharding.batch_sharding(mesh)
    width, height = (size, size) if isinstance(size, int) else size
    max_lengths = tuple(max_length) if isinstance(max_length, (list, tuple)) else (max_length,)
    batch = family.text_batch(global_batch_size, max_lengths, where)
    if cache_latents:
        factor = 2 ** (len(vae.block_out_channels) - 1)
        moments = jax.ShapeDtypeStruct((global_batch_size, vae.latent_channels, height // factor, width // factor),
                                       jnp.float32, sharding=where)
        batch.update(latent_mean=moments, latent_std=moments)
    else:
        batch["pixel_values"] = jax.ShapeDtypeStruct((global_batch_size, 3, height, width), jnp.float32,
                                                     sharding=where)
    return batch


def batch_image_size(batch: dict) -> tuple[int, int]:
    """(width, height) of the images' (or latents') last two axes of a batch: the key of its compiled step."""
    images = batch["latent_mean"] if "latent_mean" in batch else batch["pixel_values"]
    return int(images.shape[-1]), int(images.shape[-2])


def make_step_config(config: RunConfig, plan: Plan, modules: families.Modules, noise_schedule: NoiseSchedule,
                     trained, family=families.STABLE_DIFFUSION) -> step.StepConfig:
    optimizer_config = config.optimizer
    hyperparameters = optim.Hyperparameters(
        name=optimizer_config.optimizer, schedule=optimizer_config.lr_scheduler, learning_rate=plan.learning_rate,
        warmup_steps=optimizer_config.lr_warmup_steps, total_steps=plan.max_train_steps,
        beta1=optimizer_config.adam_beta1, beta2=optimizer_config.adam_beta2, epsilon=optimizer_config.adam_epsilon,
        weight_decay=optimizer_config.adam_weight_decay, max_grad_norm=optimizer_config.max_grad_norm,
        decay_mask=optimizer_config.no_decay_bias_and_norm, warmup=optimizer_config.warmup,
        ema_decay=config.train.ema_decay)
    schedule, optimizer = hyperparameters.learning_rate_schedule(), hyperparameters.optimizer()
    return step.StepConfig(unet=modules.unet, vae=modules.vae, text_encoder=modules.text_encoder,
                           noise_schedule=noise_schedule, optimizer=optimizer, learning_rate=schedule,
                           use_ema=config.train.use_ema, ema_decay=config.train.ema_decay,
                           hyperparameters=hyperparameters,
                           noise_offset=config.train.noise_offset,
                           input_perturbation=config.train.input_perturbation,
                           timestep_bias=TimestepBias.from_config(config.train),
                           dream_detail_preservation=(config.train.dream_detail_preservation
                                                      if config.train.dream_training else None),
                           trainable=trained, family=family,
                           text_encoder_2=modules.text_encoder_2)


def _placed(tree, shardings):
    return jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                  tree, shardings)


def build(config: RunConfig, base: BaseModel, mesh, plan: Plan) -> TrainSetup:
    """The abstract setup of `config` on `mesh` (FlagError/ModelError, one line, for what does not fit together)."""
    noise_schedule = schedule_from_config(base.scheduler_config, config.model.prediction_type)
    dtype = COMPUTE_DTYPES[config.model.mixed_precision]
    modules = base.modules(config.model, dtype)
    vae_factor = 2 ** (len(modules.vae.block_out_channels) - 1)
    if config.data.resolution % vae_factor:
        raise FlagError(f"--resolution {config.data.resolution} must be a multiple of {vae_factor} for this VAE")
    # Each UNet down block but the last halves the latents, and the up blocks must meet them again.
    multiple = vae_factor * 2 ** (len(modules.unet.block_out_channels) - 1)
    if config.data.aspect_ratio_buckets and config.data.bucket_step % multiple:
        raise FlagError(f"--bucket_step {config.data.bucket_step} must be a multiple of {multiple} for this model "
                        f"(its VAE and UNet downsample the images {multiple} times)")
    trained = trainable.from_config(config, modules)
    step_config = make_step_config(config, plan, modules, noise_schedule, trained, base.family)
    if config.train.dream_training and noise_schedule.prediction_type != "epsilon":
        raise FlagError("--dream_training is for epsilon prediction (as diffusers' compute_dream_and_update_latents); "
                        f"this run predicts {noise_schedule.prediction_type}")
    if step_config.timestep_bias is not None:
        step_config.timestep_bias.check(noise_schedule.num_train_timesteps)
    abstract_state, state_sharding = step.state_shardings(step_config, mesh, trained.abstract_params(modules.unet),
                                                          config.train.seed)
    shapes = {"unet": modules.unet.abstract_params(), "vae": modules.vae.abstract_params(),
              "text_encoder": modules.text_encoder.abstract_params(),
              "text_encoder_2": modules.text_encoder_2.abstract_params() if modules.text_encoder_2 else None}
    frozen = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), step.frozen_params(
        None if config.data.cache_latents else shapes["vae"], shapes["text_encoder"],
        trained.frozen_unet(shapes["unet"]), shapes["text_encoder_2"]))
    frozen["hyperparameters"] = step_config.hyperparameters.abstract()  # float32 and int32, not the compute dtype
    frozen_sharding = sharding.tree_shardings(mesh, frozen)
    batch = abstract_batch(mesh, plan.global_batch_size, config.data.resolution,
                           tuple(int(t.model_max_length) for t in base.tokenizers), modules.vae,
                           config.data.cache_latents, base.family)
    return TrainSetup(config, base, mesh, plan, modules, noise_schedule, dtype, trained, step_config,
                      _placed(abstract_state, state_sharding), state_sharding, _placed(frozen, frozen_sharding),
                      frozen_sharding, batch)
