"""The trainer end to end: the command line on a tiny pipeline, the export in diffusers' PyTorch pipeline,
lr 0 leaving every tensor bit-identical, loss falling, and the same result on 1 and 8 devices, data
parallel and FSDP."""
import glob
import json
import os

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from t2i_flax import cli, data, optim, sharding, step, tokenizer, weights
from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from t2i_flax.noise import load_noise_schedule

from conftest import RESOLUTION


def train_argv(pipeline_dir, dataset_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1",
            "--center_crop", "--random_flip", "--seed", "3", *extra]


def safetensors_of(folder):
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "*.safetensors"))):
        component = os.path.basename(os.path.dirname(path))
        tensors.update({f"{component}/{k}": v for k, v in load_file(path).items()})
    return tensors


def test_learning_rate_zero_exports_identical_tensors(pipeline_dir, dataset_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    argv = train_argv(pipeline_dir, dataset_dir, output_dir, "--learning_rate", "0", "--use_ema",
                      "--max_train_steps", "2", "--report_to", "none")
    assert cli.main(argv) == 0
    before, after = safetensors_of(pipeline_dir), safetensors_of(output_dir)
    assert sorted(before) == sorted(after) and len(before) > 100
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].tobytes() == tensor.tobytes(), name


def test_command_line_run_exports_a_pipeline_diffusers_runs(pipeline_dir, dataset_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    argv = train_argv(pipeline_dir, dataset_dir, output_dir, "--learning_rate", "1e-3", "--use_ema",
                      "--ema_decay", "0.9", "--lr_scheduler", "linear", "--lr_warmup_steps", "1",
                      "--max_train_steps", "4", "--log_every", "2", "--hub_token", "hf_secret_value")
    assert cli.main(argv) == 0

    logged = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    assert [entry["step"] for entry in logged] == [2, 4]
    # linear with 1 warmup step over 4 steps: lr(0..3) = 0, 1e-3, 2/3e-3, 1/3e-3 -> window means
    np.testing.assert_allclose([entry["learning_rate"] for entry in logged], [0.5e-3, 0.5e-3], rtol=1e-5)
    assert all(np.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in logged)
    assert glob.glob(os.path.join(output_dir, "logs", "events.out.tfevents.*"))
    saved_args = open(os.path.join(output_dir, "training_args.json")).read()
    assert "hf_secret_value" not in saved_args and "hub_token" not in saved_args
    with open(os.path.join(output_dir, "scheduler", "scheduler_config.json")) as handle:
        scheduler = json.load(handle)
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["steps_offset"] == 1
    assert scheduler["prediction_type"] == "epsilon"

    # training moved the UNet (the EMA of it is exported) and nothing else
    before, after = safetensors_of(pipeline_dir), safetensors_of(output_dir)
    changed = [name for name in before if before[name].tobytes() != after[name].tobytes()]
    assert changed and all(name.startswith("unet/") for name in changed)

    # the seed's inference snippet, on CPU
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    assert pipeline.safety_checker is None
    images = pipeline("a red circle on a blue background", num_inference_steps=2, height=RESOLUTION,
                      width=RESOLUTION, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()


# ---- the step itself, on fixed batches ---------------------------------------------------------

@pytest.fixture(scope="module")
def components(pipeline_dir, dataset_dir):
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    clip_tokenizer = tokenizer.load_tokenizer(os.path.join(pipeline_dir, "tokenizer"))
    loader = data.build_train_loader(clip_tokenizer, host_batch_size=8, resolution=RESOLUTION,
                                     train_data_dir=dataset_dir, center_crop=True, seed=0)
    batches = loader.iterator()
    fixed = [next(batches) for _ in range(2)]
    batches.close()
    return dict(unet=unet, unet_params=unet_params, vae=vae, text_encoder=text_encoder,
                frozen={"vae": vae_params, "text_encoder": text_params}, batches=fixed,
                schedule=load_noise_schedule(pipeline_dir))


def run_steps(components, mesh, batches, learning_rate=1e-3, use_ema=True, optimizer=None):
    lr = optim.learning_rate_schedule("constant", learning_rate, 0, 100)
    config = step.StepConfig(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                             noise_schedule=components["schedule"], optimizer=optimizer or optim.make_optimizer(lr),
                             learning_rate=lr, use_ema=use_ema, ema_decay=0.9)
    state, state_sharding = step.create_state(config, mesh, components["unet_params"], seed=0)
    frozen_sharding = sharding.tree_shardings(mesh, components["frozen"])
    frozen = jax.device_put(components["frozen"], frozen_sharding)
    train_step = step.compile_train_step(config, mesh, state_sharding, frozen_sharding)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, frozen, sharding.global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
    assert train_step._cache_size() == 1  # compiled once
    return losses, jax.device_get(state)


def test_loss_falls_when_overfitting_one_batch(components):
    losses, _ = run_steps(components, sharding.make_mesh(1), [components["batches"][0]] * 40, learning_rate=2e-3)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)


@pytest.fixture(scope="module")
def data_parallel_8(components):
    """Reference: all 8 devices on the data axis, parameters replicated.

    SGD, not Adam: Adam divides by sqrt(v), so parameters whose gradient is exactly 0 in real arithmetic
    (a conv bias right before a one-channel-per-group GroupNorm) take +-lr steps from float noise, which
    differs with the reduction order of each layout. SGD keeps the comparison linear in the gradients."""
    return run_steps(components, sharding.make_mesh(1), components["batches"], optimizer=optax.sgd(0.5))


@pytest.mark.parametrize("layout", ["one_device", "fsdp8", "data2_fsdp4"])
def test_same_global_batch_same_result_on_any_layout(components, data_parallel_8, layout):
    batches = components["batches"]
    reference_losses, reference_state = data_parallel_8
    if layout == "one_device":
        mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh({"fsdp8": 8, "data2_fsdp4": 4}[layout])
    losses, state = run_steps(components, mesh, batches, optimizer=optax.sgd(0.5))
    moved = max(np.abs(np.asarray(v) - weights.flatten(components["unet_params"])[p]).max()
                for p, v in weights.flatten(reference_state.params).items())
    assert moved > 1e-3  # the steps really changed the parameters
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
    for tree in ("params", "ema_params"):
        flat = weights.flatten(getattr(state, tree))
        for path, value in weights.flatten(getattr(reference_state, tree)).items():
            np.testing.assert_allclose(flat[path], value, rtol=1e-4, atol=1e-6, err_msg=f"{tree}: {'/'.join(path)}")


def test_fsdp_really_shards_params_optimizer_and_ema(components):
    lr = optim.learning_rate_schedule("constant", 1e-3, 0, 10)
    config = step.StepConfig(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                             noise_schedule=components["schedule"], optimizer=optim.make_optimizer(lr),
                             learning_rate=lr, use_ema=True)
    state, _ = step.create_state(config, sharding.make_mesh(8), components["unet_params"], seed=0)
    kernel = state.params["conv_in"]["kernel"]  # (3, 3, 4, 32): output features split 8 ways
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 4, 4)}
    adam_mu = state.opt_state[1][0].mu["conv_in"]["kernel"]
    assert {shard.data.shape for shard in adam_mu.addressable_shards} == {(3, 3, 4, 4)}
    assert {s.data.shape for s in state.ema_params["conv_in"]["kernel"].addressable_shards} == {(3, 3, 4, 4)}
    assert state.params["conv_in"]["bias"].sharding.spec == jax.sharding.PartitionSpec()  # small: replicated


