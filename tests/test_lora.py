"""LoRA (t2i_flax/lora.py) against diffusers' PyTorch `load_lora_weights` (with peft, the oracle): the tiny
PyTorch-made pipeline (tests/oracle.py), adapters with random non-zero A and B and alpha != rank. Error
measure: max|ours - reference| / max|reference| (oracle.rel_err)."""
from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from oracle import rel_err
from t2i_flax import errors, lora, lora_files, weights
from t2i_flax.models import FlaxUNet2DConditionModel

RANK, ALPHA = 4, 8.0  # scale 2: diffusers must read the alpha from the file's metadata
SCALE = ALPHA / RANK
# The default targets plus feed-forward, resnet time projections and one full module name.
TARGETS = lora.DEFAULT_TARGET_MODULES + ("ff.net.0.proj", "ff.net.2", "time_emb_proj", "time_embedding.linear_1")
# Ours with the adapters against the PyTorch UNet with the file loaded by diffusers, float32: measured 1.24e-6
# (PEFT keys, scale 2), 1.26e-6 (diffusers lora.down/up keys, scale 1); the base models alone 1.28e-6.
PARITY_TOL = 1e-5
# Merged kernels against the adapters beside them, float32: measured 9.3e-7.
MERGE_TOL = 3e-6
# DoRA at init (m = ||W||, B = 0) against the base UNet, float32: measured 8.9e-7.
DORA_INIT_TOL = 3e-6
# LoRA gradients against the gradients through merged kernels, float32, worst leaf: measured 6.3e-6.
GRAD_TOL = 2e-5


@pytest.fixture(scope="module")
def model(torch_pipeline_dir):
    unet, base_params = FlaxUNet2DConditionModel.from_pretrained(torch_pipeline_dir, subfolder="unet")
    return unet, base_params, unet.abstract_params()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([10, 500]),
            rng.normal(size=(2, 7, 32)).astype(np.float32))


@pytest.fixture(scope="module")
def forward(model, inputs):
    """Our UNet with adapters, one compiled program for every adapter tree of the TARGETS layout and scale."""
    unet = model[0]
    return jax.jit(lambda base, lora_params, scale: lora.apply_unet(unet, base, lora_params, scale, *inputs).sample)


@pytest.fixture(scope="module")
def plain(model, inputs):
    unet = model[0]
    return jax.jit(lambda base: unet.apply({"params": base}, *inputs).sample)


def with_random_B(lora_params, seed: int, std: float):
    flat = {path: np.asarray(leaf) for path, leaf in weights.flatten(lora_params).items()}
    rng = np.random.default_rng(seed)
    for path in flat:
        if path[-1] == "lora_B":
            flat[path] = rng.normal(0, std, flat[path].shape).astype(np.float32)
    return weights.unflatten(flat)


@pytest.fixture(scope="module")
def random_lora(model):
    """Gaussian A (PEFT's init) and random B: a trained-looking adapter."""
    return with_random_B(lora.init_lora_params(jax.random.key(1), model[2], RANK, TARGETS), seed=2, std=0.1)


@pytest.fixture(scope="module")
def lora_dir(random_lora, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lora"))
    lora_files.save_lora_weights(folder, random_lora, RANK, ALPHA, TARGETS)
    return folder


def diffusers_style_state_dict(lora_params) -> dict[str, np.ndarray]:
    """The older diffusers keys: unet.<module>.lora.down.weight / lora.up.weight."""
    return {key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): value
            for key, value in lora_files.lora_state_dict(lora_params).items()}


