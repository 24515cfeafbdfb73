"""Writes the trained model as a diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) folder
(safetensors, PyTorch names) that `from_pretrained(output_dir)` loads as it is: no safety checker download,
the base model's own scheduler (class and config, as the PyTorch scripts keep it) with the prediction type
trained for. What is written with it (a LoRA file, a merged pipeline) is decided by what was trained
(t2i_flax/trainable.py, through `PipelineWriter`).

    python -m t2i_flax.export --checkpoint <output_dir>/checkpoints/<step> --output_dir DIR [--no_ema]
        [--single_file [--export_dtype float16|bfloat16|float32]]
    python -m t2i_flax.export --pipeline DIFFUSERS_FOLDER --output_dir DIR --single_file   # an existing folder

`--single_file` (the trainer's --export_single_file) also writes <output_dir>/<name>.safetensors, the pipeline
in the original Stable Diffusion layout (t2i_flax/single_file.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from t2i_flax.errors import CheckpointError

DIFFUSERS_VERSION = "0.42.1"

def model_index() -> dict:
    """model_index.json of an SD 1.x/2.x pipeline."""
    from t2i_flax.family import STABLE_DIFFUSION

    return STABLE_DIFFUSION.model_index()


def base_inference_scheduler_config(training_config: dict, prediction_type: str) -> dict:
    """The base model's own scheduler (class and config), with the prediction type the model was trained for."""
    return dict(training_config, prediction_type=prediction_type)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)


def export_pipeline(output_dir: str, components: dict, training_scheduler_config: dict, prediction_type: str,
                    tokenizer_dirs: dict, family) -> None:
    """`components`: {"unet"|"vae"|"text_encoder"[|"text_encoder_2"]: (module, host params)}; `tokenizer_dirs`:
    {folder name: the base's folder} of each tokenizer. `family`: family.StableDiffusion, or StableDiffusionXL,
    which keeps the base model's scheduler."""
    os.makedirs(output_dir, exist_ok=True)
    for name, (module, params) in components.items():
        module.save_pretrained(os.path.join(output_dir, name), params)
    for name, source in tokenizer_dirs.items():
        tokenizer_out = os.path.join(output_dir, name)
        if os.path.isdir(tokenizer_out):
            shutil.rmtree(tokenizer_out)
        shutil.copytree(source, tokenizer_out)
    os.makedirs(os.path.join(output_dir, "scheduler"), exist_ok=True)
    index = family.model_index()
    scheduler = base_inference_scheduler_config(training_scheduler_config, prediction_type)
    index["scheduler"] = ["diffusers", scheduler.get("_class_name", index["scheduler"][1])]
    _write_json(os.path.join(output_dir, "scheduler", "scheduler_config.json"), scheduler)
    _write_json(os.path.join(output_dir, "model_index.json"), index)


@dataclasses.dataclass(frozen=True)
class PipelineWriter:
    """Writes the trained model's diffusers folder: the trained UNet with the base model's VAE, text encoder
    and tokenizer. What is trained (t2i_flax/trainable.py) decides what it writes with it."""
    output_dir: str
    model_dir: str                   # the base model folder
    variant: str | None
    unet: object                     # the UNet module
    training_scheduler_config: dict
    prediction_type: str
    family: object = None            # family.StableDiffusion (None) | family.StableDiffusionXL
    vae_dir: str | None = None       # --pretrained_vae_model_name_or_path: the VAE trained with, exported with

    def write_pipeline(self, unet_params, text_encoders: dict | None = None) -> None:
        """The pipeline folder with these UNet parameters (host arrays), and `text_encoders` ({name: host params},
        e.g. merged text-encoder LoRA) in place of the base model's."""
        from t2i_flax.family import STABLE_DIFFUSION, text_encoder_class
        from t2i_flax.models import FlaxAutoencoderKL

        family = self.family or STABLE_DIFFUSION
        components = {"unet": (self.unet, unet_params),
                      "vae": FlaxAutoencoderKL.from_pretrained(self.vae_dir or self.model_dir,
                                                               subfolder=None if self.vae_dir else "vae",
                                                               variant=self.variant)}
        for name in family.text_encoders:
            module, params = text_encoder_class(name).from_pretrained(self.model_dir, subfolder=name,
                                                                      variant=self.variant,
                                                                      load_weights=name not in (text_encoders or {}))
            components[name] = (module, (text_encoders or {}).get(name, params))
        export_pipeline(self.output_dir, components, self.training_scheduler_config, self.prediction_type,
                        {name: os.path.join(self.model_dir, name) for name in family.tokenizer_folders}, family)

    def base_unet_params(self):
        """The base model's UNet parameters (host, float32)."""
        from t2i_flax.models import FlaxUNet2DConditionModel

        return FlaxUNet2DConditionModel.from_pretrained(self.model_dir, subfolder="unet", variant=self.variant)[1]

    def base_text_encoder_params(self, name: str):
        """The base model's text encoder `name` ("text_encoder" | "text_encoder_2"), host, float32."""
        from t2i_flax.family import text_encoder_class

        return text_encoder_class(name).from_pretrained(self.model_dir, subfolder=name, variant=self.variant)[1]


