"""The model card: README.md in diffusers' model card style, beside the exported model."""
from __future__ import annotations

import os
import shutil

import numpy as np


def settings_table(config, plan, trainable) -> dict:
    """The training settings the card lists (after --scale_lr and the data's step count)."""
    optimizer = config.optimizer
    return {"steps": plan.max_train_steps, "global batch": plan.global_batch_size,
            "resolution": config.data.resolution, "learning rate": f"{plan.learning_rate:g} ({optimizer.lr_scheduler}, "
            f"{optimizer.lr_warmup_steps} warmup steps)", **optimizer_settings(optimizer),
            "max grad norm": optimizer.max_grad_norm, "mixed precision": config.model.mixed_precision,
            "EMA": f"decay {config.train.ema_decay}" if config.train.use_ema else "no",
            "noise offset": config.train.noise_offset, **noise_settings(config.train),
            **({"zero terminal SNR": "yes (rescaled betas, trailing timesteps)"} if config.model.rescale_betas_zero_snr
               else {}), "seed": config.train.seed,
            "crop / flip": f"{'center' if config.data.center_crop else 'random'} / "
                           f"{'random' if config.data.random_flip else 'none'}",
            "resize filter": config.data.image_interpolation_mode, **caption_settings(config.data),
            **bucket_settings(config.data), **held_out_settings(config.data, plan), **trainable.card_settings(),
            **({"tracker project": config.output.tracker_project_name} if config.output.tracker_project_name else {})}


def optimizer_settings(optimizer) -> dict:
    """The optimizer's row: what it read of the flags (t2i_flax/optim.py)."""
    decay = f"weight decay {optimizer.adam_weight_decay}"
    if optimizer.optimizer == "adamw":
        return {"AdamW": f"betas {optimizer.adam_beta1}/{optimizer.adam_beta2}, {decay}, eps {optimizer.adam_epsilon}"}
    described = {"adafactor": "Adafactor (optax's defaults: factored, decay rate 0.8, update clipping 1, relative "
                              "to the parameters' scale)",
                 "lion": f"Lion (optax), betas 0.9/0.99, {decay}",
                 "prodigy": f"Prodigy (optax), betas {optimizer.adam_beta1}/{optimizer.adam_beta2}, {decay}, "
                            f"eps {optimizer.adam_epsilon}" + (", safeguarded warmup" if optimizer.warmup else "")}
    return {"optimizer": described[optimizer.optimizer]}


def noise_settings(train) -> dict:
    """The rows of the step's noise and timestep options, when set."""
    from t2i_flax.diffusion.timestep_bias import TimestepBias

    rows = {"input perturbation": train.input_perturbation} if train.input_perturbation else {}
    if train.dream_training:
        rows["DREAM"] = f"detail preservation {train.dream_detail_preservation:g}"
    bias = TimestepBias.from_config(train)
    if bias is not None:
        rows["timestep bias"] = bias.describe()
    return rows


def bucket_settings(data_config) -> dict:
    if not data_config.aspect_ratio_buckets:
        return {}
    return {"aspect-ratio buckets": f"step {data_config.bucket_step}, sides {data_config.min_bucket_resolution}-"
                                    f"{data_config.bucket_max_side} (buckets.json)"}


def held_out_settings(data_config, plan) -> dict:
    """--validation_split's row: how many images were held out of training for the held-out loss."""
    if not data_config.validation_split:
        return {}
    return {"validation split": f"{plan.num_held_out} images held out (--validation_split "
                                f"{data_config.validation_split:g}, seeded)"}


HELD_OUT_ROWS = 12  # points of the held-out loss curve the card lists at most


