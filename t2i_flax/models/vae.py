"""Stable Diffusion VAE (``AutoencoderKL``) in flax.linen, numerically equal to diffusers' PyTorch
``AutoencoderKL`` (0.42) and parameter-compatible with legacy diffusers Flax checkpoints.

API: NCHW in and out (as diffusers); convolutions run NHWC inside.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_flax.errors import ModelError
from t2i_flax.models.attention import dot_product_attention
from t2i_flax.models.base import PretrainedMixin
from t2i_flax.models.resnet import FlaxDownsample2D, FlaxResnetBlock2D, FlaxUpsample2D

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code eps=1e-6 for every norm
# AutoencoderKL config keys of a latent normalisation beyond scaling_factor (SD3/Flux/SDXL-style VAEs):
# accepted only when null, as diffusers writes them for SD 1.x/2.x VAEs
LATENT_NORM_KEYS = ("shift_factor", "latents_mean", "latents_std")


@flax.struct.dataclass
class FlaxDiagonalGaussianDistribution:
    """Posterior N(mean, std^2) of the encoder; all arrays NCHW (batch, latent_channels, h, w)."""

    mean: jnp.ndarray
    logvar: jnp.ndarray
    std: jnp.ndarray
    var: jnp.ndarray

    @classmethod
    def from_moments(cls, moments):
        """``moments`` NCHW with 2*latent_channels channels: [mean, logvar] (logvar clipped to [-30, 20])."""
        mean, logvar = jnp.split(moments, 2, axis=1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return cls(mean=mean, logvar=logvar, std=jnp.exp(0.5 * logvar), var=jnp.exp(logvar))

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self, other: "FlaxDiagonalGaussianDistribution | None" = None):
        """KL divergence to N(0, 1) (or to ``other``), summed over C, H, W."""
        axes = (1, 2, 3)
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=axes,
        )


@flax.struct.dataclass
class FlaxAutoencoderKLOutput:
    latent_dist: FlaxDiagonalGaussianDistribution


@flax.struct.dataclass
class FlaxDecoderOutput:
    """``sample``: decoded image NCHW, compute dtype."""

    sample: jnp.ndarray


def _resnet(channels: int, num_groups: int, dtype, name: str) -> FlaxResnetBlock2D:
    """The VAE's resnets: no time embedding, eps 1e-6."""
    return FlaxResnetBlock2D(channels, temb_channels=None, groups=num_groups, eps=VAE_EPS, dtype=dtype, name=name)


class FlaxVAEAttentionBlock(nn.Module):
    """Spatial self-attention with residual: ``group_norm``, ``query``/``key``/``value``/``proj_attn`` (with bias).

    One head of the full channel width unless ``num_head_channels`` is set. Input/output NHWC.
    """

    channels: int
    num_head_channels: int | None = None
    num_groups: int = 32
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        batch, height, width, channels = hidden_states.shape
        head_dim = self.num_head_channels or channels
        heads = channels // head_dim
        residual = hidden_states

        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=VAE_EPS, dtype=self.dtype,
                         name="group_norm")(hidden_states)
        h = h.reshape(batch, height * width, channels)

        def proj(name):
            return nn.Dense(channels, dtype=self.dtype, name=name)(h).reshape(batch, height * width, heads, head_dim)

        out = dot_product_attention(proj("query"), proj("key"), proj("value"), self.attention)
        out = nn.Dense(channels, dtype=self.dtype, name="proj_attn")(out.reshape(batch, height * width, channels))
        return out.reshape(batch, height, width, channels) + residual


class FlaxVAEMidBlock2D(nn.Module):
    """``resnets_0`` -> ``attentions_0`` -> ``resnets_1`` (no time embedding)."""

    channels: int
    num_groups: int = 32
    add_attention: bool = True
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        hidden_states = _resnet(self.channels, self.num_groups, self.dtype, "resnets_0")(hidden_states)
        if self.add_attention:
            hidden_states = FlaxVAEAttentionBlock(self.channels, num_groups=self.num_groups, attention=self.attention,
                                                  dtype=self.dtype, name="attentions_0")(hidden_states)
        return _resnet(self.channels, self.num_groups, self.dtype, "resnets_1")(hidden_states)


