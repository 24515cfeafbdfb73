"""The training job, top to bottom: mesh, checkpoint to continue, base model, input, setup, weights, state, step,
output, loop, export. What is trained (t2i_flax/trainable.py) and what the step compiles (t2i_flax/setup.py) are
chosen once; nothing below branches on them."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import cached_latents, data, export, hub, model_card, resume, setup, sharding, step
from t2i_flax.held_out import HeldOutLoss
from t2i_flax.checkpoint import Checkpoints
from t2i_flax.config import RunConfig
from t2i_flax.errors import FlagError, OutputError, Stopped, TrainingFailed
from t2i_flax.family import force_zeros_for_empty_prompt
from t2i_flax.interrupt import StopRequest
from t2i_flax.metrics import MetricsWriter, log, logged_values
from t2i_flax.validation import Validation


def run(config: RunConfig) -> None:
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

    # ---- base model: its configs, scheduler and tokenizer (the weights come after the data) -------
    model_dir = resolve_model_dir(config, saved_record)
    base = setup.read_base_model(model_dir, config.model)  # ModelError for an unsupported model, before the data

    # ---- input ------------------------------------------------------------------------------
    loader = data.build_train_loader(
        config.data, base.tokenizer, host_batch_size=config.train.train_batch_size * jax.local_device_count(),
        seed=config.train.seed, cache_dir=config.model.cache_dir,
        # Which records decode, kept with the run: a resumed or repeated run does not scan again.
        scan_cache_path=os.path.join(output_config.output_dir, "data_scan.json"), write_scan_file=False,
        **base.loader_options())
    plan = setup.Plan.make(config, jax.device_count(), jax.local_device_count(), loader.num_examples,
                           loader.steps_per_epoch, len(loader.held_out or ()))
    held_out_note = f" ({plan.num_held_out} more held out: --validation_split)" if plan.num_held_out else ""
    log(f"data: {plan.num_examples} examples{held_out_note}, global batch {plan.global_batch_size}, {plan.steps_per_epoch} "
        f"steps/epoch, {plan.num_train_epochs} epochs, {plan.max_train_steps} steps")
    if loader.buckets is not None:
        log(loader.buckets.describe())

    # ---- the setup: models' shapes, what is trained, state, frozen inputs, batch, the step --------
    built = setup.build(config, base, mesh, plan)
    log(f"model: {model_dir} (prediction_type {built.noise_schedule.prediction_type}, compute "
        f"{jnp.dtype(built.dtype).name})")
    if built.trained.describe(built.unet):
        log(built.trained.describe(built.unet))

    # ---- weights ----------------------------------------------------------------------------
    _, params = base.load(config.model, built.dtype, unet=built.trained.needs_unet_weights(resuming=source is not None))
    if config.data.cache_latents:  # the VAE encoder runs once per image here, never in the step
        loader = cached_latents.loader_over_cache(config, loader, built, params["vae"])

    # ---- state: restored, or initialised from the base model ---------------------------------
    if source is not None:
        resume_step, state, data_state, _, damaged = resume.restore(
            source, resume_step, checkpoint_config.resume_from_checkpoint, check_record, built.state)
        source.close()
        for moved in resume.set_aside(source.directory, damaged):
            log(f"moved the damaged checkpoint aside: {moved}")
        batches = loader.restore(data_state)
        log(f"resumed from {source.step_path(resume_step)} (step {resume_step} of {plan.max_train_steps})")
    else:
        state, _ = step.create_state(built.step_config, mesh,
                                     built.trained.initial_params(built.unet, params.get("unet"), params),
                                     config.train.seed)
        batches = loader.iterator()
        resume_step = 0
    frozen = built.place_frozen(params)

    # ---- the step and the validation sampler, compiled before the first step -----------------
    train_step = compile_ahead(built, train_sizes(loader))
    validation = make_validation(config, built, frozen, state, params["vae"])
    held_out_loss = HeldOutLoss.for_run(built, loader, config.train.seed)  # None without --validation_split
    del params

    # ---- output and checkpoints -----------------------------------------------------------------
    run_record = {"version": resume.RECORD_VERSION, "config": config.to_dict(),
                  "resolved": {"global_batch_size": plan.global_batch_size, "learning_rate": plan.learning_rate,
                               "num_examples": plan.num_examples, "max_train_steps": plan.max_train_steps,
                               "model_dir": os.path.abspath(model_dir), "model_commit": model_commit(model_dir)}}
    if is_main:
        write_json(os.path.join(output_config.output_dir, "training_args.json"), run_record["config"])
        loader.write_scan_file()
        if loader.buckets is not None:
            loader.buckets.write(output_config.output_dir)
    checkpoints = Checkpoints(checkpoints_dir, keep=checkpoint_config.checkpoints_total_limit or None)
    writer = MetricsWriter(output_config.output_dir, output_config.logging_dir, output_config.report_to,
                           plan.max_train_steps, initial_step=resume_step, run_config=run_record["config"],
                           enabled=is_main, images_per_step=plan.global_batch_size, append=source is not None,
                           project_name=output_config.tracker_project_name)

    # ---- loop -------------------------------------------------------------------------------
    def save_checkpoint(finished_steps: int, state) -> None:
        if finished_steps in checkpoints.steps():
            return
        start = time.perf_counter()
        checkpoints.save(finished_steps, state, batches.get_state(), run_record)
        log(f"checkpoint {checkpoints.step_path(finished_steps)} (the loop waited {time.perf_counter() - start:.1f}s)")

    validated, grids = set(), {}  # the steps validated; step -> grid path

    def measure_held_out(finished_steps: int, state) -> None:
        val_loss = held_out_loss(state.params, frozen)  # the raw weights (t2i_flax/held_out.py says why)
        writer.add_validation(finished_steps, {"val_loss": val_loss})
        log(f"held-out loss ({len(held_out_loss)} images) after step {finished_steps}: {val_loss:.6f}")

    def validate(finished_steps: int, state) -> None:
        if finished_steps in validated:
            return
        validated.add(finished_steps)
        if held_out_loss is not None:
            measure_held_out(finished_steps, state)
        if validation is not None:
            path, grid = validation(finished_steps, built.sampler_models(state, frozen)[0])
            grids[finished_steps] = path
            writer.add_image(finished_steps, "validation", grid,
                             caption="; ".join(config.validation.validation_prompts))
            log(f"validation images: {path}")

    periodic = [Every(checkpoint_config.checkpointing_steps, save_checkpoint),
                Every(config.validation.interval(plan.steps_per_epoch, held_out=held_out_loss is not None), validate)]
    metrics = PendingMetrics(writer, output_config.log_every)
    final_step = max(resume_step, plan.max_train_steps)
    try:
        with StopRequest() as stop_request:
            # Only explicit transfers (device_put, device_get) in the loop: an implicit host <-> device copy that
            # creeps into the step, the metrics, validation or checkpointing is an error.
            with jax.transfer_guard("disallow"):
                if held_out_loss is not None and resume_step == 0:
                    measure_held_out(0, state)  # the untrained weights: where the curve starts
                for finished in range(resume_step + 1, plan.max_train_steps + 1):
                    with jax.transfer_guard_host_to_device("allow"):  # the one intended copy (several hosts: JAX
                        batch = sharding.global_batch(mesh, next(batches))  # counts it as an implicit one)
                    state, step_metrics = train_step(state, frozen, batch)
                    metrics.add(finished, step_metrics)
                    stopping = stop_request.should_stop(finished)
                    due = [action for action in periodic if action.due(finished)]
                    if due or stopping or finished == plan.max_train_steps or finished % output_config.log_every == 0:
                        metrics.fetch()  # a step's loss is checked before anything is saved from it
                    for action in due:
                        action.run(finished, state)
                    if stopping:
                        save_checkpoint(finished, state)
                        checkpoints.wait()
                        raise Stopped(f"stopped by {stop_request.signal_name} after step {finished}: the checkpoint "
                                      f"{checkpoints.step_path(finished)} is complete; run the same command with "
                                      f"--resume_from_checkpoint latest to continue")
                save_checkpoint(final_step, state)  # so that training longer can resume
                validate(final_step, state)  # the last pass, for the model card
        checkpoints.wait()
    finally:
        writer.close()
        batches.close()
        checkpoints.close()

    # ---- export -----------------------------------------------------------------------------
    trained = sharding.gather_to_host(step.exported_params(state))  # also FSDP-sharded
    if is_main:
        writer = export.PipelineWriter(output_config.output_dir, model_dir, config.model.variant, built.unet,
                                       base.scheduler_config, built.noise_schedule.prediction_type, base.family,
                                       base.vae_dir)
        what = built.trained.export(writer, trained)
        if output_config.export_single_file:
            log(export.write_single_file(output_config.output_dir, output_config.export_dtype))
        model_card.write_model_card(output_config.output_dir, config.model.pretrained_model_name_or_path,
                                    config.data.dataset_name or config.data.train_data_dir,
                                    model_card.settings_table(config, plan, built.trained), grids.get(final_step),
                                    list(config.validation.validation_prompts), lora=built.trained.is_adapter,
                                    license_name=model_card.base_model_license(model_dir),
                                    family_tags=base.family.hub_tags, pipeline_class=base.family.pipeline_class,
                                    held_out_curve=logged_values(output_config.output_dir, "val_loss"))
        log(f"saved the {'EMA of the ' if config.train.use_ema else ''}{what} to "
            f"{os.path.abspath(output_config.output_dir)}")
        if output_config.push_to_hub:
            repo_id = export.push_to_hub(output_config.output_dir, output_config.hub_model_id, output_config.hub_token)
            log(f"pushed to the Hub: {repo_id}")


# ---- the loop's parts ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Every:
    """A periodic action of the loop: `run(step, state)` after every `interval`-th finished step (0: never)."""
    interval: int
    run: Callable[[int, step.TrainState], None]

    def due(self, finished_steps: int) -> bool:
        return self.interval > 0 and finished_steps % self.interval == 0


class PendingMetrics:
    """The steps' metrics stay on the devices until `fetch` (every --log_every steps, and before a save, a
    validation or the end): one transfer for many steps, so the host never waits on a step to dispatch the next.
    A non-finite loss ends the run (exit code 1) naming its step."""

    def __init__(self, writer: MetricsWriter, log_every: int):
        self.writer, self.log_every = writer, log_every
        self.pending: list[tuple[int, dict]] = []

    def add(self, finished_steps: int, metrics: dict) -> None:
        self.pending.append((finished_steps, metrics))
        self.writer.advance()

    def fetch(self) -> None:
        values = jax.device_get([metrics for _, metrics in self.pending])
        for (finished_steps, _), host in zip(self.pending, values):
            host = {name: float(value) for name, value in host.items()}
            if not math.isfinite(host["loss"]):
                raise TrainingFailed(f"loss became {host['loss']} at step {finished_steps}: lower --learning_rate "
                                     f"or check the data")
            self.writer.add(finished_steps, host)
            if finished_steps % self.log_every == 0:
                self.writer.flush(finished_steps)
        self.pending = []


# ---- the run's pieces -------------------------------------------------------------------------------

def resolve_model_dir(config: RunConfig, saved_record: dict | None) -> str:
    """The base model's local folder; a resumed run loads the exact files its checkpoint was trained from."""
    model = config.model
    if model.from_pt:
        log("note: --from_pt is not needed: t2i_flax reads safetensors (PyTorch) weights directly")
    revision = model.revision
    if saved_record is not None and saved_record["resolved"]["model_commit"]:
        revision = saved_record["resolved"]["model_commit"]
    return hub.resolve_model_dir(model.pretrained_model_name_or_path, revision=revision, variant=model.variant,
                                 cache_dir=model.cache_dir, single_file_config=model.single_file_config)


