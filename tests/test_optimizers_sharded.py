"""--optimizer on the mesh: each optimizer's state sharded by the partition table, trained and resumed exactly from
an Orbax checkpoint (the trainer's step for Prodigy), and the aot report of its state. The optimizers' math is in
test_train_options.py."""
import pytest


@pytest.fixture(scope="module")
def tiny_step_parts(pipeline_dir, dataset_dir):
    """The tiny pipeline's models and parameters, and three fixed global batches of 8."""
    import os

    import jax

    from t2i_flax import data, family, tokenizer
    from t2i_flax.config import DataConfig
    from t2i_flax.diffusion.noise import load_noise_schedule

    from conftest import RESOLUTION

    kind = family.detect(pipeline_dir)
    modules, params = kind.load(pipeline_dir, jax.numpy.float32)
    loader = data.build_train_loader(DataConfig(train_data_dir=dataset_dir, resolution=RESOLUTION, center_crop=True),
                                     tokenizer.load_tokenizer(os.path.join(pipeline_dir, "tokenizer")),
                                     host_batch_size=8, seed=0)
    batches = loader.iterator()
    fixed = [next(batches) for _ in range(3)]
    batches.close()
    return kind, modules, params, load_noise_schedule(pipeline_dir), fixed


@pytest.mark.parametrize("name,full_step", [("prodigy", True), ("adafactor", False), ("lion", False)])
def test_each_optimizer_trains_sharded_and_resumes_exactly(tiny_step_parts, tmp_path, name, full_step):
    """On a 2 x 4 mesh (data x fsdp), the optimizer's state sharded by the partition table (a kernel's moments as the
    kernel), with EMA, a warmup schedule and clipping: a checkpoint after update 1 (Orbax, the trainer's Checkpoints),
    restored, then updates 2-3: every array of the state bit for bit that of the uninterrupted run.
    Prodigy (the largest state: moments, gradient sums, the initial weights, scalar estimates) runs the trainer's
    whole jitted step (state donated), with this issue's other step options, and its losses must agree too; for
    Adafactor and Lion the step's optimizer half (`step.apply_gradients`, what the optimizer changes in the program)
    is jitted with the same shardings and fed fixed gradients, which spares the suite two UNet compiles."""
    import jax
    import numpy as np

    from t2i_flax import checkpoint, optim, sharding, step
    from t2i_flax.diffusion.timestep_bias import TimestepBias

    kind, modules, params, schedule, batches = tiny_step_parts
    lr = optim.learning_rate_schedule("constant_with_warmup", 1.0 if name == "prodigy" else 1e-3, 1, 10)
    config = step.StepConfig(unet=modules.unet, vae=modules.vae, text_encoder=modules.text_encoder, family=kind,
                             noise_schedule=schedule, learning_rate=lr, use_ema=True, ema_decay=0.9,
                             optimizer=optim.make_optimizer(lr, max_grad_norm=0.5, name=name, warmup=True),
                             input_perturbation=0.1, timestep_bias=TimestepBias("later", 2.0))
    mesh = sharding.make_mesh(4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    state, state_sharding = step.create_state(config, mesh, params["unet"], seed=0)

    kernel_spec = jax.sharding.PartitionSpec(None, None, None, "fsdp")
    shaped_like_conv_in = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
                           if jax.tree_util.keystr(path).endswith("['conv_in']['kernel']")
                           and leaf.shape == state.params["conv_in"]["kernel"].shape]
    assert shaped_like_conv_in and all(leaf.sharding.spec == kernel_spec for leaf in shaped_like_conv_in)

    if full_step:
        frozen = step.frozen_params(params["vae"], params["text_encoder"])
        frozen_sharding = sharding.tree_shardings(mesh, frozen)
        frozen = jax.device_put(frozen, frozen_sharding)
        train_step = step.compile_train_step(config, mesh, state_sharding, frozen_sharding)
        inputs = [sharding.global_batch(mesh, batch) for batch in batches]

        def update(state, batch):
            state, metrics = train_step(state, frozen, batch)
            return state, float(metrics["loss"])
    else:
        apply = jax.jit(lambda state, grads: step.apply_gradients(config, state, grads),
                        in_shardings=(state_sharding, state_sharding.params), out_shardings=state_sharding,
                        donate_argnums=(0,))
        rng = np.random.default_rng(0)
        inputs = [jax.device_put(jax.tree_util.tree_map(
            lambda p: (0.1 * rng.standard_normal(p.shape)).astype(np.float32), params["unet"]), state_sharding.params)
            for _ in range(3)]

        def update(state, grads):
            return apply(state, grads), 0.0

    def run(state, steps):
        losses = []
        for inputs_of_step in steps:
            state, loss = update(state, inputs_of_step)
            losses.append(loss)
        return state, losses

    state, first = run(state, inputs[:1])
    saved = checkpoint.Checkpoints(str(tmp_path / "ckpt"))
    saved.save(1, state, {"next_batch": 1}, {"version": 1})
    saved.close()
    straight, losses = run(state, inputs[1:])
    abstract = jax.tree_util.tree_map(lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                                      jax.eval_shape(lambda: straight), state_sharding)
    restored = checkpoint.Checkpoints(str(tmp_path / "ckpt"), read_only=True).restore_state(1, abstract)
    assert int(restored.step) == 1
    resumed, resumed_losses = run(restored, inputs[1:])
    assert np.isfinite(first + losses).all() and resumed_losses == losses, (losses, resumed_losses)
    want, got = jax.device_get(straight), jax.device_get(resumed)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(want))
    start = np.asarray(params["unet"]["conv_in"]["kernel"])
    assert np.abs(np.asarray(want.params["conv_in"]["kernel"]) - start).max() > 0  # the updates moved the weights


