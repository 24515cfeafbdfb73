"""The training job, top to bottom: mesh, checkpoint to continue, model, input, state, step, loop, export."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from t2i_flax import data, export, hub, lora, optim, resume, sharding, step, tokenizer
from t2i_flax.checkpoint import Checkpoints
from t2i_flax.config import RunConfig
from t2i_flax.errors import DataError, FlagError, OutputError, Stopped, TrainingFailed
from t2i_flax.interrupt import StopRequest
from t2i_flax.metrics import MetricsWriter
from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from t2i_flax.noise import read_scheduler_config, schedule_from_config
from t2i_flax.validation import Validation

COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16}
LORA_INIT_STREAM = 0x4C6F5241  # "LoRA": the adapters' init key, apart from the step's streams
_HUB_SNAPSHOT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


def log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)  # above the progress bar, when there is one
        sys.stdout.flush()


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

    @classmethod
    def make(cls, config: RunConfig, num_examples: int, steps_per_epoch: int) -> "Plan":
        per_device = config.train.train_batch_size
        global_batch_size = per_device * jax.device_count()
        learning_rate = config.optimizer.learning_rate
        if config.optimizer.scale_lr:
            learning_rate *= global_batch_size
        if config.train.max_train_steps is None:  # as the reference: --max_train_steps wins over epochs
            max_steps, epochs = config.train.num_train_epochs * steps_per_epoch, config.train.num_train_epochs
        else:
            max_steps = config.train.max_train_steps
            epochs = math.ceil(max_steps / steps_per_epoch)
        return cls(global_batch_size, per_device * jax.local_device_count(), learning_rate, num_examples,
                   steps_per_epoch, max_steps, epochs)


@dataclasses.dataclass(frozen=True)
class Every:
    """A periodic action of the loop: `run(step)` after every `interval`-th finished step (0: never)."""
    interval: int
    run: Callable[[int], None]

    def due(self, finished_steps: int) -> bool:
        return self.interval > 0 and finished_steps % self.interval == 0


def model_commit(model_dir: str) -> str | None:
    """The Hub commit a downloaded model folder is a snapshot of (None for a local folder)."""
    found = _HUB_SNAPSHOT.search(model_dir)
    return found.group(1) if found else None


def load_models(config: RunConfig, model_dir: str, dtype, load_unet_weights: bool = True):
    common = dict(variant=config.model.variant, dtype=dtype)
    attention = config.model.attention
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention=attention,
                                                                 load_weights=load_unet_weights, **common)
    # The VAE's mid-block attention is one head of 512 channels, beyond cuDNN's head_dim limit: always XLA.
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", **common)
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder",
                                                                  attention=attention, **common)
    return (unet, unet_params), (vae, vae_params), (text_encoder, text_params)


def make_step_config(config: RunConfig, plan: Plan, unet, vae, text_encoder, noise_schedule) -> step.StepConfig:
    optimizer_config = config.optimizer
    schedule = optim.learning_rate_schedule(optimizer_config.lr_scheduler, plan.learning_rate,
                                            optimizer_config.lr_warmup_steps, plan.max_train_steps)
    optimizer = optim.make_optimizer(schedule, optimizer_config.adam_beta1, optimizer_config.adam_beta2,
                                     optimizer_config.adam_weight_decay, optimizer_config.adam_epsilon,
                                     optimizer_config.max_grad_norm, optimizer_config.no_decay_bias_and_norm)
    return step.StepConfig(unet=unet, vae=vae, text_encoder=text_encoder, noise_schedule=noise_schedule,
                           optimizer=optimizer, learning_rate=schedule, use_ema=config.train.use_ema,
                           ema_decay=config.train.ema_decay, noise_offset=config.train.noise_offset,
                           lora_scale=config.lora.scale if config.lora.enabled else None)


def init_lora(config: RunConfig, unet):
    """The LoRA adapters at step 0 (A Gaussian, B zero), as a jitted function of nothing."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), LORA_INIT_STREAM)
    targets = lora.parse_target_modules(config.lora.lora_target_modules)
    return jax.jit(lambda: lora.init_lora_params(key, unet.abstract_params(), config.lora.lora_rank, targets))


