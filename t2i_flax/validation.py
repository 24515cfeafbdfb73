"""Validation images while training: a periodic action of the loop.

    validation = Validation(settings, mesh, unet, vae, text_encoder, ...)    # compiles ahead of time
    path, grid_HWC = validation(step, model_params)   # {"unet", "text_encoder"[, "text_encoder_2"]}: the sampler's
                                                      # <output_dir>/validation/step_<step>.png

The prompts, their tokens and the initial noise are fixed for the whole run (seeded by --seed), so grids
compare across steps. The program is the sampler's (t2i_flax/diffusion/sample.py), compiled once on the
training mesh with the training parameters' shardings; it reads the current weights and changes nothing
of the training state. With --use_ema the trainer passes the EMA weights, as the PyTorch script does."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw, ImageFont

from t2i_flax import sharding
from t2i_flax.config import ValidationConfig
from t2i_flax.diffusion import sample, schedulers
from t2i_flax.errors import FlagError
from t2i_flax.tokenizer import tokenize_captions

LABEL_HEIGHT = 14  # pixels of prompt text above each row of the grid


class Validation:
    def __init__(self, settings: ValidationConfig, mesh, unet, vae, text_encoder, clip_tokenizer,
                 scheduler_config: dict, vae_params, model_params_abstract: dict, size: tuple[int, int],
                 seed: int, output_dir: str, unet_fn=None, text_encoder_2=None, tokenizer_2=None,
                 family=None, force_zeros_for_empty_prompt: bool = False, text_encoder_fn=None, dtype=None):
        """`vae_params`: host VAE parameters (only the decoder half goes to the devices, in `dtype`, the compute
        dtype); `model_params_abstract`: the shapes and shardings of the sampler's params of the UNet and text
        encoder(s) the trainer will pass ({"unet", "text_encoder"[, "text_encoder_2"]}, setup.sampler_models), with
        their hooks `unet_fn`, `text_encoder_fn` (diffusion.sample.Sampler's); `size`: the images' (height, width).
        SDXL: its second text encoder and tokenizer, and whether no negative prompt means zero conditioning (as its
        pipeline draws without one)."""
        self.settings, self.output_dir = settings, output_dir
        self.prompts = list(settings.validation_prompts)
        per_prompt = settings.num_validation_images
        count = len(self.prompts) * per_prompt
        batch = -(-count // mesh.size) * mesh.size  # padded to split over the devices; padding is dropped
        self.count, self.per_prompt = count, per_prompt
        prompts = [p for p in self.prompts for _ in range(per_prompt)] + [""] * (batch - count)
        tokenizers = [clip_tokenizer] + ([tokenizer_2] if tokenizer_2 is not None else [])
        token_ids = lambda captions: [tokenize_captions(each, captions)[0] for each in tokenizers]  # noqa: E731
        prompt_ids, negative_ids = token_ids(prompts), token_ids([""] * batch)
        self.sampler = sample.Sampler(unet, vae, text_encoder, mesh, unet_fn, text_encoder_2, family,
                                      force_zeros_for_empty_prompt, text_encoder_fn)
        zero_negative = self.sampler.zero_negative(settings.validation_guidance_scale > 1.0, None)
        negative_ids = None if zero_negative else negative_ids
        self.scheduler = schedulers.make_scheduler(scheduler_config, settings.validation_num_inference_steps,
                                                   settings.validation_scheduler)
        noise = sample.initial_noise(seed, batch, self.sampler.latent_shape(batch, *size)[1:])
        decoder = {name: vae_params[name] for name in sample.VAE_DECODER_PARAMS}
        decoder = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype or np.float32), decoder)
        self.vae_params = sharding.put(decoder, sharding.tree_shardings(mesh, decoder))
        guidance = settings.validation_guidance_scale > 1.0
        abstract = self.sampler_params(model_params_abstract, _abstract(self.vae_params))
        # Where the program takes each parameter (a host scalar such as LoRA's scale is placed explicitly).
        self.param_shardings = jax.tree_util.tree_map(lambda leaf, where: leaf.sharding or where, abstract,
                                                      sharding.tree_shardings(mesh, abstract))
        try:
            self.program = self.sampler.compile(abstract, self.scheduler, batch, *size, guidance,
                                                max_length=[ids.shape[1] for ids in prompt_ids],
                                                zero_negative=zero_negative,
                                                guidance_rescale=settings.validation_guidance_rescale > 0)
        except jax.errors.JaxRuntimeError as error:  # a sampler that does not fit: before the first step
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            raise FlagError(f"the validation sampler does not fit device memory ({str(error).splitlines()[0][:200]}): "
                            f"lower --num_validation_images or use fewer --validation_prompts") from None
        single = lambda ids: ids if ids is None or len(ids) > 1 else ids[0]  # noqa: E731
        self.inputs = self.sampler.place_inputs(single(prompt_ids), single(negative_ids), noise, self.scheduler,
                                                settings.validation_guidance_scale,
                                                settings.validation_guidance_rescale)

    @staticmethod
    def sampler_params(model_params: dict, vae_params) -> dict:
        return sample.sampler_params(model_params["unet"], model_params["text_encoder"], vae_params,
                                     model_params.get("text_encoder_2"))

    def __call__(self, finished_steps: int, model_params: dict) -> tuple[str, np.ndarray]:
        """Draws the prompts with `model_params` ({"unet", "text_encoder"[, "text_encoder_2"]}: the sampler's);
        writes the grid (process 0) and returns (path, grid)."""
        params = jax.device_put(self.sampler_params(model_params, self.vae_params), self.param_shardings)
        images = self.program(params, *self.inputs)
        images = multihost_utils.process_allgather(images, tiled=True)[: self.count]
        grid = labelled_grid(sample.to_uint8(images), self.prompts, self.per_prompt)
        path = os.path.join(self.output_dir, "validation", f"step_{finished_steps}.png")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(grid).save(path)
        return path, grid


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


MIN_TILE = 128  # smaller images (tiny test models) are enlarged in the grid, so that they can be looked at


def labelled_grid(images: np.ndarray, prompts: list[str], per_prompt: int) -> np.ndarray:
    """(prompts x per_prompt, H, W, 3) uint8 -> one image: a row per prompt, its text above it."""
    _, height, width, _ = images.shape
    zoom = max(1, MIN_TILE // width)
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        height, width = height * zoom, width * zoom
    canvas = Image.new("RGB", (per_prompt * width, len(prompts) * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, prompt in enumerate(prompts):
        top = row * (height + LABEL_HEIGHT)
        draw.text((2, top + 1), prompt, fill="black", font=font)
        for column in range(per_prompt):
            canvas.paste(Image.fromarray(images[row * per_prompt + column]), (column * width, top + LABEL_HEIGHT))
    return np.asarray(canvas)


def grid_images(grid: np.ndarray, rows: int, per_prompt: int, size: int) -> np.ndarray:
    """The images (rows x per_prompt, size, size, 3) of a labelled_grid, back at their own size."""
    tile = grid.shape[1] // per_prompt
    zoom = tile // size
    images = []
    for row in range(rows):
        top = row * (tile + LABEL_HEIGHT) + LABEL_HEIGHT
        for column in range(per_prompt):
            images.append(grid[top:top + tile:zoom, column * tile:(column + 1) * tile:zoom])
    return np.stack(images)