def test_aot_reports_the_optimizers_state(pipeline_dir):
    """`python -m t2i_flax.aot --optimizer lion` (TPU v3-8, --fsdp 8): Lion keeps one moment, so its state is the
    parameters' bytes (plus its int32 count), half of Adam's two moments; the report names it."""
    from t2i_flax.aot import report

    from test_aot import run_aot

    done = run_aot(pipeline_dir, "--train_batch_size", "2", "--fsdp", "8", "--optimizer", "lion")
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    shapes = result["train_step"]["shapes"]
    assert result["train_step"]["optimizer"] == "lion"
    assert shapes["params_bytes"] < shapes["opt_state_bytes"] <= shapes["params_bytes"] + 2 * 4
    assert f"params {report._size(shapes['params_bytes'])} + Lion " in report.report_text(result)


def test_rescale_betas_zero_snr_is_the_scheduler_config_the_run_uses(pipeline_dir):
    """--rescale_betas_zero_snr: the base model's scheduler config as the run trains, validates and exports with it
    (here for the tiny pipeline this file already has; the math is in test_train_options.py)."""
    import json
    import os

    from t2i_flax import setup
    from t2i_flax.config import RunConfig

    flags = {"pretrained_model_name_or_path": pipeline_dir, "dataset_name": "d"}
    with open(os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")) as handle:
        on_disk = json.load(handle)
    zero_snr = RunConfig.from_flags(dict(flags, rescale_betas_zero_snr=True, prediction_type="v_prediction")).model
    assert setup.read_base_model(pipeline_dir, zero_snr).scheduler_config == dict(
        on_disk, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert setup.read_base_model(pipeline_dir, RunConfig.from_flags(flags).model).scheduler_config == on_disk


def test_the_setup_takes_the_step_options_and_refuses_what_the_reference_does_not_do(pipeline_dir):
    """The trainer's (and aot's) abstract setup of the tiny pipeline, no compile: the step options arrive in the step's
    config; DREAM with v-prediction and zero terminal SNR with epsilon are one-line refusals."""
    import jax

    from t2i_flax import cli
    from t2i_flax.aot.cli import build_setup
    from t2i_flax.errors import FlagError, ModelError

    def setup_of(*flags):
        config = cli.parse_config(["--pretrained_model_name_or_path", pipeline_dir, "--dataset_name", "d",
                                   "--resolution", "32", "--train_batch_size", "1", *flags])
        return build_setup(config, jax.devices())

    built = setup_of("--dream_training", "--dream_detail_preservation", "0.5", "--input_perturbation", "0.1",
                     "--timestep_bias_strategy", "earlier", "--timestep_bias_multiplier", "2", "--optimizer", "lion")
    step_config = built.step_config
    assert (step_config.dream_detail_preservation, step_config.input_perturbation) == (0.5, 0.1)
    assert step_config.timestep_bias.biased(1000) == (0, 250)
    assert setup_of().step_config.dream_detail_preservation is None
    with pytest.raises(FlagError, match="--dream_training is for epsilon prediction"):
        setup_of("--dream_training", "--prediction_type", "v_prediction")
    with pytest.raises(ModelError, match="needs v-prediction"):
        setup_of("--rescale_betas_zero_snr")
    zero_snr = setup_of("--rescale_betas_zero_snr", "--prediction_type", "v_prediction")
    assert zero_snr.noise_schedule.alphas_cumprod[-1] == 0.0
    assert zero_snr.sampling_scheduler_config["timestep_spacing"] == "trailing"
    with pytest.raises(FlagError, match="--timestep_bias_end 2000 is past this model's 1000 training timesteps"):
        setup_of("--timestep_bias_strategy", "range", "--timestep_bias_end", "2000")
