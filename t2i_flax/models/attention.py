"""Attention layers of the Stable Diffusion UNet (flax.linen).

Submodule names are the legacy diffusers Flax names (``query``/``key``/``value``/``proj_attn``,
``net_0``/``net_2``, ``transformer_blocks_N``...) so that old ``diffusion_flax_model.msgpack`` trees load.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def check_implementation(implementation: str | None) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; use one of {ATTENTION_IMPLEMENTATIONS}"
        )


def dot_product_attention(query, key, value, implementation: str | None = None, mask=None, is_causal: bool = False):
    """Multi-head softmax(q k^T / sqrt(d)) v.

    Layout (batch, seq, heads, head_dim) for all three inputs and the output. ``implementation``:
    'xla' is the portable einsum/softmax path (logits and softmax in float32
    whatever the input dtype), 'cudnn' is the fused GPU kernel (bf16/fp16 inputs, head_dim a
    multiple of 8 and <= 256 on Hopper). None means JAX's default, which in jax 0.10 is the XLA path.
    ``mask`` (boolean, broadcast to (batch, heads, q_seq, kv_seq), True = attend) and ``is_causal``
    are passed on to ``jax.nn.dot_product_attention``.
    """
    check_implementation(implementation)
    return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                        implementation=implementation)


class FlaxAttention(nn.Module):
    """Multi-head (self or cross) attention: ``query``/``key``/``value`` without bias, ``proj_attn`` with.

    ``upcast_attention`` (SD 2.x): logits and softmax in float32 when ``dtype`` is bf16/fp16. Both
    backends always do this already: ``jax.nn.dot_product_attention``'s XLA path accumulates q.k in
    float32 (``preferred_element_type``) and casts the logits to float32 before the softmax, and the
    cuDNN kernel keeps its softmax in float32. The field is kept for config fidelity.
    """

    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    upcast_attention: bool = False
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, context=None, deterministic: bool = True):
        query_dim = hidden_states.shape[-1]
        inner_dim = self.heads * self.dim_head
        context = hidden_states if context is None else context

        def dense(features, name, use_bias):
            return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q = dense(inner_dim, "query", False)(hidden_states)
        k = dense(inner_dim, "key", False)(context)
        v = dense(inner_dim, "value", False)(context)

        batch = hidden_states.shape[0]
        # (B, S, heads*head_dim) -> (B, S, heads, head_dim)
        q = q.reshape(batch, -1, self.heads, self.dim_head)
        k = k.reshape(batch, -1, self.heads, self.dim_head)
        v = v.reshape(batch, -1, self.heads, self.dim_head)
        out = dot_product_attention(q, k, v, self.attention)
        out = out.reshape(batch, -1, inner_dim)

        out = dense(query_dim, "proj_attn", True)(out)
        if self.dropout > 0.0:
            out = nn.Dropout(rate=self.dropout, name="dropout_layer")(out, deterministic=deterministic)
        return out


class FlaxGEGLU(nn.Module):
    """Gated GELU: ``proj`` to 2*inner, split, ``x * gelu(gate)`` (exact erf GELU, as torch's F.gelu)."""

    dim_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        h = nn.Dense(self.dim_out * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(hidden_states)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FlaxFeedForward(nn.Module):
    """GEGLU (``net_0``) to ``mult`` x width, dropout, Dense back (``net_2``)."""

    mult: int = 4
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, deterministic: bool = True):
        dim = hidden_states.shape[-1]
        h = FlaxGEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(hidden_states)
        if self.dropout > 0.0:
            h = nn.Dropout(rate=self.dropout, name="net_1")(h, deterministic=deterministic)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class FlaxBasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (``attn1``), cross-attention (``attn2``) and GEGLU feed-forward (``ff``).

    ``only_cross_attention``: ``attn1`` attends to the context too.
    """

    dim: int
    n_heads: int
    d_head: int
    dropout: float = 0.0
    only_cross_attention: bool = False
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, context, deterministic: bool = True):
        def attn(name):
            return FlaxAttention(
                heads=self.n_heads, dim_head=self.d_head, dropout=self.dropout,
                upcast_attention=self.upcast_attention, attention=self.attention,
                dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            )

        def norm(name):
            return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        h = norm("norm1")(hidden_states)
        h = attn("attn1")(h, context if self.only_cross_attention else None, deterministic=deterministic)
        hidden_states = hidden_states + h

        h = attn("attn2")(norm("norm2")(hidden_states), context, deterministic=deterministic)
        hidden_states = hidden_states + h

        h = FlaxFeedForward(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(
            norm("norm3")(hidden_states), deterministic=deterministic
        )
        return hidden_states + h


class FlaxTransformer2DModel(nn.Module):
    """GroupNorm -> ``proj_in`` -> N transformer blocks -> ``proj_out`` -> + residual, on NHWC input.

    ``use_linear_projection``: ``proj_in``/``proj_out`` are Dense on the flattened tokens, else 1x1 convs.
    """

    in_channels: int
    n_heads: int
    d_head: int
    depth: int = 1
    dropout: float = 0.0
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    attention: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, context, deterministic: bool = True):
        batch, height, width, channels = hidden_states.shape
        inner_dim = self.n_heads * self.d_head
        residual = hidden_states

        h = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=1e-6, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(hidden_states)
        if self.use_linear_projection:
            h = h.reshape(batch, height * width, channels)
            h = nn.Dense(inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_in")(h)
        else:
            h = nn.Conv(inner_dim, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                        param_dtype=self.param_dtype, name="proj_in")(h)
            h = h.reshape(batch, height * width, inner_dim)

        for i in range(self.depth):
            h = FlaxBasicTransformerBlock(
                inner_dim, self.n_heads, self.d_head, dropout=self.dropout,
                only_cross_attention=self.only_cross_attention, upcast_attention=self.upcast_attention,
                attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, deterministic=deterministic)

        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_out")(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = h.reshape(batch, height, width, inner_dim)
            h = nn.Conv(channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                        param_dtype=self.param_dtype, name="proj_out")(h)
        return h + residual
