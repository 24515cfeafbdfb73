"""Text-encoder LoRA (--train_text_encoder with --lora_rank, t2i_flax/trainable.py's TextEncoderLora) against diffusers +
PEFT (the oracle) on the tiny PyTorch-made SD 1.x and SDXL pipelines (tests/oracle.py): our files (PEFT and kohya keys)
load with `load_lora_weights` and the text encoders give what ours give with the adapters; the step's loss and
gradients equal PyTorch's; a training run's file, merge, validation images, export, resume and --lora_init.
Error measure: max|ours - reference| / max|reference| (oracle.rel_err)."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from oracle import rel_err
from t2i_flax import (cli, data, errors, export, family, held_out, lora, lora_files, optim, sharding, step, tokenizer,
                      trainable)
from t2i_flax.config import DataConfig
from t2i_flax.diffusion.noise import load_noise_schedule

from conftest import RESOLUTION
from test_train import VALIDATION, assert_validation_grid_is_what_generate_draws

RANK, ALPHA = 4, 8.0  # scale 2: diffusers must read the alpha (PEFT: the metadata; kohya: the .alpha keys)
SCALE = ALPHA / RANK
LORA_FILE = lora_files.LORA_WEIGHTS_NAME
# Our text encoders with adapters against transformers' with the file loaded by diffusers + PEFT, float32, worst of
# every hidden state, the last one and the pooled (SDXL's second: projected) output: measured 4.4e-7 (SD, PEFT and kohya
# keys), 6.8e-7 (SD, DoRA), 6.9e-7 (SDXL, both encoders, both formats), 3.8e-7 (the trained run's file), 3.3e-7 (its
# merged text encoder); SDXL's encode_prompt (both penultimate states, pooled) 3.5e-7. The base encoders alone:
# 5.3e-7 to 6.2e-7.
PARITY_TOL = 2e-6
# The UNet with its adapters against diffusers' (as tests/test_lora.py): measured 1.1e-6, the trained run's 1.7e-6,
# its merged UNet 9.4e-7.
UNET_TOL = 5e-6
# The step against PyTorch on identical inputs, float32: the loss measured 6.5e-7; per tensor, the text encoder's
# adapter gradients <= 9.2e-7 and the UNet's <= 1.05e-5 (small tensors of the cross-attention, as
# tests/test_step_vs_torch.py's); the norm of the text encoder's gradients 2.6e-7.
LOSS_RTOL = 2e-6
TEXT_GRAD_TOL = 3e-6
UNET_GRAD_TOL = 3e-5
GRAD_NORM_RTOL = 1e-6


def random_adapters(abstract, targets, seed: int, dora_base=None):
    """PEFT's Gaussian A and a random B (a trained-looking adapter); with `dora_base` DoRA magnitudes ||W + s B A||
    times a random gain near 1."""
    params = lora.init_lora_params(jax.random.PRNGKey(seed), abstract, RANK, targets)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x), params)
    for node in lora.adapters(params):
        leaf = params
        for name in node:
            leaf = leaf[name]
        leaf[lora.B] = rng.normal(0, 0.2, leaf[lora.B].shape).astype(np.float32)
        if dora_base is not None:
            leaf[lora.M] = (np.asarray(lora.column_norms(_kernel(dora_base, node), leaf[lora.A], leaf[lora.B], SCALE))
                            * rng.uniform(0.8, 1.2, leaf[lora.B].shape[1])).astype(np.float32)
    return params


def _kernel(tree, path):
    for name in path:
        tree = tree[name]
    return tree["kernel"]


@pytest.fixture(scope="module")
def sd(torch_pipeline_dir):
    modules, params = family.detect(torch_pipeline_dir).load(torch_pipeline_dir, jnp.float32)
    return modules, params


@pytest.fixture(scope="module")
def sdxl(torch_sdxl_pipeline_dir):
    modules, params = family.detect(torch_sdxl_pipeline_dir).load(torch_sdxl_pipeline_dir, jnp.float32)
    return modules, params


def token_ids(model_dir, folder="tokenizer"):
    clip = tokenizer.load_tokenizer(os.path.join(model_dir, folder))
    return tokenizer.tokenize_captions(clip, ["a red circle on a blue background", "a yellow square", ""])[0]


def write_file(folder, unet_abstract, unet_adapters, text_encoders, lora_format="peft", sdxl=False):
    return os.path.dirname(lora_files.save_lora_weights(folder, unet_adapters, RANK, ALPHA,
                                                        lora.DEFAULT_TARGET_MODULES, lora_format, unet_abstract,
                                                        sdxl=sdxl, text_encoders=text_encoders))


def torch_text_outputs(pipe, name, ids):
    """Every hidden state and the final output (last hidden state and pooled, or projected text_embeds) of the
    pipeline's text encoder `name`, numpy."""
    with torch.no_grad():
        out = getattr(pipe, name)(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    final = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return [h.numpy() for h in out.hidden_states] + [out.last_hidden_state.numpy(), final.numpy()]


def our_text_outputs(module, base, adapters, ids, scale=SCALE):
    out = lora.apply_module(module, base, adapters, scale, ids, output_hidden_states=True)
    final = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return [np.asarray(h) for h in out.hidden_states] + [np.asarray(out.last_hidden_state), np.asarray(final)]


def worst(ours, reference) -> float:
    return max(rel_err(a, b) for a, b in zip(ours, reference))


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b) and all(np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes() for key in a)


