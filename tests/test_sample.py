"""The JAX sampler against diffusers' PyTorch StableDiffusionPipeline (the oracle), both started from the same
initial latents, on a tiny SD1-style pipeline (epsilon, SD 1.5's PNDM scheduler config, which has no
timestep_spacing: Euler and DPM-Solver++ take their own "linspace") and a tiny SD2-style one (v-prediction,
linear projections, upcast attention, SD 2.1's DDIM config). The tiny models are PyTorch ones (diffusers,
transformers) with every norm and bias perturbed, saved with save_pretrained: the diffusers format of a
base model. Error measure: max|ours - torch| / max|torch|."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from jax.sharding import PartitionSpec as P
from transformers import CLIPTextConfig, CLIPTextModel

from oracle import randomize_, rel_err
from t2i_flax import demo, errors, export, sharding, tokenizer
from t2i_flax.diffusion import sample, schedulers
from t2i_flax.generate import load_pipeline, run_sampler

ORACLES = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
           "dpm++2m": DPMSolverMultistepScheduler}
SD1_UNET = demo.TINY_UNET  # SD 1.x layout (1x1-conv projections, one head count), the demo's model
SD2_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SD21_SCHEDULER = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")
# Zero terminal SNR as --rescale_betas_zero_snr exports it: the rescaled schedule, trailing timesteps.
ZERO_SNR_SCHEDULER = dict(SD21_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing")
PROMPTS = ["a red circle on a blue background", "a small green square"]
NEGATIVE = ["", "dark"]  # the empty (unconditional) prompt and a real negative prompt
STEPS = 10  # < 15: DPM-Solver++'s lower_order_final applies
# Final latents after 10 steps (PNDM: 11 UNet calls). Measured with CFG 7.5: SD1 ddim 1.9e-6, pndm 1.3e-6,
# euler 2.3e-6, dpm++2m 1.6e-6 (2.0e-6 on 8 devices with FSDP); SD2 ddim 1.4e-6, pndm 2.7e-6, euler 1.8e-6,
# dpm++2m 1.6e-6; without CFG (SD2 euler) 3.4e-7.
LATENT_TOL = 1e-5
# Zero terminal SNR (trailing) with guidance_rescale 0.7: measured ddim 1.4e-6, pndm 2.6e-6, euler 7.3e-6 (its first
# sigma is ~4096, and torch's rescaled schedule is 1 ulp off ours in places: test_schedulers.py), dpm++2m 1.4e-6.
ZERO_SNR_LATENT_TOL = 3e-5
# Decoded images (values in [0, 1]): measured 1.7e-6.
IMAGE_TOL = 1e-5
# bf16 compute against the float32 oracle (8-bit mantissa through 10 UNet calls amplified by CFG 7.5):
# measured 2.6e-2.
BF16_TOL = 1e-1


def write_torch_pipeline(folder: str, unet_config: dict, scheduler_config: dict, seed: int = 0) -> str:
    """A tiny diffusers-format SD pipeline from PyTorch models (norms and biases perturbed) and the
    offline tiny CLIP tokenizer."""
    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    torch.manual_seed(seed)
    models = {"unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(**demo.TINY_VAE),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**demo.TINY_CLIP, vocab_size=vocab_size))}
    for index, (name, model) in enumerate(models.items()):
        randomize_(model, seed=seed + index + 1)
        model.save_pretrained(os.path.join(folder, name))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as handle:
        json.dump(scheduler_config, handle)
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(dict(export.model_index(), scheduler=["diffusers", scheduler_config["_class_name"]]), handle)
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {"sd1": write_torch_pipeline(str(root / "sd1"), SD1_UNET, SD15_SCHEDULER, seed=0),
            "sd2": write_torch_pipeline(str(root / "sd2"), SD2_UNET, SD21_SCHEDULER, seed=10),
            "sd2_zero_snr": write_torch_pipeline(str(root / "sd2_zero_snr"), SD2_UNET, ZERO_SNR_SCHEDULER, seed=10)}


@pytest.fixture(scope="module")
def one_device():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def pipelines(model_dirs, one_device):
    return {name: load_pipeline(folder, mesh=one_device) for name, folder in model_dirs.items()}


class Oracle:
    """diffusers' pipeline on a folder; its scheduler rebuilt per call from the folder's own config."""

    def __init__(self, folder):
        self.pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.config = self.pipe.scheduler.config

    def __call__(self, scheduler, latents, prompts=PROMPTS, negative=NEGATIVE, guidance_scale=7.5,
                 output_type="latent", steps=STEPS, guidance_rescale=0.0):
        self.pipe.scheduler = ORACLES[scheduler].from_config(self.config)
        output = self.pipe(prompts, negative_prompt=negative, guidance_scale=guidance_scale,
                           num_inference_steps=steps, latents=torch.from_numpy(latents), output_type=output_type,
                           guidance_rescale=guidance_rescale)
        return np.asarray(output.images)


@pytest.fixture(scope="module")
def oracles(model_dirs):
    return {name: Oracle(folder) for name, folder in model_dirs.items()}


def noise(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, 4, 16, 16)).astype(np.float32)


CASES = [(model, name, 7.5) for model in ("sd1", "sd2") for name in schedulers.NAMES]
CASES += [("sd2", "euler", 1.0)]


@pytest.mark.parametrize("model, scheduler, guidance_scale", CASES)
def test_final_latents_match_diffusers(pipelines, oracles, model, scheduler, guidance_scale):
    ours = run_sampler(pipelines[model], PROMPTS, NEGATIVE, STEPS, guidance_scale, latents=noise(),
                       scheduler=scheduler, output_type="latent")
    reference = oracles[model](scheduler, noise(), guidance_scale=guidance_scale)
    assert ours.dtype == np.float32
    assert rel_err(ours, reference) < LATENT_TOL


@pytest.mark.parametrize("scheduler", schedulers.NAMES)
def test_zero_terminal_snr_trailing_and_guidance_rescale_match_diffusers(pipelines, oracles, scheduler):
    """A zero-terminal-SNR v-prediction model (rescale_betas_zero_snr, trailing spacing: what --rescale_betas_zero_snr
    exports) with guidance_rescale 0.7 (the paper's): final latents against diffusers' StableDiffusionPipeline. The
    rescale is visible: without it the latents are far from the reference."""
    ours = run_sampler(pipelines["sd2_zero_snr"], PROMPTS, NEGATIVE, STEPS, 7.5, latents=noise(),
                       scheduler=scheduler, output_type="latent", guidance_rescale=0.7)
    reference = oracles["sd2_zero_snr"](scheduler, noise(), guidance_rescale=0.7)
    assert rel_err(ours, reference) < ZERO_SNR_LATENT_TOL, rel_err(ours, reference)
    plain = oracles["sd2_zero_snr"](scheduler, noise())
    assert rel_err(plain, reference) > 1e3 * ZERO_SNR_LATENT_TOL  # measured 8.6e-2 to 9.1e-2
    if scheduler == "ddim":  # validation's way: compiled ahead of time with the rescale, then placed inputs
        pipeline = pipelines["sd2_zero_snr"]
        sampler, step_scheduler = pipeline.sampler, schedulers.make_scheduler(pipeline.scheduler_config, STEPS, "ddim")
        ids, negative_ids = pipeline.token_ids(PROMPTS), pipeline.token_ids(NEGATIVE)
        size = 16 * sample.vae_scale_factor(sampler.vae)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pipeline.params)
        compiled = sampler.compile(abstract, step_scheduler, batch=2, height=size, width=size, guidance=True,
                                   output_type="latent", max_length=ids.shape[1], guidance_rescale=True)
        inputs = sampler.place_inputs(ids, negative_ids, noise(), step_scheduler, 7.5, 0.7)
        assert len(inputs) == 6  # the rescale is an argument of the program
        np.testing.assert_array_equal(np.asarray(compiled(pipeline.params, *inputs)), ours)


def test_decoded_images_match_diffusers(pipelines, oracles):
    ours = run_sampler(pipelines["sd1"], PROMPTS, NEGATIVE, STEPS, 7.5, latents=noise(), scheduler="ddim")
    reference = oracles["sd1"]("ddim", noise(), output_type="np")
    assert ours.shape == (2, 32, 32, 3)  # the default size: the UNet's sample_size 16 x the VAE's factor 2
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert rel_err(ours, reference) < IMAGE_TOL


def test_repeated_calls_reuse_one_compiled_program(pipelines):
    """New prompts, noise, guidance scale and parameter values: no retrace, no recompile; the parameters
    are arguments (scaled ones change the result), not constants of the program. (The configuration of
    the sd1-euler parity case: compiled there already when the whole file runs.)"""
    pipeline = pipelines["sd1"]
    sampler = pipeline.sampler
    options = dict(num_inference_steps=STEPS, scheduler="euler", output_type="latent")
    first = run_sampler(pipeline, PROMPTS, NEGATIVE, guidance_scale=7.5, latents=noise(), **options)
    traces, compiled = sampler.traces, sampler.program._cache_size()
    again = run_sampler(pipeline, PROMPTS, NEGATIVE, guidance_scale=7.5, latents=noise(), **options)
    other = run_sampler(pipeline, PROMPTS[::-1], ["", ""], guidance_scale=3.0, seed=5, **options)
    original_params = pipeline.params
    pipeline.params = dict(original_params, unet=jax.tree_util.tree_map(lambda w: w * 1.01, original_params["unet"]))
    try:
        scaled = run_sampler(pipeline, PROMPTS, NEGATIVE, guidance_scale=7.5, latents=noise(), **options)
    finally:
        pipeline.params = original_params
    assert (sampler.traces, sampler.program._cache_size()) == (traces, compiled)
    np.testing.assert_array_equal(again, first)
    assert rel_err(other, first) > 0.1 and rel_err(scaled, first) > 1e-3


def test_8_devices_fsdp_params_ahead_of_time_and_unet_fn_hook(model_dirs, oracles):
    """One run answers three questions. A (data 4 x fsdp 2) mesh with the UNet kernels split on fsdp and
    8 images split over the 8 devices; the program compiled ahead of time from ShapeDtypeStructs; the
    UNet called through a `unet_fn` hook (LoRA's way in), which gets the program's UNet params as tracers."""
    mesh = sharding.make_mesh(fsdp=2)
    loaded = load_pipeline(model_dirs["sd1"], mesh=mesh)
    unet, seen = loaded.sampler.unet, []

    def unet_fn(unet_params, latents_BCHW, timestep, text_embeddings_BLD):
        seen.append(all(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(unet_params)))
        return unet.apply({"params": unet_params}, latents_BCHW, timestep, text_embeddings_BLD).sample

    sampler = sample.Sampler(unet, loaded.sampler.vae, loaded.sampler.text_encoder, mesh, unet_fn=unet_fn)
    specs = {leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(loaded.params["unet"])}
    assert P(None, None, None, "fsdp") in specs and P(None, "fsdp") in specs
    scheduler = schedulers.make_scheduler(loaded.scheduler_config, STEPS, "dpm++2m")
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded.params)
    compiled = sampler.compile(abstract, scheduler, batch=8, height=32, width=32, guidance=True, output_type="latent")
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert (sampler.traces, seen) == (1, [True])  # the fori_loop body: traced once
    prompts = [f"a {color} circle" for color in ("red", "green", "blue", "pink", "white", "black", "gray", "cyan")]
    negative = [""] * 4 + ["dark"] * 4
    prompt_ids, _ = tokenizer.tokenize_captions(loaded.tokenizer, prompts)
    negative_ids, _ = tokenizer.tokenize_captions(loaded.tokenizer, negative)
    with jax.transfer_guard("disallow"):  # as in the trainer's loop: only the explicit transfers of place_inputs
        inputs = sampler.place_inputs(prompt_ids, negative_ids, noise(8), scheduler, 7.5)
        latents = compiled(loaded.params, *inputs)
    assert latents.sharding.spec == P(("data", "fsdp")) and len(latents.addressable_shards) == 8
    reference = oracles["sd1"]("dpm++2m", noise(8), prompts=prompts, negative=negative)
    assert rel_err(latents, reference) < LATENT_TOL


def test_bf16_compute_keeps_float32_params_and_scheduler(model_dirs, oracles, one_device):
    pipeline = load_pipeline(model_dirs["sd1"], mixed_precision="bf16", mesh=one_device)
    modules = (pipeline.sampler.unet, pipeline.sampler.vae, pipeline.sampler.text_encoder)
    assert [jnp.dtype(module.dtype) for module in modules] == [jnp.bfloat16] * 3
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(pipeline.params)} == {np.dtype(np.float32)}
    ours = run_sampler(pipeline, PROMPTS, NEGATIVE, STEPS, 7.5, latents=noise(), scheduler="euler",
                       output_type="latent")
    assert ours.dtype == np.float32
    error = rel_err(ours, oracles["sd1"]("euler", noise()))
    assert 1e-3 < error < BF16_TOL  # bf16 really computed, and close to float32


def test_sizes_must_be_multiples_of_the_vae_factor(pipelines):
    with pytest.raises(errors.FlagError, match="--height 33 must be a positive multiple of 2"):
        run_sampler(pipelines["sd1"], PROMPTS, height=33)
    assert sample.default_size(pipelines["sd2"].sampler.unet, pipelines["sd2"].sampler.vae) == (32, 32)


def test_initial_noise_depends_only_on_seed_and_image_index():
    three = sample.initial_noise(0, 3, (4, 8, 8))
    assert three.shape == (3, 4, 8, 8) and three.dtype == np.float32
    np.testing.assert_array_equal(sample.initial_noise(0, 1, (4, 8, 8)), three[:1])
    assert np.abs(sample.initial_noise(1, 1, (4, 8, 8)) - three[:1]).max() > 1.0
    assert abs(float(three.std()) - 1.0) < 0.1
