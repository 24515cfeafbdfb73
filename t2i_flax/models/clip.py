"""CLIP text encoder (flax.linen), numerically equal to transformers' PyTorch `CLIPTextModel`.

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

The forward pass: token + position embeddings -> pre-LayerNorm transformer layers with causal
self-attention (plus an optional padding mask) -> final LayerNorm -> `last_hidden_state`;
`pooler_output` is the final hidden state at the end-of-text token, chosen as transformers 5 does.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t2i_flax.models.base import PretrainedMixin, reject_unsupported

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


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
    "model_type": "clip_text_model",
    "architectures": (None, ["CLIPTextModel"]),
    "pruned_heads": ({}, None),
}


@flax.struct.dataclass
class CLIPTextOutput:
    """`last_hidden_state` (batch, seq, hidden) after the final LayerNorm; `pooler_output` (batch, hidden)
    is its row at the end-of-text token."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array


def _dense(features: int, std: float, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance (as torch): CLIP's residual stream has large per-channel means.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class FlaxCLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dropout: float = 0.0
    num_layers: int = 1
    initializer_factor: float = 1.0
    attention: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        batch, seq, _ = hidden_states.shape
        head_dim = self.hidden_size // self.num_heads
        in_std = self.hidden_size ** -0.5 * (2 * self.num_layers) ** -0.5 * self.initializer_factor
        out_std = self.hidden_size ** -0.5 * self.initializer_factor
        # (B, S, hidden) -> (B, S, heads, head_dim)
        q = _dense(self.hidden_size, in_std, self.dtype, "q_proj")(hidden_states).reshape(batch, seq, self.num_heads, head_dim)
        k = _dense(self.hidden_size, in_std, self.dtype, "k_proj")(hidden_states).reshape(batch, seq, self.num_heads, head_dim)
        v = _dense(self.hidden_size, in_std, self.dtype, "v_proj")(hidden_states).reshape(batch, seq, self.num_heads, head_dim)

        if train and self.dropout > 0.0:
            # jax.nn.dot_product_attention has no dropout on the probabilities: spell it out.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
            allowed = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
            if padding_mask is not None:
                allowed = allowed & padding_mask
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            probs = nn.Dropout(rate=self.dropout)(probs, deterministic=False)
            out = jnp.einsum("bnts,bsnh->btnh", probs, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=padding_mask, is_causal=True,
                                               implementation=self.attention)
        if padding_mask is not None:
            # A query with no key to attend to (left padding: causal + padded keys) gets a zero output,
            # as transformers' default SDPA path (torch >= 2.5) gives; the XLA softmax would average all keys.
            has_key = jnp.cumsum(padding_mask[:, 0, 0, :].astype(jnp.int32), axis=-1) > 0  # (B, T)
            out = out * has_key[:, :, None, None].astype(out.dtype)
        out = out.reshape(batch, seq, self.hidden_size)
        return _dense(self.hidden_size, out_std, self.dtype, "out_proj")(out)


class FlaxCLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    num_layers: int = 1
    initializer_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        fc1_std = (2 * self.hidden_size) ** -0.5 * self.initializer_factor
        fc2_std = self.hidden_size ** -0.5 * (2 * self.num_layers) ** -0.5 * self.initializer_factor
        h = _dense(self.intermediate_size, fc1_std, self.dtype, "fc1")(hidden_states)
        h = ACTIVATIONS[self.hidden_act](h)
        return _dense(self.hidden_size, fc2_std, self.dtype, "fc2")(h)


class FlaxCLIPEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float = 0.0
    num_layers: int = 1
    initializer_factor: float = 1.0
    attention: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(hidden_states)
        h = FlaxCLIPAttention(self.hidden_size, self.num_heads, self.attention_dropout, self.num_layers,
                              self.initializer_factor, self.attention, self.dtype, name="self_attn")(
            h, padding_mask, train)
        hidden_states = hidden_states + h
        h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(hidden_states)
        h = FlaxCLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.num_layers,
                        self.initializer_factor, self.dtype, name="mlp")(h)
        return hidden_states + h


class FlaxCLIPLayerCollection(nn.Module):
    """Holds the layers as children named "0", "1", ... (transformers' Flax naming: `layers/0`)."""

    layer_kwargs: dict
    num_layers: int

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        for i in range(self.num_layers):
            hidden_states = FlaxCLIPEncoderLayer(**self.layer_kwargs, num_layers=self.num_layers, name=str(i))(
                hidden_states, padding_mask, train)
        return hidden_states


class FlaxCLIPEncoder(nn.Module):
    layer_kwargs: dict
    num_layers: int

    @nn.compact
    def __call__(self, hidden_states, padding_mask=None, train: bool = False):
        return FlaxCLIPLayerCollection(self.layer_kwargs, self.num_layers, name="layers")(
            hidden_states, padding_mask, train)


class FlaxCLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    initializer_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids):
        init = nn.initializers.normal(0.02 * self.initializer_factor)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                          embedding_init=init, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             param_dtype=jnp.float32, embedding_init=init, name="position_embedding")(position_ids)
        return tokens + positions


