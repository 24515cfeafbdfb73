"""Stable Diffusion 1.x / 2.x / XL conditional UNet in flax.linen, numerically equal to diffusers'
PyTorch ``UNet2DConditionModel`` (diffusers 0.42) and parameter-compatible with the legacy diffusers
Flax checkpoints (``diffusion_flax_model.msgpack``).

SDXL: per-layer transformer depths (``transformer_layers_per_block`` lists of lists with
``reverse_transformer_layers_per_block``) and the ``text_time`` added conditioning (pooled text
embedding and size/crop time ids, passed as ``added_cond_kwargs``).

API: NCHW in and out (as diffusers); convolutions run NHWC inside.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from t2i_flax.errors import ModelError
from t2i_flax.models.attention import FlaxTransformer2DModel, check_implementation
from t2i_flax.models.base import PretrainedMixin, _jsonable
from t2i_flax.models.resnet import FlaxDownsample2D, FlaxResnetBlock2D, FlaxUpsample2D

# Keys written by diffusers' EMAModel.save_pretrained into an EMA UNet's config.json: bookkeeping of
# the averaging, no influence on the network. diffusers ignores them too.
EMA_CONFIG_KEYS = frozenset(
    {"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"}
)


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ModelError(f"UNet2DConditionModel config {name}={list(value)!r} must have one entry per block ({n})")
        return tuple(value)
    return (value,) * n


def _layer_depths(entry, n_layers: int, name: str) -> tuple[int, ...]:
    """One block's transformer depths, one per layer: an int for all its layers, or a list with a depth per
    layer (diffusers reads the first ``n_layers`` entries)."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return (entry,) * n_layers
    if (isinstance(entry, (list, tuple)) and len(entry) >= n_layers
            and all(isinstance(d, int) and not isinstance(d, bool) for d in entry)):
        return tuple(entry[:n_layers])
    raise ModelError(f"UNet2DConditionModel config {name} entry {_jsonable(entry)!r} is not supported by t2i_flax: "
                     f"it needs an int or a list of at least {n_layers} ints (one per layer of that block)")


def broadcast_timesteps(timesteps, batch: int):
    """A python int/float, numpy or jax array, 0-d or 1-d of length 1 or ``batch`` -> jax array (batch,)."""
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps of shape {timesteps.shape} do not match a batch of {batch}")
    return jnp.broadcast_to(timesteps.reshape(-1), (batch,))


def get_timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, max_period: int = 10000):
    """Sinusoidal timestep embedding (B,) -> (B, embedding_dim), float32, as diffusers' ``Timesteps``."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32) / (half_dim - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    if flip_sin_to_cos:
        emb = jnp.concatenate([jnp.cos(emb), jnp.sin(emb)], axis=-1)
    else:
        emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class FlaxTimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``."""

    time_embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, temb):
        temb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(temb)
        temb = nn.silu(temb)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(temb)


class _UNetBlock(nn.Module):
    """Fields and sub-module factories shared by the UNet blocks (NHWC)."""

    out_channels: int = 0
    num_layers: int = 1
    dropout: float = 0.0
    resnet_groups: int = 32
    resnet_eps: float = 1e-5
    temb_channels: int = 1280  # width of the time embedding fed to every resnet
    # cross-attention blocks only
    num_attention_heads: int = 8
    transformer_layers: Any = 1  # transformer blocks in attentions_N: an int for all N, or one int per N
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32

    def resnet(self, name, output_scale_factor=1.0):
        return FlaxResnetBlock2D(
            out_channels=self.out_channels, temb_channels=self.temb_channels, groups=self.resnet_groups,
            eps=self.resnet_eps, dropout=self.dropout, output_scale_factor=output_scale_factor, dtype=self.dtype,
            name=name,
        )

    def transformer(self, index: int):
        # the UNet's transformers run without dropout (diffusers does not pass the config's dropout)
        depth = self.transformer_layers
        return FlaxTransformer2DModel(
            in_channels=self.out_channels,
            n_heads=self.num_attention_heads,
            d_head=self.out_channels // self.num_attention_heads,
            depth=depth[index] if isinstance(depth, tuple) else depth,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
            norm_num_groups=self.resnet_groups,
            attention=self.attention,
            dtype=self.dtype,
            name=f"attentions_{index}",
        )


