"""One abstract setup (t2i_flax/setup.py) for the trainer, `python -m t2i_flax.aot` and bench/train_step.py: for
the same flags, the step the trainer compiles and the one aot's path builds (from the model's configs alone, no
weights) are the same program, with and without --cache_latents, with LoRA and with --fsdp."""
import hashlib

import jax
import pytest

from t2i_flax import cli, setup, train
from t2i_flax.aot import cli as aot_cli

from conftest import RESOLUTION


class _Compiled(Exception):
    """Stops the trainer once it has built the program it is about to compile."""


def program_text(lowered) -> str:
    return lowered.as_text()


def trainer_program(monkeypatch, argv) -> str:
    """The StableHLO text of the step train.run compiles for `argv` (the run stops right there)."""
    def capture(built, sizes):
        raise _Compiled(program_text(built.lower(sizes[0])))

    monkeypatch.setattr(train, "compile_ahead", capture)
    with pytest.raises(_Compiled) as stopped:
        cli.main(argv)
    return stopped.value.args[0]


def aot_setup(argv):
    """The same flags through aot's path: its parser and its setup, on this process's 8 CPU devices."""
    own, topology, config = aot_cli.parse_flags(["--topology", "v3-8"] + argv)
    return aot_cli.build_setup(config, jax.devices())


FLAG_SETS = {
    "online": [],
    "cache_latents": ["--cache_latents", "--center_crop"],
    "lora_fsdp_ema": ["--lora_rank", "4", "--fsdp", "8", "--use_ema", "--mixed_precision", "bf16"],
    "sdxl_fsdp_ema": ["--fsdp", "8", "--use_ema", "--mixed_precision", "bf16"],
}


@pytest.mark.parametrize("name", list(FLAG_SETS))
def test_the_trainer_and_aot_compile_the_same_step(monkeypatch, pipeline_dir, torch_sdxl_pipeline_dir, dataset_dir,
                                                   tmp_path, name):
    model = torch_sdxl_pipeline_dir if name.startswith("sdxl") else pipeline_dir
    common = ["--pretrained_model_name_or_path", model, "--resolution", str(RESOLUTION),
              "--train_batch_size", "1", "--max_train_steps", "3", "--report_to", "none", *FLAG_SETS[name]]
    trained = trainer_program(monkeypatch, common + ["--train_data_dir", dataset_dir, "--output_dir",
                                                     str(tmp_path / "out")])
    ahead = aot_setup(common)
    compiled_ahead = program_text(ahead.lower())
    assert hashlib.sha256(trained.encode()).hexdigest() == hashlib.sha256(compiled_ahead.encode()).hexdigest()
    if name == "cache_latents":  # the flag reaches aot (it did not before): no VAE encoder, moments in the batch
        assert "vae" not in ahead.frozen and sorted(ahead.batch) == ["input_ids", "latent_mean", "latent_std"]
        online = aot_setup(common[:-2])
        assert "vae" in online.frozen and program_text(online.lower()) != compiled_ahead
    if name.startswith("sdxl"):  # both text encoders, both token ids and the time ids in what aot measures
        assert "text_encoder_2" in ahead.frozen and sorted(ahead.batch) == ["input_ids", "input_ids_2",
                                                                            "pixel_values", "time_ids"]
        # the second text encoder is sharded by the same table as everything else (SDXL's is 0.7B parameters)
        specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(ahead.frozen["text_encoder_2"])]
        assert any("fsdp" in str(spec) for spec in specs), specs[:5]


def test_plan_without_data_is_the_trainers_for_the_step(pipeline_dir):
    """aot's plan differs from a training run's only in what the data decides (examples, steps per epoch), which
    changes no shape; with --max_train_steps the schedule is the same."""
    config = cli.parse_config(["--pretrained_model_name_or_path", pipeline_dir, "--dataset_name", "x",
                               "--train_batch_size", "2", "--max_train_steps", "7", "--scale_lr"])
    ahead = setup.Plan.without_data(config, 8, 8)
    trained = setup.Plan.make(config, 8, 8, num_examples=40, steps_per_epoch=2)
    assert (ahead.global_batch_size, ahead.host_batch_size, ahead.learning_rate, ahead.max_train_steps) == (
        trained.global_batch_size, trained.host_batch_size, trained.learning_rate, trained.max_train_steps) == (
        16, 16, 16 * 1e-4, 7)