def run(config: RunConfig) -> None:
    model_config, data_config, train_config = config.model, config.data, config.train
    output_config, checkpoint_config = config.output, config.checkpoint
    is_main = jax.process_index() == 0

    # ---- mesh -------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.devices.fsdp)
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"(mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']})")

    # ---- the checkpoint this run continues (its settings are checked before anything is loaded) ----
    checkpoints_dir = checkpoint_config.directory(output_config.output_dir)
    source, check_record, resume_step = resume.open_source(config, checkpoints_dir)
    saved_record = resume.peek_record(source, resume_step, check_record) if source is not None else None

    # ---- model ------------------------------------------------------------------------------
    if model_config.from_pt:
        log("note: --from_pt is not needed: t2i_flax reads safetensors (PyTorch) weights directly")
    revision = model_config.revision
    if saved_record is not None and saved_record["resolved"]["model_commit"]:
        revision = saved_record["resolved"]["model_commit"]  # the exact files the checkpoint was trained from
    model_dir = hub.resolve_model_dir(model_config.pretrained_model_name_or_path, revision=revision,
                                      variant=model_config.variant, cache_dir=model_config.cache_dir)
    scheduler_config = read_scheduler_config(model_dir)
    noise_schedule = schedule_from_config(scheduler_config, model_config.prediction_type)
    tokenizer_dir = os.path.join(model_dir, "tokenizer")
    clip_tokenizer = tokenizer.load_tokenizer(tokenizer_dir)

    # ---- input ------------------------------------------------------------------------------
    host_batch_size = train_config.train_batch_size * jax.local_device_count()
    loader = data.build_train_loader(
        clip_tokenizer, host_batch_size=host_batch_size, resolution=data_config.resolution,
        dataset_name=data_config.dataset_name, dataset_config_name=data_config.dataset_config_name,
        train_data_dir=data_config.train_data_dir, cache_dir=model_config.cache_dir,
        image_column=data_config.image_column, caption_column=data_config.caption_column,
        center_crop=data_config.center_crop, random_flip=data_config.random_flip,
        max_train_samples=data_config.max_train_samples, seed=train_config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=data_config.dataloader_num_workers,
        # Which records decode, kept with the run: a resumed or repeated run does not scan again.
        scan_cache_path=os.path.join(output_config.output_dir, "data_scan.json"), write_scan_file=False)
    plan = Plan.make(config, loader.num_examples, loader.steps_per_epoch)
    log(f"data: {plan.num_examples} examples, global batch {plan.global_batch_size}, {plan.steps_per_epoch} "
        f"steps/epoch, {plan.num_train_epochs} epochs, {plan.max_train_steps} steps")

    # ---- models (after the data, whose errors are cheaper to find) ----------------------------
    dtype = COMPUTE_DTYPES[model_config.mixed_precision]
    use_lora = config.lora.enabled
    (unet, unet_params), (vae, vae_params), (text_encoder, text_params) = load_models(
        config, model_dir, dtype, load_unet_weights=source is None or use_lora)
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if data_config.resolution % vae_factor:
        raise FlagError(f"--resolution {data_config.resolution} must be a multiple of {vae_factor} for this VAE")
    log(f"model: {model_dir} (prediction_type {noise_schedule.prediction_type}, compute {jnp.dtype(dtype).name})")
    if data_config.cache_latents:  # the VAE encoder runs once per image here, never in the step
        loader = with_latent_cache(config, loader, mesh, vae, vae_params, dtype)

    # ---- state: restored, or initialised from the base model ---------------------------------
    step_config = make_step_config(config, plan, unet, vae, text_encoder, noise_schedule)
    trained_init = init_lora(config, unet) if use_lora else None  # LoRA: the adapters are what is trained
    trained_shape = jax.eval_shape(trained_init) if use_lora else unet.abstract_params()
    if use_lora:
        log(f"LoRA: rank {config.lora.lora_rank}, scale {config.lora.scale:g}, "
            f"{len(lora.adapted_modules(unet.abstract_params(), config.lora.lora_target_modules))} adapted layers, "
            f"{lora.param_count(trained_shape):,} trained parameters")
    abstract_state, state_sharding = step.state_shardings(step_config, mesh, trained_shape, train_config.seed)
    batches = None
    if source is not None:
        placed = jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                        abstract_state, state_sharding)
        resume_step, state, data_state, _, damaged = resume.restore(source, resume_step,
                                                            config.checkpoint.resume_from_checkpoint, check_record,
                                                            placed)
        source.close()
        for moved in resume.set_aside(source.directory, damaged):
            log(f"moved the damaged checkpoint aside: {moved}")
        batches = loader.restore(data_state)
        log(f"resumed from {source.step_path(resume_step)} (step {resume_step} of {plan.max_train_steps})")
    else:
        state, state_sharding = step.create_state(step_config, mesh, trained_init() if use_lora else unet_params,
                                                  train_config.seed)
        batches = loader.iterator()
        resume_step = 0
    # Frozen models run in the compute dtype, as the PyTorch script casts them (with LoRA, the UNet too).
    frozen = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), step.frozen_params(
        None if data_config.cache_latents else vae_params, text_params, unet_params if use_lora else None))
    del unet_params
    frozen_sharding = sharding.tree_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_sharding)
    batch_spec = abstract_batch(mesh, plan.host_batch_size, data_config, clip_tokenizer.model_max_length, vae)
    train_step = compile_ahead(step.compile_train_step(step_config, mesh, state_sharding, frozen_sharding),
                               state, frozen, batch_spec)
    validation = None
    validation_interval = config.validation.interval(plan.steps_per_epoch)
    if validation_interval:  # the VAE decoder goes to the devices only for this
        validation = Validation(config.validation, mesh, unet, vae, text_encoder, clip_tokenizer, scheduler_config,
                                frozen["text_encoder"], vae_params,
                                _abstract(sampler_unet(weights_to_export(state, config), frozen, config)),
                                data_config.resolution, train_config.seed, output_config.output_dir,
                                unet_fn=lora.sampler_unet_fn(unet) if use_lora else None)
        every = (f"{validation_interval} steps (--validation_steps wins over --validation_epochs)"
                 if config.validation.validation_steps else f"{config.validation.validation_epochs} epochs")
        log(f"validation: {len(config.validation.validation_prompts)} prompts x "
            f"{config.validation.num_validation_images} every {every} and at the end, "
            f"{validation.scheduler.kind} {config.validation.validation_num_inference_steps} steps")
    del vae_params, text_params

    # ---- output and checkpoints -----------------------------------------------------------------
    run_record = {"version": resume.RECORD_VERSION, "config": config.to_dict(),
                  "resolved": {"global_batch_size": plan.global_batch_size, "learning_rate": plan.learning_rate,
                               "num_examples": plan.num_examples, "max_train_steps": plan.max_train_steps,
                               "model_dir": os.path.abspath(model_dir), "model_commit": model_commit(model_dir)}}
    if is_main:
        write_json(os.path.join(output_config.output_dir, "training_args.json"), run_record["config"])
        loader.write_scan_file()
    checkpoints = Checkpoints(checkpoints_dir, keep=checkpoint_config.checkpoints_total_limit or None)
    writer = MetricsWriter(output_config.output_dir, output_config.logging_dir, output_config.report_to,
                           plan.max_train_steps, initial_step=resume_step, run_config=run_record["config"],
                           enabled=is_main, images_per_step=plan.global_batch_size, append=source is not None)

    def save_checkpoint(finished_steps: int) -> None:
        if finished_steps in checkpoints.steps():
            return
        start = time.perf_counter()
        checkpoints.save(finished_steps, state, batches.get_state(), run_record)
        log(f"checkpoint {checkpoints.step_path(finished_steps)} (the loop waited {time.perf_counter() - start:.1f}s)")

    validated = {}  # step -> grid path

    def validate(finished_steps: int) -> None:
        if finished_steps in validated:
            return
        path, grid = validation(finished_steps, sampler_unet(weights_to_export(state, config), frozen, config))
        validated[finished_steps] = path
        writer.add_image(finished_steps, "validation", grid, caption="; ".join(config.validation.validation_prompts))
        log(f"validation images: {path}")

    # ---- loop -------------------------------------------------------------------------------
    periodic = [Every(checkpoint_config.checkpointing_steps, save_checkpoint),
                Every(validation_interval, validate)]
    pending = None  # (step, metrics) of the step in flight: read one step late so dispatch never waits
    try:
        with StopRequest() as stop_request:
            for finished in range(resume_step + 1, plan.max_train_steps + 1):
                batch = sharding.global_batch(mesh, next(batches))
                state, metrics = train_step(state, frozen, batch)
                if pending is not None:
                    record_metrics(writer, *pending, output_config.log_every)
                pending = (finished, metrics)
                stopping = stop_request.should_stop(finished)
                due = [action for action in periodic if action.due(finished)]
                if due or stopping or finished == plan.max_train_steps:
                    # A step's loss is checked before anything is saved from it.
                    record_metrics(writer, *pending, output_config.log_every)
                    pending = None
                    for action in due:
                        action.run(finished)
                if stopping:
                    save_checkpoint(finished)
                    checkpoints.wait()
                    raise Stopped(f"stopped by {stop_request.signal_name} after step {finished}: the checkpoint "
                                  f"{checkpoints.step_path(finished)} is complete; run the same command with "
                                  f"--resume_from_checkpoint latest to continue")
        final_step = max(resume_step, plan.max_train_steps)
        save_checkpoint(final_step)  # so that training longer can resume
        if validation is not None:
            validate(final_step)  # the last pass, for the model card
        checkpoints.wait()
    finally:
        writer.close()
        batches.close()
        checkpoints.close()

    # ---- export -----------------------------------------------------------------------------
    trained = multihost_utils.process_allgather(weights_to_export(state, config), tiled=True)  # also FSDP-sharded
    if is_main:
        what = export.export_trained(output_config.output_dir, config, model_dir, unet, trained, scheduler_config,
                                     noise_schedule.prediction_type)
        export.write_model_card(output_config.output_dir, model_config.pretrained_model_name_or_path,
                                data_config.dataset_name or data_config.train_data_dir, card_settings(config, plan),
                                validated.get(final_step), list(config.validation.validation_prompts),
                                lora=use_lora, license_name=export.base_model_license(model_dir))
        log(f"saved the {'EMA of the ' if train_config.use_ema else ''}{what} to "
            f"{os.path.abspath(output_config.output_dir)}")
        if output_config.push_to_hub:
            repo_id = export.push_to_hub(output_config.output_dir, output_config.hub_model_id, output_config.hub_token)
            log(f"pushed to the Hub: {repo_id}")


