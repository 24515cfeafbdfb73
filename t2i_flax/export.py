"""Writes the trained model as a diffusers StableDiffusionPipeline folder (safetensors, PyTorch names)
that `StableDiffusionPipeline.from_pretrained(output_dir)` loads as it is: no safety checker download,
an inference scheduler with steps_offset=1 and the model's prediction_type."""
from __future__ import annotations

import json
import os
import shutil

from t2i_flax.errors import CheckpointError

DIFFUSERS_VERSION = "0.42.1"
TRAINING_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def inference_scheduler_config(training_config: dict, prediction_type: str) -> dict:
    """PNDM (the SD default) over the same betas the model was trained with."""
    config = {key: training_config[key] for key in TRAINING_SCHEDULE_KEYS if key in training_config}
    config.update({"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                   "prediction_type": prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True,
                   "steps_offset": 1, "timestep_spacing": "leading"})
    return config


def model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)


def export_pipeline(output_dir: str, components: dict, training_scheduler_config: dict, prediction_type: str,
                    tokenizer_dir: str) -> None:
    """`components`: {"unet"|"vae"|"text_encoder": (module, host params)}."""
    os.makedirs(output_dir, exist_ok=True)
    for name, (module, params) in components.items():
        module.save_pretrained(os.path.join(output_dir, name), params)
    tokenizer_out = os.path.join(output_dir, "tokenizer")
    if os.path.isdir(tokenizer_out):
        shutil.rmtree(tokenizer_out)
    shutil.copytree(tokenizer_dir, tokenizer_out)
    os.makedirs(os.path.join(output_dir, "scheduler"), exist_ok=True)
    _write_json(os.path.join(output_dir, "scheduler", "scheduler_config.json"),
                inference_scheduler_config(training_scheduler_config, prediction_type))
    _write_json(os.path.join(output_dir, "model_index.json"), model_index())


def export_trained_pipeline(output_dir: str, model_dir: str, variant: str | None, unet, unet_params,
                            training_scheduler_config: dict, prediction_type: str) -> None:
    """The trained UNet (host arrays) with the base model's VAE, text encoder and tokenizer."""
    from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel

    vae, vae_params = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=variant)
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=variant)
    export_pipeline(output_dir, {"unet": (unet, unet_params), "vae": (vae, vae_params),
                                 "text_encoder": (text_encoder, text_params)},
                    training_scheduler_config, prediction_type, os.path.join(model_dir, "tokenizer"))


def export_trained(output_dir: str, config, model_dir: str, unet, trained, scheduler_config: dict,
                   prediction_type: str) -> str:
    """The end of training (or a checkpoint's export): the fine-tuned pipeline, or with LoRA the adapters'
    file (and with --lora_merge also the pipeline with them merged into the float32 UNet). Host arrays.
    Returns what was written, in words."""
    if not config.lora.enabled:
        export_trained_pipeline(output_dir, model_dir, config.model.variant, unet, trained, scheduler_config,
                                prediction_type)
        return "fine-tuned pipeline"
    from t2i_flax import lora
    from t2i_flax.models import FlaxUNet2DConditionModel

    lora.save_lora_weights(output_dir, trained, config.lora.lora_rank, config.lora.lora_alpha,
                           lora.parse_target_modules(config.lora.lora_target_modules))
    if not config.lora.lora_merge:
        return f"LoRA adapters ({lora.LORA_WEIGHTS_NAME})"
    _, base = FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=config.model.variant)
    merged = jax_to_host(lora.merge_lora(base, trained, config.lora.scale))
    export_trained_pipeline(output_dir, model_dir, config.model.variant, unet, merged, scheduler_config,
                            prediction_type)
    return f"LoRA adapters ({lora.LORA_WEIGHTS_NAME}) and the pipeline with them merged"


def jax_to_host(tree):
    import jax

    return jax.device_get(tree)