class _VAEBlock(nn.Module):
    """``resnets_N``, then with ``sampler='down'`` diffusers' ``DownEncoderBlock2D``'s (0,1)-padded stride-2
    conv ``downsamplers_0``, with ``sampler='up'`` ``UpDecoderBlock2D``'s nearest x2 + conv ``upsamplers_0``."""

    out_channels: int
    num_layers: int
    num_groups: int
    sampler: str | None = None  # None, "down" or "up"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        for j in range(self.num_layers):
            hidden_states = _resnet(self.out_channels, self.num_groups, self.dtype, f"resnets_{j}")(hidden_states)
        if self.sampler == "down":
            hidden_states = FlaxDownsample2D(self.out_channels, padding=0, dtype=self.dtype,
                                             name="downsamplers_0")(hidden_states)
        elif self.sampler == "up":
            hidden_states = FlaxUpsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(hidden_states)
        return hidden_states


class _VAECoder(nn.Module):
    """Fields and layers shared by FlaxEncoder and FlaxDecoder (NHWC)."""

    out_channels: int
    block_out_channels: tuple
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, name: str) -> nn.Conv:
        return nn.Conv(features, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=name)

    def _mid_block(self, sample):
        return FlaxVAEMidBlock2D(self.block_out_channels[-1], self.norm_num_groups, self.mid_block_add_attention,
                                 attention=self.attention, dtype=self.dtype, name="mid_block")(sample)

    def _blocks(self, sample, channels, num_layers: int, sampler: str, prefix: str):
        for i, c in enumerate(channels):
            sample = _VAEBlock(c, num_layers, self.norm_num_groups, sampler=sampler if i < len(channels) - 1 else None,
                               dtype=self.dtype, name=f"{prefix}_{i}")(sample)
        return sample

    def _head(self, sample, features: int):
        """``conv_norm_out`` -> SiLU -> ``conv_out``."""
        sample = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=VAE_EPS, dtype=self.dtype,
                              name="conv_norm_out")(sample)
        return self._conv(features, "conv_out")(nn.silu(sample))


class FlaxEncoder(_VAECoder):
    """``conv_in`` -> ``down_blocks_N`` (``resnets_M``, ``downsamplers_0``) -> ``mid_block`` ->
    ``conv_norm_out`` -> SiLU -> ``conv_out`` (2 x latent channels: mean and logvar). NHWC."""

    @nn.compact
    def __call__(self, sample):
        boc = self.block_out_channels
        sample = self._conv(boc[0], "conv_in")(sample)
        sample = self._blocks(sample, boc, self.layers_per_block, "down", "down_blocks")
        return self._head(self._mid_block(sample), 2 * self.out_channels)


class FlaxDecoder(_VAECoder):
    """``conv_in`` -> ``mid_block`` -> ``up_blocks_N`` (``resnets_M``, ``upsamplers_0``) -> ``conv_norm_out``
    -> SiLU -> ``conv_out``. NHWC."""

    @nn.compact
    def __call__(self, sample):
        boc = self.block_out_channels
        sample = self._mid_block(self._conv(boc[-1], "conv_in")(sample))
        sample = self._blocks(sample, boc[::-1], self.layers_per_block + 1, "up", "up_blocks")
        return self._head(sample, self.out_channels)


