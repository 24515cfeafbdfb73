"""Residual blocks, down- and upsampling shared by the UNet and the VAE (flax.linen, NHWC).

Parameter names follow the legacy diffusers Flax layout (``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``; ``conv`` in the samplers) so old msgpack weights load.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def _conv(features: int, kernel: int, dtype, param_dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class FlaxResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> dropout -> conv, plus skip.

    ``temb_channels=None`` drops ``time_emb_proj`` (the VAE's resnets; otherwise only its presence
    matters, the Dense input width is taken from ``temb``); a 1x1 ``conv_shortcut`` is created when
    the input channel count differs from ``out_channels`` (or ``use_in_shortcut`` forces it).
    Input and output are NHWC.
    """

    out_channels: int
    temb_channels: int | None = 512
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, temb=None, deterministic: bool = True):
        in_channels = hidden_states.shape[-1]
        out_channels = self.out_channels
        groups_out = self.groups_out or self.groups
        residual = hidden_states

        h = nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm1")(hidden_states)
        h = nn.silu(h)
        h = _conv(out_channels, 3, self.dtype, self.param_dtype, "conv1")(h)

        if self.temb_channels is not None:
            if temb is None:
                raise ValueError("FlaxResnetBlock2D built with temb_channels needs a time embedding")
            t = nn.Dense(out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]  # (B, C) -> (B, 1, 1, C)

        h = nn.GroupNorm(num_groups=groups_out, epsilon=self.eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm2")(h)
        h = nn.silu(h)
        h = nn.Dropout(rate=self.dropout, name="dropout")(h, deterministic=deterministic)
        h = _conv(out_channels, 3, self.dtype, self.param_dtype, "conv2")(h)

        use_shortcut = in_channels != out_channels if self.use_in_shortcut is None else self.use_in_shortcut
        if use_shortcut:
            residual = _conv(out_channels, 1, self.dtype, self.param_dtype, "conv_shortcut",
                             padding=((0, 0), (0, 0)))(residual)

        out = residual + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class FlaxDownsample2D(nn.Module):
    """Stride-2 3x3 convolution (submodule ``conv``), NHWC.

    ``padding=1`` pads one pixel on every side (the UNet). ``padding=0`` reproduces diffusers'
    ``Downsample2D(padding=0)`` used by the VAE encoder: zero-pad one pixel at the bottom and right
    only, then an unpadded convolution.
    """

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        if self.padding == 0:
            pad = ((0, 1), (0, 1))
        else:
            p = self.padding
            pad = ((p, p), (p, p))
        return _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                     padding=pad)(hidden_states)


def nearest_resize(hidden_states, output_size: tuple[int, int] | None = None):
    """Nearest-neighbour upsampling of NHWC; x2 by default, else to ``output_size`` (PyTorch 'nearest')."""
    batch, height, width, channels = hidden_states.shape
    if output_size is None or tuple(output_size) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(hidden_states, 2, axis=1), 2, axis=2)
    out_h, out_w = output_size
    # PyTorch mode='nearest': source index = floor(dst * in / out)
    rows = jnp.floor(jnp.arange(out_h) * (height / out_h)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(out_w) * (width / out_w)).astype(jnp.int32)
    return hidden_states[:, rows][:, :, cols]


class FlaxUpsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``) followed by a 3x3 ``conv``, NHWC."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, output_size: tuple[int, int] | None = None):
        hidden_states = nearest_resize(hidden_states, output_size)
        return _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(hidden_states)


__all__ = ["FlaxResnetBlock2D", "FlaxDownsample2D", "FlaxUpsample2D", "nearest_resize"]
