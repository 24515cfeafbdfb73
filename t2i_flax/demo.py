"""`make demo`: a tiny random SD pipeline and a synthetic captioned dataset; the tiny VAE fitted to the
images first (1000 Adam steps), then the UNet trained with the real command line on 8 simulated CPU devices
(EMA, warmup schedule, TensorBoard, validation images and the loss of 1 in 8 images held out of training, a
checkpoint, latent cache) and exported with its model card. The last validation grid shows each prompt's colours;
the untrained model's grid (step 0) does not. No torch, no network.

    python -m t2i_flax.demo [--workdir demo_output] [--steps 800] [--seed 1] [--sdxl] [--aspect_ratio_buckets]

With --aspect_ratio_buckets the images come at mixed aspect ratios (squares, portraits, landscapes, 2:1 and 3:1)
and train in aspect-ratio buckets; the VAE is fitted on the square images of the same shapes and colours.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
# SDXL-shaped (as stabilityai/stable-diffusion-xl-base-1.0, scaled down): no attention in the first block, per-block
# head counts and transformer depths, linear projections, a context of two text encoders' hidden states (32 + 16)
# and the text_time conditioning: a pooled text embedding of TINY_SDXL_POOLED_DIM features and SDXL's 6 time
# ids of addition_time_embed_dim sinusoids each.
TINY_SDXL_POOLED_DIM = 16
TINY_SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=[32, 64, 64],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4], cross_attention_dim=48,
                      use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_SDXL_POOLED_DIM)
TINY_CLIP_2_HIDDEN = 16  # SDXL's second text encoder (with a projection of TINY_SDXL_POOLED_DIM)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
                norm_num_groups=32)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# The demo's own model: a VAE of factor 4 (8x8 latents for its 32 px images: a UNet step ~7x cheaper than on
# TINY_VAE's 16x16), narrow enough to be fitted on a CPU in a minute; the same UNet on the smaller latents.
DEMO_VAE = dict(TINY_VAE, block_out_channels=[8, 16, 16], norm_num_groups=4, mid_block_add_attention=False,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
DEMO_UNET = dict(TINY_UNET, sample_size=8)
DEMO_SDXL_UNET = dict(TINY_SDXL_UNET, sample_size=8)
DEMO_MAX_LENGTH = 16  # text positions: the captions have at most 9 tokens; 77 would bury the two colour words
# v-prediction (as SD 2.x): at high noise its target is mostly the image, which only the prompt can tell; an
# epsilon target is then almost all noise, and the model learned to ignore the prompt (measured: its output
# changed 4% between prompts after 800 steps, and the grids followed the noise, not the colours).
PREDICTION_TYPE = "v_prediction"
EMPTY_CAPTION_FRACTION = 0.1  # so that the unconditional prediction guidance subtracts is trained too
RESOLUTION = 32
# Distinct colour pairs, written as the dataset's captions are (its random pairs need not contain them).
PROMPTS = ("a red circle on a blue background", "a yellow square on a black background",
           "a white triangle on a green background", "a purple square on a yellow background")
IMAGES_PER_PROMPT = 2  # 4 x 2: one image per simulated device
SAMPLER = dict(num_inference_steps=20, guidance_scale=7.5)  # the trainer's validation defaults
HELD_OUT_FRACTION = 8  # 1 in 8 images held out of training (32 of 256): their loss is measured at each validation
VALIDATIONS = 4  # validation passes (grid and held-out loss) in a run, the last at its end
# Reconstruction error (images in [-1, 1], seed 0) 1.20 random -> 0.044 after 500 steps, 0.029 after 1000: with
# 500, seed 2's VAE (0.086) blurred black and green into one navy and its grid matched 6 of 8.
VAE_FIT = dict(steps=1000, batch_size=8, learning_rate=5e-3, kl_weight=1e-4)
TEXT_EMBEDDING_STD = 1.0  # see spread_text_embeddings
SD_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def write_tiny_pipeline(folder: str, seed: int = 0, prediction_type: str = "epsilon", unet_config: dict | None = None,
                        vae_config: dict = TINY_VAE, model_max_length: int = 77, sdxl: bool = False) -> str:
    """A randomly initialised, SD-shaped (or with `sdxl`, SDXL-shaped) tiny pipeline in diffusers format, made with
    our own classes; `model_max_length`: the tokenizers' (SD's 77, or fewer text positions for short captions)."""
    import jax

    from t2i_flax import family, tokenizer
    from t2i_flax.models import (FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection,
                                 FlaxUNet2DConditionModel)

    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"), model_max_length)
    components = [("unet", FlaxUNet2DConditionModel, unet_config or (TINY_SDXL_UNET if sdxl else TINY_UNET)),
                  ("vae", FlaxAutoencoderKL, vae_config),
                  ("text_encoder", FlaxCLIPTextModel, dict(TINY_CLIP, vocab_size=vocab_size))]
    if sdxl:  # the second tokenizer pads with "!" as SDXL's
        tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer_2"), model_max_length,
                                            pad_token=tokenizer.SDXL_PAD_TOKEN)
        components.append(("text_encoder_2", FlaxCLIPTextModelWithProjection, dict(
            TINY_CLIP, vocab_size=vocab_size, hidden_size=TINY_CLIP_2_HIDDEN, num_attention_heads=2,
            projection_dim=TINY_SDXL_POOLED_DIM, hidden_act="gelu")))
    key = jax.random.key(seed)
    for index, (name, cls, config) in enumerate(components):
        module = cls.from_config(config)
        params = jax.jit(module.init_params)(jax.random.fold_in(key, index))
        module.save_pretrained(os.path.join(folder, name), params)
    # SDXL base ships an Euler config (leading spacing, steps_offset 1) over the same betas
    scheduler = dict(SD_SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="leading") if sdxl \
        else SD_SCHEDULER
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as handle:
        json.dump(dict(scheduler, prediction_type=prediction_type), handle, indent=2)
    index = (family.STABLE_DIFFUSION_XL if sdxl else family.STABLE_DIFFUSION).model_index()
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(dict(index, scheduler=["diffusers", scheduler["_class_name"]]), handle, indent=2)
    return folder


def spread_text_embeddings(model_dir: str, std: float = TEXT_EMBEDDING_STD) -> None:
    """Rescales the random text encoder's token and position embeddings to `std` (from CLIP's initial 0.02).
    Under two random layers and the final LayerNorm, std 0.02 gives almost the same hidden state for every
    colour word (cosine 0.95-0.97 between "red" and "yellow", measured); std 1 makes words and their positions
    distinct (cosine 0.2-0.5), as a trained text encoder's are."""
    from t2i_flax.family import text_encoder_class

    for component in ("text_encoder", "text_encoder_2"):
        if not os.path.isdir(os.path.join(model_dir, component)):
            continue
        text_encoder, params = text_encoder_class(component).from_pretrained(model_dir, subfolder=component)
        embeddings = params["text_model"]["embeddings"]
        for name in ("token_embedding", "position_embedding"):
            table = embeddings[name]["embedding"]
            embeddings[name]["embedding"] = table * (std / table.std())
        text_encoder.save_pretrained(os.path.join(model_dir, component), params)


