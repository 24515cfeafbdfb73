"""Writes the trained model as a diffusers StableDiffusionPipeline folder (safetensors, PyTorch names)
that `StableDiffusionPipeline.from_pretrained(output_dir)` loads as it is: no safety checker download,
an inference scheduler with steps_offset=1 and the model's prediction_type."""
from __future__ import annotations

import json
import os
import shutil

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


def push_to_hub(output_dir: str, repo_id: str | None, token: str | None) -> str:
    """Uploads the pipeline folder (not the logs). The token is passed through, never printed or saved."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message="t2i_flax fine-tune",
                  allow_patterns=["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*",
                                  "scheduler/*", "README.md"])
    return repo_id