def model_commit(model_dir: str) -> str | None:
    """The Hub commit a downloaded model folder is a snapshot of, or that a Hub single file (converted into a folder
    of the single-file cache) was downloaded from; None for a local folder or file."""
    from t2i_flax import single_file

    return hub.snapshot_commit(model_dir) or single_file.source_commit(model_dir)


def train_sizes(loader) -> list[tuple[int, int]]:
    """The (width, height) of every batch the run trains on: each aspect-ratio bucket that holds a global batch, or
    the square."""
    if loader.buckets is not None:
        return loader.buckets.used_sizes
    return [(loader.resolution, loader.resolution)]


class StepsByShape:
    """The compiled train steps, one per image size; called as the step, it takes the one of the batch's size."""

    def __init__(self, compiled: dict):
        self.compiled = compiled

    def __call__(self, state, frozen, batch):
        return self.compiled[setup.batch_image_size(batch)](state, frozen, batch)


def compile_ahead(built: setup.TrainSetup, sizes: list[tuple[int, int]]) -> StepsByShape:
    """Compiles the step for every image size before the loop (so the first timed step is a real one, and no
    bucket compiles in the middle of training) and turns a step that does not fit device memory into one line."""
    start = time.perf_counter()
    compiled = {}
    for size in sizes:
        try:
            program = built.lower(size).compile()
        except jax.errors.JaxRuntimeError as error:  # a step that does not fit is RESOURCE_EXHAUSTED at compile time
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            at = f" at {size[0]}x{size[1]}" if len(sizes) > 1 else ""
            raise FlagError(f"the train step{at} does not fit device memory ({str(error).splitlines()[0][:200]}): "
                            f"shard with --fsdp {jax.device_count()}, lower --train_batch_size or use "
                            f"--mixed_precision bf16") from None
        compiled[setup.batch_image_size(built.batch_at(size))] = program
    shapes = f" for {len(sizes)} image sizes" if len(sizes) > 1 else ""
    log(f"compiled the train step{shapes} in {time.perf_counter() - start:.1f}s")
    return StepsByShape(compiled)


