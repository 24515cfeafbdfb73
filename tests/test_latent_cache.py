"""Cached latents: the step from stored posterior moments equals the online step, end to end the same
losses, the cache is reused, keyed, resumable, and works with LoRA."""
import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from t2i_flax import cli, data, optim, sharding, step, tokenizer
from t2i_flax.config import DataConfig
from t2i_flax.data import latent_cache
from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from t2i_flax.diffusion.noise import load_noise_schedule

from conftest import RESOLUTION


def test_the_step_from_cached_moments_is_the_online_step(torch_pipeline_dir, dataset_dir):
    """The same batch, the same step key: loss and gradients from (mean, std) computed by the VAE equal the
    online step's, which runs the VAE inside (measured: loss bit-identical, gradients <= 1e-7 relative),
    and the cached step needs no VAE parameters at all."""
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet")
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(torch_pipeline_dir, subfolder="vae")
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(torch_pipeline_dir, subfolder="text_encoder")
    lr = optim.learning_rate_schedule("constant", 1e-3, 0, 10)
    config = step.StepConfig(unet=unet, vae=vae, text_encoder=text_encoder,
                             noise_schedule=load_noise_schedule(torch_pipeline_dir), optimizer=optim.make_optimizer(lr),
                             learning_rate=lr, noise_offset=0.05)
    loader = data.build_train_loader(
        DataConfig(train_data_dir=dataset_dir, resolution=RESOLUTION, center_crop=True, random_flip=True),
        tokenizer.load_tokenizer(os.path.join(torch_pipeline_dir, "tokenizer")), host_batch_size=4, seed=0,
        process_index=0, process_count=1)
    batches = loader.iterator()
    online = next(batches)
    batches.close()
    mean, std = jax.jit(lambda p, x: step.posterior_moments(vae, p, x))(vae_params, online["pixel_values"])
    cached = {"latent_mean": mean, "latent_std": std, "input_ids": online["input_ids"]}
    key = jax.random.PRNGKey(5)
    grads_of = jax.jit(lambda frozen, batch: step.loss_and_grads(config, unet_params, frozen, batch, key))
    loss_online, grads_online = grads_of(step.frozen_params(vae_params, text_params), online)
    loss_cached, grads_cached = grads_of(step.frozen_params(None, text_params), cached)
    assert "vae" not in step.frozen_params(None, text_params)
    assert float(loss_cached) == pytest.approx(float(loss_online), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_cached), jax.tree_util.tree_leaves(grads_online)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * max(np.abs(np.asarray(b)).max(), 1e-12)


def test_an_interrupted_pass_continues_and_a_changed_input_is_another_cache(torch_pipeline_dir, dataset_dir, tmp_path):
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(torch_pipeline_dir, subfolder="vae")
    dataset = data.load_train_dataset(train_data_dir=dataset_dir)
    dataset = data.sources.prepare_columns(dataset, "image", "text")
    mesh = sharding.make_mesh(1)
    encoder = {name: vae_params[name] for name in step.VAE_ENCODER_PARAMS}
    where = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda pixels: step.posterior_moments(vae, encoder, pixels), out_shardings=(where, where))
    records = np.arange(16)

    def cache(fields):
        return latent_cache.LatentCache(str(tmp_path), fields, records, True, (4, 16, 16), 0, 1, per_host=8)

    fields = {"vae_encoder": latent_cache.params_digest(encoder), "resolution": RESOLUTION}
    first = cache(fields)
    assert first.build(dataset, "image", RESOLUTION, encode, mesh, show_progress=False) == 2  # two chunks of 8
    mean_flip, std_flip = first.read(11, flipped=True)
    mean, _ = first.read(11, flipped=False)
    assert mean.shape == (4, 16, 16) and np.abs(mean - mean_flip).max() > 1e-3  # the mirror image is its own
    for part in latent_cache.PARTS:  # a pass killed after the first chunk
        os.remove(first._part_path(1, 0, part))
    again = cache(fields)
    assert again.missing_chunks() == [1]
    assert again.build(dataset, "image", RESOLUTION, encode, mesh, show_progress=False) == 1
    assert np.array_equal(again.read(11, flipped=True)[1], std_flip)
    assert cache(fields).build(dataset, "image", RESOLUTION, encode, mesh, show_progress=False) == 0  # complete
    # Other weights (or any other key field): another folder, never the stale one.
    other = cache(dict(fields, vae_encoder="0" * 64))
    assert other.root != first.root and other.missing_chunks() == [0, 1]
    assert json.load(open(os.path.join(first.root, "meta.json")))["num_records"] == 16


def run_quietly(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


def cache_argv(model_dir, dataset_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", dataset_dir, "--output_dir", output_dir,
            "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--center_crop", "--random_flip",
            "--seed", "6", "--learning_rate", "1e-3", "--max_train_steps", "3", "--log_every", "1",
            "--report_to", "none", *extra]


def losses(output_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(output_dir, "metrics.jsonl"))]


def test_training_from_the_cache_gives_the_online_losses(torch_pipeline_dir, dataset_dir, tmp_path):
    """End to end on 8 devices: the same losses as the online run (measured: bit-identical on CPU; the
    tolerance allows for a differently batched VAE on other hardware); a second run finds the cache complete; LoRA trains from it too (its
    first loss is the full fine-tune's: the adapters start at zero)."""
    shared_cache = str(tmp_path / "latents")
    code, _ = run_quietly(cache_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "online")))
    assert code == 0
    code, out = run_quietly(cache_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "cached"), "--cache_latents",
                                       "--latent_cache_dir", shared_cache))
    assert code == 0 and "latent cache: " in out and "(16 images x 2 flips, encoded 1 of 1 chunks" in out
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "online"), rtol=1e-5)
    code, out = run_quietly(cache_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "lora"), "--cache_latents",
                                       "--latent_cache_dir", shared_cache, "--lora_rank", "4"))
    assert code == 0 and "x 2 flips, complete)" in out
    assert losses(tmp_path / "lora")[0] == pytest.approx(losses(tmp_path / "cached")[0], rel=1e-6)
