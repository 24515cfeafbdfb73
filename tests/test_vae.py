"""Our Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (the oracle) on a tiny random model.

The fixture is a diffusers model from a tiny config under torch.manual_seed, with every norm
scale/shift and bias perturbed, saved with `save_pretrained` and loaded through our `from_pretrained`.
Error measure: max|ours - torch| / max|torch|.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from oracle import randomize_, rel_err
from t2i_flax import weights
from t2i_flax.models.vae import FlaxAutoencoderKL, FlaxDiagonalGaussianDistribution

# float32 against the PyTorch oracle. Measured on CPU: encode mean 1.2e-6, std 2.6e-7, logvar 1.1e-6,
# decode 1.6e-6, encode+decode 1.9e-6, the legacy fixture's stored PyTorch latent mean 8.5e-7, decoded 2.2e-6.
F32_TOL = 1e-5
# Against the stored outputs of diffusers 0.39's legacy Flax VAE, not the oracle (they are themselves
# 8.7e-7 (mean) and 2.1e-6 (decoded) off PyTorch); ours measures 5.6e-7 (mean) and 1.0e-6 (decoded) from them.
LEGACY_FLAX_TOL = 5e-6
BF16_TOL = 5e-2  # bf16 compute through ~20 layers of a random net; measured about 1e-2

CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    torch_model = AutoencoderKL(**CONFIG).eval()
    randomize_(torch_model, seed=1)
    folder = str(tmp_path_factory.mktemp("vae"))
    torch_model.save_pretrained(folder)
    module, params = FlaxAutoencoderKL.from_pretrained(folder)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_model.encode(torch.from_numpy(images)).latent_dist
        reference = {
            "mean": posterior.mean.numpy(), "std": posterior.std.numpy(), "logvar": posterior.logvar.numpy(),
            "decoded": torch_model.decode(torch.from_numpy(latents)).sample.numpy(),
            "reconstruction": torch_model(torch.from_numpy(images)).sample.numpy(),
        }
    return dict(torch_model=torch_model, module=module, params=params, images=images, latents=latents,
                reference=reference, folder=folder)


def _encode(module):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode).latent_dist)


def _decode(module):
    return jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode).sample)


def test_encode_parity_float32(vae):
    dist = _encode(vae["module"])(vae["params"], vae["images"])
    assert isinstance(dist, FlaxDiagonalGaussianDistribution)
    errors = {key: rel_err(getattr(dist, key), vae["reference"][key]) for key in ("mean", "std", "logvar")}
    print("vae encode float32 rel err", errors)
    assert max(errors.values()) <= F32_TOL, errors
    np.testing.assert_array_equal(np.asarray(dist.mode()), np.asarray(dist.mean))


def test_decode_parity_float32(vae):
    decoded = _decode(vae["module"])(vae["params"], vae["latents"])
    err = rel_err(decoded, vae["reference"]["decoded"])
    print(f"vae decode float32 rel err {err:.2e}")
    assert err <= F32_TOL, err


def test_call_reconstructs_from_the_posterior_mode(vae):
    module = vae["module"]
    out = jax.jit(lambda p, x: module.apply({"params": p}, x).sample)(vae["params"], vae["images"])
    err = rel_err(out, vae["reference"]["reconstruction"])
    assert err <= F32_TOL, err


def test_posterior_sample_is_mean_plus_std_noise(vae):
    dist = _encode(vae["module"])(vae["params"], vae["images"])
    key = jax.random.key(3)
    sample = np.asarray(dist.sample(key))
    noise = np.asarray(jax.random.normal(key, dist.mean.shape))
    np.testing.assert_allclose(sample, np.asarray(dist.mean) + np.asarray(dist.std) * noise, rtol=1e-6, atol=1e-6)
    assert sample.shape == (2, 4, 8, 8)
    assert np.abs(sample - np.asarray(dist.mean)).max() > 1e-3


def test_bf16_compute(vae):
    module = vae["module"].clone(dtype=jnp.bfloat16)
    dist = _encode(module)(vae["params"], vae["images"])
    decoded = _decode(module)(vae["params"], vae["latents"])
    assert decoded.dtype == jnp.bfloat16
    errors = {"mean": rel_err(dist.mean, vae["reference"]["mean"]),
              "std": rel_err(dist.std, vae["reference"]["std"]),
              "decoded": rel_err(decoded, vae["reference"]["decoded"])}
    print("vae bf16 rel err", errors)
    assert max(errors.values()) <= BF16_TOL


def test_config_and_weights_round_trip_through_diffusers(vae, tmp_path):
    module, torch_model = vae["module"], vae["torch_model"]
    ours = module.to_config()
    assert ours["_class_name"] == "AutoencoderKL"
    assert ours["scaling_factor"] == module.scaling_factor == 0.18215
    torch_config = {k: v for k, v in torch_model.config.items() if not k.startswith("_")}
    assert json.loads(json.dumps({k: v for k, v in ours.items() if not k.startswith("_")})) == json.loads(
        json.dumps(torch_config))
    assert FlaxAutoencoderKL.from_config(ours) == module
    n_ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(module.abstract_params()))
    assert n_ours == sum(p.numel() for p in torch_model.parameters())
    module.save_pretrained(str(tmp_path), vae["params"])
    reloaded = AutoencoderKL.from_pretrained(str(tmp_path))
    original = torch_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[key].numpy(), err_msg=key)


def test_param_names_are_the_legacy_flax_names(vae):
    flat = weights.flatten(vae["params"])
    for path in [("encoder", "down_blocks_0", "downsamplers_0", "conv", "kernel"),
                 ("encoder", "mid_block", "attentions_0", "group_norm", "scale"),
                 ("encoder", "mid_block", "attentions_0", "query", "kernel"),
                 ("encoder", "mid_block", "attentions_0", "proj_attn", "bias"),
                 ("decoder", "up_blocks_0", "resnets_1", "conv2", "kernel"),
                 ("decoder", "up_blocks_0", "upsamplers_0", "conv", "kernel"),
                 ("decoder", "conv_norm_out", "scale"), ("quant_conv", "kernel"), ("post_quant_conv", "bias")]:
        assert path in flat, path
    assert flat[("encoder", "conv_out", "kernel")].shape == (3, 3, 64, 8)


def test_downsample_pads_bottom_right_only():
    # diffusers' Downsample2D(padding=0): zero-pad (0,1) on H and W, then a VALID stride-2 conv
    from t2i_flax.models.resnet import FlaxDownsample2D

    x = np.random.default_rng(0).standard_normal((1, 6, 6, 2)).astype(np.float32)
    module = FlaxDownsample2D(3, padding=0)
    params = module.init(jax.random.key(0), x)
    kernel = np.asarray(params["params"]["conv"]["kernel"])  # (3, 3, 2, 3)
    bias = np.asarray(params["params"]["conv"]["bias"])
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    expected = np.stack([np.stack([np.einsum("hwc,hwco->o", padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], kernel)
                                   for j in range(3)]) for i in range(3)])[None] + bias
    np.testing.assert_allclose(np.asarray(module.apply(params, x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key, value, named", [
    ("some_new_option", 1, "'some_new_option'"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "'AttnDownEncoderBlock2D'"),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "'AttnUpDecoderBlock2D'"),
    ("act_fn", "gelu", "act_fn='gelu'"),
])
def test_from_config_rejects_unsupported(key, value, named):
    config = dict(AutoencoderKL(**CONFIG).config)
    config[key] = value
    with pytest.raises(ValueError, match="not supported") as info:
        FlaxAutoencoderKL.from_config(config)
    assert named in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("shift_factor", 0.1159),  # SD3 / Flux VAEs
    ("latents_mean", [-1.6574, 1.886, -1.383, 2.5155]),  # per-channel latent normalisation
    ("latents_std", [8.4927, 5.9022, 6.5498, 5.2299]),
])
def test_from_config_rejects_latent_normalisation(key, value, tmp_path):
    config = dict(AutoencoderKL(**CONFIG).config)
    assert config[key] is None  # what diffusers writes for an SD 1.x/2.x VAE
    config[key] = value
    with pytest.raises(ValueError, match="not supported") as info:
        FlaxAutoencoderKL.from_config(config)
    message = str(info.value)
    assert f"{key}={value!r}" in message and "\n" not in message, message
    with open(tmp_path / "config.json", "w") as handle:  # from_pretrained refuses before reading any weights
        json.dump({"_class_name": "AutoencoderKL", **config}, handle)
    with pytest.raises(ValueError, match=f"config {key}="):
        FlaxAutoencoderKL.from_pretrained(str(tmp_path))


def test_from_config_accepts_null_latent_normalisation(vae):
    with open(os.path.join(vae["folder"], "config.json")) as handle:
        saved = json.load(handle)  # written by diffusers' save_pretrained
    assert [saved[key] for key in ("shift_factor", "latents_mean", "latents_std")] == [None, None, None]
    assert FlaxAutoencoderKL.from_config(saved) == vae["module"]
    config = vae["module"].to_config()
    assert [config[key] for key in ("shift_factor", "latents_mean", "latents_std")] == [None, None, None]


def test_legacy_flax_msgpack_loads_and_matches():
    # tests/fixtures/legacy_vae: a diffusers 0.39 FlaxAutoencoderKL save (bf16 msgpack)
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_vae")
    module, params = FlaxAutoencoderKL.from_pretrained(folder)
    ref = np.load(os.path.join(folder, "reference.npz"))
    mean = _encode(module)(params, ref["sample"]).mean
    decoded = _decode(module)(params, ref["latent_mean"])
    errors = {key: rel_err(ours, ref[key]) for ours, key in (
        (mean, "latent_mean"), (mean, "torch_latent_mean"), (decoded, "decoded"), (decoded, "torch_decoded"))}
    print("vae legacy fixture float32 rel err", errors)
    for key, err in errors.items():
        assert err <= (F32_TOL if key.startswith("torch_") else LEGACY_FLAX_TOL), (key, err)