def make_validation(config: RunConfig, built: setup.TrainSetup, frozen: dict, state, vae_params) -> Validation | None:
    """The validation sampler, compiled now (the VAE decoder goes to the devices only for it); None without
    validation prompts."""
    if not config.validation.validation_prompts:
        return None
    interval = config.validation.interval(built.plan.steps_per_epoch)
    model_params, hooks = built.sampler_models(state, frozen)
    validation = Validation(config.validation, built.mesh, built.unet, built.vae, built.text_encoder,
                            built.base.tokenizer, built.sampling_scheduler_config, vae_params,
                            _abstract(model_params), config.validation.size(config.data.resolution), config.train.seed,
                            config.output.output_dir, text_encoder_2=built.modules.text_encoder_2,
                            tokenizer_2=built.base.tokenizer_2, family=built.family,
                            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt(built.base.model_dir,
                                                                                      built.family),
                            dtype=built.dtype, **hooks)
    every = (f"{interval} steps (--validation_steps wins over --validation_epochs)"
             if config.validation.validation_steps else f"{config.validation.validation_epochs} epochs")
    log(f"validation: {len(config.validation.validation_prompts)} prompts x "
        f"{config.validation.num_validation_images} every {every} and at the end, "
        f"{validation.scheduler.kind} {config.validation.validation_num_inference_steps} steps")
    return validation


def _abstract(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def write_json(path: str, content: dict) -> None:
    """Writes a JSON file, creating its folder; an unwritable place is the user's OutputError."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(content, handle, indent=2, sort_keys=True)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
