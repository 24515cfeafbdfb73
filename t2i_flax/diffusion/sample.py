"""Text-to-image sampling as one jax.jit program: text encoder(s) -> classifier-free guided denoising
loop (one lax.fori_loop over the scheduler's timesteps) -> VAE decode, as diffusers' StableDiffusionPipeline
(SDXL: as StableDiffusionXLPipeline, with both text encoders, the pooled embedding and the time ids of the
target size, crop (0, 0); without a negative prompt, zero negative conditioning when the model asks for it).

    sampler = Sampler(unet, vae, text_encoder, mesh)
    params = sampler.place_params(sampler_params(unet_params, text_encoder_params, vae_params))
    scheduler = schedulers.make_scheduler(scheduler_config, num_inference_steps=25)
    images_BHWC = sampler(params, prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler, guidance_scale=7.5)

Ahead of time (a trainer, before its first step), then every few steps with the current UNet params:

    compiled = sampler.compile(abstract_params, scheduler, batch, height, width, guidance=True)
    inputs = sampler.place_inputs(prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler, 7.5)  # once
    images_BHWC = compiled(sampler_params(state.params, text_encoder_params, vae_params), *inputs)

The parameters are arguments of the program, never closed-over constants, so the trainer can pass its
current (possibly FSDP-sharded, possibly EMA) UNet parameters every time without a recompile. One compile
per (scheduler kind, step count, batch, size, guidance on/off, output type); jit's cache keeps them.
The batch is split over all devices of the mesh; the scheduler's tables are replicated."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import errors, sharding
from t2i_flax.diffusion import schedulers

OUTPUT_TYPES = ("np", "latent")
# The parts of the VAE that decoding reads (the encoder half stays out of the program).
VAE_DECODER_PARAMS = ("decoder", "post_quant_conv")


def sampler_params(unet_params, text_encoder_params, vae_params, text_encoder_2_params=None) -> dict:
    """The parameter tree the sampling program takes: {"unet", "text_encoder"[, "text_encoder_2"], "vae" (decoder
    half)}."""
    params = {"unet": unet_params, "text_encoder": text_encoder_params,
              "vae": {name: vae_params[name] for name in VAE_DECODER_PARAMS if name in vae_params}}
    if text_encoder_2_params is not None:
        params["text_encoder_2"] = text_encoder_2_params
    return params


def as_text_inputs(ids) -> dict | None:
    """Token ids as the conditioning reads them: {"input_ids"[, "input_ids_2"]} (an array: SD's one tokenizer; a
    pair: SDXL's two)."""
    if ids is None or isinstance(ids, dict):
        return ids
    if isinstance(ids, (tuple, list)):
        return {"input_ids": ids[0], "input_ids_2": ids[1]}
    return {"input_ids": ids}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.block_out_channels) - 1)


def default_size(unet, vae) -> tuple[int, int]:
    """(height, width) = the UNet's sample_size x the VAE's factor, as diffusers."""
    size = unet.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return height * vae_scale_factor(vae), width * vae_scale_factor(vae)


def check_size(height: int, width: int, vae) -> None:
    factor = vae_scale_factor(vae)
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise errors.FlagError(f"--{name} {value} must be a positive multiple of {factor} (the VAE's factor)")


def initial_noise(seed: int, num_images: int, latent_shape_CHW) -> np.ndarray:
    """Gaussian latents (num_images, C, h, w) float32; image i draws from fold_in(key(seed), i), so it does
    not depend on how many images are made with it."""
    key = jax.random.key(seed)
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(latent_shape_CHW))))
    return np.asarray(draw(jnp.arange(num_images)), np.float32)


def to_uint8(images_BHWC) -> np.ndarray:
    """[0, 1] floats -> uint8 as diffusers' numpy_to_pil: round(x * 255)."""
    return (np.asarray(images_BHWC, np.float32) * 255).round().astype(np.uint8)


def rescale_noise_cfg(noise_cfg_BCHW, noise_pred_text_BCHW, guidance_rescale):
    """Lin et al. 2023, section 3.4, as diffusers' rescale_noise_cfg: the guided prediction scaled to the text
    prediction's per-sample standard deviation (torch's, unbiased), mixed with the unscaled one by
    `guidance_rescale` (0: unchanged, 1: fully rescaled). Applied to the raw model output (v for v-prediction)."""
    axes = tuple(range(1, noise_cfg_BCHW.ndim))
    std_text = jnp.std(noise_pred_text_BCHW, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg_BCHW, axis=axes, keepdims=True, ddof=1)
    rescaled_BCHW = noise_cfg_BCHW * (std_text / std_cfg)
    return guidance_rescale * rescaled_BCHW + (1 - guidance_rescale) * noise_cfg_BCHW


