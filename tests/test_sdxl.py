"""SDXL end to end on a tiny SDXL pipeline made with the PyTorch classes: the command line trains it (the model
kind read from the folder), lr 0 exports it bit for bit as a folder StableDiffusionXLPipeline loads, validation
while training draws what `generate` draws from the export, our sampler's final latents equal
StableDiffusionXLPipeline's from the same latents, and folders of kinds we do not train are refused with one line
before any data is read. (The step itself against train_text_to_image_sdxl.py: tests/test_step_vs_torch.py.)"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from t2i_flax import cli, family, generate
from t2i_flax.errors import ModelError

from conftest import RESOLUTION
from test_train import VALIDATION, assert_validation_grid_is_what_generate_draws, safetensors_of


def sdxl_argv(pipeline_dir, dataset_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--random_flip",
            "--seed", "3", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def lr_zero_run(torch_sdxl_pipeline_dir, sized_dataset_dir, tmp_path_factory):
    """lr 0, LoRA merged into the exported UNet (B stays 0: the merged UNet is the base's, bit for bit), EMA, FSDP
    over the 8 devices, empty prompts, validation images through the adapters (the sampler compiled before the
    first step): (output folder, stdout). Full fine-tuning's step on SDXL: tests/test_step_vs_torch.py."""
    import contextlib
    import io

    output_dir = str(tmp_path_factory.mktemp("sdxl-lr0"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(sdxl_argv(torch_sdxl_pipeline_dir, sized_dataset_dir, output_dir, "--learning_rate", "0",
                                  "--use_ema", "--fsdp", "8", "--max_train_steps", "2", "--lora_rank", "4",
                                  "--lora_merge", "--proportion_empty_prompts", "0.2", *VALIDATION)) == 0
    return output_dir, stdout.getvalue()


def test_lr_zero_exports_the_sdxl_pipeline_bit_for_bit(lr_zero_run, torch_sdxl_pipeline_dir):
    output_dir, stdout = lr_zero_run
    assert "data: 16 examples" in stdout and "LoRA: rank 4" in stdout
    # transformers 5 saves CLIP without the `text_model.` prefix that we write (both load)
    ours = {k.replace("/text_model.", "/"): v for k, v in safetensors_of(output_dir).items()}
    base = {k.replace("/text_model.", "/"): v for k, v in safetensors_of(torch_sdxl_pipeline_dir).items()}
    assert sorted(ours) == sorted(base) and any(k.startswith("text_encoder_2/") for k in base)
    for name, tensor in base.items():
        assert ours[name].dtype == tensor.dtype and ours[name].tobytes() == tensor.tobytes(), name
    index = json.load(open(os.path.join(output_dir, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    # the base model's own scheduler, class and config, as the PyTorch scripts keep it
    exported = json.load(open(os.path.join(output_dir, "scheduler", "scheduler_config.json")))
    original = json.load(open(os.path.join(torch_sdxl_pipeline_dir, "scheduler", "scheduler_config.json")))
    assert exported["_class_name"] == "EulerDiscreteScheduler" == index["scheduler"][1]
    assert {k: v for k, v in exported.items() if k != "_diffusers_version"} == \
        {k: v for k, v in original.items() if k != "_diffusers_version"}
    for name in ("tokenizer", "tokenizer_2"):
        assert sorted(os.listdir(os.path.join(output_dir, name))) == \
            sorted(os.listdir(os.path.join(torch_sdxl_pipeline_dir, name)))
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "- stable-diffusion-xl" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    assert "- lora" in card


def test_diffusers_loads_and_runs_the_export(lr_zero_run):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(lr_zero_run[0])
    images = pipeline("a red square", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()


def test_validation_while_training_draws_what_generate_draws_from_the_export(lr_zero_run, torch_sdxl_pipeline_dir):
    """SDXL validation: both text encoders, time ids of the target size, no negative prompt (zero conditioning,
    as the SDXL pipeline draws without one); generate on the export gives the same grid."""
    output_dir = lr_zero_run[0]
    assert sorted(os.listdir(os.path.join(output_dir, "validation"))) == ["step_2.png"]
    assert_validation_grid_is_what_generate_draws(os.path.join(output_dir, "validation", "step_2.png"), output_dir,
                                                  seed=3)


@pytest.mark.parametrize("scheduler,negative", [("ddim", ["a blue square", "a red square"]), ("euler", None),
                                                ("euler", ["a blue square", ""]), ("dpm++2m", None)])
def test_final_latents_equal_stable_diffusion_xl_pipelines(torch_sdxl_pipeline_dir, scheduler, negative):
    """Our sampler against StableDiffusionXLPipeline from the same initial latents (float32, guidance 5), two
    prompts: with negative prompts, and without (zero negative conditioning, force_zeros_for_empty_prompt)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLPipeline)

    from oracle import rel_err

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}
    reference = StableDiffusionXLPipeline.from_pretrained(torch_sdxl_pipeline_dir)
    reference.scheduler = classes[scheduler].from_config(reference.scheduler.config)
    ours = generate.load_pipeline(torch_sdxl_pipeline_dir)
    prompts = ["a red square on blue", "a green square on yellow"]
    latents = np.random.default_rng(0).standard_normal((2, 4, RESOLUTION // 2, RESOLUTION // 2)).astype(np.float32)
    want = reference(prompts, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                     height=RESOLUTION, width=RESOLUTION, latents=torch.tensor(latents),
                     output_type="latent").images.numpy()
    got = generate.run_sampler(ours, prompts, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                               height=RESOLUTION, width=RESOLUTION, latents=latents, scheduler=scheduler,
                               output_type="latent")
    print(f"SDXL final latents, {scheduler}, negative {negative}: rel_err {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-4


def test_the_kind_is_read_from_the_folder_and_other_kinds_are_refused(torch_sdxl_pipeline_dir, pipeline_dir, tmp_path,
                                                                      capsys):
    assert family.detect(torch_sdxl_pipeline_dir) is family.STABLE_DIFFUSION_XL
    assert family.detect(pipeline_dir) is family.STABLE_DIFFUSION
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for folder, what in ((refiner, "an SDXL refiner"), (flux, "a FluxPipeline folder")):
        with pytest.raises(ModelError, match=what):
            family.detect(str(folder))
        # refused by the command line before any data is read (a Hub dataset that would fail to load offline)
        argv = sdxl_argv(str(folder), "unused", str(tmp_path / "out"))
        argv[argv.index("--train_data_dir"):argv.index("--train_data_dir") + 2] = ["--dataset_name", "no-such/set"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and what in err and "SDXL base" in err, err


def test_parts_that_do_not_fit_together_are_one_line(torch_sdxl_pipeline_dir, tmp_path):
    """A UNet whose projection_class_embeddings_input_dim does not match the pooled embedding and time ids, and a
    VAE override with other latent channels: ModelError naming the numbers, before anything is loaded."""
    from t2i_flax import setup
    from t2i_flax.config import ModelConfig

    folder = tmp_path / "wrong"
    shutil.copytree(torch_sdxl_pipeline_dir, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["projection_class_embeddings_input_dim"] += 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="projection_class_embeddings_input_dim"):
        setup.read_base_model(str(folder), ModelConfig(pretrained_model_name_or_path=str(folder)))

    vae = tmp_path / "vae8"
    shutil.copytree(os.path.join(torch_sdxl_pipeline_dir, "vae"), vae)
    vae_config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps(dict(vae_config, latent_channels=8)))
    model = ModelConfig(pretrained_model_name_or_path=torch_sdxl_pipeline_dir,
                        pretrained_vae_model_name_or_path=str(vae))
    with pytest.raises(ModelError, match="8 latent channels"):
        setup.read_base_model(torch_sdxl_pipeline_dir, model)


def test_lora_file_loads_in_the_sdxl_pipeline_and_draws_what_our_unet_draws(lr_zero_run, torch_sdxl_pipeline_dir,
                                                                            tmp_path):
    """LoRA on the SDXL UNet: the run's PEFT file loads in StableDiffusionXLPipeline.load_lora_weights; with the
    adapters moved (B random: the run's are still 0 at lr 0), our UNet with them and the added conditions draws
    what diffusers' draws with the file."""
    from diffusers import StableDiffusionXLPipeline

    from oracle import rel_err
    from t2i_flax import lora, lora_files
    from t2i_flax.models import FlaxUNet2DConditionModel

    unet, base = FlaxUNet2DConditionModel.from_pretrained(torch_sdxl_pipeline_dir, subfolder="unet")
    adapters, info = lora_files.load_lora_weights(lr_zero_run[0], unet.abstract_params())
    assert info.rank == 4 and info.scale == 1.0 and info.modules > 10
    rng = np.random.default_rng(0)
    assert all(not np.asarray(b).any() for _, b in lora.adapters(adapters).values())  # lr 0: B is still 0
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.normal(size=x.shape) * 0.1).astype(np.float32) if path[-1].key == "lora_B"
        else np.asarray(x), adapters)
    lora_files.save_lora_weights(str(tmp_path), adapters, 4, None)
    sample, timesteps = rng.normal(size=(2, 4, 16, 16)).astype(np.float32), np.array([3, 700])
    context = rng.normal(size=(2, 77, 48)).astype(np.float32)
    added = {"text_embeds": rng.normal(size=(2, 16)).astype(np.float32),
             "time_ids": np.array([[40, 32, 0, 4, 32, 32], [32, 48, 8, 0, 32, 32]], np.float32)}
    ours = lora.apply_unet(unet, base, adapters, 1.0, sample, timesteps, context, added_cond_kwargs=added).sample
    pipe = StableDiffusionXLPipeline.from_pretrained(torch_sdxl_pipeline_dir)
    torch_inputs = (torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context))
    torch_added = {name: torch.tensor(value) for name, value in added.items()}
    with torch.no_grad():
        base_output = pipe.unet(*torch_inputs, added_cond_kwargs=torch_added).sample.numpy()
        pipe.load_lora_weights(str(tmp_path))
        reference = pipe.unet(*torch_inputs, added_cond_kwargs=torch_added).sample.numpy()
    assert rel_err(ours, reference) <= 1e-5
    assert rel_err(base_output, reference) > 1e-3  # the adapters change the output


def test_export_of_an_sdxl_checkpoint_is_the_runs_export(lr_zero_run, tmp_path):
    from t2i_flax import export

    output_dir = lr_zero_run[0]
    assert export.main(["--checkpoint", os.path.join(output_dir, "checkpoints", "2"), "--output_dir",
                        str(tmp_path / "x")]) == 0
    again, trained = safetensors_of(str(tmp_path / "x")), safetensors_of(output_dir)
    assert sorted(again) == sorted(trained) and all(again[k].tobytes() == trained[k].tobytes() for k in trained)
    for name in ("model_index.json", os.path.join("scheduler", "scheduler_config.json")):
        assert json.load(open(tmp_path / "x" / name)) == json.load(open(os.path.join(output_dir, name)))