@pytest.fixture(scope="module")
def diffusers_style_dir(random_lora, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("diffusers-style"))
    save_file(diffusers_style_state_dict(random_lora), os.path.join(folder, lora_files.LORA_WEIGHTS_NAME),
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def torch_outputs(torch_pipeline_dir, lora_dir, diffusers_style_dir, inputs):
    """diffusers' StableDiffusionPipeline.load_lora_weights(folder): the UNet's output and what PEFT loaded."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    sample, timesteps, context = (torch.from_numpy(np.asarray(x)) for x in inputs)
    run = lambda: pipe.unet(sample, timesteps, context).sample.numpy()  # noqa: E731
    with torch.no_grad():
        base = run()
        pipe.load_lora_weights(lora_dir)
        adapter = next(iter(pipe.unet.peft_config))
        loaded = {key: value.numpy().copy()
                  for key, value in get_peft_model_state_dict(pipe.unet, adapter_name=adapter).items()}
        scalings = {name: module.scaling[adapter] for name, module in pipe.unet.named_modules()
                    if isinstance(module, LoraLayer)}
        peft_keys = run()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(diffusers_style_dir)
        diffusers_keys = run()
    return dict(base=base, peft_keys=peft_keys, diffusers_keys=diffusers_keys, loaded=loaded, scalings=scalings)


# ---- targets ---------------------------------------------------------------------------------------

def test_default_targets_are_the_attention_projections(model):
    modules = lora.adapted_modules(model[2])
    # 4 transformer blocks (down 0, mid, up 1 x 2 layers), attn1 and attn2, q/k/v/out each.
    assert len(modules) == 32
    first = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1")
    assert list(modules)[:4] == [first + ("key",), first + ("proj_attn",), first + ("query",), first + ("value",)]
    assert modules[first + ("query",)] == (32, 32)
    cross = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")
    assert modules[cross + ("key",)] == (32, 32)  # cross_attention_dim 32 -> 32
    assert {lora.torch_module_name(path).rsplit(".", 1)[-1] for path in modules} == {"to_q", "to_k", "to_v", "0"}
    assert all(lora.flax_module_path(lora.torch_module_name(path)) == path for path in modules)
    assert (lora.torch_module_name(first + ("proj_attn",))
            == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    assert len(lora.adapted_modules(model[2], TARGETS)) == 32 + 4 * 2 + 8 + 1  # + ff x2, 8 resnets, linear_1


@pytest.mark.parametrize("targets, message", [
    ("to_q,to_z", "--lora_target_modules: 'to_z' matches no linear layer of the UNet (PyTorch module names or "
                  "their last parts, e.g. linear_1, linear_2, net.2, proj, time_emb_proj, to_k, to_out.0, to_q, "
                  "to_v)"),
    ("conv1", "--lora_target_modules: 'conv1' names convolutions (down_blocks.0.resnets.0.conv1, "
              "down_blocks.1.resnets.0.conv1, mid_block.resnets.0.conv1 and 5 more); LoRA here adapts linear "
              "layers only"),
    (" , ", "--lora_target_modules is empty: name PyTorch modules, e.g. to_q,to_k,to_v,to_out.0"),
])
def test_a_bad_target_is_a_one_line_flag_error(model, targets, message):
    with pytest.raises(errors.FlagError) as caught:
        lora.adapted_modules(model[2], targets)
    assert str(caught.value) == message


@pytest.mark.parametrize("rank, alpha, message", [
    (0, None, "--lora_rank must be a positive integer (got 0)"),
    (4, -1.0, "--lora_alpha must be a positive number (got -1.0)"),
])
def test_bad_rank_or_alpha(rank, alpha, message):
    with pytest.raises(errors.FlagError) as caught:
        lora.lora_scale(rank, alpha)
    assert str(caught.value) == message


def test_scale_is_alpha_over_rank():
    assert (lora.lora_scale(4), lora.lora_scale(4, 8.0), lora.lora_scale(64, 16)) == (1.0, 2.0, 0.25)


# ---- init ------------------------------------------------------------------------------------------

def test_init_is_peft_gaussian_A_and_zero_B(model):
    lora_params = lora.init_lora_params(jax.random.key(0), model[2], 16)
    pairs, modules = lora.adapters(lora_params), lora.adapted_modules(model[2])
    assert list(pairs) == list(modules)
    all_A = np.concatenate([np.asarray(a).ravel() for a, _ in pairs.values()])
    assert all(a.dtype == jnp.float32 and b.dtype == jnp.float32 for a, b in pairs.values())
    assert all(a.shape == (modules[path][0], 16) and b.shape == (16, modules[path][1])
               for path, (a, b) in pairs.items())
    assert all(not np.asarray(b).any() for _, b in pairs.values())
    # PEFT's init_lora_weights="gaussian": normal with std 1 / r (19456 draws: std within 2%).
    assert abs(all_A.std() / (1 / 16) - 1) < 0.02 and abs(all_A.mean()) < 0.002
    again = lora.init_lora_params(jax.random.key(0), model[2], 16)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(lora_params), jax.tree.leaves(again)))
    assert all_A.size == 19456
    assert lora.param_count(lora_params) == sum(16 * (fan_in + fan_out) for fan_in, fan_out in modules.values())


def test_zero_B_leaves_the_output_bit_identical(model, forward, plain, random_lora):
    _, base_params, abstract = model
    zero_B = lora.init_lora_params(jax.random.key(3), abstract, RANK, TARGETS)
    ours, reference = np.asarray(forward(base_params, zero_B, SCALE)), np.asarray(plain(base_params))
    assert ours.tobytes() == reference.tobytes()


# ---- parity with diffusers + peft --------------------------------------------------------------------

def test_diffusers_loads_our_file_with_no_missing_or_unexpected_keys_and_our_scale(lora_dir, random_lora,
                                                                                    torch_outputs):
    written = weights.read_safetensors(os.path.join(lora_dir, lora_files.LORA_WEIGHTS_NAME))
    assert sorted(torch_outputs["loaded"]) == sorted(key.removeprefix("unet.") for key in written)
    assert all(np.array_equal(torch_outputs["loaded"][key.removeprefix("unet.")], value)
               for key, value in written.items())
    assert len(torch_outputs["scalings"]) == len(lora.adapters(random_lora)) == 49
    assert set(torch_outputs["scalings"].values()) == {SCALE}
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert written[key + ".lora_A.weight"].shape == (RANK, 32) and written[key + ".lora_B.weight"].shape == (32, RANK)


def test_unet_output_matches_diffusers_with_the_lora_loaded(model, forward, plain, random_lora, torch_outputs):
    _, base_params, _ = model
    ours = np.asarray(forward(base_params, random_lora, SCALE))
    assert rel_err(ours, torch_outputs["peft_keys"]) < PARITY_TOL
    assert rel_err(plain(base_params), torch_outputs["base"]) < PARITY_TOL
    # The adapters matter (0.73 of the output's range) and so does alpha (at scale 1: 0.55 off).
    assert rel_err(torch_outputs["base"], torch_outputs["peft_keys"]) > 0.5
    assert rel_err(forward(base_params, random_lora, 1.0), torch_outputs["peft_keys"]) > 0.2


def test_diffusers_style_file_matches_diffusers(model, forward, diffusers_style_dir, torch_outputs):
    """No metadata and no alphas: diffusers takes alpha = rank (scale 1), and so do we."""
    _, base_params, abstract = model
    lora_params, info = lora_files.load_lora_weights(diffusers_style_dir, abstract)
    assert (info.scale, info.alpha, info.key_style, info.folded) == (1.0, None, "diffusers", False)
    assert rel_err(forward(base_params, lora_params, info.scale), torch_outputs["diffusers_keys"]) < PARITY_TOL


def test_merge_equals_apply_in_float32(model, forward, plain, random_lora):
    _, base_params, _ = model
    merged = lora.merge_lora(base_params, random_lora, SCALE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(merged))
    assert rel_err(plain(merged), forward(base_params, random_lora, SCALE)) < MERGE_TOL
    path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "value")
    lora_A, lora_B = lora.adapters(random_lora)[path]
    kernel = weights.flatten(merged)[path + ("kernel",)]
    np.testing.assert_allclose(kernel, weights.flatten(base_params)[path + ("kernel",)] + SCALE * lora_A @ lora_B,
                               rtol=0, atol=1e-6)
    untouched = ("mid_block", "attentions_0", "proj_in", "kernel")
    assert weights.flatten(merged)[untouched] is weights.flatten(base_params)[untouched]


# ---- gradients -------------------------------------------------------------------------------------

def test_gradients_reach_the_adapters_only_and_equal_the_merged_reference(model, inputs, random_lora):
    unet, base_params, abstract = model
    target = np.random.default_rng(4).normal(size=inputs[0].shape).astype(np.float32)

    def loss_apply(lora_params, base):
        return jnp.mean((lora.apply_unet(unet, base, lora_params, SCALE, *inputs).sample - target) ** 2)

    def loss_merged(lora_params, base):
        return jnp.mean((unet.apply({"params": lora.merge_lora(base, lora_params, SCALE)}, *inputs).sample
                         - target) ** 2)

    grad_apply, grad_merged = jax.jit(jax.grad(loss_apply)), jax.jit(jax.grad(loss_merged))
    grads = grad_apply(random_lora, base_params)
    # Only the adapters get gradients: the tree is the adapters' (46 modules x A, B), nothing of the base.
    assert jax.tree.structure(grads) == jax.tree.structure(random_lora)
    reference = grad_merged(random_lora, base_params)
    errors_by_leaf = [rel_err(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))]
    assert max(errors_by_leaf) < GRAD_TOL
    # At init (B = 0) the down matrices get exactly zero gradient and the up matrices do not: PEFT's LoRA.
    at_init = grad_apply(lora.init_lora_params(jax.random.key(5), abstract, RANK, TARGETS), base_params)
    pairs = lora.adapters(at_init)
    assert all(not np.asarray(grad_A).any() for grad_A, _ in pairs.values())
    assert all(np.abs(np.asarray(grad_B)).max() > 0 for _, grad_B in pairs.values())


# ---- bf16 ------------------------------------------------------------------------------------------

class Projection(nn.Module):
    """One Dense as the attention layers build them (no bias, compute dtype)."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="query")(x)


def test_bf16_apply_keeps_a_delta_that_merging_into_bf16_weights_rounds_away():
    """An SD 1.5-wide projection (1280) in bf16 with a small adapter (|A@B| / |W| = 6e-4, as a few low-lr steps
    give) whose inputs lie in its down matrix's span (what training aligns it with). Measured against the
    float64 delta: apply's error 0.16; merging into the bf16 kernel leaves 87% of its entries unchanged and
    loses 0.66 of the delta."""
    width, rank, tokens = 1280, 4, 64
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.bfloat16)
    lora_A = np.linalg.qr(rng.normal(size=(width, rank)))[0].astype(np.float32)  # orthonormal columns
    lora_B = rng.normal(0, 3e-4, (rank, width)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(tokens, rank)) @ lora_A.T * np.sqrt(width / rank), jnp.bfloat16)
    base, adapter = {"query": {"kernel": kernel}}, {"query": {"lora_A": lora_A, "lora_B": lora_B}}
    module = Projection(jnp.bfloat16)
    base_out = np.asarray(module.apply({"params": base}, x), np.float32)
    true_delta = np.asarray(x, np.float64) @ (lora_A.astype(np.float64) @ lora_B)
    applied = np.asarray(lora.apply_unet(module, base, adapter, 1.0, x), np.float32) - base_out
    merged_kernel = lora.merge_lora(base, adapter, 1.0)["query"]["kernel"].astype(jnp.bfloat16)
    merged = np.asarray(module.apply({"params": {"query": {"kernel": merged_kernel}}}, x), np.float32) - base_out

    def lost(delta):
        return float(np.linalg.norm(delta - true_delta) / np.linalg.norm(true_delta))

    assert float(np.mean(np.asarray(merged_kernel == kernel))) > 0.85
    assert lost(applied) < 0.2
    assert lost(merged) > 0.6


