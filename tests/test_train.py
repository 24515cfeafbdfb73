"""The trainer end to end: the command line on a tiny pipeline, the export in diffusers' PyTorch pipeline,
lr 0 leaving every tensor bit-identical, loss falling, and the same result on 1 and 8 devices, data
parallel and FSDP."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from t2i_flax import cli, data, optim, sharding, step, tokenizer, weights
from t2i_flax.config import DataConfig
from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from t2i_flax.diffusion.noise import load_noise_schedule

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
    """lr 0 exports the base model's tensors bit for bit; --pretrained_vae_model_name_or_path (a VAE folder, as
    sd-vae-ft-mse) replaces the pipeline's VAE in training and in the export."""
    from t2i_flax.models import FlaxAutoencoderKL

    vae, vae_params = FlaxAutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    other_vae = str(tmp_path / "other-vae")
    vae.save_pretrained(other_vae, jax.tree_util.tree_map(lambda x: x * np.float32(1.01), vae_params))
    output_dir = str(tmp_path / "out")
    argv = train_argv(pipeline_dir, dataset_dir, output_dir, "--learning_rate", "0", "--use_ema",
                      "--max_train_steps", "2", "--report_to", "none",
                      "--pretrained_vae_model_name_or_path", other_vae)
    assert cli.main(argv) == 0
    before, after = safetensors_of(pipeline_dir), safetensors_of(output_dir)
    before.update({f"vae/{k}": v for k, v in load_file(os.path.join(other_vae, vae.weights_name)).items()})
    assert sorted(before) == sorted(after) and len(before) > 100
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].tobytes() == tensor.tobytes(), name