class Sampler:
    """The sampling program for one set of modules on one mesh.

    `unet_fn(unet_params, latents_NCHW, timestep, text_embeddings_NLD, **added) -> noise_pred_NCHW` replaces
    `unet.apply` (e.g. to apply LoRA adapters to the parameters first): N is 2B with guidance, `timestep`
    a float32 scalar, `unet_params` the program's argument params["unet"], `added` SDXL's added_cond_kwargs.
    `text_encoder_fn(module, params[name], input_ids, **options)` likewise applies each text encoder (default
    `module.apply` with params[name]; text-encoder LoRA: lora.apply_adapted).

    Prompt ids: an array (SD) or a pair of arrays (SDXL's two tokenizers). SDXL with guidance and no negative
    prompt (None) conditions the unconditional half on zeros where `force_zeros_for_empty_prompt` (as diffusers)."""

    def __init__(self, unet, vae, text_encoder, mesh, unet_fn: Callable | None = None, text_encoder_2=None,
                 family=None, force_zeros_for_empty_prompt: bool = False, text_encoder_fn: Callable | None = None):
        from t2i_flax.family import STABLE_DIFFUSION, STABLE_DIFFUSION_XL, Modules, apply_frozen

        self.unet, self.vae, self.text_encoder, self.mesh = unet, vae, text_encoder, mesh
        self.text_encoder_2 = text_encoder_2
        self.family = family or (STABLE_DIFFUSION_XL if text_encoder_2 is not None else STABLE_DIFFUSION)
        self.modules = Modules(unet, vae, text_encoder, text_encoder_2)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.unet_fn = unet_fn or self._apply_unet
        self.text_encoder_fn = text_encoder_fn or apply_frozen
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.traces = 0  # how many times the program was traced (one per compile)
        self.program = jax.jit(self._sample, static_argnames=("guidance", "output_type"),
                               out_shardings=self.batch_sharding)

    def zero_negative(self, guidance: bool, negative_ids) -> bool:
        """Whether the unconditional half is zeros instead of an encoded negative prompt."""
        return guidance and negative_ids is None and self.force_zeros_for_empty_prompt

    # ---- shapes and placement --------------------------------------------------------------------
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_size(height, width, self.vae)
        factor = vae_scale_factor(self.vae)
        return batch, self.unet.in_channels, height // factor, width // factor

    def place_params(self, params):
        """Host (or differently placed) params -> the mesh, by sharding.tree_shardings."""
        return jax.device_put(params, sharding.tree_shardings(self.mesh, params))

    def place_batch(self, array):
        """A whole batch (the same on every host) -> split along its first axis over the mesh."""
        array = array if isinstance(array, jax.Array) else np.asarray(array)
        if array.shape[0] % self.mesh.size:
            raise errors.FlagError(f"a batch of {array.shape[0]} images does not split over the {self.mesh.size} "
                                   f"devices of the mesh: use a multiple of {self.mesh.size}")
        if isinstance(array, jax.Array):
            return jax.device_put(array, self.batch_sharding)
        # Each host puts its own devices' rows (explicit transfers, also with several hosts).
        where = self.batch_sharding.addressable_devices_indices_map(array.shape)
        shards = [jax.device_put(array[index], device) for device, index in where.items()]
        return jax.make_array_from_single_device_arrays(array.shape, self.batch_sharding, shards)

    def place_inputs(self, prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler: schedulers.Scheduler,
                     guidance_scale: float, guidance_rescale: float = 0.0):
        """The program's arguments after the params, moved explicitly (so that a caller running under
        jax.transfer_guard("disallow") can place them once and call `program`/a compiled one). With guidance and
        `guidance_rescale` > 0, one more argument: the rescale (a program compiled with guidance_rescale=True)."""
        replicated = sharding.replicated(self.mesh)

        def place(ids):
            return None if ids is None else jax.tree_util.tree_map(self.place_batch, as_text_inputs(ids))

        if guidance_scale > 1.0 and negative_ids_BL is None and not self.force_zeros_for_empty_prompt:
            raise errors.FlagError("classifier-free guidance needs negative prompt ids (\"\" for none)")
        negative = place(negative_ids_BL) if guidance_scale > 1.0 else None
        inputs = (place(prompt_ids_BL), negative, self.place_batch(noise_BCHW),
                  jax.device_put(scheduler, replicated), jax.device_put(np.float32(guidance_scale), replicated))
        if guidance_scale > 1.0 and guidance_rescale > 0.0:
            inputs += (jax.device_put(np.float32(guidance_rescale), replicated),)
        return inputs

    # ---- running and compiling -------------------------------------------------------------------
    def __call__(self, params, prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler: schedulers.Scheduler,
                 guidance_scale: float = 7.5, output_type: str = "np", guidance_rescale: float = 0.0):
        """Images (B, H, W, 3) float32 in [0, 1], or with output_type="latent" the final latents (B, C, h, w),
        as a jax.Array split over the mesh.

        `noise_BCHW`: the initial latents before the scheduler's init_noise_sigma (diffusers' `latents=`).
        `guidance_scale` > 1 turns classifier-free guidance on; `negative_ids_BL` (tokenized negative
        prompts, "" for none) is then needed, and ignored otherwise. `guidance_rescale` (0 to 1) rescales the
        guided prediction towards the text prediction's standard deviation (diffusers' rescale_noise_cfg)."""
        if output_type not in OUTPUT_TYPES:
            raise errors.FlagError(f"output_type {output_type!r} is not one of: {', '.join(OUTPUT_TYPES)}")
        inputs = self.place_inputs(prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler, guidance_scale,
                                   guidance_rescale)
        return self.program(params, *inputs, guidance=guidance_scale > 1.0, output_type=output_type)

    def compile(self, abstract_params, scheduler: schedulers.Scheduler, batch: int, height: int, width: int,
                guidance: bool, output_type: str = "np", max_length=None, zero_negative: bool = False,
                guidance_rescale: bool = False):
        """Ahead-of-time compile from shapes only (e.g. before training, so that a sampler that does not fit
        device memory fails early). `abstract_params`: ShapeDtypeStructs (or arrays) of `sampler_params`;
        leaves without a sharding get the sharding table's. Returns the jax Compiled program, called as
        `compiled(params, *sampler.place_inputs(prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler,
        guidance_scale))` with params placed as the abstract ones say. `max_length`: the token ids' length (one per
        tokenizer for SDXL); `zero_negative`: compiled for no negative prompt (SDXL's zero conditioning);
        `guidance_rescale`: compiled for a guidance rescale > 0 (with guidance)."""
        return self.lower(abstract_params, scheduler, batch, height, width, guidance, output_type, max_length,
                          zero_negative, guidance_rescale).compile()

    def lower(self, abstract_params, scheduler: schedulers.Scheduler, batch: int, height: int, width: int,
              guidance: bool, output_type: str = "np", max_length=None, zero_negative: bool = False,
              guidance_rescale: bool = False):
        """The program `compile` compiles, lowered (t2i_flax.aot measures it for a TPU topology)."""
        if batch % self.mesh.size:
            raise errors.FlagError(f"a batch of {batch} images does not split over {self.mesh.size} devices")
        shardings = sharding.tree_shardings(self.mesh, abstract_params)
        params = jax.tree_util.tree_map(
            lambda leaf, where: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype,
                                                     sharding=getattr(leaf, "sharding", None) or where),
            abstract_params, shardings)
        encoders = [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])
        lengths = max_length if isinstance(max_length, (list, tuple)) else [max_length] * len(encoders)
        lengths = [length or encoder.max_position_embeddings for length, encoder in zip(lengths, encoders)]
        ids = as_text_inputs([jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=self.batch_sharding)
                              for length in lengths] if len(lengths) > 1 else
                             jax.ShapeDtypeStruct((batch, lengths[0]), jnp.int32, sharding=self.batch_sharding))
        noise = jax.ShapeDtypeStruct(self.latent_shape(batch, height, width), jnp.float32,
                                     sharding=self.batch_sharding)
        replicated = sharding.replicated(self.mesh)
        abstract_scheduler = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), scheduler)
        scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        rescale = (scale,) if guidance and guidance_rescale else ()
        return self.program.lower(params, ids, ids if guidance and not zero_negative else None, noise,
                                  abstract_scheduler, scale, *rescale, guidance=guidance, output_type=output_type)

    # ---- the program -----------------------------------------------------------------------------
    def _apply_unet(self, unet_params, latents_BCHW, timestep, text_embeddings_BLD, **added):
        return self.unet.apply({"params": unet_params}, latents_BCHW, timestep, text_embeddings_BLD, **added).sample

    def _encode(self, params, ids: dict, time_ids_B6):
        """(context (B, L, D), added conditions or None) as the family conditions its UNet in training."""
        batch = dict(ids, time_ids=time_ids_B6) if time_ids_B6 is not None else ids
        return self.family.condition(self.modules, params, batch, self.text_encoder_fn)

    def _sample(self, params: dict[str, Any], prompt_ids_BL, negative_ids_BL, noise_BCHW, scheduler, guidance_scale,
                guidance_rescale=None, *, guidance: bool, output_type: str):
        self.traces += 1
        constrain = lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding)  # noqa: E731
        batch = noise_BCHW.shape[0]
        time_ids_B6 = None
        if self.family.size_conditioning:  # SDXL: original = target = the image's size, crop (0, 0)
            height, width = (dim * vae_scale_factor(self.vae) for dim in noise_BCHW.shape[2:])
            time_ids_B6 = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (batch, 1))
        # N: 2B with guidance (one UNet batch [uncond; cond], as diffusers), else B.
        text_embeddings_BLD, added = self._encode(params, prompt_ids_BL, time_ids_B6)
        context_NLD = text_embeddings_BLD
        if guidance:
            if negative_ids_BL is None:  # zero conditioning (SDXL's force_zeros_for_empty_prompt)
                negative_embeddings_BLD = jnp.zeros_like(text_embeddings_BLD)
                negative_added = None if added is None else dict(
                    added, text_embeds=jnp.zeros_like(added["text_embeds"]))
            else:
                negative_embeddings_BLD, negative_added = self._encode(params, negative_ids_BL, time_ids_B6)
            context_NLD = constrain(jnp.concatenate([negative_embeddings_BLD, text_embeddings_BLD]))
            if added is not None:
                added = {name: constrain(jnp.concatenate([negative_added[name], added[name]])) for name in added}
        added_kwargs = {} if added is None else {"added_cond_kwargs": added}
        latents_BCHW = noise_BCHW.astype(jnp.float32) * scheduler.init_noise_sigma
        state = schedulers.init_state(scheduler, latents_BCHW.shape)

        def denoise(i, carry):
            latents_BCHW, state = carry
            model_input_NCHW = jnp.concatenate([latents_BCHW] * 2) if guidance else latents_BCHW
            model_input_NCHW = constrain(schedulers.scale_model_input(scheduler, model_input_NCHW, i))
            noise_pred_NCHW = self.unet_fn(params["unet"], model_input_NCHW, scheduler.timesteps[i],
                                           context_NLD, **added_kwargs).astype(jnp.float32)
            if guidance:
                noise_pred_uncond_BCHW, noise_pred_text_BCHW = jnp.split(noise_pred_NCHW, 2)
                noise_pred_BCHW = noise_pred_uncond_BCHW + guidance_scale * (noise_pred_text_BCHW
                                                                             - noise_pred_uncond_BCHW)
                if guidance_rescale is not None:  # None: not compiled in (the program is as without it)
                    noise_pred_BCHW = rescale_noise_cfg(noise_pred_BCHW, noise_pred_text_BCHW, guidance_rescale)
            else:
                noise_pred_BCHW = noise_pred_NCHW
            latents_BCHW, state = schedulers.step(scheduler, state, noise_pred_BCHW, i, latents_BCHW)
            return constrain(latents_BCHW), state

        latents_BCHW, _ = jax.lax.fori_loop(0, scheduler.num_steps, denoise, (latents_BCHW, state))
        if output_type == "latent":
            return latents_BCHW
        decoded_BCHW = self.vae.apply({"params": params["vae"]}, latents_BCHW / self.vae.scaling_factor,
                                      method=self.vae.decode).sample
        images_BCHW = jnp.clip(decoded_BCHW.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return jnp.transpose(images_BCHW, (0, 2, 3, 1))  # NCHW -> NHWC, as diffusers' output_type="np"