def flat_state(components: dict) -> dict:
    """{component: adapters} -> our PEFT keys, so that trees compare as tensors."""
    out = {}
    for name, params in components.items():
        out.update(lora_files.lora_state_dict(params, name))
    return out


# ---- files: diffusers + PEFT load ours and the text encoders agree ----------------------------------------

@pytest.mark.parametrize("lora_format", ["peft", "kohya", "dora"])
def test_sd_text_encoder_adapters_load_in_diffusers_and_match(sd, torch_pipeline_dir, tmp_path, lora_format):
    """Random adapters on the UNet and the text encoder, saved as our file: diffusers' StableDiffusionPipeline
    .load_lora_weights gives the text encoder (every hidden state, the pooled output) and the UNet what ours give;
    our reader gives the same tensors back (bit for bit)."""
    from diffusers import StableDiffusionPipeline

    modules, params = sd
    dora = lora_format == "dora"
    te_abstract, unet_abstract = modules.text_encoder.abstract_params(), modules.unet.abstract_params()
    text_adapters = random_adapters(te_abstract, lora.TEXT_ENCODER_TARGET_MODULES, seed=3,
                                    dora_base=params["text_encoder"] if dora else None)
    unet_adapters = random_adapters(unet_abstract, lora.DEFAULT_TARGET_MODULES, seed=4)
    folder = write_file(str(tmp_path), unet_abstract, unet_adapters, {"text_encoder": text_adapters},
                        "peft" if dora else lora_format)
    keys = sorted(load_file(os.path.join(folder, LORA_FILE)))
    te_keys = [key for key in keys if not key.startswith(("unet.", "lora_unet_"))]
    if lora_format == "kohya":
        assert te_keys[:3] == ["lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha",
                               "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight",
                               "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"]
        assert len(te_keys) == 3 * 8  # 2 layers x q, k, v, out: down, up, alpha
    else:
        assert te_keys[:2] == ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight",
                               "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight"]
        assert len(te_keys) == (3 if dora else 2) * 8
        with safe_open(os.path.join(folder, LORA_FILE), "np") as handle:
            metadata = handle.metadata()[lora_files.METADATA_KEY]
        assert '"text_encoder.r": 4' in metadata and '"text_encoder.lora_alpha": 8' in metadata
        assert '"text_encoder.target_modules": [\n    "q_proj",' in metadata

    read, infos = lora_files.load_lora_components(folder, {"unet": unet_abstract, "text_encoder": te_abstract})
    assert {name: (info.scale, info.rank, info.modules, info.dora) for name, info in infos.items()} == {
        "unet": (SCALE, RANK, 32, False), "text_encoder": (SCALE, RANK, 8, dora)}
    assert_same_tensors(flat_state(read), flat_state({"unet": unet_adapters, "text_encoder": text_adapters}))

    ids = token_ids(torch_pipeline_dir)
    ours = our_text_outputs(modules.text_encoder, params["text_encoder"], text_adapters, ids)
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    base = torch_text_outputs(pipe, "text_encoder", ids)
    pipe.load_lora_weights(folder)
    reference = torch_text_outputs(pipe, "text_encoder", ids)
    assert worst(ours, reference) <= PARITY_TOL, worst(ours, reference)
    assert rel_err(reference[-2], base[-2]) > 1e-2  # the adapters change the text encoder's output
    adapter = next(iter(pipe.text_encoder.peft_config))
    assert pipe.text_encoder.peft_config[adapter].use_dora == dora

    rng = np.random.default_rng(0)
    sample, timesteps = rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([10, 500])
    context = reference[-2][:2]
    ours_unet = lora.apply_unet(modules.unet, params["unet"], unet_adapters, SCALE, sample, timesteps, context).sample
    with torch.no_grad():
        torch_unet = pipe.unet(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample.numpy()
    assert rel_err(ours_unet, torch_unet) <= UNET_TOL


@pytest.mark.parametrize("lora_format", ["peft", "kohya"])
def test_sdxl_both_text_encoders_load_in_diffusers_and_match(sdxl, torch_sdxl_pipeline_dir, tmp_path, lora_format):
    """SDXL: adapters on both text encoders (text_encoder_2's projection is no target) as `text_encoder.` and
    `text_encoder_2.` (PEFT) or `lora_te1_`/`lora_te2_` (kohya) keys: StableDiffusionXLPipeline.load_lora_weights
    gives both encoders' hidden states and the pooled projection ours give, and its encode_prompt (penultimate
    states side by side, pooled) equals the family's conditioning with the adapters."""
    from diffusers import StableDiffusionXLPipeline

    modules, params = sdxl
    names = ("text_encoder", "text_encoder_2")
    abstract = {name: getattr(modules, name).abstract_params() for name in names}
    abstract["unet"] = modules.unet.abstract_params()
    text_adapters = {name: random_adapters(abstract[name], lora.TEXT_ENCODER_TARGET_MODULES, seed=5 + i)
                     for i, name in enumerate(names)}
    unet_adapters = random_adapters(abstract["unet"], lora.DEFAULT_TARGET_MODULES, seed=7)
    folder = write_file(str(tmp_path), abstract["unet"], unet_adapters, text_adapters, lora_format, sdxl=True)
    keys = load_file(os.path.join(folder, LORA_FILE))
    prefixes = ("lora_te1_", "lora_te2_") if lora_format == "kohya" else ("text_encoder.", "text_encoder_2.")
    for prefix, count in zip(prefixes, (3 * 4, 3 * 4)):  # 3 layers x q, k, v, out
        assert len([key for key in keys if key.startswith(prefix) and "lora_B" in key or
                    key.startswith(prefix) and "lora_up" in key]) == count
    assert not any("text_projection" in key for key in keys)

    read, infos = lora_files.load_lora_components(folder, abstract)
    assert_same_tensors(flat_state(read), flat_state({"unet": unet_adapters, **text_adapters}))
    assert {name: info.scale for name, info in infos.items()} == {name: SCALE for name in abstract}

    ids = {name: token_ids(torch_sdxl_pipeline_dir, folder) for name, folder in zip(names, ("tokenizer",
                                                                                            "tokenizer_2"))}
    ours = {name: our_text_outputs(getattr(modules, name), params[name], text_adapters[name], ids[name])
            for name in names}
    pipe = StableDiffusionXLPipeline.from_pretrained(torch_sdxl_pipeline_dir)
    pipe.load_lora_weights(folder)
    for name in names:
        reference = torch_text_outputs(pipe, name, ids[name])
        assert worst(ours[name], reference) <= PARITY_TOL, (name, worst(ours[name], reference))

    prompts = ["a red circle on a blue background", "a yellow square", ""]
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    adapted = {name: lora.sampler_unet_params(params[name], text_adapters[name], SCALE) for name in names}
    batch = {"input_ids": ids["text_encoder"], "input_ids_2": ids["text_encoder_2"], "time_ids": np.zeros((3, 6))}
    context, added = family.STABLE_DIFFUSION_XL.condition(modules, adapted, batch, lora.apply_adapted)
    assert rel_err(context, prompt_embeds.numpy()) <= PARITY_TOL
    assert rel_err(added["text_embeds"], pooled.numpy()) <= PARITY_TOL


def test_files_for_other_components_are_one_line(sd, tmp_path):
    """A UNet-only reader (--lora_init without --train_text_encoder) refuses text-encoder keys; a text-encoder key
    for a module the encoder lacks is named."""
    modules, _ = sd
    te_abstract, unet_abstract = modules.text_encoder.abstract_params(), modules.unet.abstract_params()
    text_adapters = random_adapters(te_abstract, lora.TEXT_ENCODER_TARGET_MODULES, seed=1)
    unet_adapters = random_adapters(unet_abstract, lora.DEFAULT_TARGET_MODULES, seed=2)
    folder = write_file(str(tmp_path / "peft"), unet_abstract, unet_adapters, {"text_encoder": text_adapters})
    with pytest.raises(errors.ModelError, match=r"holds text-encoder adapters \(16 tensors, e.g. text_encoder\.text_"
                                                r"model\.encoder\.layers\.0\.self_attn\.k_proj\.lora_A\.weight\); a "
                                                r"UNet-only LoRA does not apply them \(train with --train_text_encoder\)"):
        lora_files.load_lora_weights(folder, unet_abstract)
    tensors = load_file(os.path.join(folder, LORA_FILE))
    tensors["text_encoder.text_model.encoder.layers.5.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 32), np.float32)
    tensors["text_encoder.text_model.encoder.layers.5.self_attn.q_proj.lora_B.weight"] = np.zeros((32, 4), np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(errors.ModelError, match=r"adapts 1 module this text encoder does not have \(text_model\.encoder"
                                                r"\.layers\.5\.self_attn\.q_proj\)"):
        lora_files.load_lora_components(str(tmp_path / "bad.safetensors"),
                                        {"unet": unet_abstract, "text_encoder": te_abstract})


def test_dora_on_the_text_encoder_starts_at_the_base_model(sd, torch_pipeline_dir, dataset_dir):
    """--use_dora --train_text_encoder: every text-encoder adapter starts with B zero and the magnitude ||W|| of the
    frozen kernel it sits on, so the adapted encoder gives the base encoder's output (to the rounding of the norm)."""
    modules, params = sd
    argv = ["--pretrained_model_name_or_path", torch_pipeline_dir, "--train_data_dir", dataset_dir, "--output_dir",
            "unused", "--lora_rank", str(RANK), "--train_text_encoder", "--use_dora"]
    start = trainable.from_config(cli.parse_config(argv), modules).initial_params(modules.unet, params["unet"], params)
    text = jax.device_get(start["text_encoder"])
    magnitudes = lora.magnitudes(text)
    assert len(magnitudes) == 8 and len(lora.magnitudes(start["unet"])) == 32
    for path, magnitude in magnitudes.items():
        np.testing.assert_allclose(magnitude, np.linalg.norm(_kernel(params["text_encoder"], path), axis=0), rtol=1e-6)
    ids = token_ids(torch_pipeline_dir)
    ours = our_text_outputs(modules.text_encoder, params["text_encoder"], text, ids, scale=1.0)
    base = our_text_outputs(modules.text_encoder, params["text_encoder"], {}, ids)
    assert worst(ours, base) <= 2e-6  # measured 3.7e-7: the gain m / ||W|| is 1 to a float32 ulp


# ---- the step: loss and gradients against PyTorch, gradients reach the text encoder, the loss goes down ------

@pytest.fixture(scope="module")
def step_setup(sd, torch_pipeline_dir, dataset_dir):
    """Our step with TextEncoderLora (rank 4, alpha 8) on the tiny SD pipeline, adapters with random B everywhere
    (so that every adapter's gradient is non-zero), one batch of 2 from the synthetic dataset, one device."""
    modules, params = sd
    kind = trainable.from_config(cli.parse_config([
        "--pretrained_model_name_or_path", torch_pipeline_dir, "--train_data_dir", dataset_dir, "--output_dir",
        "unused", "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--train_text_encoder"]), modules)
    assert isinstance(kind, trainable.TextEncoderLora)
    start = kind.initial_params(modules.unet, params["unet"], params)
    adapters = {"unet": random_adapters(modules.unet.abstract_params(), lora.DEFAULT_TARGET_MODULES, seed=11),
                "text_encoder": random_adapters(modules.text_encoder.abstract_params(),
                                                lora.TEXT_ENCODER_TARGET_MODULES, seed=12)}
    assert jax.tree_util.tree_structure(start) == jax.tree_util.tree_structure(adapters)
    schedule = optax.constant_schedule(1e-2)
    config = step.StepConfig(unet=modules.unet, vae=modules.vae, text_encoder=modules.text_encoder, family=family.
                             STABLE_DIFFUSION, noise_schedule=load_noise_schedule(torch_pipeline_dir, None),
                             optimizer=optim.make_optimizer(schedule, weight_decay=0.0), learning_rate=schedule,
                             trainable=kind)
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    frozen = step.frozen_params(params["vae"], params["text_encoder"], params["unet"])
    frozen = jax.device_put(frozen, sharding.tree_shardings(mesh, frozen))
    clip = tokenizer.load_tokenizer(os.path.join(torch_pipeline_dir, "tokenizer"))
    loader = data.build_train_loader(DataConfig(train_data_dir=dataset_dir, resolution=RESOLUTION), clip,
                                     host_batch_size=2, seed=1)
    batches = loader.iterator()
    host_batch = next(batches)
    batches.close()
    grads_of = jax.jit(lambda params, frozen, batch, key: step.loss_and_grads(config, params, frozen, batch, key))
    # Placed as the train state's params and key are, so that one compiled program serves every call.
    place = lambda tree: jax.device_put(tree, sharding.tree_shardings(mesh, tree))  # noqa: E731
    return dict(config=config, mesh=mesh, frozen=frozen, adapters=place(adapters), host_batch=host_batch,
                batch=sharding.global_batch(mesh, host_batch), grads_of=grads_of, key=place(jax.random.PRNGKey(3)),
                place=place)


def torch_lora_state(name: str) -> str:
    """A PEFT parameter's name in diffusers' models -> our file's key (adapter name out, CLIP's text_model. in)."""
    component, rest = name.split(".", 1)
    rest = re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.[^.]+(\.weight)?$", r".\1.weight", rest)
    if component == "text_encoder" and not rest.startswith("text_model."):
        rest = "text_model." + rest
    return f"{component}.{rest}"


def test_step_loss_and_gradients_equal_pytorch_and_reach_the_text_encoder(step_setup, torch_pipeline_dir, tmp_path):
    """train_text_to_image_lora.py's step with the text encoder trained, in PyTorch: diffusers' models with our
    adapters loaded by `load_lora_weights` (PEFT layers), the same randomness our step draws; the loss and the
    gradients of every adapter (UNet and text encoder) agree, and the text encoder's are far from zero."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    s = step_setup
    loss, grads = s["grads_of"](s["adapters"], s["frozen"], s["batch"], s["key"])
    drawn = jax.device_get(step.step_randomness(s["config"], s["key"], step.batch_latent_shape(s["config"],
                                                                                                s["host_batch"])))
    folder = write_file(str(tmp_path), s["config"].unet.abstract_params(), s["adapters"]["unet"],
                        {"text_encoder": s["adapters"]["text_encoder"]})
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    pipe.load_lora_weights(folder)
    scheduler = DDPMScheduler.from_pretrained(torch_pipeline_dir, subfolder="scheduler")
    trained = {}
    for component in ("unet", "text_encoder"):
        for name, parameter in getattr(pipe, component).named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_" in name:
                trained[torch_lora_state(f"{component}.{name}")] = parameter
    host = s["host_batch"]
    posterior = pipe.vae.encode(torch.tensor(host["pixel_values"])).latent_dist
    latents = (posterior.mean + posterior.std * torch.tensor(drawn["posterior_noise"])) * pipe.vae.config.scaling_factor
    noise, timesteps = torch.tensor(drawn["noise"]), torch.tensor(drawn["timesteps"], dtype=torch.long)
    context = pipe.text_encoder(torch.tensor(host["input_ids"], dtype=torch.long), return_dict=False)[0]
    prediction = pipe.unet(scheduler.add_noise(latents.detach(), noise, timesteps), timesteps, context).sample
    reference_loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
    reference_loss.backward()
    reference = {key: parameter.grad.numpy() for key, parameter in trained.items()}

    ours = flat_state(jax.device_get(grads))
    assert sorted(ours) == sorted(reference) and len([k for k in ours if k.startswith("text_encoder.")]) == 16
    assert abs(float(loss) - float(reference_loss)) <= LOSS_RTOL * float(reference_loss)
    errors_per_tensor = {key: rel_err(ours[key], reference[key]) for key in ours}
    for prefix, tolerance in (("text_encoder.", TEXT_GRAD_TOL), ("unet.", UNET_GRAD_TOL)):
        found = max((error, key) for key, error in errors_per_tensor.items() if key.startswith(prefix))
        assert found[0] <= tolerance, found
    text_norm = float(optax.tree.norm(grads["text_encoder"]))
    reference_norm = float(np.sqrt(sum(np.sum(reference[k] ** 2) for k in reference if k.startswith("text_encoder."))))
    assert abs(text_norm - reference_norm) <= GRAD_NORM_RTOL * reference_norm
    assert min(np.abs(g).max() for g in jax.tree_util.tree_leaves(grads["text_encoder"])) > 1e-6


def test_training_lowers_the_loss_and_moves_the_text_encoder_adapters(step_setup, sd):
    """Five steps (the step's two halves, `loss_and_grads` then `apply_gradients`, each with its step key) from the
    PEFT init (B zero): the loss on a fixed batch and noise goes down, the text encoder's B leave zero; the
    differentiated program is compiled once."""
    s = step_setup
    modules, params = sd
    start = s["config"].trainable.initial_params(modules.unet, params["unet"], params)
    state, _ = step.create_state(s["config"], s["mesh"], start, seed=0)
    apply_gradients = jax.jit(lambda state, grads: step.apply_gradients(s["config"], state, grads))
    before = float(s["grads_of"](state.params, s["frozen"], s["batch"], s["key"])[0])
    for _ in range(5):
        key = s["place"](step.step_key(state))
        state = apply_gradients(state, s["grads_of"](state.params, s["frozen"], s["batch"], key)[1])
    after = float(s["grads_of"](state.params, s["frozen"], s["batch"], s["key"])[0])
    assert after < 0.9 * before, (before, after)
    text_B = [np.abs(b).max() for _, b in lora.adapters(jax.device_get(state.params["text_encoder"])).values()]
    assert len(text_B) == 8 and min(text_B) > 1e-3
    assert s["grads_of"]._cache_size() == 1



def test_the_held_out_loss_reads_the_text_encoder_adapters(step_setup, sd, torch_pipeline_dir, dataset_dir):
    """--validation_split with --train_text_encoder: the held-out loss conditions on the adapted text encoder, as the
    step does (the trainable's hook): with the text encoder's B at zero it is the UNet-only LoRA's loss, with random
    B it is another."""
    s = step_setup
    modules, _ = sd
    unet_only = trainable.from_config(cli.parse_config([
        "--pretrained_model_name_or_path", torch_pipeline_dir, "--train_data_dir", dataset_dir, "--output_dir",
        "unused", "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA)]), modules)
    batch = dict(s["batch"], held_out_index=jnp.arange(2, dtype=jnp.int32))
    key, timesteps = held_out.fixed_key(0), held_out.fixed_timesteps(1000)

    def losses(config, params):
        return np.asarray(jax.jit(lambda p: step.held_out_losses(config, p, s["frozen"], batch, key, timesteps))(params))

    text_adapters = jax.device_get(s["adapters"]["text_encoder"])
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.zeros_like(leaf) if path[-1].key == lora.B else leaf, text_adapters)
    adapted = losses(s["config"], s["adapters"])
    at_zero = losses(s["config"], {"unet": s["adapters"]["unet"], "text_encoder": zeroed})
    np.testing.assert_allclose(at_zero, losses(dataclasses.replace(s["config"], trainable=unet_only),
                                               s["adapters"]["unet"]), rtol=1e-6)
    assert np.abs(adapted - at_zero).max() > 1e-3 * np.abs(at_zero).max(), (adapted, at_zero)


# ---- a training run through the command line ------------------------------------------------------------------

def te_argv(model_dir, dataset_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", dataset_dir, "--output_dir", output_dir,
            "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--random_flip", "--seed", "2",
            "--lora_rank", str(RANK), "--lora_alpha", str(int(ALPHA)), "--train_text_encoder", "--learning_rate",
            "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--log_every", "1", "--report_to", "none",
            *extra]


@pytest.fixture(scope="module")
def trained(torch_pipeline_dir, dataset_dir, tmp_path_factory):
    """4 steps with the text encoder's adapters, --lora_merge, validation at step 4, data parallel on 8 devices."""
    output_dir = str(tmp_path_factory.mktemp("te-lora-run"))
    assert cli.main(te_argv(torch_pipeline_dir, dataset_dir, output_dir, "--lora_merge", *VALIDATION[:-6],
                            "--validation_steps", "4", *VALIDATION[-4:])) == 0
    return output_dir


def test_the_run_file_loads_in_diffusers_and_the_merged_pipeline_is_the_same_model(trained, sd, torch_pipeline_dir):
    """The trained file (PEFT keys of the UNet and the text encoder, alpha 8 in the metadata) in diffusers gives our
    text encoder's and UNet's outputs; the --lora_merge pipeline (UNet and text encoder merged) equals it."""
    from diffusers import StableDiffusionPipeline

    modules, params = sd
    abstract = {"unet": modules.unet.abstract_params(), "text_encoder": modules.text_encoder.abstract_params()}
    adapters, infos = lora_files.load_lora_components(trained, abstract)
    assert {name: (info.rank, info.scale, info.modules) for name, info in infos.items()} == {
        "unet": (4, 2.0, 32), "text_encoder": (4, 2.0, 8)}
    assert min(np.abs(b).max() for _, b in lora.adapters(adapters["text_encoder"]).values()) > 1e-4  # B moved
    ids = token_ids(torch_pipeline_dir)
    ours = our_text_outputs(modules.text_encoder, params["text_encoder"], adapters["text_encoder"], ids)
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    base = torch_text_outputs(pipe, "text_encoder", ids)
    pipe.load_lora_weights(trained)
    reference = torch_text_outputs(pipe, "text_encoder", ids)
    assert worst(ours, reference) <= PARITY_TOL
    assert rel_err(reference[-2], base[-2]) > 1e-3  # training moved the text encoder
    merged = StableDiffusionPipeline.from_pretrained(trained)
    assert worst(torch_text_outputs(merged, "text_encoder", ids), reference) <= PARITY_TOL
    rng = np.random.default_rng(0)
    sample, timesteps = rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([3, 700])
    context = torch.tensor(reference[-2][:2])
    ours_unet = lora.apply_unet(modules.unet, params["unet"], adapters["unet"], 2.0, sample, timesteps,
                                reference[-2][:2]).sample
    with torch.no_grad():
        lora_unet = pipe.unet(torch.tensor(sample), torch.tensor(timesteps), context).sample.numpy()
        merged_unet = merged.unet(torch.tensor(sample), torch.tensor(timesteps), context).sample.numpy()
    assert rel_err(ours_unet, lora_unet) <= UNET_TOL and rel_err(merged_unet, lora_unet) <= UNET_TOL
    card = open(os.path.join(trained, "README.md")).read()
    assert "text encoder" in card and "q_proj,k_proj,v_proj,out_proj" in card


def test_validation_draws_what_generate_draws_with_the_text_encoder_adapters(trained, torch_pipeline_dir, tmp_path):
    """The step-4 grid equals `generate --lora` of the exported file (both adapter sets); without the text encoder's
    adapters generate draws something else."""
    grid_path = os.path.join(trained, "validation", "step_4.png")
    assert_validation_grid_is_what_generate_draws(grid_path, torch_pipeline_dir, seed=2, lora=trained)
    unet_only = {key: value for key, value in load_file(os.path.join(trained, LORA_FILE)).items()
                 if key.startswith("unet.")}
    with safe_open(os.path.join(trained, LORA_FILE), "np") as handle:
        metadata = handle.metadata()
    save_file(unet_only, str(tmp_path / LORA_FILE), metadata=metadata)
    with pytest.raises(AssertionError):
        assert_validation_grid_is_what_generate_draws(grid_path, torch_pipeline_dir, seed=2, lora=str(tmp_path))


def test_export_kohya_and_lora_init_read_back_the_same_tensors(trained, sd, torch_pipeline_dir, dataset_dir,
                                                                tmp_path):
    """`export --checkpoint` writes the run's file again (bit for bit); with --lora_format kohya, lora_te_ keys that
    diffusers loads into the same text encoder; --lora_init of either file starts from the file's tensors."""
    from diffusers import StableDiffusionPipeline

    modules, params = sd
    checkpoint = os.path.join(trained, "checkpoints", "4")
    assert export.main(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "peft")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "peft" / LORA_FILE)), load_file(os.path.join(trained, LORA_FILE)))
    assert export.main(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "kohya"), "--lora_format",
                        "kohya"]) == 0
    kohya_keys = load_file(str(tmp_path / "kohya" / LORA_FILE))
    assert len([key for key in kohya_keys if key.startswith("lora_te_")]) == 3 * 8
    assert kohya_keys["lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"] == ALPHA
    ids = token_ids(torch_pipeline_dir)
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    pipe.load_lora_weights(trained)
    reference = torch_text_outputs(pipe, "text_encoder", ids)
    pipe = StableDiffusionPipeline.from_pretrained(torch_pipeline_dir)
    pipe.load_lora_weights(str(tmp_path / "kohya"))
    assert worst(torch_text_outputs(pipe, "text_encoder", ids), reference) <= PARITY_TOL

    abstract = {"unet": modules.unet.abstract_params(), "text_encoder": modules.text_encoder.abstract_params()}
    written = flat_state(lora_files.load_lora_components(trained, abstract)[0])
    for folder in (trained, str(tmp_path / "kohya")):
        argv = te_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "unused"), "--lora_init", folder)
        started = trainable.from_config(cli.parse_config(argv), modules).initial_params(modules.unet, params["unet"],
                                                                                        params)
        assert_same_tensors(flat_state(started), written)


