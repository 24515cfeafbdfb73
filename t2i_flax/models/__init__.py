"""Our Flax Stable Diffusion models: the API of the removed diffusers/transformers Flax classes."""
from t2i_flax.models.clip import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from t2i_flax.models.unet import FlaxUNet2DConditionModel
from t2i_flax.models.vae import FlaxAutoencoderKL

__all__ = ["FlaxAutoencoderKL", "FlaxCLIPTextModel", "FlaxCLIPTextModelWithProjection", "FlaxUNet2DConditionModel"]
