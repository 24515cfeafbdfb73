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
