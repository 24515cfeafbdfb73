"""Text -> PNG images with the JAX sampler, from a diffusers folder (a base model or the trainer's export)
or a Hub repo id.

    python -m t2i_flax.generate --model sd-shapes-model --prompt "a red circle on a blue background" \\
        --num_images 4 --steps 25 --scheduler dpm++2m --out images/

Writes image_000.png, image_001.png, ... and grid.png to --out; the same seed gives the same files.
`--lora DIR [--lora_scale S]` applies a LoRA (pytorch_lora_weights.safetensors: ours, or a diffusers/PEFT/kohya
file trained elsewhere) beside the UNet's linear layers, and its text-encoder adapters (--train_text_encoder's)
beside the text encoders', at the file's alpha / rank times S.
Bad input is one line on stderr and exit code 2, before anything is written.

From Python:

    pipeline = load_pipeline("sd-shapes-model", mixed_precision="bf16")
    images = generate(pipeline, ["a red circle", "a blue square"], num_inference_steps=25)  # uint8 (N, H, W, 3)
    pipeline = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", lora="sd-lora-model", lora_scale=0.8)

JAX is imported only inside the functions that need it, so that --cpu_devices can configure it first."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any

import numpy as np

from t2i_flax import cli, errors, hub, tokenizer

DEFAULT_STEPS = 50  # StableDiffusionPipeline's default num_inference_steps, so defaults give diffusers' images
DEFAULT_GUIDANCE = 7.5
MIXED_PRECISION = ("no", "bf16")


@dataclasses.dataclass
class Pipeline:
    """The loaded model: a Sampler on a mesh, its parameters placed there, the tokenizer and scheduler config."""
    sampler: Any  # diffusion.sample.Sampler
    params: dict  # diffusion.sample.sampler_params(...), on sampler.mesh
    tokenizers: tuple  # one CLIPTokenizer per text encoder
    scheduler_config: dict
    model_dir: str
    lora: Any = None  # lora_files.LoraInfo of the applied LoRA file's UNet adapters (else its first), if any
    lora_components: dict = dataclasses.field(default_factory=dict)  # {"unet"|"text_encoder"|...: LoraInfo}

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def token_ids(self, captions: list[str]):
        """The sampler's prompt ids: an array (one tokenizer) or one array per tokenizer."""
        ids = [tokenizer.tokenize_captions(each, captions)[0] for each in self.tokenizers]
        return ids[0] if len(ids) == 1 else tuple(ids)

    @property
    def default_size(self) -> tuple[int, int]:
        from t2i_flax.diffusion import sample

        return sample.default_size(self.sampler.unet, self.sampler.vae)


