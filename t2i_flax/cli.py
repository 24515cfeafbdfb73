"""Command line: every flag of diffusers' train_text_to_image_flax.py (same meaning and defaults), the
PyTorch script's --use_ema/--lr_warmup_steps/--prediction_type/--noise_offset/--dataloader_num_workers,
and ours (--cpu_devices, --fsdp, --attention, --ema_decay, --log_every).

Bad input is one line on stderr and exit code 2. JAX is imported only after the flags are read, so
--cpu_devices can set up simulated devices first."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

EXIT_USAGE = 2
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# Flags the documented Flax trainer does not have (its docs say so); one line each on why and what instead.
NOT_IN_FLAX_TRAINER = {
    "gradient_checkpointing": "--gradient_checkpointing: the JAX/Flax trainer has no gradient checkpointing "
                              "(as diffusers' docs say); lower --train_batch_size or shard with --fsdp instead",
    "gradient_accumulation_steps": "--gradient_accumulation_steps > 1: the JAX/Flax trainer has no gradient "
                                   "accumulation (as diffusers' docs say); raise --train_batch_size or use more devices",
    "enable_xformers_memory_efficient_attention": "--enable_xformers_memory_efficient_attention: xFormers is a "
                                                  "PyTorch library; on GPU use --attention cudnn (flash attention)",
    "snr_gamma": "--snr_gamma: Min-SNR weighting is only in the PyTorch script (as diffusers' docs say); "
                 "use diffusers' train_text_to_image.py for it",
}
# The PyTorch script's flags for features this version does not have yet.
NOT_YET = {
    "checkpointing_steps": "--checkpointing_steps", "checkpoints_total_limit": "--checkpoints_total_limit",
    "resume_from_checkpoint": "--resume_from_checkpoint", "validation_prompts": "--validation_prompts",
    "validation_epochs": "--validation_epochs",
}


class UsageError(ValueError):
    """Bad flags or inputs: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_text_to_image_flax.py",
        description="Fine-tune a Stable Diffusion (1.x/2.x) model on captioned images with JAX/Flax.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", type=str, required=True,
      help="Hub repo id or local diffusers pipeline folder.")
    a("--revision", type=str, default=None, help="Hub revision (branch, tag or commit).")
    a("--variant", type=str, default=None, help="Weight file variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).")
    a("--from_pt", action="store_true", help="Accepted for compatibility; t2i_flax always reads safetensors directly.")
    a("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    # data
    a("--dataset_name", type=str, default=None, help="datasets name (Hub) or local dataset path.")
    a("--dataset_config_name", type=str, default=None)
    a("--train_data_dir", type=str, default=None, help="imagefolder with metadata.jsonl or metadata.csv.")
    a("--image_column", type=str, default="image")
    a("--caption_column", type=str, default="text", help="A string or a list of strings (one picked at random).")
    a("--max_train_samples", type=int, default=None, help="Shuffle with --seed, then keep the first N examples.")
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true", help="Center crop (default: random crop).")
    a("--random_flip", action="store_true")
    a("--dataloader_num_workers", type=int, default=0, help="Decode worker processes (0: in the main process).")
    # training
    a("--output_dir", type=str, default="sd-model-finetuned")
    a("--seed", type=int, default=0)
    a("--train_batch_size", type=int, default=16, help="Per device.")
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    a("--learning_rate", type=float, default=1e-4)
    a("--scale_lr", action="store_true", help="learning_rate x train_batch_size x device count.")
    a("--lr_scheduler", type=str, default="constant", help=", ".join(SCHEDULES))
    a("--lr_warmup_steps", type=int, default=500)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2, help="Not applied to biases and norm scales.")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", type=str, default="no", help="no | bf16 (compute dtype; weights stay float32). fp16: see README.")
    a("--prediction_type", type=str, default=None, help="epsilon | v_prediction; default: the model's scheduler config.")
    a("--noise_offset", type=float, default=0.0)
    a("--use_ema", action="store_true", help="Keep an EMA of the UNet; the export uses it.")
    a("--ema_decay", type=float, default=0.9999)
    # logging and hub
    a("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    a("--report_to", type=str, default="tensorboard", help="tensorboard | wandb | all | none")
    a("--log_every", type=int, default=10, help="Steps between logged (averaged) metrics.")
    a("--push_to_hub", action="store_true")
    a("--hub_token", type=str, default=None)
    a("--hub_model_id", type=str, default=None)
    a("--local_rank", type=int, default=-1, help="Accepted for compatibility (multi-host: --multihost).")
    a("--multihost", action="store_true",
      help="Call jax.distributed.initialize() first: one process per host (TPU pod slices, SLURM, or the "
           "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID environment).")
    # devices
    a("--cpu_devices", type=int, default=None, help="Simulate N CPU devices (stand-in for a TPU v3-8: 8).")
    a("--fsdp", type=int, default=1, help="Devices on the fsdp mesh axis: params, grads, optimizer, EMA sharded.")
    a("--attention", type=str, default=None, help="dot_product_attention implementation: xla | cudnn (GPU).")
    # refused / not yet: parsed so that the refusal is a clear sentence, not 'unrecognized argument'
    a("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    a("--gradient_accumulation_steps", type=int, default=1, help=argparse.SUPPRESS)
    a("--enable_xformers_memory_efficient_attention", action="store_true", help=argparse.SUPPRESS)
    a("--snr_gamma", type=float, default=None, help=argparse.SUPPRESS)
    for name in NOT_YET:
        a(f"--{name}", type=str, default=None, nargs="*" if name == "validation_prompts" else None, help=argparse.SUPPRESS)
    return p


def check_args(args) -> None:
    """Raises UsageError with one line for the first bad flag."""
    if args.gradient_checkpointing:
        raise UsageError(NOT_IN_FLAX_TRAINER["gradient_checkpointing"])
    if args.gradient_accumulation_steps != 1:
        if args.gradient_accumulation_steps < 1:
            raise UsageError("--gradient_accumulation_steps must be 1")
        raise UsageError(NOT_IN_FLAX_TRAINER["gradient_accumulation_steps"])
    if args.enable_xformers_memory_efficient_attention:
        raise UsageError(NOT_IN_FLAX_TRAINER["enable_xformers_memory_efficient_attention"])
    if args.snr_gamma is not None:
        raise UsageError(NOT_IN_FLAX_TRAINER["snr_gamma"])
    for name, flag in NOT_YET.items():
        if getattr(args, name) is not None:
            raise UsageError(f"{flag}: checkpoints and validation images are not in this version of t2i_flax yet; "
                             f"drop the flag (the final model is still exported to --output_dir)")
    if args.dataset_name is None and args.train_data_dir is None:  # both: data_dir of the named dataset
        raise UsageError("give --dataset_name or --train_data_dir")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir} is not a folder")
    positive = {"resolution": args.resolution, "train_batch_size": args.train_batch_size,
                "num_train_epochs": args.num_train_epochs, "max_grad_norm": args.max_grad_norm,
                "log_every": args.log_every, "fsdp": args.fsdp}
    for name in ("max_train_steps", "max_train_samples", "cpu_devices"):
        if getattr(args, name) is not None:
            positive[name] = getattr(args, name)
    for name, value in positive.items():
        if not value > 0:
            raise UsageError(f"--{name} must be positive (got {value})")
    for name in ("learning_rate", "lr_warmup_steps", "noise_offset", "dataloader_num_workers",
                 "adam_weight_decay", "adam_epsilon"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if not 0.0 < args.ema_decay <= 1.0:
        raise UsageError(f"--ema_decay must be in (0, 1] (got {args.ema_decay})")
    if args.lr_scheduler not in SCHEDULES:
        raise UsageError(f"--lr_scheduler {args.lr_scheduler!r} is not one of: {', '.join(SCHEDULES)}")
    if args.lr_scheduler == "polynomial" and args.learning_rate <= 1e-7:
        raise UsageError("--lr_scheduler polynomial decays to 1e-7: --learning_rate must be larger")
    if args.mixed_precision == "fp16":
        raise UsageError("--mixed_precision fp16 is not supported: float16 needs loss scaling and TPUs have no "
                         "float16 units; use --mixed_precision bf16 (TPU, and GPUs from Ampere on)")
    if args.mixed_precision not in ("no", "bf16"):
        raise UsageError(f"--mixed_precision {args.mixed_precision!r} is not one of: no, bf16")
    if args.prediction_type not in (None, "epsilon", "v_prediction"):
        raise UsageError(f"--prediction_type {args.prediction_type!r} is not one of: epsilon, v_prediction")
    if args.attention not in (None, "xla", "cudnn"):
        raise UsageError(f"--attention {args.attention!r} is not one of: xla, cudnn")
    if args.attention == "cudnn" and args.mixed_precision != "bf16":
        raise UsageError("--attention cudnn needs --mixed_precision bf16 (cuDNN flash attention has no float32)")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise UsageError(f"--report_to {args.report_to!r} is not one of: tensorboard, wandb, all, none")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UsageError("--hub_token with --report_to wandb would expose the token in the run's config; "
                         "log in with `hf auth login` instead of passing --hub_token")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--report_to {args.report_to} needs the wandb package: pip install wandb")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file, not a folder")


def setup_devices(cpu_devices: int | None) -> None:
    """Before jax is imported: N simulated CPU devices."""
    if cpu_devices is None:
        return
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != cpu_devices:
            raise UsageError(f"--cpu_devices {cpu_devices}: JAX is already initialised with {jax.device_count()} "
                             f"devices; set XLA_FLAGS=--xla_force_host_platform_device_count={cpu_devices}")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        setup_devices(args.cpu_devices)
        if args.multihost:
            import jax

            # TPU pods and SLURM are detected; elsewhere JAX_COORDINATOR_ADDRESS plus these two say who is who.
            env = {name: int(os.environ[key]) for name, key in (("num_processes", "JAX_NUM_PROCESSES"),
                                                                ("process_id", "JAX_PROCESS_ID")) if key in os.environ}
            jax.distributed.initialize(**env)
        from t2i_flax import train

        train.run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as error:  # the loaders' and data pipeline's checks, missing/unreadable files
        if os.environ.get("T2I_FLAX_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as error:  # NaN/inf loss: the run failed, the input may be fine
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
