"""CLIP text encoders (flax.linen), numerically equal to transformers' PyTorch `CLIPTextModel` and
`CLIPTextModelWithProjection` (SDXL's second text encoder).

Parameter tree (the names of the removed transformers 4.x Flax class, so old `flax_model.msgpack` files
load as they are; `t2i_flax.weights` maps them to PyTorch keys such as
`text_model.encoder.layers.0.self_attn.q_proj.weight`):

    text_model/embeddings/token_embedding/embedding           (vocab_size, hidden_size)
    text_model/embeddings/position_embedding/embedding        (max_position_embeddings, hidden_size)
    text_model/encoder/layers/<i>/layer_norm1/{scale,bias}
    text_model/encoder/layers/<i>/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}
    text_model/encoder/layers/<i>/layer_norm2/{scale,bias}
    text_model/encoder/layers/<i>/mlp/{fc1,fc2}/{kernel,bias}
    text_model/final_layer_norm/{scale,bias}
    text_projection/kernel                                    (hidden_size, projection_dim), WithProjection only

The forward pass: token + position embeddings -> pre-LayerNorm transformer layers with causal
self-attention (plus an optional padding mask) -> final LayerNorm -> `last_hidden_state`;
`pooler_output` is the final hidden state at the end-of-text token, chosen as transformers 5 does;
`text_embeds` (WithProjection) is its projection. With `output_hidden_states=True` both classes also return
`hidden_states`, transformers' tuple: the embeddings' output, then every layer's output (the last one before
the final LayerNorm), so `hidden_states[-2]` is SDXL's penultimate-layer conditioning.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t2i_flax.errors import ModelError
from t2i_flax.models.attention import check_implementation, dot_product_attention
from t2i_flax.models.base import PretrainedMixin


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names -> the same function. gelu_new and gelu_pytorch_tanh are both the tanh
# approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}

# Config keys transformers writes (now or in 4.x) that cannot change what the text encoder computes,
# whatever their value: bookkeeping, output-format flags, classification-head labels, generation
# settings of the old PretrainedConfig. (`dropout` is a 4.x CLIPTextConfig argument the model never used.)
_IRRELEVANT_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_bfloat16", "torchscript", "return_dict",
    "output_hidden_states", "output_attentions", "output_scores", "return_dict_in_generate",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "dropout", "chunk_size_feed_forward", "tie_word_embeddings", "use_cache",
    "gradient_checkpointing", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
})
# Keys accepted only with a value that changes nothing here.
_INERT_KEYS = {
    "model_type": ("clip_text_model",),
    "architectures": (None, ["CLIPTextModel"]),
    "pruned_heads": ({}, None),
}
# WithProjection: a CLIPTextModel config names a checkpoint without text_projection.weight.
_INERT_KEYS_WITH_PROJECTION = {**_INERT_KEYS, "architectures": (None, ["CLIPTextModelWithProjection"])}


@flax.struct.dataclass
class CLIPTextOutput:
    """`last_hidden_state` (batch, seq, hidden) after the final LayerNorm; `pooler_output` (batch, hidden)
    is its row at the end-of-text token; `hidden_states` (only with output_hidden_states=True, else None):
    num_hidden_layers + 1 arrays (batch, seq, hidden), the embeddings' output then each layer's."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class CLIPTextProjectionOutput:
    """transformers' `CLIPTextModelOutput`: `text_embeds` (batch, projection_dim) is the projected pooled
    output; `last_hidden_state` and `hidden_states` as in `CLIPTextOutput`."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _dense(features: int, std: float, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance (as torch): CLIP's residual stream has large per-channel means.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


@dataclasses.dataclass(frozen=True)
class _TextSettings:
    """The fields of FlaxCLIPTextModel that its submodules need (a plain value, not a Module)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float
    initializer_factor: float
    eos_token_id: int
    dtype: Any
    attention: str | None


class FlaxCLIPAttention(nn.Module):
    config: _TextSettings

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        c = self.config
        batch, seq, _ = hidden_states.shape
        head_dim = c.hidden_size // c.num_attention_heads
        in_std = c.hidden_size ** -0.5 * (2 * c.num_hidden_layers) ** -0.5 * c.initializer_factor
        out_std = c.hidden_size ** -0.5 * c.initializer_factor

        def proj(name):  # (B, S, hidden) -> (B, S, heads, head_dim)
            return _dense(c.hidden_size, in_std, c.dtype, name)(hidden_states).reshape(
                batch, seq, c.num_attention_heads, head_dim)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        if train and c.attention_dropout > 0.0:
            # jax.nn.dot_product_attention has no dropout on the probabilities: spell it out.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
            allowed = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
            if padding_mask is not None:
                allowed = allowed & padding_mask
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            probs = nn.Dropout(rate=c.attention_dropout)(probs, deterministic=False)
            out = jnp.einsum("bnts,bsnh->btnh", probs, v)
        else:
            out = dot_product_attention(q, k, v, c.attention, mask=padding_mask, is_causal=True)
        if padding_mask is not None:
            # A query with no key to attend to (left padding: causal + padded keys) gets a zero output,
            # as transformers' default SDPA path (torch >= 2.5) gives; the XLA softmax would average all keys.
            has_key = jnp.cumsum(padding_mask[:, 0, 0, :].astype(jnp.int32), axis=-1) > 0  # (B, T)
            out = out * has_key[:, :, None, None].astype(out.dtype)
        out = out.reshape(batch, seq, c.hidden_size)
        return _dense(c.hidden_size, out_std, c.dtype, "out_proj")(out)