def test_command_line_run_exports_a_pipeline_diffusers_runs(pipeline_dir, dataset_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    # The step of test_checkpoint_gcs.py's and test_restore_faults.py's runs (EMA 0.9, lr 1e-3, 2 warmup steps; the
    # data flags and the seed are not part of the program): compiled once for the three files.
    argv = train_argv(pipeline_dir, dataset_dir, output_dir, "--learning_rate", "1e-3", "--use_ema",
                      "--ema_decay", "0.9", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
                      "--max_train_steps", "4", "--log_every", "2", "--hub_token", "hf_secret_value")
    assert cli.main(argv) == 0

    logged = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    assert [entry["step"] for entry in logged] == [2, 4]
    # 2 warmup steps, then constant: lr(0..3) = 0, 0.5e-3, 1e-3, 1e-3 -> window means
    np.testing.assert_allclose([entry["learning_rate"] for entry in logged], [0.25e-3, 1e-3], rtol=1e-5)
    assert all(np.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in logged)
    assert glob.glob(os.path.join(output_dir, "logs", "events.out.tfevents.*"))
    saved_args = open(os.path.join(output_dir, "training_args.json")).read()
    assert "hf_secret_value" not in saved_args and "hub_token" not in saved_args
    with open(os.path.join(output_dir, "scheduler", "scheduler_config.json")) as handle:
        scheduler = json.load(handle)
    # the base model's own scheduler, as the PyTorch scripts keep it (not the documented Flax script's PNDM)
    with open(os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")) as handle:
        assert scheduler == dict(json.load(handle), prediction_type="epsilon")

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


# ---- the paths the README tells users to take, in two shared runs ------------------------------------

P0_LR = 1e-4  # x global batch 8 (--scale_lr)


def paths_argv(model_dir, dataset_dir, output_dir, *extra):
    """8 of the 16 images, 2 epochs of 1 step at a global batch of 8 (no --max_train_steps), the first
    update at lr 0 (warmup 1), an fp16-variant-only model folder, v-prediction with a noise offset."""
    return ["--pretrained_model_name_or_path", model_dir, "--variant", "fp16", "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1",
            "--max_train_samples", "8", "--num_train_epochs", "2", "--scale_lr", "--learning_rate", str(P0_LR),
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1", "--prediction_type", "v_prediction",
            "--noise_offset", "0.05", "--center_crop", "--random_flip", "--seed", "3", "--log_every", "1",
            "--report_to", "none", *extra]


VALIDATION_PROMPTS = ["a red circle on a blue background", "a yellow square"]
VALIDATION = ["--validation_prompts", *VALIDATION_PROMPTS, "--num_validation_images", "2", "--validation_steps", "2",
              "--validation_num_inference_steps", "3", "--validation_scheduler", "ddim"]


def assert_validation_grid_is_what_generate_draws(grid_path, model_dir, seed, **load):
    """The grid the trainer drew (from the weights it exports) against `generate` on the export: the same
    prompts, seed, scheduler and guidance give the same pixels. The same scheduler config too: the trainer draws
    with the base model's, with the prediction type trained for, which is what the export writes."""
    from t2i_flax import generate, validation
    from t2i_flax.diffusion import sample

    grid = np.asarray(Image.open(grid_path)).astype(np.int32)
    pipeline = generate.load_pipeline(model_dir, **load)
    prompts = [prompt for prompt in VALIDATION_PROMPTS for _ in range(2)]
    images = generate.run_sampler(pipeline, prompts, num_inference_steps=3, guidance_scale=7.5, seed=seed,
                                  scheduler="ddim")
    drawn = validation.labelled_grid(sample.to_uint8(images), VALIDATION_PROMPTS, 2).astype(np.int32)
    assert drawn.shape == grid.shape and grid.std() > 1
    # Measured: at most 1 of 255 apart in a few pixels (the trainer's sampler runs on the training mesh, with
    # FSDP-sharded weights, generate's on all devices replicated: float reduction order).
    difference = np.abs(drawn - grid)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())


@pytest.fixture(scope="module")
def readme_paths(fp16_variant_pipeline_dir, dataset_dir, tmp_path_factory):
    """The TPU advice (--fsdp 8, EMA, 2 worker processes) and the same run data parallel, in this process,
    without EMA and workers; stdout of each."""
    import contextlib
    import io

    runs = {}
    for name, extra in (("fsdp8_ema_workers", ["--fsdp", "8", "--use_ema", "--dataloader_num_workers", "2",
                                               *VALIDATION]),
                        ("data_parallel", [])):
        output_dir = str(tmp_path_factory.mktemp(name))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli.main(paths_argv(fp16_variant_pipeline_dir, dataset_dir, output_dir, *extra))
        assert code == 0, stdout.getvalue()[-2000:]
        runs[name] = (output_dir, stdout.getvalue())
    return runs


def metrics_of(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]


def test_epochs_samples_scale_lr_and_v_prediction_as_told(readme_paths):
    for output_dir, stdout in readme_paths.values():
        assert "data: 8 examples, global batch 8, 1 steps/epoch, 2 epochs, 2 steps" in stdout
        logged = metrics_of(output_dir)
        assert [entry["step"] for entry in logged] == [1, 2]
        np.testing.assert_allclose([entry["learning_rate"] for entry in logged], [0.0, 8 * P0_LR], rtol=1e-6)
        with open(os.path.join(output_dir, "scheduler", "scheduler_config.json")) as handle:
            assert json.load(handle)["prediction_type"] == "v_prediction"
        saved = json.load(open(os.path.join(output_dir, "training_args.json")))
        assert saved["data"]["max_train_samples"] == 8 and saved["model"]["variant"] == "fp16"


def test_validation_while_training_draws_what_generate_draws_from_the_export(readme_paths):
    """The validation grid of the last step (EMA weights, FSDP 8) equals generate's images of the exported pipeline:
    drawn with v-prediction, the prediction type trained for (the base model is epsilon)."""
    output_dir = readme_paths["fsdp8_ema_workers"][0]
    assert sorted(os.listdir(os.path.join(output_dir, "validation"))) == ["step_2.png"]
    assert_validation_grid_is_what_generate_draws(os.path.join(output_dir, "validation", "step_2.png"), output_dir,
                                                  seed=3)


def test_fsdp8_with_workers_trains_like_data_parallel(readme_paths):
    """Same global batch, same data (workers change nothing): the same losses. The first update has lr 0,
    so both runs take their second step from the same weights."""
    sharded, replicated = (metrics_of(readme_paths[name][0]) for name in ("fsdp8_ema_workers", "data_parallel"))
    np.testing.assert_allclose([e["loss"] for e in sharded], [e["loss"] for e in replicated], rtol=2e-5)
    np.testing.assert_allclose([e["grad_norm"] for e in sharded], [e["grad_norm"] for e in replicated], rtol=2e-5)


def test_export_is_the_gathered_ema_and_the_variant_weights(readme_paths, fp16_variant_pipeline_dir):
    """--variant fp16: the frozen VAE and text encoder are exported as the fp16 files, in float32. The
    FSDP-sharded EMA is gathered whole. EMA (diffusers' warmup): update 1 copies the weights (decay 0),
    update 2 has decay 2/11; the first update is at lr 0, so the raw weights after step 1 equal the
    start p0, and after step 2 EMA = p0 + 9/11 (p2 - p0), where p2 is the data-parallel run's (no EMA)
    export. Exporting the raw weights instead would break this relation by 2/11 of every change."""
    base = {}
    for component in ("unet", "vae", "text_encoder"):
        path = glob.glob(os.path.join(fp16_variant_pipeline_dir, component, "*.fp16.safetensors"))
        base.update({f"{component}/{k}": v.astype(np.float32) for k, v in load_file(path[0]).items()})
    # transformers 5 saves CLIP without the `text_model.` prefix that we write (both load)
    ema, raw = ({k.replace("text_encoder/text_model.", "text_encoder/"): v for k, v in safetensors_of(
        readme_paths[name][0]).items()} for name in ("fsdp8_ema_workers", "data_parallel"))
    assert sorted(ema) == sorted(raw) == sorted(base)
    for name, tensor in base.items():
        assert ema[name].dtype == np.float32
        if not name.startswith("unet/"):
            assert ema[name].tobytes() == tensor.tobytes(), name
    changes = [np.abs(raw[n] - base[n]).max() for n in base if n.startswith("unet/")]
    assert max(changes) > 1e-4  # the second step trained
    worst = 0.0
    for name in (n for n in base if n.startswith("unet/")):
        expected = base[name] + 9.0 / 11.0 * (raw[name] - base[name])
        worst = max(worst, float(np.abs(ema[name] - expected).max()))
    # The two layouts differ by the float order of the gradient reductions, which Adam can amplify where
    # |g| is near its eps on a first update (see test_same_global_batch_same_result_on_any_layout); this is
    # Adam's second update (the first had lr 0 but set its moments): measured 2.8e-7.
    assert worst <= 1.5e-6, worst


def test_non_finite_loss_stops_the_run_with_its_step(pipeline_dir, dataset_dir, tmp_path, capsys):
    """lr 1e30: the first update sends the weights to ~1e30, the second step's loss is not finite. The run
    stops with one line naming step 2, exit code 1 (the input was valid), and exports nothing."""
    output_dir = tmp_path / "out"
    argv = train_argv(pipeline_dir, dataset_dir, str(output_dir), "--learning_rate", "1e30", "--max_train_steps",
                      "4", "--report_to", "none")
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the progress bar, then one error line
    assert lines[-1].startswith("error: loss became ") and " at step 2: " in lines[-1], lines
    assert not any(line.startswith(("Traceback", "error")) for line in lines[:-1]), lines
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "unet").exists()


