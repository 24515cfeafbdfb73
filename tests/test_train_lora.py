"""LoRA training through the command line: the file diffusers' `load_lora_weights` loads, lr 0 is exactly the
base model, exact resume, --fsdp 8 (the frozen base sharded), --lora_merge, export from a checkpoint."""
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from oracle import rel_err
from t2i_flax import checkpoint, cli, errors, export, lora, lora_files, trainable, weights
from t2i_flax.models import FlaxUNet2DConditionModel

from conftest import RESOLUTION
from test_train import VALIDATION, assert_validation_grid_is_what_generate_draws

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_FILE = lora_files.LORA_WEIGHTS_NAME
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")
# Our UNet with the trained adapters against the PyTorch UNet with the file loaded by diffusers, float32:
# measured 1.3e-6 (the base models alone differ by about as much).
PARITY_TOL = 1e-5


def assert_same_lora_file(a_folder, b_folder):
    """Tensors bit for bit and the same metadata (safetensors does not keep the metadata's order)."""
    from safetensors import safe_open

    a, b = (load_file(os.path.join(folder, LORA_FILE)) for folder in (a_folder, b_folder))
    assert sorted(a) == sorted(b) and all(a[key].tobytes() == b[key].tobytes() for key in a)
    metadata = [safe_open(os.path.join(folder, LORA_FILE), "np").metadata() for folder in (a_folder, b_folder)]
    assert metadata[0] == metadata[1]


def lora_argv(model_dir, dataset_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", dataset_dir, "--output_dir", output_dir,
            "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--random_flip", "--seed", "2",
            "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--log_every", "1", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def trained(torch_pipeline_dir, dataset_dir, tmp_path_factory):
    """4 LoRA steps with EMA and --lora_merge, data parallel."""
    output_dir = str(tmp_path_factory.mktemp("lora-run"))
    assert cli.main(lora_argv(torch_pipeline_dir, dataset_dir, output_dir, "--use_ema", "--ema_decay", "0.5",
                              "--lora_merge", *VALIDATION[:-6], "--validation_steps", "4",
                              *VALIDATION[-4:])) == 0
    return output_dir


def test_validation_while_training_draws_what_generate_draws_with_the_lora(trained, torch_pipeline_dir):
    """The last validation grid (the EMA of the adapters on the frozen UNet) equals `generate --lora` of the
    exported file on the base model."""
    assert_validation_grid_is_what_generate_draws(os.path.join(trained, "validation", "step_4.png"),
                                                  torch_pipeline_dir, seed=2, lora=trained)


def test_diffusers_loads_the_trained_file_and_draws_what_our_unet_draws(trained, torch_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    unet, base = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet")
    adapters, info = lora_files.load_lora_weights(trained, unet.abstract_params())
    assert (info.rank, info.scale, info.modules) == (4, 2.0, 32)
    assert max(np.abs(np.asarray(b)).max() for _, b in lora.adapters(adapters).values()) > 1e-4  # B moved
    rng = np.random.default_rng(0)
    sample, timesteps = rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([3, 700])
    context = rng.normal(size=(2, 77, 32)).astype(np.float32)
    ours = lora.apply_unet(unet, base, adapters, info.scale, sample, timesteps, context).sample
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    with torch.no_grad():
        base_output = pipe.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
        pipe.load_lora_weights(trained)
        reference = pipe.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
    assert rel_err(ours, reference) <= PARITY_TOL
    assert rel_err(base_output, reference) > 100 * PARITY_TOL  # the adapters change the output

    # --lora_merge: the pipeline in the same folder, its UNet = base + scale A B, loads in diffusers as is
    merged = StableDiffusionPipeline.from_pretrained(trained)
    with torch.no_grad():
        merged_output = merged.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
    assert rel_err(merged_output, reference) <= PARITY_TOL
    card = open(os.path.join(trained, "README.md")).read()
    assert "- lora" in card and "load_lora_weights" in card


def test_export_of_a_lora_checkpoint_is_the_same_file(trained, tmp_path):
    assert export.main(["--checkpoint", os.path.join(trained, "checkpoints", "4"), "--output_dir",
                        str(tmp_path / "x")]) == 0
    assert_same_lora_file(tmp_path / "x", trained)


def test_learning_rate_zero_is_exactly_the_base_model(torch_pipeline_dir, dataset_dir, tmp_path):
    output_dir = str(tmp_path / "zero")
    argv = lora_argv(torch_pipeline_dir, dataset_dir, output_dir, "--lora_merge")
    argv[argv.index("--learning_rate") + 1] = "0"
    assert cli.main(argv) == 0
    written = load_file(os.path.join(output_dir, LORA_FILE))
    assert all(not value.any() for key, value in written.items() if key.endswith("lora_B.weight"))
    base = load_file(os.path.join(torch_pipeline_dir, UNET_FILE))
    merged = load_file(os.path.join(output_dir, UNET_FILE))
    assert sorted(base) == sorted(merged)
    assert all(merged[key].tobytes() == base[key].tobytes() for key in base)


def test_resume_is_exact_and_fsdp_trains_the_same_adapters(trained, torch_pipeline_dir, dataset_dir, tmp_path):
    """From the run's checkpoint 2, resumed to 4 (with a --lora_init, which the checkpoint overrides): the LoRA
    file equals the uninterrupted run's bit for bit.
    Steps 1-2 on --fsdp 8 (the frozen base sharded 8 ways) give the same adapters as data parallel, up to
    the float order of the reductions."""
    resumed = str(tmp_path / "resumed")
    shutil.copytree(trained, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, LORA_FILE))
    # --lora_init (the finished run's file, other tensors than checkpoint 2's) is not read: the checkpoint wins.
    argv = lora_argv(torch_pipeline_dir, dataset_dir, resumed, "--use_ema", "--ema_decay", "0.5",
                     "--resume_from_checkpoint", "latest", "--lora_init", os.path.join(trained, LORA_FILE))
    assert cli.main(argv) == 0
    assert_same_lora_file(resumed, trained)

    sharded = str(tmp_path / "fsdp")
    argv = lora_argv(torch_pipeline_dir, dataset_dir, sharded, "--use_ema", "--ema_decay", "0.5", "--fsdp", "8")
    argv[argv.index("--max_train_steps") + 1] = "2"
    assert cli.main(argv) == 0
    unet = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet", load_weights=False)[0]
    where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shape = trainable.from_config(cli.parse_config(argv)).abstract_params(unet)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), shape)
    read = lambda folder: jax.device_get(checkpoint.Checkpoints(folder, read_only=True).restore(  # noqa: E731
        2, {"params": abstract})["params"])
    a = lora_files.lora_state_dict(read(os.path.join(sharded, "checkpoints")))
    b = lora_files.lora_state_dict(read(os.path.join(trained, "checkpoints")))
    # Adam's first update of an entry is lr x g / (|g| + eps): where |g| is near eps, the reduction order
    # decides any fraction of lr (measured: 0.5% of the entries differ by more than 2e-6, at most 0.05 lr);
    # everywhere else the runs agree to 2e-6. Bounds: 4 times the measured fraction, 3 times the measured max.
    differences = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert (differences > 2e-6).mean() < 0.02 and differences.max() <= 0.15 * 1e-2, (
        (differences > 2e-6).mean(), differences.max())
    assert max(np.abs(b[k]).max() for k in b if k.endswith("lora_B.weight")) > 1e-3


