"""What a model family is made of: its components, how they load, its tokenizer and the folder it exports.

Today one family, Stable Diffusion 1.x/2.x: a UNet, a VAE and one CLIP text encoder (whose last hidden state is
the UNet's context), one tokenizer. SDXL (two text encoders, penultimate states, a pooled embedding, time ids)
will be a second class here, chosen by `detect` from the folder (model_index.json, the UNet config).

    family = family.detect(model_dir)
    modules = family.modules(model_dir, config.model, dtype)                  # configs only, no weights
    modules, params = family.load(model_dir, config.model, dtype, unet=True)  # params: {component: host tree}
"""
from __future__ import annotations

import dataclasses
import os

from t2i_flax import tokenizer


@dataclasses.dataclass(frozen=True)
class Modules:
    """The Flax modules of one pipeline (no parameters)."""
    unet: object
    vae: object
    text_encoder: object


class StableDiffusion:
    """SD 1.x / 2.x: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer."""
    name = "Stable Diffusion 1.x/2.x"
    components = ("unet", "vae", "text_encoder")

    def load(self, model_dir: str, model_config, dtype, unet: bool = True, vae: bool = True,
             text_encoder: bool = True) -> tuple[Modules, dict]:
        """The modules (from their configs) and the host parameters of the components asked for (float32; the
        models compute in `dtype`). The VAE's mid-block attention is one head of 512 channels, beyond cuDNN's
        head_dim limit: it always uses XLA attention."""
        from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel

        common = dict(variant=model_config.variant, dtype=dtype)
        attention = model_config.attention
        loaded = {
            "unet": FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention=attention,
                                                             load_weights=unet, **common),
            "vae": FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", load_weights=vae, **common),
            "text_encoder": FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", attention=attention,
                                                              load_weights=text_encoder, **common)}
        modules = Modules(**{name: module for name, (module, _) in loaded.items()})
        return modules, {name: params for name, (_, params) in loaded.items() if params is not None}

    def modules(self, model_dir: str, model_config, dtype) -> Modules:
        return self.load(model_dir, model_config, dtype, unet=False, vae=False, text_encoder=False)[0]

    def tokenizer(self, model_dir: str):
        return tokenizer.load_tokenizer(os.path.join(model_dir, "tokenizer"))


STABLE_DIFFUSION = StableDiffusion()


def detect(model_dir: str) -> StableDiffusion:
    """The family of a diffusers folder. Only SD 1.x/2.x for now: the UNet's config check refuses SDXL's keys
    with one line."""
    return STABLE_DIFFUSION