# ---- the file: round trip, other styles, refusals ------------------------------------------------------

def test_save_load_round_trip_is_bit_exact(model, lora_dir, random_lora):
    lora_params, info = lora_files.load_lora_weights(lora_dir, model[2])
    assert jax.tree.structure(lora_params) == jax.tree.structure(random_lora)
    assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(lora_params), jax.tree.leaves(random_lora)))
    assert info == lora_files.LoraInfo(path=os.path.join(lora_dir, lora_files.LORA_WEIGHTS_NAME), scale=SCALE, rank=RANK,
                                 alpha=ALPHA, target_modules=TARGETS, key_style="peft", folded=False, modules=49)
    with open(info.path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    metadata = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)
    assert header["__metadata__"]["format"] == "pt"
    # The file itself or its folder.
    assert lora_files.load_lora_weights(info.path, model[2])[1] == info


def test_diffusers_style_alphas_and_attention_processor_keys(model, random_lora, tmp_path):
    abstract = model[2]
    state_dict = diffusers_style_state_dict(random_lora)
    modules = sorted({key.removesuffix(".lora.down.weight") for key in state_dict if key.endswith("down.weight")})
    # One alpha for every module: scale alpha / rank, B as in the file.
    uniform = dict(state_dict, **{f"{module}.alpha": np.array(8.0, np.float32) for module in modules})
    save_file(uniform, str(tmp_path / "uniform.safetensors"))
    lora_params, info = lora_files.load_lora_weights(str(tmp_path / "uniform.safetensors"), abstract)
    assert (info.scale, info.alpha, info.folded, info.rank) == (2.0, 8.0, False, RANK)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(lora_params), jax.tree.leaves(random_lora)))
    # Different alphas: each module's scale goes into its B, the returned scale is 1.
    mixed = dict(state_dict, **{f"{module}.alpha": np.array(8.0 if "attn1" in module else 2.0, np.float32)
                                for module in modules})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    lora_params, info = lora_files.load_lora_weights(str(tmp_path / "mixed.safetensors"), abstract)
    assert (info.scale, info.folded) == (1.0, True)
    for path, (_, lora_B) in lora.adapters(lora_params).items():
        factor = 2.0 if "attn1" in path else 0.5
        np.testing.assert_array_equal(lora_B, lora.adapters(random_lora)[path][1] * np.float32(factor))
    # diffusers' first format (attention processors, no unet. prefix).
    procs = {}
    for key, value in lora_files.lora_state_dict(random_lora).items():
        module, part = key.removeprefix("unet.").rsplit(".", 2)[0], "down" if ".lora_A." in key else "up"
        attention, projection = module.removesuffix(".0").rsplit(".", 1)
        if projection in ("to_q", "to_k", "to_v", "to_out"):
            procs[f"{attention}.processor.{projection}_lora.{part}.weight"] = value
    save_file(procs, str(tmp_path / "procs.safetensors"))
    lora_params, info = lora_files.load_lora_weights(str(tmp_path / "procs.safetensors"), abstract)
    assert (info.key_style, info.modules, info.scale) == ("diffusers-attn-procs", 32, 1.0)
    for path, (lora_A, lora_B) in lora.adapters(lora_params).items():
        assert np.array_equal(lora_A, lora.adapters(random_lora)[path][0])