class FlaxCLIPTextModel(PretrainedMixin, nn.Module):
    """transformers' `CLIPTextModel` (no projection). Fields are `CLIPTextConfig`'s names and defaults;
    `dtype` is the computation dtype (parameters stay float32); `attention` is passed to
    `jax.nn.dot_product_attention(implementation=...)` (None / 'xla' / 'cudnn').

    `apply({'params': params}, input_ids, attention_mask=None, position_ids=None, train=False)` ->
    `CLIPTextOutput` (or the tuple (last_hidden_state, pooler_output) with `return_dict=False`).
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
    config_name = "config.json"
    # transformers 4.x (all SD hub checkpoints) prefixes every tensor key with this; transformers 5's
    # CLIPTextModel.save_pretrained writes the keys without it (and loads both).
    base_model_prefix = "text_model"

    _CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                    "attention_dropout", "initializer_range", "initializer_factor", "pad_token_id",
                    "bos_token_id", "eos_token_id")

    # -- config -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, attention: str | None = None) -> "FlaxCLIPTextModel":
        """A transformers `CLIPTextConfig` dict (config.json) -> module. Raises ValueError naming any
        key or value we cannot honour (wrong model_type, unsupported hidden_act, ...)."""
        relevant = {k: v for k, v in config.items() if k not in _IRRELEVANT_KEYS}
        kept = reject_unsupported(relevant, set(cls._CONFIG_KEYS), _INERT_KEYS, "CLIP text encoder")
        eos = kept.get("eos_token_id", 49407)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"CLIP text encoder config has eos_token_id={eos!r}; t2i_flax supports one id")
            kept["eos_token_id"] = eos[0]
        if kept.get("attention_dropout", 0.0) is None:
            kept["attention_dropout"] = 0.0
        module = cls(**kept, dtype=dtype, attention=attention)
        module.validate()
        return module

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text encoder config has hidden_act={self.hidden_act!r}, which t2i_flax does "
                             f"not support (supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP text encoder hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.layer_norm_eps is None:
            raise ValueError("CLIP text encoder config has layer_norm_eps=None; a number is needed")
        if self.eos_token_id is None:
            raise ValueError("CLIP text encoder config has eos_token_id=None; it is needed for pooler_output")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {self.attention!r} is not supported; "
                             f"use one of {ATTENTION_IMPLEMENTATIONS}")

    def to_config(self) -> dict:
        """config.json that transformers 5 `CLIPTextModel.from_pretrained` loads into the same model."""
        config = {key: getattr(self, key) for key in self._CONFIG_KEYS}
        config.update(architectures=["CLIPTextModel"], model_type="clip_text_model",
                      dtype="float32")  # the parameters (what save_pretrained writes) are float32
        return config

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),)

    # -- forward ------------------------------------------------------------------------------

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, train: bool = False,
                 return_dict: bool = True):
        self.validate()
        settings = _TextSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(_TextSettings)})
        return FlaxCLIPTextTransformer(settings, name="text_model")(
            input_ids, attention_mask, position_ids, train, return_dict)


@dataclasses.dataclass(frozen=True)
class _TextSettings:
    """The fields of FlaxCLIPTextModel that FlaxCLIPTextTransformer needs (a plain value, not a Module)."""

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


class FlaxCLIPTextTransformer(nn.Module):
    """The `text_model` scope: embeddings, encoder, final_layer_norm and EOS pooling."""

    config: _TextSettings

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, train: bool = False,
                 return_dict: bool = True):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        seq = input_ids.shape[-1]
        input_ids = input_ids.reshape(-1, seq)  # as transformers: any leading dims -> one batch dim
        if seq > c.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings={c.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None, :]
        hidden_states = FlaxCLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size,
                                               c.initializer_factor, c.dtype, name="embeddings")(
            input_ids, position_ids)

        padding_mask = None
        if attention_mask is not None:
            # (B, S) with 1 = attend -> (B, 1, 1, S) boolean, broadcast over heads and queries.
            padding_mask = jnp.asarray(attention_mask).reshape(-1, seq).astype(bool)[:, None, None, :]

        layer_kwargs = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_heads=c.num_attention_heads, hidden_act=c.hidden_act,
                            layer_norm_eps=c.layer_norm_eps, attention_dropout=c.attention_dropout,
                            initializer_factor=c.initializer_factor, attention=c.attention, dtype=c.dtype)
        hidden_states = FlaxCLIPEncoder(layer_kwargs, c.num_hidden_layers, name="encoder")(
            hidden_states, padding_mask, train)
        last_hidden_state = _layer_norm(c.layer_norm_eps, c.dtype, "final_layer_norm")(hidden_states)

        if c.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773) carry eos_token_id=2: the end-of-text
            # token is then taken to be the highest id in each sequence (first one on ties).
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            # First position holding eos_token_id (0 when there is none, as transformers).
            eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last_hidden_state, eos_index[:, None, None], axis=1)[:, 0]

        if not return_dict:
            return last_hidden_state, pooled
        return CLIPTextOutput(last_hidden_state=last_hidden_state, pooler_output=pooled)
