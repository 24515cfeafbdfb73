"""`python -m t2i_flax.generate` (its main in this process, and a real process): PNG files, determinism,
one-line errors, --lora."""
from __future__ import annotations

import os
import subprocess
import sys

import json

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import process_environment
from oracle import rel_err
from t2i_flax import demo, generate, lora, lora_files, sharding, weights
from t2i_flax.models import FlaxUNet2DConditionModel
from test_sample import SD1_UNET, write_torch_pipeline  # the tiny PyTorch-made pipeline of the parity tests

NUM_IMAGES = 3  # on 8 devices: a mesh of 3 (the largest count that divides the batch)
FILES = ["image_000.png", "image_001.png", "image_002.png", "grid.png"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The demo model's DDPM training config: no JAX DDPM sampler, so the command falls back to PNDM.
    return write_torch_pipeline(str(tmp_path_factory.mktemp("tiny-sd") / "pipeline"), SD1_UNET, demo.SD_SCHEDULER)


def argv(model_dir, out, *extra):
    return ["--model", model_dir, "--prompt", "a red circle on a blue background", "--negative_prompt", "dark",
            "--num_images", str(NUM_IMAGES), "--steps", "4", "--seed", "7", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def first_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    assert generate.main(argv(model_dir, out, "--cpu_devices", "8")) == 0
    return out


def test_writes_one_png_per_image_and_a_grid(first_run, capsys):
    assert sorted(os.listdir(first_run)) == sorted(FILES)
    images = [np.asarray(Image.open(first_run / name)) for name in FILES]
    assert [image.shape for image in images] == [(32, 32, 3)] * 3 + [(64, 64, 3)]  # 2 x 2 grid, one cell black
    np.testing.assert_array_equal(images[3][:32, 32:], images[1])
    assert images[3][32:, 32:].max() == 0
    assert np.abs(images[0].astype(int) - images[1]).max() > 10  # each image has its own noise


def test_same_seed_gives_byte_identical_pngs_in_a_new_process(model_dir, first_run, tmp_path):
    """The real command line, in a fresh process whose devices come from --cpu_devices alone."""
    env = process_environment(JAX_PLATFORMS=None)
    command = [sys.executable, "-m", "t2i_flax.generate", *argv(model_dir, tmp_path, "--cpu_devices", "8")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert "generate: 8 cpu device(s), 3 used for 3 image(s)" in result.stdout
    assert "using pndm" in result.stdout  # the model's DDPMScheduler has no JAX sampler here
    assert f"to {tmp_path}" in result.stdout
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (first_run / name).read_bytes(), name


@pytest.mark.parametrize("extra, message", [
    (["--height", "33"], "error: --height 33 must be a positive multiple of 2 (the VAE's factor)"),
    (["--scheduler", "lms"], "error: --scheduler 'lms' is not one of: ddim, pndm, euler, dpm++2m"),
    (["--steps", "0"], "error: --steps must be positive (got 0)"),
    (["--steps", "2000"], "error: --steps 2000 must be between 1 and the model's num_train_timesteps (1000)"),
    (["--mixed_precision", "fp16"], "error: --mixed_precision 'fp16' is not one of: no, bf16"),
])
def test_bad_flags_are_one_line_exit_2_nothing_written(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert generate.main(argv(model_dir, out, *extra)) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not out.exists()


@pytest.mark.parametrize("model, message", [
    ("no-such-folder/", "error: model folder no-such-folder/ does not exist (and it is not a Hub repo id)"),
    ("someone/not-cached", "error: someone/not-cached is not in the local Hugging Face cache and downloads are off"),
])
def test_missing_model_is_one_line_exit_2(tmp_path, capsys, monkeypatch, model, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub.py reads it per call: the cache only
    out = tmp_path / "out"
    assert generate.main(argv(model, out)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("")
    assert generate.main(argv(model_dir, out)) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --out {out} is a file, not a folder"]


# ---- --lora ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dirs(model_dir, tmp_path_factory):
    """For the command's UNet: a LoRA as initialised (B = 0) and one with random B, rank 4, alpha 8."""
    with open(os.path.join(model_dir, "unet", "config.json")) as handle:
        abstract = FlaxUNet2DConditionModel.from_config(json.load(handle)).abstract_params()
    initial = lora.init_lora_params(jax.random.key(0), abstract, 4)
    rng = np.random.default_rng(0)
    trained = weights.unflatten({path: rng.normal(0, 0.2, leaf.shape).astype(np.float32) if path[-1] == "lora_B"
                                 else np.asarray(leaf) for path, leaf in weights.flatten(initial).items()})
    folders = {name: str(tmp_path_factory.mktemp(name)) for name in ("zero", "trained")}
    lora_files.save_lora_weights(folders["zero"], initial, 4, 8.0)
    lora_files.save_lora_weights(folders["trained"], trained, 4, 8.0)
    return folders


def read_images(folder):
    return [np.asarray(Image.open(os.path.join(folder, name)), np.int32) for name in FILES]


def test_zero_lora_gives_byte_identical_images(model_dir, first_run, lora_dirs, tmp_path, capsys):
    assert generate.main(argv(model_dir, tmp_path, "--cpu_devices", "8", "--lora", lora_dirs["zero"])) == 0
    assert (f"generate: LoRA {os.path.join(lora_dirs['zero'], lora_files.LORA_WEIGHTS_NAME)}: 32 adapted layers, rank 4, "
            f"scale 2 x 1") in capsys.readouterr().out
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (first_run / name).read_bytes(), name


def test_trained_lora_changes_the_images(model_dir, first_run, lora_dirs, tmp_path):
    assert generate.main(argv(model_dir, tmp_path, "--cpu_devices", "8", "--lora", lora_dirs["trained"])) == 0
    changed, base = read_images(tmp_path), read_images(first_run)
    # Measured: mean |difference| 15.4, 17.8 and 15.5 of 255 for the 3 images.
    assert min(np.abs(a - b).mean() for a, b in zip(changed[:3], base[:3])) > 10


@pytest.mark.parametrize("kind", ["unreadable", "kohya", "missing", "scale without lora"])
def test_bad_lora_is_one_line_exit_2_nothing_written(model_dir, tmp_path, capsys, kind):
    path = str(tmp_path / "lora.safetensors")
    extra = ["--lora", path]
    if kind == "unreadable":
        with open(path, "w") as handle:
            handle.write("this is not a LoRA")
        message = f"error: LoRA file {path} is not a safetensors file"
    elif kind == "kohya":
        save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": np.zeros((4, 64), np.float32)}, path)
        message = (f"error: LoRA file {path} has a down or an up matrix without the other for "
                   f"mid_block.attentions.0.proj_in")
    elif kind == "missing":
        message = (f"error: LoRA {path} does not exist (give a pytorch_lora_weights.safetensors file or its "
                   f"folder)")
    else:
        extra = ["--lora_scale", "0.5"]
        message = "error: --lora_scale needs --lora (the LoRA file or folder to apply)"
    out = tmp_path / "out"
    assert generate.main(argv(model_dir, out, *extra)) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not out.exists()


def test_lora_draws_what_diffusers_load_lora_weights_draws(model_dir, lora_dirs):
    """`generate --lora` (its Python API) against diffusers' pipeline with `load_lora_weights` of the same file, the
    same initial latents, DDIM and CFG: the final latents agree to float32 rounding."""
    from test_sample import Oracle, noise

    pipeline = generate.load_pipeline(model_dir, mesh=sharding.make_mesh(devices=jax.devices()[:1]),
                                      lora=lora_dirs["trained"])
    prompts, negative = ["a red circle on a blue background", "a small green square"], ["", "dark"]
    ours = generate.run_sampler(pipeline, prompts, negative, 6, 7.5, latents=noise(), scheduler="ddim",
                                output_type="latent")
    oracle = Oracle(model_dir)
    without = oracle("ddim", noise(), prompts, negative, steps=6)
    oracle.pipe.load_lora_weights(lora_dirs["trained"])
    reference = oracle("ddim", noise(), prompts, negative, steps=6)
    # Measured: 1.1e-6 with the adapters, which move the latents by 0.37 of their largest value.
    assert rel_err(ours, reference) <= 1e-5
    assert rel_err(without, reference) > 1e-2