def write_single_file(output_dir: str, dtype: str | None = None, pipeline_dir: str | None = None) -> str:
    """Writes <output_dir>/<name>.safetensors from the pipeline folder (default: the one exported to output_dir);
    returns a line saying what was written."""
    from t2i_flax import single_file

    folder = pipeline_dir or output_dir
    if not os.path.isfile(os.path.join(folder, "unet", "config.json")):
        raise CheckpointError(f"{folder} holds no diffusers pipeline to write as a single file (a LoRA run exports "
                              f"one with --lora_merge)")
    path = single_file.single_file_path(output_dir)
    written = single_file.write_single_file(folder, path, dtype or "float16")
    return (f"wrote the single-file checkpoint {os.path.abspath(path)} ({single_file.KIND_NAMES[written['kind']]} "
            f"layout, {dtype or 'float16'}, {written['tensors']} tensors, {written['bytes'] / 2 ** 20:.1f} MiB)")


def push_to_hub(output_dir: str, repo_id: str | None, token: str | None) -> str:
    """Uploads the pipeline folder (not the logs). The token is passed through, never printed or saved."""
    from huggingface_hub import create_repo, upload_folder

    from t2i_flax.single_file import single_file_path

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message="t2i_flax fine-tune",
                  allow_patterns=["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*",
                                  "text_encoder_2/*", "tokenizer_2/*", "scheduler/*", "README.md", "validation.png",
                                  "pytorch_lora_weights.safetensors",
                                  os.path.basename(single_file_path(output_dir))])
    return repo_id