class FlaxCLIPMLP(nn.Module):
    config: _TextSettings

    @nn.compact
    def __call__(self, hidden_states):
        c = self.config
        fc1_std = (2 * c.hidden_size) ** -0.5 * c.initializer_factor
        fc2_std = c.hidden_size ** -0.5 * (2 * c.num_hidden_layers) ** -0.5 * c.initializer_factor
        h = _dense(c.intermediate_size, fc1_std, c.dtype, "fc1")(hidden_states)
        h = ACTIVATIONS[c.hidden_act](h)
        return _dense(c.hidden_size, fc2_std, c.dtype, "fc2")(h)


class FlaxCLIPEncoderLayer(nn.Module):
    config: _TextSettings

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        c = self.config
        h = _layer_norm(c.layer_norm_eps, c.dtype, "layer_norm1")(hidden_states)
        hidden_states = hidden_states + FlaxCLIPAttention(c, name="self_attn")(h, padding_mask, train)
        h = _layer_norm(c.layer_norm_eps, c.dtype, "layer_norm2")(hidden_states)
        return hidden_states + FlaxCLIPMLP(c, name="mlp")(h)


class FlaxCLIPLayerCollection(nn.Module):
    """Holds the layers as children named "0", "1", ... (transformers' Flax naming: `layers/0`).
    Returns (last layer's output, (its input, every layer's output) or None)."""

    config: _TextSettings

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False, output_hidden_states: bool = False):
        all_states = [hidden_states]
        for i in range(self.config.num_hidden_layers):
            hidden_states = FlaxCLIPEncoderLayer(self.config, name=str(i))(hidden_states, padding_mask, train)
            all_states.append(hidden_states)
        return hidden_states, (tuple(all_states) if output_hidden_states else None)


class FlaxCLIPEncoder(nn.Module):
    config: _TextSettings

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False, output_hidden_states: bool = False):
        return FlaxCLIPLayerCollection(self.config, name="layers")(hidden_states, padding_mask, train,
                                                                   output_hidden_states)


class FlaxCLIPTextEmbeddings(nn.Module):
    config: _TextSettings

    @nn.compact
    def __call__(self, input_ids, position_ids):
        c = self.config
        init = nn.initializers.normal(0.02 * c.initializer_factor)
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=jnp.float32,
                          embedding_init=init, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=c.dtype,
                             param_dtype=jnp.float32, embedding_init=init, name="position_embedding")(position_ids)
        return tokens + positions