class FlaxDownBlock2D(_UNetBlock):
    """``resnets_N`` (each followed by ``attentions_N`` with ``has_attention``, diffusers'
    ``CrossAttnDownBlock2D``) (+ ``downsamplers_0``); returns (hidden, skip states)."""

    has_attention: bool = False
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, hidden_states, temb, encoder_hidden_states=None, deterministic: bool = True):
        output_states = ()
        for i in range(self.num_layers):
            hidden_states = self.resnet(f"resnets_{i}")(hidden_states, temb, deterministic=deterministic)
            if self.has_attention:
                hidden_states = self.transformer(i)(hidden_states, encoder_hidden_states, deterministic=deterministic)
            output_states += (hidden_states,)
        if self.add_downsample:
            hidden_states = FlaxDownsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                                             name="downsamplers_0")(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class FlaxUNetMidBlock2DCrossAttn(_UNetBlock):
    """``resnets_0``, then (``attentions_i``, ``resnets_{i+1}``) for each layer."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, hidden_states, temb, encoder_hidden_states, deterministic: bool = True):
        hidden_states = self.resnet("resnets_0", self.output_scale_factor)(hidden_states, temb,
                                                                           deterministic=deterministic)
        for i in range(self.num_layers):
            hidden_states = self.transformer(i)(hidden_states, encoder_hidden_states, deterministic=deterministic)
            hidden_states = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(
                hidden_states, temb, deterministic=deterministic)
        return hidden_states


class FlaxUpBlock2D(_UNetBlock):
    """``resnets_N`` over [hidden, skip] concatenations (each followed by ``attentions_N`` with
    ``has_attention``, diffusers' ``CrossAttnUpBlock2D``) (+ ``upsamplers_0``)."""

    has_attention: bool = False
    add_upsample: bool = True

    @nn.compact
    def __call__(self, hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states=None, upsample_size=None,
                 deterministic: bool = True):
        for i in range(self.num_layers):
            res_hidden_states, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = jnp.concatenate([hidden_states, res_hidden_states], axis=-1)
            hidden_states = self.resnet(f"resnets_{i}")(hidden_states, temb, deterministic=deterministic)
            if self.has_attention:
                hidden_states = self.transformer(i)(hidden_states, encoder_hidden_states, deterministic=deterministic)
        if self.add_upsample:
            hidden_states = FlaxUpsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(
                hidden_states, upsample_size)
        return hidden_states


@flax.struct.dataclass
class FlaxUNet2DConditionOutput:
    """``sample``: (batch, out_channels, height, width), in the module's compute dtype."""

    sample: jnp.ndarray


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _block_type(kind: str, value: str, allowed: tuple) -> str:
    """diffusers accepts a ``UNetRes`` prefix on block names (``UNetResDownBlock2D`` == ``DownBlock2D``)."""
    base = value[7:] if isinstance(value, str) and value.startswith("UNetRes") else value
    if base not in allowed:
        raise ModelError(
            f"UNet2DConditionModel config {kind} contains {value!r}; this model is not supported by t2i_flax "
            f"(supported: {', '.join(a for a in allowed if a)})"
        )
    return base


# diffusers UNet2DConditionModel config keys that must keep their "off" value here
_UNET_OFF = {
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type_num_heads": lambda v: isinstance(v, int),  # used only by addition_embed_type "text"
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    # read only by block types that are not supported here (ResnetDownsampleBlock2D, SimpleCrossAttn...):
    # any value leaves these blocks unchanged
    "resnet_out_scale_factor": lambda v: isinstance(v, (int, float)),
    "resnet_skip_time_act": lambda v: isinstance(v, bool),
    # written by the legacy diffusers FlaxUNet2DConditionModel (<= 0.39): speed knobs of its attention,
    # no effect on the numbers
    "use_memory_efficient_attention": lambda v: isinstance(v, bool),
    "split_head_dim": lambda v: isinstance(v, bool),
    # only read by UNetMidBlock2DSimpleCrossAttn, which is not supported: no effect here
    "mid_block_only_cross_attention": (None, True, False),
}

# values diffusers' to_config needs for the "off" keys
_UNET_OFF_DEFAULTS = {
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type_num_heads": 64,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "mid_block_only_cross_attention": None,
}


ADDITION_EMBED_TYPES = (None, "text_time")
SDXL_TIME_IDS = 6  # (original height, width, crop top, left, target height, width) of SDXL base


class FlaxUNet2DConditionModel(PretrainedMixin, nn.Module):
    """Conditional UNet of Stable Diffusion 1.x/2.x/XL. Fields are diffusers' config keys.

    ``__call__(sample (B, C, H, W), timesteps, encoder_hidden_states (B, L, D), train=False,
    added_cond_kwargs=None)``. ``timesteps``: python int/float, numpy or jax array, 0-d or 1-d (length 1
    or B). ``added_cond_kwargs`` (keyword only; required with ``addition_embed_type='text_time'``, SDXL,
    ignored otherwise): ``{"text_embeds": (B, D) pooled text embedding, "time_ids": (B, N)}`` with
    D + N * ``addition_time_embed_dim`` == ``projection_class_embeddings_input_dim``. With ``train``
    and ``dropout > 0`` pass ``rngs={'dropout': key}``. ``dtype`` is the compute dtype (parameters
    stay float32); ``attention`` picks the ``jax.nn.dot_product_attention`` implementation.
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1  # an int, one per block, or per block a list with one per layer
    reverse_transformer_layers_per_block: Any = None  # the up blocks' (one entry per up block), when given
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    dtype: jnp.dtype = jnp.float32
    attention: str | None = None

    weights_name = "diffusion_pytorch_model.safetensors"
    legacy_weights_name = "diffusion_flax_model.msgpack"
    model_name = "UNet2DConditionModel"
    config_off = _UNET_OFF
    config_ignored = EMA_CONFIG_KEYS
    config_extra = {"_class_name": model_name, **_UNET_OFF_DEFAULTS}

    def validate(self) -> None:
        """Raise ValueError for config values this implementation cannot run."""
        n = len(self.down_block_types)
        for t in self.down_block_types:
            _block_type("down_block_types", t, DOWN_BLOCK_TYPES)
        for t in self.up_block_types:
            _block_type("up_block_types", t, UP_BLOCK_TYPES)
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ModelError(
                f"UNet2DConditionModel config mid_block_type={self.mid_block_type!r} is not supported by t2i_flax; "
                "this model is not supported (only UNetMidBlock2DCrossAttn or null)"
            )
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ModelError(
                "UNet2DConditionModel config needs as many up_block_types and block_out_channels as "
                f"down_block_types ({n})"
            )
        if self.norm_num_groups is None:
            raise ModelError("UNet2DConditionModel config norm_num_groups=None is not supported by t2i_flax")
        check_implementation(self.attention)
        for name in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                     "num_attention_heads"):
            _per_block(getattr(self, name), n, name)
        self.transformer_depths()
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ModelError(
                f"UNet2DConditionModel config addition_embed_type={self.addition_embed_type!r} is not supported by "
                f"t2i_flax (supported: None or 'text_time')"
            )
        if self.addition_embed_type == "text_time" and not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0
                for v in (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)):
            raise ModelError(
                "UNet2DConditionModel config addition_embed_type='text_time' with "
                f"addition_time_embed_dim={self.addition_time_embed_dim!r} and projection_class_embeddings_input_dim="
                f"{self.projection_class_embeddings_input_dim!r} is not supported: it needs positive ints for both"
            )

    def transformer_depths(self) -> tuple[tuple[tuple[int, ...], ...], int | None, tuple[tuple[int, ...], ...]]:
        """Transformer blocks in each ``attentions_N``, as diffusers reads ``transformer_layers_per_block`` and
        ``reverse_transformer_layers_per_block``: (per down block one depth per layer, the mid block's depth
        (None without one), per up block one depth per layer); blocks without attention get (). The up blocks
        (one layer more than their down block) take ``reverse_transformer_layers_per_block`` when given, else
        the down blocks' entries reversed; the mid block takes the first depth of the last down block's entry."""
        n = len(self.down_block_types)
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        down = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None:
            if any(isinstance(entry, (list, tuple)) for entry in down):
                raise ModelError(
                    "UNet2DConditionModel config transformer_layers_per_block="
                    f"{_jsonable(self.transformer_layers_per_block)!r} (per-layer depths) without "
                    "reverse_transformer_layers_per_block is not supported (diffusers refuses it too)"
                )
            up = down[::-1]
        elif isinstance(reverse, (list, tuple)):
            up = _per_block(reverse, n, "reverse_transformer_layers_per_block")
        else:
            raise ModelError(f"UNet2DConditionModel config reverse_transformer_layers_per_block={reverse!r} is not "
                             f"supported by t2i_flax: it needs a list with one entry per up block ({n})")
        down_depths = tuple(
            _layer_depths(down[i], layers[i], "transformer_layers_per_block")
            if _block_type("down_block_types", t, DOWN_BLOCK_TYPES) == "CrossAttnDownBlock2D" else ()
            for i, t in enumerate(self.down_block_types))
        mid_depth = (_layer_depths(down[-1], 1, "transformer_layers_per_block")[0]
                     if self.mid_block_type is not None else None)
        up_depths = tuple(
            _layer_depths(up[i], layers[::-1][i] + 1, "reverse_transformer_layers_per_block"
                          if reverse is not None else "transformer_layers_per_block")
            if _block_type("up_block_types", t, UP_BLOCK_TYPES) == "CrossAttnUpBlock2D" else ()
            for i, t in enumerate(self.up_block_types))
        return down_depths, mid_depth, up_depths

    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers: ``attention_head_dim`` is the head COUNT when
        ``num_attention_heads`` is unset, a historical naming mistake kept for compatibility)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.down_block_types), "attention_head_dim")

    def to_config(self) -> dict:
        """diffusers ``config.json`` content that rebuilds this network in diffusers."""
        config = super().to_config()
        if self.num_attention_heads is not None:
            # diffusers 0.42 refuses num_attention_heads; attention_head_dim carries the head count
            heads = self.heads_per_block()
            config["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else list(heads)
            config["num_attention_heads"] = None
        return config

    def dummy_inputs(self) -> tuple:
        """Smallest (sample, timesteps, encoder_hidden_states) for ``init``/``jax.eval_shape``."""
        size = 2 ** (len(self.down_block_types) - 1)
        cross = self.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        sample = jnp.zeros((1, self.in_channels, size, size), jnp.float32)
        timesteps = jnp.ones((1,), jnp.int32)
        encoder_hidden_states = jnp.zeros((1, 1, cross), jnp.float32)
        return sample, timesteps, encoder_hidden_states

    def dummy_kwargs(self) -> dict:
        """``added_cond_kwargs`` for ``init``/``jax.eval_shape`` with ``text_time``: SDXL's 6 time ids (fewer
        when the projection is too narrow for them), the pooled text embedding the rest of the projection."""
        if self.addition_embed_type != "text_time":
            return {}
        n_ids = min(SDXL_TIME_IDS, self.projection_class_embeddings_input_dim // self.addition_time_embed_dim)
        text_dim = self.projection_class_embeddings_input_dim - n_ids * self.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": jnp.zeros((1, text_dim), jnp.float32),
                                      "time_ids": jnp.zeros((1, n_ids), jnp.float32)}}

    def text_time_input(self, added_cond_kwargs, batch: int):
        """diffusers' ``text_time`` input of ``add_embedding``: [text_embeds, sinusoids of each time id
        (``add_time_proj``)], (B, projection_class_embeddings_input_dim), float32."""
        if not isinstance(added_cond_kwargs, Mapping) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            given = "None" if added_cond_kwargs is None else (
                f"keys {sorted(added_cond_kwargs)}" if isinstance(added_cond_kwargs, Mapping)
                else type(added_cond_kwargs).__name__)
            raise ValueError(
                "UNet2DConditionModel config has addition_embed_type='text_time' (SDXL): pass "
                "added_cond_kwargs={'text_embeds': (B, D) pooled text embedding, 'time_ids': (B, N)} "
                f"(given: {given})"
            )
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        width = self.projection_class_embeddings_input_dim
        dim = self.addition_time_embed_dim
        if (text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch
                or time_ids.shape[0] != batch or text_embeds.shape[1] + time_ids.shape[1] * dim != width):
            raise ValueError(
                f"added_cond_kwargs text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} do "
                f"not fit a batch of {batch}: they need shapes (B, D) and (B, N) with D + N * "
                f"{dim} (addition_time_embed_dim) == {width} (projection_class_embeddings_input_dim)"
            )
        time_embeds = get_timestep_embedding(time_ids.reshape(-1), dim, self.flip_sin_to_cos, self.freq_shift)
        time_embeds = time_embeds.reshape(batch, -1)
        return jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)

    # ------------------------------------------------------------------ network
    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, train: bool = False, return_dict: bool = True, *,
                 added_cond_kwargs=None):
        self.validate()
        deterministic = not train
        n_blocks = len(self.block_out_channels)
        boc = self.block_out_channels
        heads = self.heads_per_block()
        only_cross = _per_block(self.only_cross_attention, n_blocks, "only_cross_attention")
        layers = _per_block(self.layers_per_block, n_blocks, "layers_per_block")
        down_depths, mid_depth, up_depths = self.transformer_depths()
        time_embed_dim = self.time_embedding_dim or boc[0] * 4
        common = dict(dropout=self.dropout, resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps,
                      temb_channels=time_embed_dim, dtype=self.dtype)
        attn_common = dict(use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                           attention=self.attention)

        batch = sample.shape[0]
        # diffusers passes explicit upsample sizes when H or W is not a multiple of 2^(blocks-1)
        forward_upsample_size = any(d % 2 ** (n_blocks - 1) != 0 for d in sample.shape[-2:])
        # 1. time: any python/numpy/jax scalar or vector -> (B,)
        timesteps = broadcast_timesteps(timesteps, batch)
        t_emb = get_timestep_embedding(timesteps, boc[0], self.flip_sin_to_cos, self.freq_shift)
        emb = FlaxTimestepEmbedding(time_embed_dim, dtype=self.dtype,
                                    name="time_embedding")(t_emb.astype(self.dtype))
        if self.addition_embed_type == "text_time":  # SDXL: + pooled text embedding and size/crop conditioning
            add_input = self.text_time_input(added_cond_kwargs, batch)
            emb = emb + FlaxTimestepEmbedding(time_embed_dim, dtype=self.dtype, name="add_embedding")(
                add_input.astype(self.dtype))

        # 2. pre-process: NCHW -> NHWC
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        sample = jnp.transpose(sample, (0, 2, 3, 1))
        k = self.conv_in_kernel
        sample = nn.Conv(boc[0], (k, k), padding=((k - 1) // 2, (k - 1) // 2), dtype=self.dtype,
                         name="conv_in")(sample)

        # 3. down
        res_samples = (sample,)
        for i, block_type in enumerate(self.down_block_types):
            block_type = _block_type("down_block_types", block_type, DOWN_BLOCK_TYPES)
            sample, skips = FlaxDownBlock2D(
                out_channels=boc[i], num_layers=layers[i], has_attention=block_type == "CrossAttnDownBlock2D",
                add_downsample=i < n_blocks - 1, downsample_padding=self.downsample_padding,
                num_attention_heads=heads[i], transformer_layers=down_depths[i],
                only_cross_attention=only_cross[i], name=f"down_blocks_{i}", **attn_common, **common,
            )(sample, emb, encoder_hidden_states, deterministic=deterministic)
            res_samples += skips

        # 4. mid
        if self.mid_block_type is not None:
            sample = FlaxUNetMidBlock2DCrossAttn(
                out_channels=boc[-1], num_attention_heads=heads[-1], transformer_layers=mid_depth,
                output_scale_factor=self.mid_block_scale_factor, name="mid_block", **attn_common, **common,
            )(sample, emb, encoder_hidden_states, deterministic=deterministic)

        # 5. up (skip states consumed from the end; explicit output sizes when H, W are not multiples of 2^n)
        rev_heads, rev_layers = heads[::-1], layers[::-1]
        rev_only_cross = only_cross[::-1]
        for i, block_type in enumerate(self.up_block_types):
            block_type = _block_type("up_block_types", block_type, UP_BLOCK_TYPES)
            n_res = rev_layers[i] + 1
            skips, res_samples = res_samples[-n_res:], res_samples[:-n_res]
            is_final = i == n_blocks - 1
            upsample_size = tuple(res_samples[-1].shape[1:3]) if (forward_upsample_size and not is_final) else None
            sample = FlaxUpBlock2D(
                out_channels=boc[::-1][i], num_layers=n_res, has_attention=block_type == "CrossAttnUpBlock2D",
                add_upsample=not is_final, num_attention_heads=rev_heads[i],
                transformer_layers=up_depths[i], only_cross_attention=rev_only_cross[i],
                name=f"up_blocks_{i}", **attn_common, **common,
            )(sample, skips, emb, encoder_hidden_states, upsample_size, deterministic=deterministic)

        # 6. post-process
        sample = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                              name="conv_norm_out")(sample)
        sample = nn.silu(sample)
        k = self.conv_out_kernel
        sample = nn.Conv(self.out_channels, (k, k), padding=((k - 1) // 2, (k - 1) // 2), dtype=self.dtype,
                         name="conv_out")(sample)
        sample = jnp.transpose(sample, (0, 3, 1, 2))  # NHWC -> NCHW

        if not return_dict:
            return (sample,)
        return FlaxUNet2DConditionOutput(sample=sample)


__all__ = [
    "FlaxUNet2DConditionModel",
    "FlaxUNet2DConditionOutput",
    "FlaxDownBlock2D",
    "FlaxUNetMidBlock2DCrossAttn",
    "FlaxUpBlock2D",
    "FlaxTimestepEmbedding",
    "get_timestep_embedding",
    "broadcast_timesteps",
]