def weights_to_export(state, config: RunConfig):
    """What is exported and drawn from: the EMA with --use_ema (as the PyTorch script), else the weights."""
    return state.ema_params if config.train.use_ema else state.params


def sampler_unet(trained, frozen: dict, config: RunConfig):
    """What the sampler's UNet reads: the trained UNet, or the frozen one with the trained adapters."""
    if not config.lora.enabled:
        return trained
    return lora.sampler_unet_params(frozen["unet"], trained, config.lora.scale)


def _abstract(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def card_settings(config: RunConfig, plan: Plan) -> dict:
    optimizer = config.optimizer
    return {"steps": plan.max_train_steps, "global batch": plan.global_batch_size,
            "resolution": config.data.resolution, "learning rate": f"{plan.learning_rate:g} ({optimizer.lr_scheduler}, "
            f"{optimizer.lr_warmup_steps} warmup steps)", "AdamW": f"betas {optimizer.adam_beta1}/{optimizer.adam_beta2}, "
            f"weight decay {optimizer.adam_weight_decay}, eps {optimizer.adam_epsilon}",
            "max grad norm": optimizer.max_grad_norm, "mixed precision": config.model.mixed_precision,
            "EMA": f"decay {config.train.ema_decay}" if config.train.use_ema else "no",
            "noise offset": config.train.noise_offset, "seed": config.train.seed,
            "crop / flip": f"{'center' if config.data.center_crop else 'random'} / "
                           f"{'random' if config.data.random_flip else 'none'}",
            **({"LoRA": f"rank {config.lora.lora_rank}, alpha {config.lora.lora_alpha or config.lora.lora_rank}, "
                        f"targets {config.lora.lora_target_modules}"} if config.lora.enabled else {})}


def write_json(path: str, content: dict) -> None:
    """Writes a JSON file, creating its folder; an unwritable place is the user's OutputError."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(content, handle, indent=2, sort_keys=True)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


def abstract_batch(mesh, host_batch_size: int, data_config, max_length: int, vae) -> dict:
    """The global batch's ShapeDtypeStructs: images, or with --cache_latents the posterior moments."""
    size = host_batch_size * jax.process_count()
    where = sharding.batch_sharding(mesh)
    resolution = data_config.resolution
    batch = {"input_ids": jax.ShapeDtypeStruct((size, max_length), jnp.int32, sharding=where)}
    if data_config.cache_latents:
        factor = 2 ** (len(vae.block_out_channels) - 1)
        moments = jax.ShapeDtypeStruct((size, vae.latent_channels, resolution // factor, resolution // factor),
                                       jnp.float32, sharding=where)
        batch.update(latent_mean=moments, latent_std=moments)
    else:
        batch["pixel_values"] = jax.ShapeDtypeStruct((size, 3, resolution, resolution), jnp.float32, sharding=where)
    return batch


def with_latent_cache(config: RunConfig, loader, mesh, vae, vae_params, dtype):
    """Builds (or finds, or completes) the latent cache, then the loader that reads it."""
    from t2i_flax.data import latent_cache

    data_config = config.data
    if loader.dataset_identity is None:
        raise DataError("--cache_latents: this dataset has no datasets fingerprint, so a cache of it could not be "
                        "told from a stale one; drop --cache_latents")
    encoder = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                     {name: vae_params[name] for name in step.VAE_ENCODER_PARAMS})
    factor = 2 ** (len(vae.block_out_channels) - 1)
    latent_hw = data_config.resolution // factor
    key_fields = {"vae_encoder": latent_cache.params_digest(encoder), "dtype": jnp.dtype(dtype).name,
                  "vae_config": vae.to_config(), "dataset": loader.dataset_identity,
                  "image_column": data_config.image_column, "resolution": data_config.resolution, "center_crop": True}
    local = jax.local_device_count()
    online = loader.example_fn
    cache = latent_cache.LatentCache(
        data_config.latent_cache_dir or os.path.join(config.output.output_dir, "latent_cache"), key_fields,
        online.records, data_config.random_flip, (vae.latent_channels, latent_hw, latent_hw), jax.process_index(),
        jax.process_count(), per_host=-(-64 // local) * local)
    placed = jax.device_put(encoder, sharding.tree_shardings(mesh, encoder))
    where = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda params, pixels: step.posterior_moments(vae, params, pixels), out_shardings=(where, where))
    encode_pixels = functools.partial(encode, placed)
    start = time.perf_counter()
    encoded = cache.build(online.dataset, data_config.image_column, data_config.resolution, encode_pixels, mesh,
                          show_progress=jax.process_index() == 0)
    seconds = time.perf_counter() - start
    what = f"encoded {encoded} of {cache.num_chunks} chunks in {seconds:.1f}s" if encoded else "complete"
    log(f"latent cache: {cache.root} ({len(online.records)} images{' x 2 flips' if data_config.random_flip else ''}, "
        f"{what})")
    del placed, encode_pixels  # the VAE encoder leaves the devices
    return loader.with_examples(latent_cache.CachedExampleAt(online, cache))


def compile_ahead(train_step, state, frozen, batch: dict):
    """Compiles the step before the loop (so the first timed step is a real one) and turns a step that does
    not fit device memory into one line."""
    start = time.perf_counter()
    try:
        compiled = train_step.lower(state, frozen, batch).compile()
    except jax.errors.JaxRuntimeError as error:  # a step that does not fit is RESOURCE_EXHAUSTED at compile time
        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
            raise
        raise FlagError(f"the train step does not fit device memory ({str(error).splitlines()[0][:200]}): "
                        f"shard with --fsdp {jax.device_count()}, lower --train_batch_size or use "
                        f"--mixed_precision bf16") from None
    log(f"compiled the train step in {time.perf_counter() - start:.1f}s")
    return compiled


def record_metrics(writer: MetricsWriter, finished_steps: int, metrics, log_every: int) -> None:
    """Host values of one finished step; a non-finite loss ends the run (exit code 1) with its step."""
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
        raise TrainingFailed(f"loss became {values['loss']} at step {finished_steps}: lower --learning_rate "
                             f"or check the data")
    writer.add(finished_steps, values)
    if finished_steps % log_every == 0:
        writer.flush(finished_steps)
