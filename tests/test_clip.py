"""FlaxCLIPTextModel and FlaxCLIPTextModelWithProjection against transformers 5's PyTorch CLIPTextModel and
CLIPTextModelWithProjection (the oracles), on tiny random models saved with `save_pretrained` and loaded
through our `from_pretrained`."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.activations import ACT2FN

from oracle import rel_err
from t2i_flax import weights
from t2i_flax.errors import ModelError
from t2i_flax.models import FlaxCLIPTextModelWithProjection
from t2i_flax.models.clip import ACTIVATIONS, FlaxCLIPTextModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
            max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
REAL_EOS = 500  # a real id: sequences hold larger ids, so "first eos" and "argmax" pick different tokens
# float32, max abs error / max abs torch output. Measured on CPU: last_hidden_state 3.5e-7..5.0e-7 and
# pooler_output 2.0e-7..3.3e-7 over the four (hidden_act, eos) variants with and without mask, position ids
# 4.5e-7/4.2e-7, transformers 5 layout 4.6e-7/3.2e-7, the legacy fixture's stored PyTorch outputs 4.2e-7/3.6e-7.
F32_TOL = 1e-5
BF16_TOL = 5e-2  # bf16 compute (params float32, 8-bit mantissa activations); measured ~1.7e-2


def make_torch_model(hidden_act: str, eos_token_id: int, seed: int = 0, model_class=CLIPTextModel,
                     **overrides) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = model_class(CLIPTextConfig(**{**TINY, **overrides}, hidden_act=hidden_act,
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


# ------------------------------------------------------------------------------------------------------------
# hidden_states (both classes) and FlaxCLIPTextModelWithProjection (SDXL's text_encoder_2)

# Measured on CPU, max abs error / max abs torch output, over eos 2 / 500 with and without mask. float32:
# FlaxCLIPTextModel hidden_states 0 (embeddings), 2.1e-7, 2.9e-7..4.3e-7; WithProjection text_embeds 2.9e-7..3.3e-7,
# last_hidden_state 3.8e-7..4.0e-7, hidden_states 0, <= 3.8e-7; the legacy fixture 3.9e-7/2.9e-7/2.0e-7 against
# the 4.x Flax outputs, 7.3e-7/4.0e-7/3.2e-7 against PyTorch's. bf16 compute: text_embeds 6.6e-3..9.3e-3,
# last_hidden_state 1.3e-2, hidden_states <= 9.7e-3.
PROJECTION = dict(num_hidden_layers=3, projection_dim=24)


def torch_forward_all(model, ids, mask=None):
    """Every output transformers gives with output_hidden_states=True, as numpy."""
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                    output_hidden_states=True)
    return {key: (tuple(h.numpy() for h in value) if key == "hidden_states" else value.numpy())
            for key, value in out.items()}


def flax_forward_all(module, params, ids, mask=None):
    fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, output_hidden_states=True))
    return fn(params, jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask, jnp.int32))


@pytest.fixture(scope="module")
def projection_models(tmp_path_factory):
    """eos_token_id -> (torch CLIPTextModelWithProjection, its transformers 5 save_pretrained folder)."""
    cache = {}

    def get(eos_token_id):
        if eos_token_id not in cache:
            model = make_torch_model("gelu", eos_token_id, seed=1, model_class=CLIPTextModelWithProjection,
                                     **PROJECTION)
            folder = str(tmp_path_factory.mktemp(f"clip_projection_{eos_token_id}"))
            model.save_pretrained(folder)
            cache[eos_token_id] = (model, folder)
        return cache[eos_token_id]

    return get


def test_text_model_hidden_states(saved_models):
    """FlaxCLIPTextModel(output_hidden_states=True): transformers' tuple (embeddings, then each layer's output,
    the last before final_layer_norm); the other outputs are those of the plain call (another XLA program:
    equal to float32 rounding)."""
    torch_model, _, folder = saved_models("quick_gelu", REAL_EOS)
    module, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, mask = make_inputs()
    want = torch_forward_all(torch_model, ids, mask)
    out = flax_forward_all(module, params, ids, mask)
    assert len(out.hidden_states) == len(want["hidden_states"]) == module.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, want["hidden_states"])):
        assert rel_err(ours, theirs) <= F32_TOL, (i, rel_err(ours, theirs))
    hidden, pooled, plain = flax_forward(module, params, ids, mask)
    assert plain.hidden_states is None
    assert rel_err(out.last_hidden_state, hidden) <= 1e-6 and rel_err(out.pooler_output, pooled) <= 1e-6
    as_tuple = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), return_dict=False,
                            output_hidden_states=True)
    assert len(as_tuple) == 3 and len(as_tuple[2]) == module.num_hidden_layers + 1
    assert len(module.apply({"params": params}, jnp.asarray(ids), return_dict=False)) == 2


@pytest.mark.parametrize("eos_token_id", [2, REAL_EOS])
def test_with_projection_matches_transformers(projection_models, eos_token_id):
    torch_model, folder = projection_models(eos_token_id)
    module, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder)
    assert (module.projection_dim, module.num_hidden_layers, module.eos_token_id) == (24, 3, eos_token_id)
    assert params["text_projection"]["kernel"].shape == (32, 24)
    ids, mask = make_inputs()
    for attention_mask in (None, mask):
        want = torch_forward_all(torch_model, ids, attention_mask)
        out = flax_forward_all(module, params, ids, attention_mask)
        assert rel_err(out.text_embeds, want["text_embeds"]) <= F32_TOL, rel_err(out.text_embeds, want["text_embeds"])
        assert rel_err(out.last_hidden_state, want["last_hidden_state"]) <= F32_TOL
        assert len(out.hidden_states) == len(want["hidden_states"]) == 4
        for i, (ours, theirs) in enumerate(zip(out.hidden_states, want["hidden_states"])):
            assert rel_err(ours, theirs) <= F32_TOL, (i, attention_mask is not None, rel_err(ours, theirs))
    # text_embeds projects the row at the position transformers' rule picks
    index = ids.argmax(-1) if eos_token_id == 2 else (ids == eos_token_id).argmax(-1)
    pooled = np.asarray(out.last_hidden_state)[np.arange(len(ids)), index]
    np.testing.assert_allclose(np.asarray(out.text_embeds), pooled @ params["text_projection"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    text_embeds, last_hidden_state = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                                  return_dict=False)
    assert rel_err(last_hidden_state, out.last_hidden_state) <= 1e-6 and rel_err(text_embeds, out.text_embeds) <= 1e-6


def test_with_projection_bf16_compute(projection_models):
    torch_model, folder = projection_models(2)
    module, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    ids, mask = make_inputs()
    want = torch_forward_all(torch_model, ids, mask)
    out = flax_forward_all(module, params, ids, mask)
    assert out.text_embeds.dtype == jnp.bfloat16 and out.hidden_states[-2].dtype == jnp.bfloat16
    assert rel_err(out.text_embeds, want["text_embeds"]) <= BF16_TOL, rel_err(out.text_embeds, want["text_embeds"])
    assert rel_err(out.last_hidden_state, want["last_hidden_state"]) <= BF16_TOL
    for ours, theirs in zip(out.hidden_states, want["hidden_states"]):
        assert rel_err(ours, theirs) <= BF16_TOL, rel_err(ours, theirs)


def test_with_projection_save_pretrained_round_trip(projection_models, tmp_path):
    """Our save_pretrained writes the file transformers 5 writes (same keys, bit-equal tensors), transformers
    loads it into the same model, and our from_pretrained reads it back bit for bit."""
    torch_model, folder = projection_models(REAL_EOS)
    module, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder)
    assert FlaxCLIPTextModelWithProjection.from_config(module.to_config()) == module
    module.save_pretrained(str(tmp_path), params)
    theirs, ours = load_file(os.path.join(folder, "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert ours.keys() == theirs.keys() and "text_projection.weight" in ours
    assert all(ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"] and config["projection_dim"] == 24
    reloaded = CLIPTextModelWithProjection.from_pretrained(str(tmp_path)).eval()
    original, back = torch_model.state_dict(), reloaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert reloaded.config.projection_dim == 24 and reloaded.config.eos_token_id == REAL_EOS
    _, params_back = FlaxCLIPTextModelWithProjection.from_pretrained(str(tmp_path))
    flat, flat_back = weights.flatten(params), weights.flatten(params_back)
    assert flat.keys() == flat_back.keys()
    assert all(np.array_equal(flat[k], flat_back[k]) for k in flat)


def test_with_projection_parameter_names(projection_models):
    """FlaxCLIPTextModel's tree plus text_projection/kernel (transformers 4.x FlaxCLIPTextModelWithProjection's)."""
    torch_model, _ = projection_models(2)
    module = FlaxCLIPTextModelWithProjection.from_config(torch_model.config.to_dict())
    text_module = FlaxCLIPTextModel.from_config({**torch_model.config.to_dict(), "architectures": None})
    ours = {"/".join(p): tuple(v.shape) for p, v in weights.flatten(module.abstract_params()).items()}
    text = {"/".join(p): tuple(v.shape) for p, v in weights.flatten(text_module.abstract_params()).items()}
    assert ours == {**text, "text_projection/kernel": (32, 24)}


SDXL_TEXT_ENCODER_2_CONFIG = {  # the shape of SDXL base 1.0's text_encoder_2/config.json (transformers 4.32)
    "_name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
    "hidden_size": 1280, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 5120,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
    "torch_dtype": "float32", "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}


def test_with_projection_config():
    sdxl = FlaxCLIPTextModelWithProjection.from_config(SDXL_TEXT_ENCODER_2_CONFIG, dtype=jnp.bfloat16)
    assert (sdxl.hidden_size, sdxl.num_hidden_layers, sdxl.projection_dim, sdxl.eos_token_id, sdxl.hidden_act) == (
        1280, 32, 1280, 2, "gelu")
    defaults = FlaxCLIPTextModelWithProjection.from_config(CLIPTextConfig().to_dict())
    assert defaults == FlaxCLIPTextModelWithProjection() and defaults != FlaxCLIPTextModel()
    config = defaults.to_config()
    assert config["architectures"] == ["CLIPTextModelWithProjection"] and config["model_type"] == "clip_text_model"
    assert json.loads(json.dumps(config)) == config
    # the text encoder without projection refuses SDXL's second encoder, and the other way round
    with pytest.raises(ModelError, match="CLIPTextModelWithProjection"):
        FlaxCLIPTextModel.from_config(SDXL_TEXT_ENCODER_2_CONFIG)


@pytest.mark.parametrize("change, named", [
    ({"architectures": ["CLIPTextModel"]}, "architectures=\\['CLIPTextModel'\\]"),
    ({"projection_dim": None}, "projection_dim=None"),
    ({"projection_dim": 0}, "projection_dim=0"),
    ({"hidden_act": "swiglu"}, "swiglu"),
    ({"rope_theta": 10000.0}, "rope_theta"),
    ({"num_attention_heads": 7}, "num_attention_heads"),
])
def test_with_projection_rejects_what_it_cannot_honour(change, named):
    with pytest.raises(ModelError, match=named) as error:
        FlaxCLIPTextModelWithProjection.from_config({**SDXL_TEXT_ENCODER_2_CONFIG, **change})
    assert "\n" not in str(error.value)


def test_with_projection_refuses_a_text_model_checkpoint(saved_models):
    """A CLIPTextModel folder (no text_projection.weight) is refused by its config, in one line."""
    _, native, _ = saved_models("quick_gelu", REAL_EOS)
    with pytest.raises(ModelError, match="architectures") as error:
        FlaxCLIPTextModelWithProjection.from_pretrained(native)
    assert "\n" not in str(error.value)


def test_with_projection_legacy_flax_msgpack_loads_and_matches():
    # tests/fixtures/legacy_clip_projection: transformers 4.57.6 FlaxCLIPTextModelWithProjection.save_pretrained
    # (flax_model.msgpack: text_model/... and text_projection/kernel), made by
    # tests/fixtures/make_legacy_clip_projection.py; SDXL-like (gelu, eos_token_id=2, padded with id 0).
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_clip_projection")
    reference = np.load(os.path.join(folder, "reference.npz"))
    model, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder)
    out = model.apply({"params": params}, jnp.asarray(reference["input_ids"]), output_hidden_states=True)
    for source in ("", "torch_"):  # the legacy Flax model's outputs and the PyTorch model's
        assert rel_err(out.text_embeds, reference[source + "text_embeds"]) <= F32_TOL
        assert rel_err(out.last_hidden_state, reference[source + "last_hidden_state"]) <= F32_TOL
        assert rel_err(np.stack(out.hidden_states), reference[source + "hidden_states"]) <= F32_TOL