def peft_file(*modules, rank=RANK, features=(32, 32), extra=None):
    tensors = {}
    for module in modules:
        tensors[f"{module}.lora_A.weight"] = np.zeros((rank, features[0]), np.float32)
        tensors[f"{module}.lora_B.weight"] = np.zeros((features[1], rank), np.float32)
    tensors.update(extra or {})
    return tensors


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = Q.removesuffix("to_q") + "to_k"
CONV = {"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": np.zeros((4, 32, 3, 3), np.float32),
        "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": np.zeros((32, 4, 1, 1), np.float32)}
KOHYA = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
         np.zeros((4, 32), np.float32),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
         np.zeros((32, 4), np.float32),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": np.array(4.0, np.float32),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32)}
TEXT = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensors, message", [
    (KOHYA, "holds text-encoder adapters (1 tensor, e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj."
            "lora_down.weight); a UNet-only LoRA does not apply them (train with --train_text_encoder)"),
    (peft_file(Q, TEXT), "holds text-encoder adapters (2 tensors, e.g. text_encoder.text_model.encoder.layers.0."
                         "self_attn.q_proj.lora_A.weight); a UNet-only LoRA does not apply them (train with "
                         "--train_text_encoder)"),
    (peft_file(Q, extra=CONV), "holds convolution adapters (1 module, e.g. down_blocks.0.resnets.0.conv1); "
                               "t2i_flax applies adapters of linear layers only"),
    (peft_file(Q, "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q"),
     "adapts 1 module this UNet does not have (down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q): it was "
     "trained for another model"),
    (peft_file(Q, features=(64, 32)), "does not fit this UNet: down_blocks.0.attentions.0.transformer_blocks.0.attn1."
                                      "to_q (down (4, 64), up (32, 4); here linear 32 -> 32)"),
    (peft_file(Q, K, extra={f"{Q}.lora_magnitude_vector": np.zeros(32, np.float32)}),
     "has DoRA magnitudes for some modules only: down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k differ"),
    (peft_file(Q, extra={f"{Q}.lora_magnitude_vector": np.zeros(16, np.float32)}),
     "does not fit this UNet: down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q (down (4, 32), up (32, 4), "
     "magnitude (16,); here linear 32 -> 32)"),
    (peft_file("transformer.transformer_blocks.0.attn.to_q"), "holds adapters for transformer, not for a Stable "
                                                               "Diffusion UNet"),
    (peft_file(Q, extra={f"{Q}.lora_A.scale": np.zeros(1, np.float32)}),
     "has tensors that are not LoRA down/up matrices: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
     "to_q.lora_A.scale"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 32), np.float32)},
     "has a down or an up matrix without the other for down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
], ids=["kohya", "text-encoder", "conv", "lacking", "shape", "dora-partial", "dora-shape", "other-model", "unknown",
        "half"])
