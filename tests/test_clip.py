"""FlaxCLIPTextModel against transformers 5's PyTorch CLIPTextModel (the oracle), on tiny random models
saved with `save_pretrained` and loaded through our `from_pretrained`."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.activations import ACT2FN

from oracle import rel_err
from t2i_flax import weights
from t2i_flax.models.clip import ACTIVATIONS, FlaxCLIPTextModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
            max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
REAL_EOS = 500  # a real id: sequences hold larger ids, so "first eos" and "argmax" pick different tokens
# float32, max abs error / max abs torch output. Measured on CPU: last_hidden_state 3.5e-7..5.0e-7 and
# pooler_output 2.0e-7..3.3e-7 over the four (hidden_act, eos) variants with and without mask, position ids
# 4.5e-7/4.2e-7, transformers 5 layout 4.6e-7/3.2e-7, the legacy fixture's stored PyTorch outputs 4.2e-7/3.6e-7.
F32_TOL = 1e-5
BF16_TOL = 5e-2  # bf16 compute (params float32, 8-bit mantissa activations); measured ~1.7e-2


def make_torch_model(hidden_act: str, eos_token_id: int, seed: int = 0, **overrides) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**{**TINY, **overrides}, hidden_act=hidden_act,
                                         eos_token_id=eos_token_id)).eval()
    with torch.no_grad():  # LayerNorms away from the identity, so that a mix-up of scale/bias shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def with_text_model_prefix(src: str, dst: str) -> str:
    """The transformers 4.x layout (every SD Hub checkpoint): keys `text_model.embeddings...`."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in state.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """(hidden_act, eos_token_id) -> (torch model, folder written by transformers 5, folder in 4.x layout)."""
    cache = {}

    def get(hidden_act, eos_token_id):
        key = (hidden_act, eos_token_id)
        if key not in cache:
            model = make_torch_model(hidden_act, eos_token_id)
            native = str(tmp_path_factory.mktemp(f"clip_{hidden_act}_{eos_token_id}"))
            model.save_pretrained(native)
            cache[key] = (model, native, with_text_model_prefix(native, native + "_v4"))
        return cache[key]

    return get


def make_inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(4, 16)).astype(np.int64)
    ids[ids == REAL_EOS] = 3
    ids[0, 5] = REAL_EOS
    ids[1, [3, 11]] = REAL_EOS  # two eos: the first counts
    ids[2, 14] = REAL_EOS
    ids[3, 9] = 999  # no eos at all: transformers pools position 0
    ids[0, [7, 12]] = 999  # ties for the max: argmax takes the first
    # right padding on rows 0 and 2, none on row 1, left padding on row 3 (its first queries see no key)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    mask[2, 15:] = 0
    mask[3, :4] = 0
    return ids, mask


def torch_forward(model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                    position_ids=None if position_ids is None else torch.tensor(position_ids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def flax_forward(module, params, ids, mask=None, **kwargs):
    fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, **kwargs))
    out = fn(params, jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask, jnp.int32))
    return np.asarray(out.last_hidden_state, np.float32), np.asarray(out.pooler_output, np.float32), out


def test_inputs_tell_the_two_pooling_rules_apart():
    ids, _ = make_inputs()
    first_eos = (ids == REAL_EOS).argmax(-1)
    assert list(first_eos) == [5, 3, 14, 0]
    assert (ids.argmax(-1) != first_eos).all()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, REAL_EOS])
def test_matches_transformers(saved_models, hidden_act, eos_token_id):
    torch_model, _, folder = saved_models(hidden_act, eos_token_id)
    module, params = FlaxCLIPTextModel.from_pretrained(folder)
    assert (module.hidden_act, module.eos_token_id) == (hidden_act, eos_token_id)
    ids, mask = make_inputs()
    for attention_mask in (None, mask):
        want_hidden, want_pooled = torch_forward(torch_model, ids, attention_mask)
        hidden, pooled, _ = flax_forward(module, params, ids, attention_mask)
        assert rel_err(hidden, want_hidden) <= F32_TOL, (attention_mask is not None, rel_err(hidden, want_hidden))
        assert rel_err(pooled, want_pooled) <= F32_TOL, (attention_mask is not None, rel_err(pooled, want_pooled))
    # pooler_output is the row at the position transformers' rule picks
    index = ids.argmax(-1) if eos_token_id == 2 else (ids == eos_token_id).argmax(-1)
    np.testing.assert_array_equal(pooled, hidden[np.arange(len(ids)), index])


def test_loads_transformers5_layout(saved_models):
    """transformers 5 writes CLIPTextModel keys without the `text_model.` prefix (4.x wrote it)."""
    torch_model, native, _ = saved_models("quick_gelu", REAL_EOS)
    module, params = FlaxCLIPTextModel.from_pretrained(native)
    ids, _ = make_inputs()
    want_hidden, want_pooled = torch_forward(torch_model, ids)
    hidden, pooled, _ = flax_forward(module, params, ids)
    assert rel_err(hidden, want_hidden) <= F32_TOL
    assert rel_err(pooled, want_pooled) <= F32_TOL


def test_position_ids_and_tuple_output(saved_models):
    torch_model, _, folder = saved_models("quick_gelu", REAL_EOS)
    module, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, _ = make_inputs()
    position_ids = np.tile(np.arange(16)[::-1] + 30, (4, 1))
    want_hidden, want_pooled = torch_forward(torch_model, ids, position_ids=position_ids)
    hidden, pooled = module.apply({"params": params}, jnp.asarray(ids), position_ids=jnp.asarray(position_ids),
                                  return_dict=False)
    assert rel_err(hidden, want_hidden) <= F32_TOL
    assert rel_err(pooled, want_pooled) <= F32_TOL
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))


def test_bf16_compute(saved_models):
    torch_model, _, folder = saved_models("quick_gelu", REAL_EOS)
    module, params = FlaxCLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    ids, mask = make_inputs()
    want_hidden, want_pooled = torch_forward(torch_model, ids, mask)
    hidden, pooled, out = flax_forward(module, params, ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.pooler_output.dtype == jnp.bfloat16
    assert rel_err(hidden, want_hidden) <= BF16_TOL, rel_err(hidden, want_hidden)
    assert rel_err(pooled, want_pooled) <= BF16_TOL, rel_err(pooled, want_pooled)


def test_attention_dropout_path(saved_models):
    """train=True with attention_dropout > 0 takes the explicit softmax/dropout path; with a vanishing
    rate it must agree with the fused path (masks, left padding included)."""
    _, _, folder = saved_models("gelu", REAL_EOS)
    module, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, mask = make_inputs()
    hidden, pooled, _ = flax_forward(module, params, ids, mask)
    tiny_rate = module.clone(attention_dropout=1e-9)
    rngs = {"dropout": jax.random.key(0)}
    out = tiny_rate.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), train=True, rngs=rngs)
    assert rel_err(out.last_hidden_state, hidden) <= 1e-5
    assert rel_err(out.pooler_output, pooled) <= 1e-5
    dropped = module.clone(attention_dropout=0.5).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                                         train=True, rngs=rngs)
    assert np.isfinite(np.asarray(dropped.last_hidden_state)).all()
    assert rel_err(dropped.last_hidden_state, hidden) > 1e-2  # dropout did something
    # train=False never drops
    evaluated = module.clone(attention_dropout=0.5).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(evaluated.last_hidden_state, hidden) <= 1e-6


def test_activations_match_transformers():
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        want = ACT2FN[name](torch.tensor(x)).numpy()
        assert np.abs(np.asarray(fn(jnp.asarray(x))) - want).max() <= 2e-6, name


# The parameter paths and shapes of transformers 4.57.6's FlaxCLIPTextModel (its flax_model.msgpack for
# this tiny config, layer 1 like layer 0): the names our tree must keep so legacy files load.
LEGACY_PATHS = {
    "text_model/embeddings/position_embedding/embedding": (77, 32),
    "text_model/embeddings/token_embedding/embedding": (1000, 32),
    "text_model/final_layer_norm/bias": (32,),
    "text_model/final_layer_norm/scale": (32,),
}
for _layer in ("0", "1"):
    LEGACY_PATHS.update({
        f"text_model/encoder/layers/{_layer}/{name}": shape for name, shape in {
            "layer_norm1/bias": (32,), "layer_norm1/scale": (32,),
            "layer_norm2/bias": (32,), "layer_norm2/scale": (32,),
            "mlp/fc1/bias": (37,), "mlp/fc1/kernel": (32, 37), "mlp/fc2/bias": (32,), "mlp/fc2/kernel": (37, 32),
            **{f"self_attn/{p}/bias": (32,) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
            **{f"self_attn/{p}/kernel": (32, 32) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
        }.items()
    })


def test_parameter_names_are_the_legacy_flax_names():
    module = FlaxCLIPTextModel.from_config(make_torch_model("quick_gelu", REAL_EOS).config.to_dict())
    flat = weights.flatten(module.abstract_params())
    assert {"/".join(path): tuple(leaf.shape) for path, leaf in flat.items()} == LEGACY_PATHS
    assert {leaf.dtype for leaf in flat.values()} == {np.dtype(np.float32)}
    assert module.dummy_inputs()[0].shape == (1, 77)


def test_save_pretrained_loads_in_transformers(saved_models, tmp_path):
    torch_model, _, folder = saved_models("gelu", 2)
    module, params = FlaxCLIPTextModel.from_pretrained(folder)
    assert FlaxCLIPTextModel.from_config(module.to_config()) == module
    module.save_pretrained(str(tmp_path), params)
    reloaded = CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    original, back = torch_model.state_dict(), reloaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    for key in ("hidden_act", "eos_token_id", "hidden_size", "num_hidden_layers", "intermediate_size",
                "layer_norm_eps", "projection_dim", "vocab_size", "max_position_embeddings"):
        assert getattr(reloaded.config, key) == getattr(torch_model.config, key), key
    ids, mask = make_inputs()
    for a, b in zip(torch_forward(reloaded, ids, mask), torch_forward(torch_model, ids, mask)):
        np.testing.assert_array_equal(a, b)


SD15_TEXT_ENCODER_CONFIG = {  # runwayml/stable-diffusion-v1-5 text_encoder/config.json (transformers 4.22)
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


def test_from_config_accepts_transformers_configs():
    sd15 = FlaxCLIPTextModel.from_config(SD15_TEXT_ENCODER_CONFIG, dtype=jnp.bfloat16, attention="xla")
    assert (sd15.hidden_size, sd15.num_hidden_layers, sd15.eos_token_id, sd15.dtype, sd15.attention) == (
        768, 12, 2, jnp.bfloat16, "xla")
    defaults = FlaxCLIPTextModel.from_config(CLIPTextConfig().to_dict())
    assert defaults == FlaxCLIPTextModel()
    config = defaults.to_config()
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "swiglu"}, "swiglu"),
    ({"model_type": "clip"}, "model_type"),
    ({"architectures": ["CLIPTextModelWithProjection"]}, "CLIPTextModelWithProjection"),
    ({"rope_theta": 10000.0}, "rope_theta"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
])
def test_from_config_rejects_what_it_cannot_honour(change, named):
    with pytest.raises(ValueError, match=named):
        FlaxCLIPTextModel.from_config({**SD15_TEXT_ENCODER_CONFIG, **change})


def test_legacy_flax_msgpack_loads_and_matches():
    # tests/fixtures/legacy_clip: transformers 4.57.6 FlaxCLIPTextModel.save_pretrained (flax_model.msgpack),
    # made by tests/fixtures/make_legacy_fixtures.py; reference.npz holds the PyTorch model's outputs.
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_clip")
    reference = np.load(os.path.join(folder, "reference.npz"))
    model, params = FlaxCLIPTextModel.from_pretrained(folder)
    out = model.apply({"params": params}, jnp.asarray(reference["input_ids"]))
    assert rel_err(out.last_hidden_state, reference["torch_last_hidden_state"]) <= F32_TOL
    assert rel_err(out.pooler_output, reference["torch_pooler_output"]) <= F32_TOL