def test_bf16_v_prediction_noise_offset_step_tracks_float32(components, pipeline_dir):
    """The TPU default (bf16 compute) on an SD2-style target: the first loss agrees with float32 compute."""
    import jax.numpy as jnp

    schedule = load_noise_schedule(pipeline_dir, prediction_type="v_prediction")
    lr = optim.learning_rate_schedule("constant", 1e-3, 0, 10)
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        models = {name: type(components[name]).from_config(components[name].to_config(), dtype=dtype)
                  for name in ("unet", "vae", "text_encoder")}
        config = step.StepConfig(**models, noise_schedule=schedule, optimizer=optim.make_optimizer(lr),
                                 learning_rate=lr, noise_offset=0.1)
        mesh = sharding.make_mesh(1)
        state, state_sharding = step.create_state(config, mesh, components["unet_params"], seed=0)
        frozen = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), step.frozen_params(
            components["frozen"]["vae"], components["frozen"]["text_encoder"]))
        frozen_sharding = sharding.tree_shardings(mesh, frozen)
        train_step = step.compile_train_step(config, mesh, state_sharding, frozen_sharding)
        _, metrics = train_step(state, jax.device_put(frozen, frozen_sharding),
                                sharding.global_batch(mesh, components["batches"][0]))
        losses[jnp.dtype(dtype).name] = float(metrics["loss"])
    assert np.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses["float32"]) <= 5e-2 * losses["float32"], losses


def test_nan_loss_stops_with_the_step_number(tmp_path):
    from t2i_flax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), "logs", "none", total_steps=5, enabled=True)
    writer.add(1, {"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-4})
    with pytest.raises(FloatingPointError, match="loss became nan at step 2"):
        writer.add(2, {"loss": float("nan"), "grad_norm": 1.0, "learning_rate": 1e-4})
    assert writer.flush(1)["loss"] == 0.5
    writer.close()