def push_to_hub(output_dir: str, repo_id: str | None, token: str | None) -> str:
    """Uploads the pipeline folder (not the logs). The token is passed through, never printed or saved."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message="t2i_flax fine-tune",
                  allow_patterns=["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*",
                                  "scheduler/*", "README.md", "validation.png", "pytorch_lora_weights.safetensors"])
    return repo_id


def export_checkpoint(checkpoint_path: str, output_dir: str, use_ema: bool = True) -> str:
    """Writes the diffusers folder of any checkpoint, as the end of training would have. The frozen VAE and
    text encoder come from the base model the run trained from (at the Hub commit it resolved to).
    Returns what was exported ("EMA" or "raw")."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from t2i_flax import checkpoint, hub, resume
    from t2i_flax.config import RunConfig
    from t2i_flax.models import FlaxUNet2DConditionModel
    from t2i_flax.noise import read_scheduler_config, schedule_from_config

    if checkpoint.is_remote(checkpoint_path) or os.path.isdir(checkpoint_path):
        directory, step = resume.parse_resume(os.path.abspath(checkpoint_path)
                                                  if not checkpoint.is_remote(checkpoint_path) else checkpoint_path, "")
    else:
        raise CheckpointError(f"--checkpoint {checkpoint_path}: not a folder; give the path of a step folder "
                              f"(<output_dir>/checkpoints/<step>)")
    checkpoints = checkpoint.Checkpoints(directory, read_only=True)
    if step not in checkpoints.steps():
        raise CheckpointError(f"--checkpoint {checkpoint_path}: not a complete checkpoint (steps in {directory}: "
                              f"{', '.join(map(str, checkpoints.steps())) or 'none'})")
    record = checkpoints.read_run_record(step)["run"]
    config = RunConfig.from_dict(record["config"])
    revision = record["resolved"].get("model_commit") or config.model.revision
    model_dir = hub.resolve_model_dir(config.model.pretrained_model_name_or_path, revision=revision,
                                      variant=config.model.variant, cache_dir=config.model.cache_dir)
    unet, _ = FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=config.model.variant,
                                                       load_weights=False)
    item = checkpoint.ITEM_EMA if use_ema and config.train.use_ema else checkpoint.ITEM_PARAMS
    where = SingleDeviceSharding(jax.devices()[0])
    if config.lora.enabled:
        from t2i_flax import train

        trained_shape = jax.eval_shape(train.init_lora(config, unet))
    else:
        trained_shape = unet.abstract_params()
    abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                      trained_shape)
    params = jax.device_get(checkpoints.restore(step, {item: abstract})[item])
    scheduler_config = read_scheduler_config(model_dir)
    prediction_type = schedule_from_config(scheduler_config, config.model.prediction_type).prediction_type
    export_trained(output_dir, config, model_dir, unet, params, scheduler_config, prediction_type)
    return "EMA" if item == checkpoint.ITEM_EMA else "raw"


def main(argv=None) -> int:
    """python -m t2i_flax.export --checkpoint <output_dir>/checkpoints/<step> --output_dir DIR [--no_ema]"""
    import argparse
    import sys

    from t2i_flax import errors

    parser = argparse.ArgumentParser(prog="python -m t2i_flax.export",
                                     description="Write the diffusers pipeline folder of a training checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a step folder: <output_dir>/checkpoints/<step>")
    parser.add_argument("--output_dir", required=True, help="where the diffusers pipeline goes")
    parser.add_argument("--no_ema", action="store_true", help="export the raw weights, not their EMA")
    args = parser.parse_args(argv)
    try:
        if os.path.isfile(args.output_dir):
            raise errors.FlagError(f"--output_dir {args.output_dir} is a file, not a folder")
        what = export_checkpoint(args.checkpoint, args.output_dir, use_ema=not args.no_ema)
    except errors.UserError as error:
        return errors.report(error)
    print(f"exported the {what} weights of {args.checkpoint} to {os.path.abspath(args.output_dir)}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def write_model_card(output_dir: str, base_model: str, dataset: str, settings: dict, validation_grid: str | None,
                     prompts: list[str], lora: bool = False, license_name: str = "other") -> str:
    """README.md in diffusers' model card style: YAML front matter (base_model, license, tags), what it was
    trained on and how, the last validation grid, how to load it. Returns its path."""
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "t2i_flax", "jax-flax"]
    tags += ["lora"] if lora else []
    lines = ["---", f"base_model: {base_model}", f"license: {license_name}", "library_name: diffusers",
             "pipeline_tag: text-to-image", "tags:"] + [f"- {tag}" for tag in tags] + ["inference: true", "---", ""]
    name = os.path.basename(os.path.abspath(output_dir))
    kind = "LoRA adapters for" if lora else "a fine-tune of"
    shown = f"`{base_model}`" if os.path.isdir(base_model) else f"[{base_model}](https://huggingface.co/{base_model})"
    lines += [f"# {name}", "", f"{kind} {shown} on `{dataset}`, trained with t2i_flax (JAX/Flax).", ""]
    if validation_grid is not None:
        shutil.copyfile(validation_grid, os.path.join(output_dir, "validation.png"))
        lines += ["## Validation images (end of training)", "", "![validation images](validation.png)", "",
                  "Prompts: " + "; ".join(f"`{p}`" for p in prompts), ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    lines += ["", "## How to use", "", "```python", "import torch", "from diffusers import StableDiffusionPipeline", ""]
    if lora:
        lines += [f'pipeline = StableDiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16)',
                  f'pipeline.load_lora_weights("{name}")']
    else:
        lines += [f'pipeline = StableDiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float16)']
    prompt = prompts[0] if prompts else "a photo"
    lines += ['pipeline = pipeline.to("cuda")', f'image = pipeline("{prompt}").images[0]', "```", "",
              "Or with JAX, without PyTorch:", "", "```bash",
              f'python -m t2i_flax.generate --model {base_model if lora else name}'
              + (f" --lora {name}" if lora else "") + f' --prompt "{prompt}" --out images', "```", ""]
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    return path


def base_model_license(model_dir: str) -> str:
    """The `license:` of the base model's own model card when it came with one, else "other"."""
    path = os.path.join(model_dir, "README.md")
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(20000)
        if text.startswith("---"):
            for line in text.split("---")[1].splitlines():
                if line.startswith("license:"):
                    return line.split(":", 1)[1].strip() or "other"
    return "other"