def test_runs_that_differ_only_in_the_optimizer_numbers_share_one_program(pipeline_dir):
    """The learning rate, its schedule, warmup and length, Adam's epsilon, the weight decay, the clipping norm and the
    EMA decay are inputs of the step (optim.Hyperparameters): two runs that differ in all of them lower the same
    program (the compilation cache then gives it to the second), Adam's beta (a constant) gives another. Run with the
    second run's numbers, the shared program does what that run's numbers compiled in as constants do."""
    import dataclasses

    import numpy as np

    from t2i_flax import sharding, step

    common = ["--pretrained_model_name_or_path", pipeline_dir, "--resolution", str(RESOLUTION), "--train_batch_size",
              "1", "--use_ema", "--cache_latents", "--center_crop", "--report_to", "none"]
    first = aot_setup(common + ["--max_train_steps", "3"])
    # Adam's epsilon 1: updates linear in the gradients, which the two programs' fusions may round differently in the
    # last bit (an epsilon below the gradients would amplify that); EMA decay 0.1 < 2/11: it caps the second update's.
    numbers = ["--max_train_steps", "50", "--learning_rate", "0.5", "--lr_scheduler", "cosine", "--lr_warmup_steps",
               "1", "--adam_epsilon", "1.0", "--adam_weight_decay", "0.1", "--max_grad_norm", "0.05", "--ema_decay",
               "0.1"]
    second = aot_setup(common + numbers)
    shared = program_text(first.lower())
    assert program_text(second.lower()) == shared
    assert program_text(aot_setup(common + ["--max_train_steps", "3", "--adam_beta1", "0.8"]).lower()) != shared

    rng = np.random.default_rng(0)
    fill = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda leaf: (rng.standard_normal(leaf.shape) * 0.1).astype(leaf.dtype), tree)
    params = fill(second.trained.abstract_params(second.unet))
    models = fill({name: tree for name, tree in second.frozen.items() if name != "hyperparameters"})
    frozen_of = lambda built: jax.device_put(  # noqa: E731  the same frozen models, the run's numbers
        dict(models, hyperparameters=built.step_config.hyperparameters.arrays()), second.frozen_sharding)
    latents = second.batch["latent_mean"].shape
    batch = sharding.global_batch(second.mesh, {
        "input_ids": rng.integers(0, second.text_encoder.vocab_size, second.batch["input_ids"].shape, dtype=np.int32),
        "latent_mean": rng.standard_normal(latents).astype(np.float32),
        "latent_std": rng.uniform(0.01, 0.1, latents).astype(np.float32)})

    def three_steps(train_step, frozen):
        state, _ = step.create_state(second.step_config, second.mesh, params, seed=0)
        rates = []
        for _ in range(3):
            state, metrics = train_step(state, frozen, batch)
            rates.append(float(metrics["learning_rate"]))
        return jax.device_get(state), rates

    constants = dataclasses.replace(second.step_config, hyperparameters=None)
    expected, expected_rates = three_steps(
        step.compile_train_step(constants, second.mesh, second.state_sharding, second.frozen_sharding),
        frozen_of(second))
    program = first.train_step()  # the first run's program, given the second run's numbers
    got, rates = three_steps(program, frozen_of(second))
    other, _ = three_steps(program, frozen_of(first))
    np.testing.assert_allclose(rates, expected_rates, rtol=1e-6)
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5)  # warmup 1, then the cosine from 0.5
    for tree in ("params", "ema_params"):
        leaves = [jax.tree_util.tree_leaves(getattr(state, tree)) for state in (expected, got, other)]
        for want, have in zip(leaves[0], leaves[1]):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)
        # the first run's numbers (lr 1e-4 in a 500-step warmup, default decay and clipping) move them elsewhere
        assert max(np.abs(have - theirs).max() for have, theirs in zip(leaves[1], leaves[2])) > 1e-3