class FlaxCLIPTextModel(PretrainedMixin, nn.Module):
    """transformers' `CLIPTextModel` (no projection). Fields are `CLIPTextConfig`'s names and defaults;
    `dtype` is the computation dtype (parameters stay float32); `attention` is passed to
    `jax.nn.dot_product_attention(implementation=...)` (None / 'xla' / 'cudnn').

    `apply({'params': params}, input_ids, attention_mask=None, position_ids=None, train=False,
    output_hidden_states=False)` -> `CLIPTextOutput` (or, with `return_dict=False`, the tuple
    (last_hidden_state, pooler_output), plus hidden_states when asked for, as transformers' to_tuple).
    `attention_dropout` is applied only with `train=True` (needs a 'dropout' rng)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512  # for CLIPTextModelWithProjection only; kept for config round trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02  # unused by transformers' CLIP init too; kept for round trips
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    dtype: Any = jnp.float32
    attention: str | None = None

    weights_name = "model.safetensors"
    legacy_weights_name = "flax_model.msgpack"
    # transformers 4.x (all SD hub checkpoints) prefixes every tensor key with this; transformers 5's
    # CLIPTextModel.save_pretrained writes the keys without it (and loads both).
    base_model_prefix = "text_model"
    model_name = "CLIP text encoder"
    config_off = _INERT_KEYS
    config_ignored = _IRRELEVANT_KEYS
    # config.json that transformers 5 `CLIPTextModel.from_pretrained` loads into the same model
    # (the parameters, what save_pretrained writes, are float32)
    config_extra = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "dtype": "float32"}

    # -- config -------------------------------------------------------------------------------

    @classmethod
    def normalize_config(cls, kwargs: dict) -> dict:
        eos = kwargs.get("eos_token_id", 49407)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ModelError(f"CLIP text encoder config has eos_token_id={list(eos)!r}; t2i_flax supports one id")
            kwargs["eos_token_id"] = eos[0]
        if kwargs.get("attention_dropout", 0.0) is None:
            kwargs["attention_dropout"] = 0.0
        return kwargs

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ModelError(f"CLIP text encoder config has hidden_act={self.hidden_act!r}, which t2i_flax does "
                             f"not support (supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ModelError(f"CLIP text encoder hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.layer_norm_eps is None:
            raise ModelError("CLIP text encoder config has layer_norm_eps=None; a number is needed")
        if self.eos_token_id is None:
            raise ModelError("CLIP text encoder config has eos_token_id=None; it is needed for pooler_output")
        check_implementation(self.attention)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),)

    def text_settings(self) -> _TextSettings:
        return _TextSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(_TextSettings)})

    # -- forward ------------------------------------------------------------------------------

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, train: bool = False,
                 return_dict: bool = True, output_hidden_states: bool = False):
        self.validate()
        out = FlaxCLIPTextTransformer(self.text_settings(), name="text_model")(
            input_ids, attention_mask, position_ids, train, output_hidden_states)
        if not return_dict:
            return (out.last_hidden_state, out.pooler_output) + ((out.hidden_states,) if output_hidden_states else ())
        return out


class FlaxCLIPTextModelWithProjection(FlaxCLIPTextModel):
    """transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): `FlaxCLIPTextModel` plus
    `text_projection`, a Dense (hidden_size -> projection_dim) without bias applied to the pooled output.

    `apply({'params': params}, input_ids, attention_mask=None, position_ids=None, train=False,
    output_hidden_states=False)` -> `CLIPTextProjectionOutput` (or, with `return_dict=False`, the tuple
    (text_embeds, last_hidden_state), plus hidden_states when asked for). The tensor keys are
    `text_model.*` and `text_projection.weight`, in transformers 4.x and 5 files alike."""

    model_name = "CLIP text encoder with projection"
    config_off = _INERT_KEYS_WITH_PROJECTION
    config_extra = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
                    "dtype": "float32"}

    def validate(self) -> None:
        super().validate()
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) \
                or self.projection_dim <= 0:
            raise ModelError(f"CLIP text encoder with projection config has projection_dim={self.projection_dim!r}; "
                             "a positive integer is needed")

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, train: bool = False,
                 return_dict: bool = True, output_hidden_states: bool = False):
        self.validate()
        out = FlaxCLIPTextTransformer(self.text_settings(), name="text_model")(
            input_ids, attention_mask, position_ids, train, output_hidden_states)
        init = nn.initializers.normal(self.hidden_size ** -0.5 * self.initializer_factor)
        text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=init, name="text_projection")(out.pooler_output)
        if not return_dict:
            return (text_embeds, out.last_hidden_state) + ((out.hidden_states,) if output_hidden_states else ())
        return CLIPTextProjectionOutput(text_embeds=text_embeds, last_hidden_state=out.last_hidden_state,
                                        hidden_states=out.hidden_states)


class FlaxCLIPTextTransformer(nn.Module):
    """The `text_model` scope: embeddings, encoder, final_layer_norm and EOS pooling."""

    config: _TextSettings

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, train: bool = False,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        c = self.config
        input_ids = jnp.asarray(input_ids)
        seq = input_ids.shape[-1]
        input_ids = input_ids.reshape(-1, seq)  # as transformers: any leading dims -> one batch dim
        if seq > c.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings={c.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None, :]
        hidden_states = FlaxCLIPTextEmbeddings(c, name="embeddings")(input_ids, position_ids)

        padding_mask = None
        if attention_mask is not None:
            # (B, S) with 1 = attend -> (B, 1, 1, S) boolean, broadcast over heads and queries.
            padding_mask = jnp.asarray(attention_mask).reshape(-1, seq).astype(bool)[:, None, None, :]

        hidden_states, all_states = FlaxCLIPEncoder(c, name="encoder")(hidden_states, padding_mask, train,
                                                                       output_hidden_states)
        last_hidden_state = _layer_norm(c.layer_norm_eps, c.dtype, "final_layer_norm")(hidden_states)

        if c.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773) carry eos_token_id=2: the end-of-text
            # token is then taken to be the highest id in each sequence (first one on ties).
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            # First position holding eos_token_id (0 when there is none, as transformers).
            eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last_hidden_state, eos_index[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states)