def load_pipeline(model: str, mixed_precision: str = "no", mesh=None, revision: str | None = None,
                  variant: str | None = None, cache_dir: str | None = None, lora: str | None = None,
                  lora_scale: float = 1.0, single_file_config: str | None = None) -> Pipeline:
    """unet, vae, text_encoder, tokenizer and scheduler/scheduler_config.json of a diffusers folder or Hub id.
    `mixed_precision="bf16"`: the models compute in bf16; parameters stay float32 (and the scheduler too).
    `mesh`: default all devices (sharding.make_mesh()). `lora`: a LoRA file or its folder, applied through
    the sampler's unet_fn at the file's scale (alpha / rank) times `lora_scale`. `model` may be a single-file
    checkpoint (t2i_flax/single_file.py) with its configs from `single_file_config`."""
    import jax.numpy as jnp

    from t2i_flax import lora as lora_adapters
    from t2i_flax import lora_files
    from t2i_flax import sharding
    from t2i_flax.diffusion import noise
    from t2i_flax.diffusion import sample
    from t2i_flax.family import detect, force_zeros_for_empty_prompt

    if mixed_precision not in MIXED_PRECISION:
        raise errors.FlagError(f"--mixed_precision {mixed_precision!r} is not one of: {', '.join(MIXED_PRECISION)}")
    check_lora_scale(lora, lora_scale)
    dtype = jnp.bfloat16 if mixed_precision == "bf16" else jnp.float32
    model_dir = hub.resolve_model_dir(model, revision=revision, variant=variant, cache_dir=cache_dir,
                                      single_file_config=single_file_config)
    scheduler_config = noise.read_scheduler_config(model_dir)
    family = detect(model_dir)
    tokenizers = family.tokenizers(model_dir)
    modules, loaded = family.load(model_dir, dtype, variant=variant)
    unet = modules.unet
    models = {name: loaded[name] for name in ("unet",) + family.text_encoders}
    unet_fn = text_encoder_fn = None
    lora_infos = {}
    if lora is not None:  # the shapes of the loaded params are the abstract trees it is checked against
        lora_params, lora_infos = lora_files.load_lora_components(lora, models)
        if not lora_params:
            raise errors.ModelError(f"LoRA file {lora_files.find_lora_file(lora)} holds no LoRA tensors")
        adapted = lambda name: lora_adapters.sampler_unet_params(  # noqa: E731  (an empty tree: no adapters)
            models[name], lora_params.get(name, {}), lora_infos[name].scale * lora_scale if name in lora_infos else 1.0)
        if "unet" in lora_params:
            models["unet"], unet_fn = adapted("unet"), lora_adapters.sampler_unet_fn(unet)
        if set(lora_params) & set(family.text_encoders):  # the text-encoder LoRA of --train_text_encoder
            models.update({name: adapted(name) for name in family.text_encoders})
            text_encoder_fn = lora_adapters.apply_adapted
    sampler = sample.Sampler(unet, modules.vae, modules.text_encoder,
                             mesh if mesh is not None else sharding.make_mesh(), unet_fn, modules.text_encoder_2,
                             family, force_zeros_for_empty_prompt(model_dir, family), text_encoder_fn)
    params = sampler.place_params(sample.sampler_params(models["unet"], models["text_encoder"], loaded["vae"],
                                                        models.get("text_encoder_2")))
    return Pipeline(sampler, params, tokenizers, scheduler_config, model_dir,
                    lora_infos.get("unet", next(iter(lora_infos.values()), None)), lora_infos)


def check_guidance_rescale(guidance_rescale: float, flag: str = "--guidance_rescale") -> None:
    if not 0.0 <= guidance_rescale <= 1.0:
        raise errors.FlagError(f"{flag} must be between 0 and 1 (got {guidance_rescale})")


def check_lora_scale(lora: str | None, lora_scale: float) -> None:
    if not math.isfinite(lora_scale):
        raise errors.FlagError(f"--lora_scale must be a finite number (got {lora_scale})")
    if lora is None and lora_scale != 1.0:
        raise errors.FlagError("--lora_scale needs --lora (the LoRA file or folder to apply)")


def run_sampler(pipeline: Pipeline, prompts, negative_prompt=None, num_inference_steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, height: int | None = None,
                width: int | None = None, scheduler: str | None = None, latents=None,
                output_type: str = "np", guidance_rescale: float = 0.0) -> np.ndarray:
    """Float images (N, H, W, 3) in [0, 1], or with output_type="latent" the final latents (N, C, h, w).

    One image per prompt. `negative_prompt`: a string for all, or one per prompt; default "" (the
    unconditional prompt). `scheduler`: one of schedulers.NAMES, default the model's config's class.
    `latents`: the initial noise (N, C, h, w) as diffusers' `latents=` (before init_noise_sigma); default
    drawn from `seed`. A batch that does not split over the mesh is padded and the padding dropped.
    `guidance_rescale`: diffusers' rescale_noise_cfg after guidance (0: off)."""
    import jax
    from jax.experimental import multihost_utils

    from t2i_flax.diffusion import sample, schedulers

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    # No negative prompt: SDXL conditions the unconditional half on zeros where the model asks for it.
    zero_negative = negative_prompt is None and pipeline.sampler.force_zeros_for_empty_prompt
    negative = "" if negative_prompt is None else negative_prompt
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if not prompts or len(negative) != len(prompts):
        raise errors.FlagError(f"give one or more prompts and one negative prompt or one per prompt "
                               f"(got {len(prompts)} prompts, {len(negative)} negative prompts)")
    sampler = pipeline.sampler
    height, width = height or pipeline.default_size[0], width or pipeline.default_size[1]
    latent_shape = sampler.latent_shape(len(prompts), height, width)  # checks the size
    step_scheduler = schedulers.make_scheduler(pipeline.scheduler_config, num_inference_steps, scheduler)

    padded = math.ceil(len(prompts) / sampler.mesh.size) * sampler.mesh.size
    pad = lambda items: list(items) + [items[-1]] * (padded - len(items))  # noqa: E731
    if latents is None:
        noise_BCHW = sample.initial_noise(seed, padded, latent_shape[1:])
    else:
        noise_BCHW = np.asarray(latents, np.float32)
        if noise_BCHW.shape != latent_shape:
            raise errors.FlagError(f"latents of shape {noise_BCHW.shape} do not match {latent_shape} "
                                   f"(prompts, channels, height / f, width / f)")
        noise_BCHW = np.stack(pad(list(noise_BCHW)))
    prompt_ids_BL = pipeline.token_ids(pad(prompts))
    negative_ids_BL = None if zero_negative else pipeline.token_ids(pad(negative))
    check_guidance_rescale(guidance_rescale)
    output = sampler(pipeline.params, prompt_ids_BL, negative_ids_BL, noise_BCHW, step_scheduler, guidance_scale,
                     output_type, guidance_rescale)
    if not output.is_fully_addressable:  # several hosts: every one gets all images
        output = multihost_utils.process_allgather(output, tiled=True)
    return np.asarray(jax.device_get(output))[:len(prompts)]