def test_resume_is_exact_and_refuses_another_train_text_encoder(trained, torch_pipeline_dir, dataset_dir, tmp_path,
                                                                capsys):
    """From checkpoint 2 to 4: the file equals the uninterrupted run's bit for bit. Resuming it without
    --train_text_encoder (another computation) is one line, exit 2, before anything is loaded; so is the flag
    without --lora_rank (the text encoder is not fine-tuned whole)."""
    resumed = str(tmp_path / "resumed")
    shutil.copytree(trained, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, LORA_FILE))
    argv = te_argv(torch_pipeline_dir, dataset_dir, resumed, "--lora_merge", "--resume_from_checkpoint", "latest")
    assert cli.main(argv) == 0
    assert_same_tensors(load_file(os.path.join(resumed, LORA_FILE)), load_file(os.path.join(trained, LORA_FILE)))
    capsys.readouterr()

    argv.remove("--train_text_encoder")
    assert cli.main(argv) == errors.EXIT_USAGE
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--train_text_encoder: True in the checkpoint, False now" in error, error
    argv = te_argv(torch_pipeline_dir, dataset_dir, str(tmp_path / "full"))
    del argv[argv.index("--lora_rank"):argv.index("--lora_rank") + 4]
    assert cli.main(argv) == errors.EXIT_USAGE
    assert capsys.readouterr().err == ("error: --train_text_encoder without --lora_rank: t2i_flax does not fine-tune "
                                       "the whole text encoder; add --lora_rank to train LoRA adapters on it (and the "
                                       "UNet)\n")
    assert not os.path.exists(tmp_path / "full")


