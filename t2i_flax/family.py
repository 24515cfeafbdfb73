"""What a model family is made of: its components, how they load, its tokenizers, how its UNet is conditioned on a
caption, the batch its step reads and the folder it exports. Chosen once from the base model's folder (`detect`:
model_index.json, else the UNet config), before any data is read.

    family = family.detect(model_dir)                                       # or ModelError: one line
    modules = family.modules(model_dir, dtype, variant=..., attention=...)    # configs only, no weights
    modules, params = family.load(model_dir, dtype, variant=..., unet=True)   # params: {component: host tree}
    context, added = family.condition(modules, frozen, batch)                 # in the step: the UNet's inputs
    context, added = family.condition(modules, params, batch, lora.apply_adapted)  # text encoders with adapters

Stable Diffusion 1.x/2.x: one CLIP text encoder whose last hidden state is the UNet's context. SDXL: two (CLIP
ViT-L and OpenCLIP bigG with a projection); the context is both penultimate hidden states side by side, and the
UNet also reads the second encoder's pooled, projected output and six "time ids" per image (original height and
width, crop top and left, target height and width: SDXL's size and crop conditioning).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from t2i_flax import tokenizer
from t2i_flax.errors import ModelError

TIME_IDS = 6  # SDXL: original (h, w), crop (top, left), target (h, w)


@dataclasses.dataclass(frozen=True)
class Modules:
    """The Flax modules of one pipeline (no parameters)."""
    unet: object
    vae: object
    text_encoder: object
    text_encoder_2: object = None   # SDXL's second text encoder


TEXT_ENCODER_CLASSES = {"text_encoder": "FlaxCLIPTextModel", "text_encoder_2": "FlaxCLIPTextModelWithProjection"}


def apply_frozen(module, params, *args, **kwargs):
    """A text encoder applied with its own parameters (family.condition's default `apply_text_encoder`)."""
    return module.apply({"params": params}, *args, **kwargs)


def text_encoder_class(component: str):
    from t2i_flax import models

    return getattr(models, TEXT_ENCODER_CLASSES[component])


class StableDiffusion:
    """SD 1.x / 2.x: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer."""
    name = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = ("text_encoder",)
    tokenizer_folders = ("tokenizer",)
    size_conditioning = False     # SDXL's time ids
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")

    def load(self, model_dir: str, dtype, *, variant: str | None = None, attention: str | None = None,
             unet: bool = True, vae: bool = True, text_encoder: bool = True,
             vae_dir: str | None = None) -> tuple[Modules, dict]:
        """The modules (from their configs) and the host parameters of the components asked for (float32; the
        models compute in `dtype`). The VAE's mid-block attention is one head of 512 channels, beyond cuDNN's
        head_dim limit: it always uses XLA attention. `text_encoder` covers every text encoder. `vae_dir`: a VAE
        folder (config.json + weights) that replaces the pipeline's (--pretrained_vae_model_name_or_path)."""
        from t2i_flax.models import FlaxAutoencoderKL, FlaxUNet2DConditionModel

        common = dict(variant=variant, dtype=dtype)
        loaded = {
            "unet": FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention=attention,
                                                             load_weights=unet, **common),
            "vae": FlaxAutoencoderKL.from_pretrained(vae_dir or model_dir, subfolder=None if vae_dir else "vae",
                                                     load_weights=vae, **common)}
        for name in self.text_encoders:
            loaded[name] = text_encoder_class(name).from_pretrained(model_dir, subfolder=name, attention=attention,
                                                         load_weights=text_encoder, **common)
        modules = Modules(**{name: module for name, (module, _) in loaded.items()})
        self.check(modules)
        return modules, {name: params for name, (_, params) in loaded.items() if params is not None}

    def modules(self, model_dir: str, dtype, **options) -> Modules:
        """The modules from their configs (no weights); `options` as `load`'s."""
        return self.load(model_dir, dtype, unet=False, vae=False, text_encoder=False, **options)[0]

    def check(self, modules: Modules) -> None:
        """ModelError (one line) for components that do not fit together."""
        if modules.vae.latent_channels != modules.unet.in_channels:
            raise ModelError(f"the VAE has {modules.vae.latent_channels} latent channels but the UNet reads "
                             f"{modules.unet.in_channels}: use a VAE made for this model")

    def tokenizers(self, model_dir: str) -> tuple:
        return tuple(tokenizer.load_tokenizer(os.path.join(model_dir, name)) for name in self.tokenizer_folders)

    def text_batch(self, global_batch_size: int, max_lengths: tuple, where) -> dict:
        """The batch entries the conditioning reads (ShapeDtypeStructs): token ids of each text encoder."""
        names = ("input_ids", "input_ids_2")
        return {names[i]: jax.ShapeDtypeStruct((global_batch_size, length), jnp.int32, sharding=where)
                for i, length in enumerate(max_lengths)}

    def condition(self, modules: Modules, params: dict, batch: dict, apply_text_encoder=apply_frozen):
        """(the UNet's context (B, L, D), its added conditions or None) from the batch's token ids. `params[name]`:
        what `apply_text_encoder(module, params[name], input_ids, **options)` applies each text encoder with (by
        default its frozen parameters; with --train_text_encoder its base and LoRA adapters, lora.apply_adapted)."""
        return apply_text_encoder(modules.text_encoder, params["text_encoder"], batch["input_ids"]).last_hidden_state, \
            None

    def model_index(self) -> dict:
        from t2i_flax.export import DIFFUSERS_VERSION

        index = {"_class_name": self.pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        index.update({"feature_extractor": [None, None], "image_encoder": [None, None],
                      "safety_checker": [None, None], "requires_safety_checker": False})
        return index


class StableDiffusionXL(StableDiffusion):
    """SDXL base: UNet2DConditionModel (addition_embed_type "text_time"), AutoencoderKL, CLIPTextModel,
    CLIPTextModelWithProjection, two CLIPTokenizers (the second pads with "!")."""
    name = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    size_conditioning = True
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    def check(self, modules: Modules) -> None:
        super().check(modules)
        unet, first, second = modules.unet, modules.text_encoder, modules.text_encoder_2
        if unet.addition_embed_type != "text_time":
            raise ModelError(f"an SDXL pipeline needs a UNet with addition_embed_type \"text_time\" (this one: "
                             f"{unet.addition_embed_type!r})")
        context = first.hidden_size + second.hidden_size
        cross = unet.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        if cross != context:
            raise ModelError(f"the UNet's cross_attention_dim is {cross} but the two text encoders give {context} "
                             f"({first.hidden_size} + {second.hidden_size})")
        expected = TIME_IDS * unet.addition_time_embed_dim + second.projection_dim
        if unet.projection_class_embeddings_input_dim != expected:
            raise ModelError(f"the UNet's projection_class_embeddings_input_dim is "
                             f"{unet.projection_class_embeddings_input_dim} but the pooled text embedding "
                             f"({second.projection_dim}) and {TIME_IDS} time ids x addition_time_embed_dim "
                             f"({unet.addition_time_embed_dim}) give {expected}")

    def text_batch(self, global_batch_size: int, max_lengths: tuple, where) -> dict:
        batch = super().text_batch(global_batch_size, max_lengths, where)
        batch["time_ids"] = jax.ShapeDtypeStruct((global_batch_size, TIME_IDS), jnp.float32, sharding=where)
        return batch

    def condition(self, modules: Modules, params: dict, batch: dict, apply_text_encoder=apply_frozen):
        """Both encoders' penultimate hidden states side by side; the second's projected pooled output and the
        time ids as the UNet's added conditions (as diffusers' SDXL training script)."""
        first = apply_text_encoder(modules.text_encoder, params["text_encoder"], batch["input_ids"],
                                   output_hidden_states=True)
        second = apply_text_encoder(modules.text_encoder_2, params["text_encoder_2"], batch["input_ids_2"],
                                    output_hidden_states=True)
        context = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
        return context, {"text_embeds": second.text_embeds, "time_ids": batch["time_ids"].astype(context.dtype)}

    def model_index(self) -> dict:
        index = super().model_index()
        for name in ("safety_checker", "requires_safety_checker"):
            del index[name]
        index.update({"scheduler": ["diffusers", "EulerDiscreteScheduler"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
        return index


def force_zeros_for_empty_prompt(model_dir: str, family: StableDiffusion) -> bool:
    """SDXL's model_index.json flag (diffusers' default: true): no negative prompt means zero conditioning."""
    if not family.size_conditioning:
        return False
    path = os.path.join(model_dir, "model_index.json")
    if not os.path.isfile(path):
        return True
    with open(path) as handle:
        return bool(json.load(handle).get("force_zeros_for_empty_prompt", True))


STABLE_DIFFUSION = StableDiffusion()
STABLE_DIFFUSION_XL = StableDiffusionXL()
PIPELINES = {StableDiffusion.pipeline_class: STABLE_DIFFUSION, StableDiffusionXL.pipeline_class: STABLE_DIFFUSION_XL}
SUPPORTED = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL base (StableDiffusionXLPipeline)"


def detect(model_dir: str) -> StableDiffusion:
    """The family of a diffusers folder, from its model_index.json (else its UNet config); ModelError (one
    line, naming what the folder is) for the kinds t2i_flax does not train."""
    index_path = os.path.join(model_dir, "model_index.json")
    index = {}
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            index = json.load(handle)
    pipeline = index.get("_class_name")
    if pipeline in PIPELINES:
        return PIPELINES[pipeline]
    if pipeline is not None:
        if "XL" in pipeline and index.get("text_encoder", [None])[0] is None and "text_encoder_2" in index:
            what = f"an SDXL refiner ({pipeline}: only text_encoder_2)"
        else:
            what = f"a {pipeline} folder"
        raise ModelError(f"{model_dir} is {what}; t2i_flax trains {SUPPORTED}")
    unet_config_path = os.path.join(model_dir, "unet", "config.json")
    if os.path.isfile(unet_config_path):
        with open(unet_config_path) as handle:
            if json.load(handle).get("addition_embed_type") == "text_time":
                return STABLE_DIFFUSION_XL
    return STABLE_DIFFUSION