def fit_pipeline_vae(model_dir: str, data_dir: str, seed: int = 0) -> dict:
    """Fits the pipeline's VAE to the images of `data_dir` and saves it there with the scaling factor that gives
    its latents unit variance; returns the reconstruction errors before and after, and that factor."""
    import glob

    from t2i_flax import vae_fit
    from t2i_flax.models import FlaxAutoencoderKL

    vae, params = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    images_BCHW = vae_fit.load_images(sorted(glob.glob(os.path.join(data_dir, "*.png"))))
    random_error = vae_fit.reconstruction_error(vae, params, images_BCHW)
    params, losses = vae_fit.fit(vae, params, images_BCHW, seed=seed, **VAE_FIT)
    scaling_factor = vae_fit.latent_scaling_factor(vae, params, images_BCHW)
    vae.clone(scaling_factor=scaling_factor).save_pretrained(os.path.join(model_dir, "vae"), params)
    return {"random_error": random_error, "fitted_error": vae_fit.reconstruction_error(vae, params, images_BCHW),
            "scaling_factor": scaling_factor, "losses": losses}


def draw_untrained(model_dir: str, path: str, seed: int = 0):
    """The validation grid of the model before training (`path`), drawn as the trainer's validation draws:
    the same prompts, noise (seed), sampler and guidance. Returns the images."""
    from PIL import Image

    from t2i_flax import generate, validation

    pipeline = generate.load_pipeline(model_dir)
    prompts = [prompt for prompt in PROMPTS for _ in range(IMAGES_PER_PROMPT)]
    images = generate.generate(pipeline, prompts, seed=seed, **SAMPLER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(validation.labelled_grid(images, list(PROMPTS), IMAGES_PER_PROMPT)).save(path)
    return images


def grid_match_fraction(path: str) -> float:
    """The fraction of a demo grid's images that show their own prompt's colours (prompt_colours)."""
    from PIL import Image

    from t2i_flax import prompt_colours, validation

    images = validation.grid_images(np.asarray(Image.open(path).convert("RGB")), len(PROMPTS), IMAGES_PER_PROMPT,
                                    RESOLUTION)
    own = [prompt for prompt in PROMPTS for _ in range(IMAGES_PER_PROMPT)]
    return float(prompt_colours.colour_matches(images, own, list(PROMPTS)).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="the same with a tiny SDXL-shaped model")
    parser.add_argument("--aspect_ratio_buckets", action="store_true",
                        help="images at mixed aspect ratios, trained in aspect-ratio buckets")
    options = parser.parse_args(argv)

    from t2i_flax import cli

    cli.setup_devices(8)  # before jax is imported
    from t2i_flax import compile_cache, synthetic

    compile_cache.enable(None)  # the trainer's default folder: a second run reuses the compiled programs
    kind = "sdxl" if options.sdxl else "sd"
    model_dir = os.path.join(options.workdir, f"tiny-{kind}")
    square_dir = os.path.join(options.workdir, "shapes")
    data_dir = os.path.join(options.workdir, "shapes-mixed") if options.aspect_ratio_buckets else square_dir
    suffix = "-buckets" if options.aspect_ratio_buckets else ""
    output_dir = os.path.join(options.workdir, f"{kind}-shapes{suffix}-model")
    first_grid = os.path.join(output_dir, "validation", "step_0.png")
    last_grid = os.path.join(output_dir, "validation", f"step_{options.steps}.png")
    if os.path.isdir(output_dir):  # the demo's own previous output
        shutil.rmtree(output_dir)
    print(f"demo: writing a tiny random {'SDXL' if options.sdxl else 'SD'} pipeline to {model_dir}", flush=True)
    write_tiny_pipeline(model_dir, seed=options.seed, prediction_type=PREDICTION_TYPE,
                        unet_config=DEMO_SDXL_UNET if options.sdxl else DEMO_UNET, vae_config=DEMO_VAE,
                        model_max_length=DEMO_MAX_LENGTH, sdxl=options.sdxl)
    spread_text_embeddings(model_dir)
    print(f"demo: writing {options.images} synthetic captioned images to {data_dir}", flush=True)
    synthetic.write_synthetic_dataset(square_dir, options.images, resolution=RESOLUTION, seed=options.seed,
                                      empty_caption_fraction=EMPTY_CAPTION_FRACTION)
    if options.aspect_ratio_buckets:
        synthetic.write_synthetic_dataset(data_dir, options.images, resolution=RESOLUTION, seed=options.seed,
                                          empty_caption_fraction=EMPTY_CAPTION_FRACTION, mixed_aspect_ratios=True)
    start = time.perf_counter()
    fitted = fit_pipeline_vae(model_dir, square_dir, seed=options.seed)
    print(f"demo: fitted the tiny VAE to the images in {time.perf_counter() - start:.0f}s ({VAE_FIT['steps']} "
          f"steps): reconstruction error {fitted['random_error']:.3f} (random) -> {fitted['fitted_error']:.3f}, "
          f"latent scaling factor {fitted['scaling_factor']:.3f}", flush=True)
    draw_untrained(model_dir, first_grid, seed=options.seed)
    print(f"demo: the untrained model's validation images: {os.path.abspath(first_grid)}", flush=True)
    argv = ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", output_dir,
            "--resolution", str(RESOLUTION), "--center_crop", "--random_flip", "--cache_latents",
            "--train_batch_size", "2", "--max_train_steps", str(options.steps), "--learning_rate", "2e-3",
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20", "--use_ema", "--ema_decay", "0.99",
            "--report_to", "tensorboard", "--log_every", "10", "--cpu_devices", "8", "--seed", str(options.seed),
            "--validation_prompts", *PROMPTS, "--num_validation_images", str(IMAGES_PER_PROMPT),
            "--validation_steps", str(max(1, options.steps // VALIDATIONS)),
            "--validation_split", str(options.images // HELD_OUT_FRACTION),
            "--validation_num_inference_steps", str(SAMPLER["num_inference_steps"]),
            "--validation_guidance_scale", str(SAMPLER["guidance_scale"]), "--checkpointing_steps", str(options.steps)]
    if options.aspect_ratio_buckets:  # the demo model's sides are multiples of 8 (its VAE and UNet halve 3 times)
        argv += ["--aspect_ratio_buckets", "--bucket_step", "8", "--min_bucket_resolution", "16"]
    print("demo: python train_text_to_image_flax.py " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if code:
        return code
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        logged = [json.loads(line) for line in handle]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    held_out = [(entry["step"], entry["val_loss"]) for entry in logged if "val_loss" in entry]
    print(f"demo: loss {losses[0]:.4f} (first 10 steps) -> {losses[-1]:.4f} (last 10 steps)")
    print(f"demo: held-out loss ({options.images // HELD_OUT_FRACTION} images never trained on), by step: "
          + ", ".join(f"{step}: {value:.4f}" for step, value in held_out))
    print(f"demo: validation images, untrained: {os.path.abspath(first_grid)}")
    print(f"demo: validation images, trained:   {os.path.abspath(last_grid)}")
    print(f"demo: images showing their prompt's background and shape colours: {grid_match_fraction(first_grid):.0%} "
          f"untrained -> {grid_match_fraction(last_grid):.0%} trained")
    print(f"demo: fine-tuned pipeline (diffusers format) with its model card: {os.path.abspath(output_dir)}")
    print(f"demo: TensorBoard logs: tensorboard --logdir {os.path.abspath(os.path.join(output_dir, 'logs'))}")
    print(f"demo: metrics: {os.path.abspath(os.path.join(output_dir, 'metrics.jsonl'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