def test_a_bug_is_not_dressed_up_as_a_user_error(monkeypatch, pipeline_dir, dataset_dir, tmp_path):
    """Only UserError becomes 'error: ...' with exit code 2; a ValueError or OSError from our own code
    propagates with its traceback (exit code 1 from Python)."""
    from t2i_flax import train

    for bug in (ValueError("a bug in t2i_flax"), OSError("another one")):
        def broken_run(config, bug=bug):
            raise bug
        monkeypatch.setattr(train, "run", broken_run)
        with pytest.raises(type(bug), match=str(bug)):
            cli.main(train_argv(pipeline_dir, dataset_dir, str(tmp_path / "out")))


# ---- the step itself, on fixed batches ---------------------------------------------------------

@pytest.fixture(scope="module")
def components(torch_pipeline_dir, dataset_dir):
    """The models of the PyTorch-made tiny pipeline (several channels per GroupNorm group, so biases have
    real gradients) and two fixed batches of 8."""
    pipeline_dir = torch_pipeline_dir
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    clip_tokenizer = tokenizer.load_tokenizer(os.path.join(pipeline_dir, "tokenizer"))
    loader = data.build_train_loader(DataConfig(train_data_dir=dataset_dir, resolution=RESOLUTION, center_crop=True),
                                     clip_tokenizer, host_batch_size=8, seed=0)
    batches = loader.iterator()
    fixed = [next(batches) for _ in range(2)]
    batches.close()
    return dict(unet=unet, unet_params=unet_params, vae=vae, text_encoder=text_encoder,
                frozen={"vae": vae_params, "text_encoder": text_params}, batches=fixed,
                schedule=load_noise_schedule(pipeline_dir))


TRAIN_STEP = step.train_step


def run_steps(components, mesh, batches, learning_rate=1e-3, use_ema=True, optimizer=None):
    lr = optim.learning_rate_schedule("constant", learning_rate, 0, 100)
    config = step.StepConfig(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                             noise_schedule=components["schedule"], optimizer=optimizer or optim.make_optimizer(lr),
                             learning_rate=lr, use_ema=use_ema, ema_decay=0.9)
    state, state_sharding = step.create_state(config, mesh, components["unet_params"], seed=0)
    frozen_sharding = sharding.tree_shardings(mesh, components["frozen"])
    frozen = jax.device_put(components["frozen"], frozen_sharding)
    traces = []  # the step's Python body runs once per trace (chex's assert_max_traces does the same)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "train_step", lambda *args: traces.append(1) or TRAIN_STEP(*args))
        train_step = step.compile_train_step(config, mesh, state_sharding, frozen_sharding)
        losses = []
        for batch in batches:
            state, metrics = train_step(state, frozen, sharding.global_batch(mesh, batch))
            losses.append(float(metrics["loss"]))
    assert len(traces) == 1, len(traces)  # traced and compiled once for all the steps
    return losses, jax.device_get(state)