def export_checkpoint(checkpoint_path: str, output_dir: str, use_ema: bool = True,
                      lora_format: str | None = None) -> str:
    """Writes the diffusers folder of any checkpoint, as the end of training would have. The frozen VAE and
    text encoder come from the base model the run trained from (at the Hub commit it resolved to).
    Returns what was exported ("EMA" or "raw")."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from t2i_flax import checkpoint, hub, resume, trainable
    from t2i_flax.config import RunConfig
    from t2i_flax.diffusion.noise import read_scheduler_config, schedule_from_config, zero_terminal_snr_config
    from t2i_flax.family import detect

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
    if lora_format is not None:  # the LoRA file's keys, chosen again for an existing run
        if not config.lora.enabled:
            raise CheckpointError(f"--lora_format: {checkpoint_path} is a full fine-tuning run, not LoRA")
        config = dataclasses.replace(config, lora=dataclasses.replace(config.lora, lora_format=lora_format))
    revision = record["resolved"].get("model_commit") or config.model.revision
    model_dir = hub.resolve_model_dir(config.model.pretrained_model_name_or_path, revision=revision,
                                      variant=config.model.variant, cache_dir=config.model.cache_dir,
                                      single_file_config=config.model.single_file_config)
    model_family = detect(model_dir)
    modules = model_family.modules(model_dir, jnp.float32, variant=config.model.variant,
                                   vae_dir=config.model.pretrained_vae_model_name_or_path)
    unet = modules.unet
    item = checkpoint.ITEM_EMA if use_ema and config.train.use_ema else checkpoint.ITEM_PARAMS
    trained_kind = trainable.from_config(config, modules)
    where = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                      trained_kind.abstract_params(unet))
    params = jax.device_get(checkpoints.restore(step, {item: abstract})[item])
    scheduler_config = read_scheduler_config(model_dir)
    if config.model.rescale_betas_zero_snr:
        scheduler_config = zero_terminal_snr_config(scheduler_config)
    prediction_type = schedule_from_config(scheduler_config, config.model.prediction_type).prediction_type
    trained_kind.export(PipelineWriter(output_dir, model_dir, config.model.variant, unet, scheduler_config,
                                       prediction_type, model_family,
                                       config.model.pretrained_vae_model_name_or_path), params)
    return "EMA" if item == checkpoint.ITEM_EMA else "raw"


def main(argv=None) -> int:
    """python -m t2i_flax.export --checkpoint <output_dir>/checkpoints/<step> --output_dir DIR [--no_ema]
    [--single_file [--export_dtype D]]; or --pipeline FOLDER --output_dir DIR --single_file"""
    import argparse
    import sys

    from t2i_flax import checkpoint, errors

    parser = argparse.ArgumentParser(prog="python -m t2i_flax.export",
                                     description="Write the diffusers pipeline folder of a training checkpoint, "
                                                 "and/or the pipeline as one single-file checkpoint.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a step folder: <output_dir>/checkpoints/<step>")
    source.add_argument("--pipeline", help="an existing diffusers pipeline folder to write as a single file "
                                           "(with --single_file)")
    parser.add_argument("--output_dir", required=True, help="where the diffusers pipeline goes")
    parser.add_argument("--no_ema", action="store_true", help="export the raw weights, not their EMA")
    parser.add_argument("--single_file", action="store_true",
                        help="also write <output_dir>/<name>.safetensors in the original SD layout")
    parser.add_argument("--export_dtype", default=None, help="the single file's dtype: float16 (default), "
                                                             "bfloat16, float32")
    parser.add_argument("--lora_format", default=None, help="a LoRA run's file: peft or kohya keys (default: the "
                                                            "run's --lora_format)")
    args = parser.parse_args(argv)
    try:
        if os.path.isfile(args.output_dir):
            raise errors.FlagError(f"--output_dir {args.output_dir} is a file, not a folder")
        if args.export_dtype is not None and not args.single_file:
            raise errors.FlagError("--export_dtype needs --single_file")
        if args.lora_format not in (None, "peft", "kohya"):
            raise errors.FlagError(f"--lora_format {args.lora_format!r} is not one of: peft, kohya")
        if args.lora_format is not None and args.checkpoint is None:
            raise errors.FlagError("--lora_format needs --checkpoint (a LoRA run's step folder)")
        if args.pipeline is not None and not args.single_file:
            raise errors.FlagError("--pipeline needs --single_file (the folder is a diffusers pipeline already)")
        if args.pipeline is not None and not os.path.isdir(args.pipeline):
            raise errors.FlagError(f"--pipeline {args.pipeline} is not a folder")
        if args.single_file:
            from t2i_flax.single_file import EXPORT_DTYPES

            if (args.export_dtype or "float16") not in EXPORT_DTYPES:
                raise errors.FlagError(f"--export_dtype {args.export_dtype!r} is not one of: {', '.join(EXPORT_DTYPES)}")
        lines = []
        if args.checkpoint is not None:
            checkpoint.setup_process()
            what = export_checkpoint(args.checkpoint, args.output_dir, use_ema=not args.no_ema,
                                     lora_format=args.lora_format)
            lines.append(f"exported the {what} weights of {args.checkpoint} to {os.path.abspath(args.output_dir)}")
        if args.single_file:
            lines.append(write_single_file(args.output_dir, args.export_dtype, args.pipeline))
    except (errors.UserError, errors.TrainingFailed) as error:  # a storage that never answered: exit 1
        return errors.report(error)
    for line in lines:
        print(line, file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