def test_lora_init_continues_a_file_and_refuses_another_rank(trained, torch_pipeline_dir, dataset_dir, tmp_path,
                                                             capsys):
    """--lora_init of the trained run's file at lr 0 exports that file bit for bit; a kohya file of the same
    adapters starts from the same tensors; another rank or other targets are one line (exit 2) naming both."""
    from t2i_flax import kohya
    from t2i_flax.errors import EXIT_USAGE

    file = os.path.join(trained, LORA_FILE)
    argv = lora_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "bad"), "--lora_init", file)
    argv[argv.index("--lora_rank") + 1] = "8"
    assert cli.main(argv) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.endswith(
        "has rank 4 and alpha 8, this run --lora_rank 8 and --lora_alpha 8: give the file's"), error
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")

    continued = str(tmp_path / "continued")
    argv = lora_argv(torch_pipeline_dir, dataset_dir, continued, "--lora_init", file)
    argv[argv.index("--learning_rate") + 1] = "0"
    argv[argv.index("--max_train_steps") + 1] = "1"
    assert cli.main(argv) == 0
    assert_same_lora_file(continued, trained)

    unet = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet", load_weights=False)[0]
    peft_params = trainable.from_config(cli.parse_config(argv)).initial_params(unet, None)
    kohya_dir = tmp_path / "kohya"
    kohya_dir.mkdir()
    kohya_file = str(kohya_dir / "k.safetensors")
    from safetensors.numpy import save_file
    save_file(kohya.lora_state_dict(peft_params, 4, 8.0, unet.abstract_params(), sdxl=False), kohya_file)
    argv[argv.index("--lora_init") + 1] = kohya_file
    from_kohya = trainable.from_config(cli.parse_config(argv)).initial_params(unet, None)
    a, b = lora_files.lora_state_dict(peft_params), lora_files.lora_state_dict(from_kohya)
    assert sorted(a) == sorted(b) and all(a[key].tobytes() == b[key].tobytes() for key in a)
    argv += ["--lora_target_modules", "to_q,to_k,to_v"]
    with pytest.raises(errors.FlagError, match=r"adapts 8 modules that --lora_target_modules does not name "
                                               r"\(down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0, "):
        trainable.from_config(cli.parse_config(argv)).initial_params(unet, None)