class FlaxAutoencoderKL(PretrainedMixin, nn.Module):
    """KL autoencoder of Stable Diffusion. Fields are diffusers' ``AutoencoderKL`` config keys.

    ``encode(sample NCHW)`` -> ``.latent_dist`` (FlaxDiagonalGaussianDistribution, NCHW);
    ``decode(latents NCHW)`` -> ``.sample``; ``__call__`` = encode + decode (builds every parameter
    in ``init``). Use ``module.apply({'params': p}, x, method=module.encode)``. ``scaling_factor``
    and ``force_upcast`` are carried config only. ``shift_factor``, ``latents_mean`` and ``latents_std``
    must be null (as diffusers writes them for SD 1.x/2.x VAEs): a value there means an SD3/Flux/SDXL-style
    latent normalisation our training does not apply, so ``from_config`` refuses it.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None

    weights_name = "diffusion_pytorch_model.safetensors"
    legacy_weights_name = "diffusion_flax_model.msgpack"
    model_name = "AutoencoderKL"
    config_off = {"act_fn": ("silu", "swish"), **{key: (None,) for key in LATENT_NORM_KEYS}}
    config_extra = {"_class_name": model_name, "act_fn": "silu", **{key: None for key in LATENT_NORM_KEYS}}

    # ------------------------------------------------------------------ config
    def validate(self) -> None:
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                    ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            for t in types:
                if t != allowed:
                    raise ModelError(
                        f"AutoencoderKL config {key} contains {t!r}; this model is not supported by t2i_flax "
                        f"(supported: {allowed})"
                    )
            if len(types) != n:
                raise ModelError(f"AutoencoderKL config needs one {key} entry per block_out_channels entry ({n})")
        if not isinstance(self.layers_per_block, int):
            raise ModelError(f"AutoencoderKL config layers_per_block={self.layers_per_block!r} must be an int")

    def dummy_inputs(self) -> tuple:
        """Smallest image batch for ``init``/``jax.eval_shape`` (runs encoder and decoder)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, self.in_channels, size, size), jnp.float32),)

    # ------------------------------------------------------------------ network
    def setup(self):
        self.validate()
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      attention=self.attention, dtype=self.dtype)
        self.encoder = FlaxEncoder(self.latent_channels, **common)
        self.decoder = FlaxDecoder(self.out_channels, **common)
        one = dict(kernel_size=(1, 1), padding="VALID", dtype=self.dtype)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, **one)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, **one)

    def encode(self, sample, return_dict: bool = True):
        """Image (B, C, H, W) -> posterior over latents (B, latent_channels, H/f, W/f)."""
        hidden_states = self.encoder(jnp.transpose(sample, (0, 2, 3, 1)))  # NCHW -> NHWC
        if self.use_quant_conv:
            hidden_states = self.quant_conv(hidden_states)
        posterior = FlaxDiagonalGaussianDistribution.from_moments(jnp.transpose(hidden_states, (0, 3, 1, 2)))
        if not return_dict:
            return (posterior,)
        return FlaxAutoencoderKLOutput(latent_dist=posterior)

    def decode(self, latents, return_dict: bool = True):
        """Latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""
        hidden_states = jnp.transpose(latents, (0, 2, 3, 1))  # NCHW -> NHWC
        if self.use_post_quant_conv:
            hidden_states = self.post_quant_conv(hidden_states)
        hidden_states = jnp.transpose(self.decoder(hidden_states), (0, 3, 1, 2))
        if not return_dict:
            return (hidden_states,)
        return FlaxDecoderOutput(sample=hidden_states)

    def __call__(self, sample, sample_posterior: bool = False, rng=None, return_dict: bool = True):
        """Encode then decode the posterior mode (or a sample: ``rng`` or the 'gaussian' rng stream)."""
        posterior = self.encode(sample).latent_dist
        if sample_posterior:
            latents = posterior.sample(rng if rng is not None else self.make_rng("gaussian"))
        else:
            latents = posterior.mode()
        return self.decode(latents, return_dict=return_dict)


__all__ = [
    "FlaxAutoencoderKL",
    "FlaxDiagonalGaussianDistribution",
    "FlaxAutoencoderKLOutput",
    "FlaxDecoderOutput",
    "FlaxEncoder",
    "FlaxDecoder",
    "FlaxVAEAttentionBlock",
]
