"""The training job, top to bottom: mesh, model, input, state, step, loop, export."""
from __future__ import annotations

import json
import math
import os

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from t2i_flax import data, export, hub, optim, sharding, step, tokenizer
from t2i_flax.metrics import MetricsWriter
from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from t2i_flax.noise import read_scheduler_config, schedule_from_config

COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16}
SECRET_ARGS = ("hub_token",)


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def plan_steps(args, steps_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) as the reference: --max_train_steps wins over epochs."""
    if args.max_train_steps is None:
        return args.num_train_epochs * steps_per_epoch, args.num_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)


def load_models(args, model_dir: str, dtype):
    common = dict(variant=args.variant, dtype=dtype)
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention=args.attention,
                                                                 **common)
    # The VAE's mid-block attention is one head of 512 channels, beyond cuDNN's head_dim limit: always XLA.
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", **common)
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder",
                                                                  attention=args.attention, **common)
    return (unet, unet_params), (vae, vae_params), (text_encoder, text_params)


def run(args) -> None:
    # ---- mesh -------------------------------------------------------------------------------
    mesh = sharding.make_mesh(args.fsdp)
    devices = jax.device_count()
    global_batch_size = args.train_batch_size * devices
    host_batch_size = args.train_batch_size * jax.local_device_count()
    learning_rate = args.learning_rate * global_batch_size if args.scale_lr else args.learning_rate
    log(f"devices: {devices} x {jax.devices()[0].platform} (mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}), "
        f"global batch {global_batch_size}")

    # ---- model ------------------------------------------------------------------------------
    if args.from_pt:
        log("note: --from_pt is not needed: t2i_flax reads safetensors (PyTorch) weights directly")
    model_dir = hub.resolve_model_dir(args.pretrained_model_name_or_path, revision=args.revision,
                                      variant=args.variant, cache_dir=args.cache_dir)
    scheduler_config = read_scheduler_config(model_dir)
    noise_schedule = schedule_from_config(scheduler_config, args.prediction_type)
    tokenizer_dir = os.path.join(model_dir, "tokenizer")
    clip_tokenizer = tokenizer.load_tokenizer(tokenizer_dir)

    # ---- input ------------------------------------------------------------------------------
    loader = data.build_train_loader(
        clip_tokenizer, host_batch_size=host_batch_size, resolution=args.resolution,
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir, cache_dir=args.cache_dir, image_column=args.image_column,
        caption_column=args.caption_column, center_crop=args.center_crop, random_flip=args.random_flip,
        max_train_samples=args.max_train_samples, seed=args.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=args.dataloader_num_workers)
    steps_per_epoch = loader.steps_per_epoch
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset has {loader.num_examples} usable examples, fewer than one global batch "
                         f"({global_batch_size}): lower --train_batch_size or use fewer devices")
    max_train_steps, num_epochs = plan_steps(args, steps_per_epoch)
    log(f"data: {loader.num_examples} examples, {steps_per_epoch} steps/epoch, {num_epochs} epochs, "
        f"{max_train_steps} steps")

    # ---- models (after the data, whose errors are cheaper to find) ----------------------------
    dtype = COMPUTE_DTYPES[args.mixed_precision]
    (unet, unet_params), (vae, vae_params), (text_encoder, text_params) = load_models(args, model_dir, dtype)
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if args.resolution % vae_factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of {vae_factor} for this VAE")
    log(f"model: {model_dir} (prediction_type {noise_schedule.prediction_type}, compute {jnp.dtype(dtype).name})")

    # ---- state and step ---------------------------------------------------------------------
    schedule = optim.learning_rate_schedule(args.lr_scheduler, learning_rate, args.lr_warmup_steps, max_train_steps)
    optimizer = optim.make_optimizer(schedule, args.adam_beta1, args.adam_beta2, args.adam_weight_decay,
                                     args.adam_epsilon, args.max_grad_norm)
    step_config = step.StepConfig(unet=unet, vae=vae, text_encoder=text_encoder, noise_schedule=noise_schedule,
                                  optimizer=optimizer, learning_rate=schedule, use_ema=args.use_ema,
                                  ema_decay=args.ema_decay, noise_offset=args.noise_offset)
    state, state_sharding = step.create_state(step_config, mesh, unet_params, args.seed)
    del unet_params
    # Frozen models run in the compute dtype, as the PyTorch script casts them.
    frozen = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), step.frozen_params(vae_params, text_params))
    frozen_sharding = sharding.tree_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_sharding)
    del vae_params, text_params
    train_step = compile_ahead(step.compile_train_step(step_config, mesh, state_sharding, frozen_sharding),
                               state, frozen, mesh, host_batch_size, args.resolution, clip_tokenizer.model_max_length)

    # ---- loop -------------------------------------------------------------------------------
    run_config = {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as handle:
            json.dump(run_config, handle, indent=2, sort_keys=True)
    writer = MetricsWriter(args.output_dir, args.logging_dir, args.report_to, max_train_steps,
                           run_config=run_config, enabled=is_main, images_per_step=global_batch_size)
    batches = loader.iterator()
    pending = None  # metrics of the step in flight: read one step late so dispatch never waits on them
    try:
        for step_index in range(max_train_steps):
            batch = sharding.global_batch(mesh, next(batches))
            state, metrics = train_step(state, frozen, batch)
            if pending is not None:
                _record(writer, step_index, pending, args.log_every)
            pending = metrics
        if pending is not None:
            _record(writer, max_train_steps, pending, 1)
    finally:
        writer.close()
        batches.close()

    # ---- export -----------------------------------------------------------------------------
    trained = state.ema_params if args.use_ema else state.params
    trained = multihost_utils.process_allgather(trained, tiled=True)  # whole arrays, also when FSDP-sharded
    if is_main:
        _, vae_params = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=args.variant)
        _, text_params = FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=args.variant)
        export.export_pipeline(args.output_dir, {"unet": (unet, trained), "vae": (vae, vae_params),
                                                 "text_encoder": (text_encoder, text_params)},
                               scheduler_config, noise_schedule.prediction_type, tokenizer_dir)
        log(f"saved the {'EMA ' if args.use_ema else ''}fine-tuned pipeline to {os.path.abspath(args.output_dir)}")
        if args.push_to_hub:
            repo_id = export.push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
            log(f"pushed to the Hub: {repo_id}")


def compile_ahead(train_step, state, frozen, mesh, host_batch_size: int, resolution: int, max_length: int):
    """Compiles the step before the loop (so the first timed step is a real one) and turns a step that does
    not fit device memory into one line."""
    global_size = host_batch_size * jax.process_count()
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {"pixel_values": jax.ShapeDtypeStruct((global_size, 3, resolution, resolution), jnp.float32,
                                                  sharding=batch_sharding),
             "input_ids": jax.ShapeDtypeStruct((global_size, max_length), jnp.int32, sharding=batch_sharding)}
    start = time.perf_counter()
    try:
        compiled = train_step.lower(state, frozen, batch).compile()
    except Exception as error:  # XLA reports a step that does not fit as RESOURCE_EXHAUSTED at compile time
        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
            raise
        raise ValueError(f"the train step does not fit device memory ({str(error).splitlines()[0][:200]}): "
                         f"shard with --fsdp {jax.device_count()}, lower --train_batch_size or use "
                         f"--mixed_precision bf16") from None
    log(f"compiled the train step in {time.perf_counter() - start:.1f}s")
    return compiled


def _record(writer: MetricsWriter, finished_steps: int, metrics, log_every: int) -> None:
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    writer.add(finished_steps, values)
    if finished_steps % log_every == 0:
        writer.flush(finished_steps)