def test_files_it_cannot_apply_are_one_line_model_errors(model, tmp_path, tensors, message):
    path = str(tmp_path / "lora.safetensors")
    save_file(tensors, path)
    with pytest.raises(errors.ModelError) as caught:
        lora_files.load_lora_weights(path, model[2])
    assert str(caught.value) == f"LoRA file {path} {message}"


def test_unreadable_or_missing_files_are_one_line_model_errors(model, tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a tensor file at all")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04")
    cases = {str(tmp_path / "notes.safetensors"): f"LoRA file {tmp_path / 'notes.safetensors'} is not a safetensors "
                                                  f"file",
             str(tmp_path / "absent"): f"LoRA {tmp_path / 'absent'} does not exist (give a "
                                       f"pytorch_lora_weights.safetensors file or its folder)",
             str(tmp_path / "pickle"): f"LoRA folder {tmp_path / 'pickle'} has only PyTorch pickles "
                                       f"(pytorch_lora_weights.bin); t2i_flax never unpickles them: save the LoRA "
                                       f"as pytorch_lora_weights.safetensors"}
    for path, message in cases.items():
        with pytest.raises(errors.ModelError) as caught:
            lora_files.load_lora_weights(path, model[2])
        assert str(caught.value) == message


# ---- SD 1.5 ----------------------------------------------------------------------------------------