def test_sdxl_run_trains_both_text_encoders_sharded_and_exports_what_diffusers_loads(sdxl, torch_sdxl_pipeline_dir,
                                                                                      sized_dataset_dir, tmp_path):
    """SDXL, 2 steps with --fsdp 8 (the frozen encoders sharded, the adapters replicated) and empty prompts: both
    encoders' adapters train (all but the first encoder's last layer, whose output the penultimate-state conditioning
    never reads: its gradient is zero, in PyTorch too); the file loads in StableDiffusionXLPipeline and gives both
    encoders' outputs ours give; the merged pipeline is that model. (Validation and generate take the same text-encoder
    hook as SD's, tested above.)"""
    from diffusers import StableDiffusionXLPipeline

    output_dir = str(tmp_path / "sdxl")
    argv = ["--pretrained_model_name_or_path", torch_sdxl_pipeline_dir, "--train_data_dir", sized_dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--seed", "3",
            "--report_to", "none", "--lora_rank", str(RANK), "--lora_alpha", str(int(ALPHA)), "--train_text_encoder",
            "--learning_rate", "1e-2", "--max_train_steps", "2", "--fsdp", "8", "--proportion_empty_prompts", "0.5",
            "--lora_merge"]
    assert cli.main(argv) == 0
    modules, params = sdxl
    names = ("text_encoder", "text_encoder_2")
    abstract = {name: getattr(modules, name).abstract_params() for name in ("unet",) + names}
    adapters, infos = lora_files.load_lora_components(output_dir, abstract)
    assert {name: (info.modules, info.scale) for name, info in infos.items()} == {
        "unet": (88, SCALE), "text_encoder": (12, SCALE), "text_encoder_2": (12, SCALE)}
    moved = {name: {"/".join(path[3:]): float(np.abs(b).max()) for path, (_, b) in lora.adapters(adapters[name]).items()}
             for name in names}
    assert min(moved["text_encoder_2"].values()) > 1e-4
    assert min(value for path, value in moved["text_encoder"].items() if not path.startswith("2/")) > 1e-4
    assert max(value for path, value in moved["text_encoder"].items() if path.startswith("2/")) == 0.0

    pipe = StableDiffusionXLPipeline.from_pretrained(torch_sdxl_pipeline_dir)
    pipe.load_lora_weights(output_dir)
    merged = StableDiffusionXLPipeline.from_pretrained(output_dir)
    for name, folder in zip(names, ("tokenizer", "tokenizer_2")):
        ids = token_ids(torch_sdxl_pipeline_dir, folder)
        reference = torch_text_outputs(pipe, name, ids)
        assert worst(our_text_outputs(getattr(modules, name), params[name], adapters[name], ids), reference) \
            <= PARITY_TOL
        assert worst(torch_text_outputs(merged, name, ids), reference) <= PARITY_TOL
