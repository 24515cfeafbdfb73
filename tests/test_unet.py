"""Our Flax UNet against diffusers' PyTorch UNet2DConditionModel (the oracle) on tiny random models.

Fixtures: diffusers models built from tiny configs under torch.manual_seed, every norm scale/bias and
every bias perturbed (so no parameter is trivially 1 or 0), saved with `save_pretrained` and loaded
back through our `from_pretrained`. Error measure: max|ours - torch| / max|torch|. SDXL-shaped cases
get a pooled text embedding and time ids (`added_cond_kwargs`).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from oracle import randomize_, rel_err
from t2i_flax import demo, weights
from t2i_flax.models.unet import FlaxUNet2DConditionModel, broadcast_timesteps

# float32 against the PyTorch oracle. Measured on CPU: sd1 8.9e-7, sd2 9.8e-7, extras 4.7e-7, scalar
# timestep 1.2e-6, the legacy fixture's stored PyTorch output 1.3e-6; sdxl 1.1e-6 (other text_time inputs
# 7.4e-7), sdxl_layers 1.1e-6. A resnet GroupNorm eps of 1e-6 instead of the config's 1e-5 measures sd1
# 4.6e-5, sd2 4.5e-5, scalar 4.9e-5, legacy torch_out 2.0e-5: fails.
F32_TOL = 1e-5
# Against the stored output of diffusers 0.39's legacy Flax UNet, not the oracle: that output is itself
# 4.9e-5 off PyTorch, and ours measures 4.9e-5 from it; about 2x.
LEGACY_FLAX_TOL = 1e-4
# The same for the SDXL-shaped legacy fixture (legacy_sdxl_unet, 6 transformer layers): its stored legacy Flax
# output is 9.1e-5 off PyTorch (its GEGLU's tanh-approximate gelu alone: 3.4e-5 with an exact one) and ours
# measures 9.3e-5 from it, while ours is 1.6e-6 from the stored PyTorch output; about 2x.
LEGACY_FLAX_SDXL_TOL = 2e-4
# bf16 compute (8 mantissa bits, ~4e-3 relative per rounding) through ~40 layers of a random net;
# measured about 1e-2 (sd2 1.3e-2, sdxl 9.0e-3), parameters and the timestep sinusoids stay float32.
BF16_TOL = 5e-2

SD1 = dict(  # SD 1.x layout: 1x1-conv projections, one head count for all blocks
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4,
)
SD2 = dict(  # SD 2.x layout: linear projections, per-block head counts, upcast attention
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
)
EXTRAS = dict(  # the remaining supported knobs, on an odd 9x9 input (explicit upsample sizes)
    sample_size=9, block_out_channels=(32, 64), layers_per_block=(1, 2), norm_num_groups=4, norm_eps=1e-6,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, only_cross_attention=(False, True),
    transformer_layers_per_block=(2, 1), flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=48,
    mid_block_scale_factor=0.5, center_input_sample=True, dropout=0.1, in_channels=3, out_channels=5,
)
SDXL = demo.TINY_SDXL_UNET  # SDXL layout: text_time conditioning, per-block depths and heads, context 48 wide
SDXL_LAYERS = dict(  # per-layer transformer depths: the up blocks' from reverse_transformer_layers_per_block
    sample_size=8, block_out_channels=(32, 64), layers_per_block=(1, 2), norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=[1, [2, 1]], reverse_transformer_layers_per_block=[[1, 2, 1], 1],
    attention_head_dim=(2, 4), cross_attention_dim=48, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=6, projection_class_embeddings_input_dim=5 * 6 + 8,
)
CONFIGS = {"sd1": SD1, "sd2": SD2, "extras": EXTRAS, "sdxl": SDXL, "sdxl_layers": SDXL_LAYERS}
# (pooled text embedding width, time ids): SDXL base's 6 ids, 5 (the refiner's, with an aesthetic score) in the other
TEXT_TIME = {"sdxl": (demo.TINY_SDXL_POOLED_DIM, 6), "sdxl_layers": (8, 5)}


_CASE = object()  # Case.apply / torch_forward: the case's own added_cond_kwargs


class Case:
    def __init__(self, name, tmp_dir):
        config = CONFIGS[name]
        torch.manual_seed(0)
        self.torch_model = UNet2DConditionModel(**config).eval()
        randomize_(self.torch_model, seed=1)
        self.folder = str(tmp_dir / name)
        self.torch_model.save_pretrained(self.folder)
        self.module, self.params = FlaxUNet2DConditionModel.from_pretrained(self.folder)
        self.jitted = jax.jit(lambda p, x, t, c, added: self.module.apply({"params": p}, x, t, c,
                                                                          added_cond_kwargs=added).sample)
        rng = np.random.default_rng(0)
        size = config["sample_size"]
        self.sample = rng.standard_normal((2, config.get("in_channels", 4), size, size)).astype(np.float32)
        cross = config["cross_attention_dim"]
        self.context = rng.standard_normal((2, 7, cross)).astype(np.float32)
        self.added = None
        if name in TEXT_TIME:
            pooled, n_ids = TEXT_TIME[name]
            # (original height, width, crop top, left, target height, width[, aesthetic score]), as SDXL's
            time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024, 6.0], [768, 1360, 64, 32, 1024, 1024, 2.5]])
            self.added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                          "time_ids": time_ids[:, :n_ids].astype(np.float32)}

    def apply(self, params, sample, timesteps, context, added=_CASE):
        return self.jitted(params, sample, timesteps, context, self.added if added is _CASE else added)

    def torch_forward(self, timesteps, added=_CASE):
        t = torch.from_numpy(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
        added = self.added if added is _CASE else added
        kwargs = {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}
        with torch.no_grad():
            return self.torch_model(torch.from_numpy(self.sample), t, torch.from_numpy(self.context),
                                    **kwargs).sample.numpy()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("unet")
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name, tmp_dir)
        return built[name]

    return get


@pytest.mark.parametrize("name", ["sd1", "sd2", "extras", "sdxl", "sdxl_layers"])
def test_forward_parity_float32(cases, name):
    case = cases(name)
    timesteps = np.array([10, 937], dtype=np.int64)  # a numpy array, one timestep per sample
    ours = case.apply(case.params, case.sample, timesteps, case.context)
    reference = case.torch_forward(timesteps)
    assert ours.dtype == jnp.float32
    err = rel_err(ours, reference)
    print(f"unet {name} float32 rel err {err:.2e}")
    assert err <= F32_TOL, err


def test_text_time_conditioning_parity(cases):
    # other pooled embeddings and time ids (same shapes: no recompile) move the output, as in torch
    case = cases("sdxl")
    timesteps = np.array([10, 937])
    other = {"text_embeds": case.added["text_embeds"][::-1] * 2.0,
             "time_ids": np.array([[512, 512, 0, 0, 1024, 1024], [1024, 768, 16, 0, 1024, 1024]], np.float32)}
    ours = case.apply(case.params, case.sample, timesteps, case.context, other)
    err = rel_err(ours, case.torch_forward(timesteps, other))
    print(f"unet sdxl other text_time float32 rel err {err:.2e}")
    assert err <= F32_TOL, err
    assert rel_err(ours, case.apply(case.params, case.sample, timesteps, case.context)) > 1e-3


def test_scalar_timestep_parity(cases):
    case = cases("sd1")
    reference = case.torch_forward(500)  # diffusers broadcasts a python int to the batch
    err = rel_err(case.apply(case.params, case.sample, 500, case.context), reference)
    assert err <= F32_TOL, err


@pytest.mark.parametrize("timesteps", [500, 500.0, np.int64(500), np.array(500), np.array([500]), jnp.array(500),
                                       jnp.array([500.0]), np.array([500, 500]), jnp.array([500, 500])])
def test_timestep_forms_broadcast_to_batch(timesteps):
    out = broadcast_timesteps(timesteps, 2)
    assert out.shape == (2,)
    np.testing.assert_array_equal(np.asarray(out, dtype=np.float32), [500.0, 500.0])


def test_timesteps_of_wrong_length_are_refused():
    with pytest.raises(ValueError, match="batch of 2"):
        broadcast_timesteps(np.array([1, 2, 3]), 2)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])  # sd2: linear projections and upcast_attention
def test_bf16_compute(cases, name):
    case = cases(name)
    module = case.module.clone(dtype=jnp.bfloat16)
    timesteps = np.array([10, 937])
    ours = jax.jit(lambda p, x, t, c, a: module.apply({"params": p}, x, t, c, added_cond_kwargs=a).sample)(
        case.params, case.sample, timesteps, case.context, case.added)
    assert ours.dtype == jnp.bfloat16
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(case.params))
    err = rel_err(ours, case.torch_forward(timesteps))
    print(f"unet {name} bf16 rel err {err:.2e}")
    assert err <= BF16_TOL


def test_dropout_only_in_training(cases):
    case = cases("extras")  # dropout=0.1 in the resnets
    timesteps = np.array([10, 937])
    train = jax.jit(lambda p, x, t, c, key: case.module.apply({"params": p}, x, t, c, train=True,
                                                               rngs={"dropout": key}).sample)
    a = np.asarray(train(case.params, case.sample, timesteps, case.context, jax.random.key(0)))
    b = np.asarray(train(case.params, case.sample, timesteps, case.context, jax.random.key(1)))
    evaluation = np.asarray(case.apply(case.params, case.sample, timesteps, case.context))
    assert rel_err(a, b) > 1e-3
    assert rel_err(a, evaluation) > 1e-3


@pytest.mark.parametrize("name", ["sd1", "sd2", "extras", "sdxl", "sdxl_layers"])
def test_config_and_weights_round_trip_through_diffusers(cases, name, tmp_path):
    case = cases(name)
    torch_config = {k: v for k, v in case.torch_model.config.items() if not k.startswith("_")}
    ours = case.module.to_config()
    assert ours["_class_name"] == "UNet2DConditionModel"
    assert json.loads(json.dumps({k: v for k, v in ours.items() if not k.startswith("_")})) == json.loads(
        json.dumps(torch_config))
    assert FlaxUNet2DConditionModel.from_config(ours) == case.module
    # our init creates exactly the torch parameters
    abstract = case.module.abstract_params()
    n_ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
    assert n_ours == sum(p.numel() for p in case.torch_model.parameters())
    # saved by us, loaded by diffusers: bit-identical tensors
    case.module.save_pretrained(str(tmp_path), case.params)
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path))
    original = case.torch_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[key].numpy(), err_msg=key)
    # the file we write holds diffusers' file's tensors, bit for bit
    ours_file = weights.read_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    diffusers_file = weights.read_safetensors(os.path.join(case.folder, "diffusion_pytorch_model.safetensors"))
    assert sorted(ours_file) == sorted(diffusers_file)
    for key, tensor in diffusers_file.items():
        assert ours_file[key].dtype == tensor.dtype, key
        np.testing.assert_array_equal(ours_file[key], tensor, err_msg=key)


@pytest.mark.parametrize("name", ["sd1", "extras", "sdxl", "sdxl_layers"])
def test_transformer_depths_are_diffusers_depths(cases, name):
    case = cases(name)
    model = case.torch_model

    def depths(block):
        return tuple(len(attention.transformer_blocks) for attention in getattr(block, "attentions", ()))

    down, mid, up = case.module.transformer_depths()
    assert down == tuple(depths(block) for block in model.down_blocks)
    assert (mid,) == depths(model.mid_block)
    assert up == tuple(depths(block) for block in model.up_blocks)


def test_param_names_are_the_legacy_flax_names(cases):
    flat = weights.flatten(cases("sd1").params)
    assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "query", "kernel") in flat
    assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "proj_attn", "bias") in flat
    assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel") in flat
    assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_2", "kernel") in flat
    assert ("down_blocks_0", "downsamplers_0", "conv", "kernel") in flat
    assert ("up_blocks_0", "upsamplers_0", "conv", "kernel") in flat
    assert ("mid_block", "resnets_1", "norm2", "scale") in flat
    assert ("time_embedding", "linear_2", "kernel") in flat
    assert flat[("conv_in", "kernel")].shape == (3, 3, 4, 32)
    assert flat[("down_blocks_0", "attentions_0", "proj_in", "kernel")].shape == (1, 1, 32, 32)


def test_sdxl_param_names(cases):
    flat = weights.flatten(cases("sdxl_layers").params)
    assert flat[("add_embedding", "linear_1", "kernel")].shape == (38, 128)  # 8 pooled + 5 time ids x 6
    assert flat[("add_embedding", "linear_2", "kernel")].shape == (128, 128)
    assert weights.flax_path_to_torch_key(("add_embedding", "linear_1", "kernel")) == "add_embedding.linear_1.weight"
    # down block 1 layer 0 has 2 transformer blocks, layer 1 one; up block 0 layer 1 two (reverse_...)
    assert ("down_blocks_1", "attentions_0", "transformer_blocks_1", "attn2", "key", "kernel") in flat
    assert ("down_blocks_1", "attentions_1", "transformer_blocks_0", "attn2", "key", "kernel") in flat
    assert ("down_blocks_1", "attentions_1", "transformer_blocks_1", "attn2", "key", "kernel") not in flat
    assert ("up_blocks_0", "attentions_1", "transformer_blocks_1", "ff", "net_2", "kernel") in flat
    assert ("up_blocks_0", "attentions_2", "transformer_blocks_1", "ff", "net_2", "kernel") not in flat
    assert flat[("mid_block", "attentions_0", "transformer_blocks_1", "attn2", "key", "kernel")].shape == (48, 64)


def test_tiny_sdxl_unet_builds_from_its_config():
    module = FlaxUNet2DConditionModel.from_config(demo.TINY_SDXL_UNET)
    assert module.transformer_depths() == (((), (1,), (2,)), 2, ((2, 2), (1, 1), ()))
    sample, timesteps, context = module.dummy_inputs()
    added = module.dummy_kwargs()["added_cond_kwargs"]
    assert added["text_embeds"].shape == (1, demo.TINY_SDXL_POOLED_DIM) and added["time_ids"].shape == (1, 6)
    params = module.abstract_params()
    assert weights.flatten(params)[("add_embedding", "linear_1", "kernel")].shape == (64, 128)
    out = jax.eval_shape(lambda p: module.apply({"params": p}, sample, timesteps, context, added_cond_kwargs=added),
                         params)
    assert out.sample.shape == sample.shape
    config = module.to_config()
    assert FlaxUNet2DConditionModel.from_config(config) == module
    assert {k: config[k] for k in demo.TINY_SDXL_UNET} == demo.TINY_SDXL_UNET


def test_text_time_needs_added_cond_kwargs(cases):
    case = cases("sdxl_layers")
    module = case.module
    sample, timesteps, context = module.dummy_inputs()

    def call(*args, **kwargs):
        return jax.eval_shape(lambda p: module.apply({"params": p}, *args, **kwargs), module.abstract_params())

    for added in (None, {"text_embeds": np.zeros((1, 8), np.float32)}):
        with pytest.raises(ValueError, match="addition_embed_type='text_time'.*pass added_cond_kwargs") as info:
            call(sample, timesteps, context, added_cond_kwargs=added)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        call(sample, timesteps, context)  # the positional SD 1.x/2.x call
    wrong = {"text_embeds": np.zeros((1, 8), np.float32), "time_ids": np.zeros((1, 6), np.float32)}  # 8 + 6x6 != 38
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim") as info:
        call(sample, timesteps, context, added_cond_kwargs=wrong)
    assert "\n" not in str(info.value)


def test_added_cond_kwargs_are_ignored_without_text_time(cases):
    case = cases("sd1")
    added = {"text_embeds": np.zeros((2, 3), np.float32), "time_ids": np.zeros((2, 6), np.float32)}
    timesteps = np.array([10, 937])
    # positional train/return_dict still work, added_cond_kwargs is keyword only
    out = jax.eval_shape(lambda p: case.module.apply({"params": p}, case.sample, timesteps, case.context, False, False,
                                                     added_cond_kwargs=added), case.params)
    assert out[0].shape == case.sample.shape


@pytest.mark.parametrize("key, value, named", [
    ("addition_embed_type", "text", "addition_embed_type='text'"),
    ("addition_embed_type", "image", "addition_embed_type='image'"),
    ("addition_embed_type_num_heads", "x", "addition_embed_type_num_heads='x'"),
    ("some_new_option", 3, "'some_new_option'"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "'SimpleCrossAttnDownBlock2D'"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "'AttnUpBlock2D'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    # per-layer depths need the up blocks' (diffusers refuses this config too)
    ("transformer_layers_per_block", [[1, 2], [1, 1]], "transformer_layers_per_block=[[1, 2], [1, 1]]"),
    ("transformer_layers_per_block", ["1", 1], "entry '1'"),
    ("reverse_transformer_layers_per_block", 2, "reverse_transformer_layers_per_block=2"),
    ("reverse_transformer_layers_per_block", [1, [2]], "entry [2]"),  # a depth per layer: that up block has 2
    ("addition_embed_type", "text_time", "addition_time_embed_dim=None"),  # without its sizes
])
def test_from_config_rejects_unsupported(key, value, named):
    config = dict(UNet2DConditionModel(**SD1).config)
    config[key] = value
    with pytest.raises(ValueError, match="not supported") as info:
        FlaxUNet2DConditionModel.from_config(config)
    assert named in str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_from_config_accepts_real_world_keys():
    config = dict(UNet2DConditionModel(**SD1).config)
    config.update({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "_name_or_path": "x",
                   "decay": 0.9999, "optimization_step": 12, "inv_gamma": 1.0, "power": 0.75,  # EMA unet
                   "min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": False,
                   "down_block_types": ["UNetResCrossAttnDownBlock2D", "DownBlock2D"], "act_fn": "swish"})
    module = FlaxUNet2DConditionModel.from_config(config, dtype=jnp.bfloat16, attention="xla")
    assert (module.dtype, module.attention, module.heads_per_block()) == (jnp.bfloat16, "xla", (4, 4))


def test_legacy_flax_msgpack_loads_and_matches():
    # tests/fixtures/legacy_unet: a diffusers 0.39 FlaxUNet2DConditionModel save (bf16 msgpack, its
    # config.json carries the Flax-only keys split_head_dim/use_memory_efficient_attention)
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_unet")
    module, params = FlaxUNet2DConditionModel.from_pretrained(folder)
    ref = np.load(os.path.join(folder, "reference.npz"))
    out = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c).sample)(
        params, ref["sample"], ref["timesteps"], ref["encoder_hidden_states"])
    errors = {"torch_out": rel_err(out, ref["torch_out"]), "legacy_flax_out": rel_err(out, ref["out"])}
    print("unet legacy fixture float32 rel err", errors)
    assert errors["torch_out"] <= F32_TOL, errors
    assert errors["legacy_flax_out"] <= LEGACY_FLAX_TOL, errors


def test_legacy_flax_sdxl_msgpack_loads_and_matches():
    # tests/fixtures/legacy_sdxl_unet (make_legacy_sdxl_unet.py): a diffusers 0.39 FlaxUNet2DConditionModel save
    # (bf16 msgpack) of TINY_SDXL_UNET's layout: addition_embed_type "text_time" (add_embedding params, pooled
    # text_embeds and time_ids), transformer_layers_per_block (1, 1, 2), per-block heads (1, 2, 4)
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_sdxl_unet")
    module, params = FlaxUNet2DConditionModel.from_pretrained(folder)
    ref = np.load(os.path.join(folder, "reference.npz"))
    added = {"text_embeds": ref["text_embeds"], "time_ids": ref["time_ids"]}
    out = jax.jit(lambda p, x, t, c, a: module.apply({"params": p}, x, t, c, added_cond_kwargs=a).sample)(
        params, ref["sample"], ref["timesteps"], ref["encoder_hidden_states"], added)
    errors = {"torch_out": rel_err(out, ref["torch_out"]), "legacy_flax_out": rel_err(out, ref["out"])}
    print("unet legacy sdxl fixture float32 rel err", errors)
    assert errors["torch_out"] <= F32_TOL, errors
    assert errors["legacy_flax_out"] <= LEGACY_FLAX_SDXL_TOL, errors