def generate(pipeline: Pipeline, prompts, negative_prompt=None, num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, height: int | None = None,
             width: int | None = None, scheduler: str | None = None, latents=None,
             guidance_rescale: float = 0.0) -> np.ndarray:
    """uint8 images (N, H, W, 3), rounded as diffusers' numpy_to_pil; arguments as run_sampler's."""
    from t2i_flax.diffusion import sample

    images = run_sampler(pipeline, prompts, negative_prompt, num_inference_steps, guidance_scale, seed, height,
                         width, scheduler, latents, output_type="np", guidance_rescale=guidance_rescale)
    return sample.to_uint8(images)


def image_grid(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image, ceil(sqrt(N)) columns, black where the last row is short."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def write_images(images: np.ndarray, out_dir: str) -> list[str]:
    """image_000.png ... and grid.png; returns the paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"image_{index:03d}.png") for index in range(len(images))]
    paths.append(os.path.join(out_dir, "grid.png"))
    for path, image in zip(paths, list(images) + [image_grid(images)]):
        Image.fromarray(image).save(path)
    return paths


# ---- the command ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_flax.generate", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", required=True, help="Local diffusers pipeline folder or Hub repo id, or one single-file "
                                     "checkpoint (file.safetensors, or owner/repo/file.safetensors on the Hub).")
    a("--single_file_config", default=None, help="For a single-file --model: the diffusers folder or Hub id whose "
                                                 "configs, tokenizers and scheduler go with it (default: the "
                                                 "official repo of its kind).")
    a("--prompt", required=True)
    a("--negative_prompt", default=None, help='Default: "" (the unconditional prompt).')
    a("--num_images", type=int, default=1)
    a("--steps", type=int, default=DEFAULT_STEPS, help="Inference steps (diffusers' num_inference_steps).")
    a("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="> 1 turns classifier-free guidance on.")
    a("--guidance_rescale", type=float, default=0.0,
      help="0 to 1: rescale the guided prediction to the text prediction's standard deviation (diffusers' "
           "guidance_rescale; 0.7 with zero-terminal-SNR models).")
    a("--seed", type=int, default=0)
    a("--height", type=int, default=None, help="Default: the UNet's sample_size x the VAE's factor.")
    a("--width", type=int, default=None)
    a("--scheduler", default=None, help="ddim | pndm | euler | dpm++2m; default: the model's scheduler config.")
    a("--out", required=True, help="Folder for image_000.png ... and grid.png.")
    a("--mixed_precision", default="no", help="no | bf16 (compute dtype; parameters stay float32).")
    a("--lora", default=None, help="A LoRA to apply: pytorch_lora_weights.safetensors or its folder (PEFT, "
                                   "diffusers or kohya keys, as diffusers' load_lora_weights reads).")
    a("--lora_scale", type=float, default=1.0, help="Multiplies the LoRA's own scale (alpha / rank), as "
                                                    "diffusers' cross_attention_kwargs={'scale': S}.")
    a("--cpu_devices", type=int, default=None, help="Simulate N CPU devices.")
    a("--compilation_cache_dir", type=str, default=None,
      help="JAX's persistent compilation cache, shared with training ('none': off).")
    return p


def check_args(args) -> None:
    """The checks that need no JAX (which --cpu_devices must configure before it is imported)."""
    for name in ("num_images", "steps", "height", "width", "cpu_devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise errors.FlagError(f"--{name} must be positive (got {value})")
    if args.mixed_precision not in MIXED_PRECISION:
        raise errors.FlagError(f"--mixed_precision {args.mixed_precision!r} is not one of: "
                               f"{', '.join(MIXED_PRECISION)}")
    check_lora_scale(args.lora, args.lora_scale)
    check_guidance_rescale(args.guidance_rescale)
    from t2i_flax import single_file

    single_file.check_reference(args.model)
    if args.single_file_config is not None and not single_file.is_single_file(args.model):
        raise errors.FlagError("--single_file_config needs a single-file checkpoint (a .safetensors file) as --model")
    if os.path.isfile(args.out):
        raise errors.OutputError(f"--out {args.out} is a file, not a folder")


def run(args) -> list[str]:
    import jax

    from t2i_flax import sharding
    from t2i_flax.diffusion import schedulers

    if args.scheduler is not None and args.scheduler not in schedulers.NAMES:
        raise errors.FlagError(f"--scheduler {args.scheduler!r} is not one of: {', '.join(schedulers.NAMES)}")
    # As many devices as divide the batch (at most all): no padded images.
    devices = jax.devices()
    used = max(n for n in range(1, len(devices) + 1) if args.num_images % n == 0)
    print(f"generate: {len(devices)} {devices[0].platform} device(s), {used} used for {args.num_images} image(s)",
          flush=True)
    print(f"generate: loading {args.model}", flush=True)
    pipeline = load_pipeline(args.model, args.mixed_precision, sharding.make_mesh(devices=devices[:used]),
                             lora=args.lora, lora_scale=args.lora_scale, single_file_config=args.single_file_config)
    for component, info in pipeline.lora_components.items():
        where = "" if component == "unet" else f" of {component}"
        print(f"generate: LoRA {info.path}: {info.modules} adapted layers{where}, rank {info.rank}, scale "
              f"{info.scale:g} x {args.lora_scale:g}", flush=True)
    config_class = pipeline.scheduler_config.get("_class_name")
    scheduler = args.scheduler or schedulers.default_name(pipeline.scheduler_config)
    if args.scheduler is None and config_class != schedulers.CLASS_NAMES[scheduler]:
        print(f"generate: the model's {config_class} has no JAX sampler here; using {scheduler} "
              f"(choose with --scheduler)", flush=True)
    truncated = tokenizer.count_truncated(pipeline.tokenizer, [args.prompt, args.negative_prompt or ""])
    if truncated:
        print(f"generate: note: {truncated} prompt(s) longer than {pipeline.tokenizer.model_max_length} tokens "
              f"were truncated", flush=True)
    height, width = args.height or pipeline.default_size[0], args.width or pipeline.default_size[1]
    print(f"generate: {args.num_images} image(s) {height}x{width}, {scheduler} {args.steps} steps, guidance "
          f"{args.guidance_scale}, seed {args.seed}", flush=True)
    start = time.perf_counter()
    images = generate(pipeline, [args.prompt] * args.num_images, args.negative_prompt, args.steps,
                      args.guidance_scale, args.seed, height, width, scheduler,
                      guidance_rescale=args.guidance_rescale)
    print(f"generate: sampled in {time.perf_counter() - start:.1f}s (compile included)", flush=True)
    paths = write_images(images, args.out)
    print(f"generate: wrote {len(images)} image(s) and grid.png to {os.path.abspath(args.out)}", flush=True)
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        cli.setup_devices(args.cpu_devices)  # before jax is imported
        from t2i_flax import compile_cache

        compile_cache.enable(args.compilation_cache_dir)
        run(args)
    except errors.UserError as error:
        return errors.report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