def test_dora_trains_a_file_diffusers_loads_and_merges(torch_pipeline_dir, dataset_dir, tmp_path, capsys):
    """--use_dora: 2 steps; the file (PEFT keys with lora_magnitude_vector, use_dora) loads in diffusers and draws
    what our UNet with it draws, and the --lora_merge pipeline is the DoRA weight; kohya keys are refused."""
    from diffusers import StableDiffusionPipeline

    output_dir = str(tmp_path / "dora")
    argv = lora_argv(torch_pipeline_dir, dataset_dir, output_dir, "--use_dora", "--lora_merge")
    assert cli.main(argv + ["--lora_format", "kohya"]) == errors.EXIT_USAGE
    assert capsys.readouterr().err.strip() == ("error: --use_dora with --lora_format kohya: kohya LoRA keys have no "
                                               "DoRA magnitudes that diffusers reads (it drops dora_scale); use "
                                               "--lora_format peft")
    argv[argv.index("--max_train_steps") + 1] = "2"
    assert cli.main(argv) == 0
    assert export.main(["--checkpoint", os.path.join(output_dir, "checkpoints", "2"), "--output_dir",
                        str(tmp_path / "x"), "--lora_format", "kohya"]) == errors.EXIT_USAGE
    assert "--use_dora with --lora_format kohya" in capsys.readouterr().err

    unet, base = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet")
    adapters, info = lora_files.load_lora_weights(output_dir, unet.abstract_params())
    assert (info.dora, info.rank, info.scale, info.modules) == (True, 4, 2.0, 32)
    # The magnitudes were trained: they left ||W + s B A|| (where the gain would be 1).
    kernels = weights.flatten(base)
    moved = max(np.abs(np.asarray(m) - np.asarray(lora.column_norms(kernels[path + ("kernel",)],
                                                                    *lora.adapters(adapters)[path], 2.0))).max()
                for path, m in lora.magnitudes(adapters).items())
    assert moved > 1e-3, moved
    rng = np.random.default_rng(0)
    sample, timesteps = rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([3, 700])
    context = rng.normal(size=(2, 77, 32)).astype(np.float32)
    ours = lora.apply_unet(unet, base, adapters, info.scale, sample, timesteps, context).sample
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    pipe.load_lora_weights(output_dir)
    assert pipe.unet.peft_config[next(iter(pipe.unet.peft_config))].use_dora
    merged = StableDiffusionPipeline.from_pretrained(output_dir)
    with torch.no_grad():
        reference = pipe.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
        merged_output = merged.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
    assert rel_err(ours, reference) <= PARITY_TOL
    assert rel_err(merged_output, reference) <= PARITY_TOL

    # --lora_init of the DoRA file starts from its tensors, magnitudes included; without --use_dora it is one line.
    started = trainable.from_config(cli.parse_config(argv + ["--lora_init", output_dir])).initial_params(unet, base)
    a, b = lora_files.lora_state_dict(started), lora_files.lora_state_dict(adapters)
    assert sorted(a) == sorted(b) and all(a[key].tobytes() == b[key].tobytes() for key in a)
    argv.remove("--use_dora")
    with pytest.raises(errors.FlagError, match="is a DoRA adapter \\(lora_magnitude_vector tensors\\): add --use_dora"):
        trainable.from_config(cli.parse_config(argv + ["--lora_init", output_dir])).initial_params(unet, base)
    # --use_dora from a plain LoRA file: its A and B, magnitudes ||W + s B A|| (PEFT's when DoRA is added to a LoRA).
    argv.append("--use_dora")
    plain = {path: leaf for path, leaf in weights.flatten(adapters).items() if path[-1] != lora.M}
    lora_files.save_lora_weights(str(tmp_path / "plain"), weights.unflatten(plain), 4, 8.0)
    started = trainable.from_config(cli.parse_config(argv + ["--lora_init", str(tmp_path / "plain")])).initial_params(
        unet, base)
    flat = weights.flatten(started)
    assert all(flat[path].tobytes() == leaf.tobytes() for path, leaf in plain.items())
    for path, magnitude in lora.magnitudes(started).items():
        np.testing.assert_allclose(magnitude, lora.column_norms(kernels[path + ("kernel",)],
                                                                *lora.adapters(adapters)[path], 2.0), rtol=3e-7)