LAYOUT_LR = 1e-3


def test_loss_falls_when_overfitting_one_batch(components):
    """40 steps on one batch (the layout tests' program: the compilation cache gives it back)."""
    losses, _ = run_steps(components, sharding.make_mesh(1), [components["batches"][0]] * 40, learning_rate=LAYOUT_LR)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)  # measured: 0.92 -> 0.16


@pytest.fixture(scope="module")
def data_parallel_8(components):
    """Reference: all 8 devices on the data axis, parameters replicated; the real optimizer (clip + AdamW)
    and EMA. Also the first step's gradients as Adam sees them (clipped), to find the entries where Adam is
    ill-conditioned: after one step Adam's first moment is (1 - beta1) x g, so they come from the state of a
    one-step run of the same program (no second compile)."""
    mesh = sharding.make_mesh(1)
    _, after_one_step = run_steps(components, mesh, components["batches"][:1], learning_rate=LAYOUT_LR)
    first_grads = jax.tree_util.tree_map(lambda mu: np.asarray(mu) / (1 - 0.9), after_one_step.opt_state[1][0].mu)
    return run_steps(components, mesh, components["batches"], learning_rate=LAYOUT_LR) + (first_grads,)


@pytest.mark.parametrize("layout", ["one_device", "fsdp8", "data2_fsdp4"])
def test_same_global_batch_same_result_on_any_layout(components, data_parallel_8, layout):
    """The layout changes only the order of float reductions (the batch mean of the loss, the gradient
    all-reduce). Losses agree to rtol 2e-5 (measured <= 1.2e-7) and the parameters and EMA after two AdamW
    steps to 1e-5 (measured <= 3.6e-6; at most 1 entry in 10,000 beyond) except where Adam is ill-conditioned:
    its first update is lr x g / (|g| + eps), and where |g| < 100 eps (1.4% of the entries here, of the clipped
    gradients Adam sees) a relative change of g from the reduction order becomes any fraction of lr (measured max
    difference there: 8.6e-5 = 0.09 lr; bounded at 3 times that)."""
    batches = components["batches"]
    reference_losses, reference_state, first_grads = data_parallel_8
    if layout == "one_device":
        mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh({"fsdp8": 8, "data2_fsdp4": 4}[layout])
    losses, state = run_steps(components, mesh, batches, learning_rate=LAYOUT_LR)
    start = weights.flatten(components["unet_params"])
    moved = max(np.abs(np.asarray(v) - start[p]).max() for p, v in weights.flatten(reference_state.params).items())
    assert moved > 1e-3  # the steps really changed the parameters
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
    ill = {path: np.abs(np.asarray(g)) < 100 * 1e-8 for path, g in weights.flatten(first_grads).items()}
    # Measured: 1.4% of the entries (Adam sees the clipped gradients, whose norm is below the raw ones).
    assert sum(m.sum() for m in ill.values()) < 2e-2 * sum(m.size for m in ill.values())
    # Measured at the ill-conditioned entries: at most 8.6e-5 = 0.09 lr; the bound is 3 times that (what Adam
    # could move them in 2 steps, 2 x lr x 2, could never fail).
    ill_bound = 0.27 * LAYOUT_LR
    for tree in ("params", "ema_params"):
        flat = weights.flatten(getattr(state, tree))
        beyond, well_conditioned = 0, 0
        for path, value in weights.flatten(getattr(reference_state, tree)).items():
            error = np.abs(np.asarray(flat[path]) - np.asarray(value))
            assert (error <= ill_bound).all(), (tree, "/".join(path), error.max())
            beyond += int((error[~ill[path]] > 1e-5).sum())
            well_conditioned += int((~ill[path]).sum())
        # The second step's Adam ratio m / sqrt(v) can be ill-conditioned too where g2 nearly cancels g1 in m:
        # allow a few such entries in 10,000 (measured: none on these three layouts).
        assert beyond <= 1e-4 * well_conditioned, (tree, beyond, well_conditioned)


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


def test_bf16_v_prediction_noise_offset_step_tracks_float32(components, torch_pipeline_dir):
    """The TPU default (bf16 compute) on an SD2-style target: the first loss agrees with float32 compute."""
    import jax.numpy as jnp

    schedule = load_noise_schedule(torch_pipeline_dir, prediction_type="v_prediction")
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