def test_sd15_default_targets_sizes():
    """The file sizes in the report: SD 1.5's real shapes from its config (no weights materialised)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from configs import SD15_UNET

    abstract = FlaxUNet2DConditionModel.from_config(SD15_UNET).abstract_params()
    modules = lora.adapted_modules(abstract)
    assert len(modules) == 128  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
    counts = {rank: sum(rank * (features_in + features_out) for features_in, features_out in modules.values())
              for rank in (4, 64)}
    assert counts == {4: 797_184, 64: 12_754_944}  # float32: 3.19 MB and 51.0 MB of tensors
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == 859_520_964


# ---- DoRA ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_dora(model, random_lora):
    """DoRA on the random adapters: magnitudes ||W + s B A|| (PEFT's init for these A, B) times a random factor in
    [0.8, 1.2], as training would move them."""
    flat = {path: np.asarray(leaf) for path, leaf in
            weights.flatten(lora.with_dora_magnitudes(random_lora, model[1], SCALE)).items()}
    rng = np.random.default_rng(5)
    for path in flat:
        if path[-1] == lora.M:
            flat[path] = (flat[path] * rng.uniform(0.8, 1.2, flat[path].shape)).astype(np.float32)
    return weights.unflatten(flat)


@pytest.fixture(scope="module")
def dora_dir(random_dora, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dora"))
    lora_files.save_lora_weights(folder, random_dora, RANK, ALPHA, TARGETS)
    return folder


@pytest.fixture(scope="module")
def torch_dora(torch_pipeline_dir, dora_dir, inputs):
    """diffusers' load_lora_weights of our DoRA file: the UNet's output, what PEFT loaded, and the gradients of
    sum(output * weights) with respect to the adapters (PEFT's module names -> tensors)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    sample, timesteps, context = (torch.from_numpy(np.asarray(x)) for x in inputs)
    pipe.load_lora_weights(dora_dir)
    adapter = next(iter(pipe.unet.peft_config))
    config = pipe.unet.peft_config[adapter]
    with torch.no_grad():
        loaded = {key: value.numpy().copy()
                  for key, value in get_peft_model_state_dict(pipe.unet, adapter_name=adapter).items()}
    trained = {name: param for name, param in pipe.unet.named_parameters() if ".lora_" in name}
    for param in trained.values():
        param.requires_grad_(True)
    output = pipe.unet(sample, timesteps, context).sample
    output_weights = torch.from_numpy(np.random.default_rng(6).normal(size=tuple(output.shape)).astype(np.float32))
    (output * output_weights).sum().backward()
    grads = {name.replace(f".{adapter}", ""): param.grad.numpy().copy() for name, param in trained.items()}
    with torch.no_grad():
        pipe.fuse_lora()
        fused = pipe.unet(sample, timesteps, context).sample.numpy()
    return dict(output=output.detach().numpy(), loaded=loaded, use_dora=config.use_dora, grads=grads,
                output_weights=output_weights.numpy(), fused=fused)


def test_dora_init_is_the_base_model_to_an_ulp_of_the_gain(model, forward, plain):
    """m = ||W|| and B = 0: every adapted layer's gain m / ||W + s B A|| is 1 up to the rounding of the norm,
    which two XLA programs (init, forward) may sum in different orders: measured 1 ulp (1.2e-7) off on 8% of
    the output features, the output 8.9e-7 off (PEFT computes both norms with the same PyTorch kernel)."""
    _, base_params, abstract = model
    zero_B = lora.with_dora_magnitudes(lora.init_lora_params(jax.random.key(3), abstract, RANK, TARGETS),
                                       base_params, SCALE)
    assert len(lora.magnitudes(zero_B)) == 49
    kernels = weights.flatten(base_params)
    norms = jax.jit(lora.column_norms)
    gains = [np.asarray(m) / np.asarray(norms(kernels[path + ("kernel",)], *lora.adapters(zero_B)[path], SCALE))
             for path, m in lora.magnitudes(zero_B).items()]
    assert max(np.abs(gain - 1).max() for gain in gains) <= 2 * np.finfo(np.float32).eps
    assert rel_err(forward(base_params, zero_B, SCALE), plain(base_params)) < DORA_INIT_TOL


def test_dora_file_loads_in_diffusers_and_draws_what_our_unet_draws(model, forward, plain, random_dora, dora_dir,
                                                                     random_lora, torch_dora):
    unet, base_params, abstract = model
    written = weights.read_safetensors(os.path.join(dora_dir, lora_files.LORA_WEIGHTS_NAME))
    # PEFT keys, 49 modules x (A, B, magnitude), every tensor loaded as written; diffusers built a DoRA config.
    assert sorted(torch_dora["loaded"]) == sorted(key.removeprefix("unet.") for key in written)
    assert len(written) == 3 * 49 and torch_dora["use_dora"] is True
    assert all(np.array_equal(torch_dora["loaded"][key.removeprefix("unet.")], value) for key, value in written.items())
    magnitude = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"
    assert written[magnitude].shape == (32,)

    ours = forward(base_params, random_dora, SCALE)
    assert rel_err(ours, torch_dora["output"]) < PARITY_TOL
    # Measured 1.25e-6. The magnitudes matter: the same A, B as plain LoRA are 0.26 of the output's range away.
    assert rel_err(forward(base_params, random_lora, SCALE), torch_dora["output"]) > 0.1

    # Our loader reads the file back bit for bit, DoRA and all.
    loaded, info = lora_files.load_lora_weights(dora_dir, abstract)
    assert (info.dora, info.scale, info.modules) == (True, SCALE, 49)
    a, b = lora_files.lora_state_dict(loaded), lora_files.lora_state_dict(random_dora)
    assert sorted(a) == sorted(b) and all(a[key].tobytes() == b[key].tobytes() for key in a)

    # --lora_merge: the DoRA weight m / ||W + s B A|| (W + s B A), as PEFT's fuse_lora (measured 1.2e-6 from
    # diffusers' fused UNet, 9.4e-7 from ours with the adapters beside the layers).
    merged = lora.merge_lora(base_params, random_dora, SCALE)
    assert rel_err(plain(merged), torch_dora["fused"]) < PARITY_TOL
    assert rel_err(plain(merged), ours) < MERGE_TOL


def test_dora_gradients_equal_peft_with_the_norm_detached(model, inputs, random_dora, torch_dora):
    """PEFT (the DoRA paper's section 4.3) treats ||W + s B A|| as a constant: the gradients of A, B and the
    magnitude equal PEFT's (measured: 5.6e-6 on the worst leaf, 5.4e-6 on the worst magnitude)."""
    unet, base_params, _ = model
    output_weights = torch_dora["output_weights"]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(
        lora.apply_unet(unet, base_params, p, SCALE, *inputs).sample * output_weights)))(random_dora)
    reference = {}
    for name, grad in torch_dora["grads"].items():
        module, part = name.split(".lora_")
        part = {"A.weight": lora.A, "B.weight": lora.B, "magnitude_vector.weight": lora.M}[part]
        reference[lora.flax_module_path(module) + (part,)] = grad if part == lora.M else grad.T
    ours = weights.flatten(grads)
    assert sorted(ours) == sorted(reference)
    errors_by_leaf = {path: rel_err(ours[path], reference[path]) for path in ours}
    assert max(errors_by_leaf.values()) < GRAD_TOL, max(errors_by_leaf.items(), key=lambda item: item[1])