def held_out_section(curve: dict) -> list[str]:
    """The held-out loss's lines of the card: its last value, where it started and its lowest, and the curve (at
    most HELD_OUT_ROWS of its points, the first and the last among them)."""
    steps = sorted(curve)
    lowest = min(steps, key=lambda s: (curve[s], s))
    lines = ["## Held-out loss", "",
             f"The mean diffusion loss of the images `--validation_split` kept out of training, at fixed timesteps and "
             f"noise, of the trained (not EMA) weights: **{curve[steps[-1]]:.4f}** after step {steps[-1]} "
             f"({curve[steps[0]]:.4f} at step {steps[0]}; lowest {curve[lowest]:.4f} at step {lowest}).", ""]
    if len(steps) > HELD_OUT_ROWS:
        picks = np.unique(np.round(np.linspace(0, len(steps) - 1, HELD_OUT_ROWS)).astype(int))
        steps = [steps[i] for i in picks]
    return lines + ["| step | val_loss |", "|---|---|"] + [f"| {s} | {curve[s]:.4f} |" for s in steps] + [""]


def caption_settings(data) -> dict:
    """The caption options' row, when any is set."""
    parts = []
    if data.proportion_empty_prompts:
        parts.append(f"empty prompts {data.proportion_empty_prompts:g}")
    if data.shuffle_caption:
        parts.append("tags shuffled")
    if data.caption_tag_dropout:
        parts.append(f"tag dropout {data.caption_tag_dropout:g}")
    if parts and (data.shuffle_caption or data.caption_tag_dropout):
        separator = data.caption_separator.replace("|", "\\|")  # a table cell
        parts.append(f"first {data.keep_tokens} tags kept, split on `{separator}`")
    return {"captions": ", ".join(parts)} if parts else {}


def write_model_card(output_dir: str, base_model: str, dataset: str, settings: dict, validation_grid: str | None,
                     prompts: list[str], lora: bool = False, license_name: str = "other",
                     family_tags: tuple = ("stable-diffusion", "stable-diffusion-diffusers"),
                     pipeline_class: str = "StableDiffusionPipeline", held_out_curve: dict | None = None) -> str:
    """README.md in diffusers' model card style: YAML front matter (base_model, license, tags), what it was
    trained on and how, the last validation grid, the held-out loss ({step: val_loss}, --validation_split), how to
    load it. Returns its path."""
    from t2i_flax import single_file

    tags = [*family_tags, "text-to-image", "diffusers", "t2i_flax", "jax-flax"]
    tags += ["lora"] if lora else []
    hub_file = single_file.hub_url(base_model)  # a single file of a Hub repo: its repo is the base model
    card_base = "/".join(base_model.split("/")[:2]) if hub_file else base_model
    lines = ["---", f"base_model: {card_base}", f"license: {license_name}", "library_name: diffusers",
             "pipeline_tag: text-to-image", "tags:"] + [f"- {tag}" for tag in tags] + ["inference: true", "---", ""]
    name = os.path.basename(os.path.abspath(output_dir))
    kind = "LoRA adapters for" if lora else "a fine-tune of"
    shown = f"`{base_model}`" if os.path.exists(base_model) else \
        f"[{base_model}]({hub_file or f'https://huggingface.co/{base_model}'})"
    lines += [f"# {name}", "", f"{kind} {shown} on `{dataset}`, trained with t2i_flax (JAX/Flax).", ""]
    if validation_grid is not None:
        shutil.copyfile(validation_grid, os.path.join(output_dir, "validation.png"))
        lines += ["## Validation images (end of training)", "", "![validation images](validation.png)", "",
                  "Prompts: " + "; ".join(f"`{p}`" for p in prompts), ""]
    if held_out_curve:
        lines += held_out_section(held_out_curve)
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    lines += ["", "## How to use", "", "```python", "import torch", f"from diffusers import {pipeline_class}", ""]
    if lora:
        load = "from_single_file" if single_file.is_single_file(base_model) else "from_pretrained"
        lines += [f'pipeline = {pipeline_class}.{load}("{hub_file or base_model}", torch_dtype=torch.float16)',
                  f'pipeline.load_lora_weights("{name}")']
    else:
        lines += [f'pipeline = {pipeline_class}.from_pretrained("{name}", torch_dtype=torch.float16)']
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
