"""Command line: every flag of diffusers' train_text_to_image_flax.py (same meaning and defaults), the
PyTorch script's --use_ema/--lr_warmup_steps/--prediction_type/--noise_offset/--dataloader_num_workers,
and ours (--cpu_devices, --fsdp, --attention, --ema_decay, --log_every).

Bad input is one line on stderr and exit code 2. JAX is imported only after the flags are read, so
--cpu_devices can set up simulated devices first."""
from __future__ import annotations

import argparse
import os
import sys

from t2i_flax import errors
from t2i_flax.config import DEFAULT_INTERPOLATION, INTERPOLATION_MODES, SCHEDULES, RunConfig
from t2i_flax.errors import EXIT_USAGE, FlagError  # noqa: F401  (EXIT_USAGE: the documented exit code)

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # an unknown or malformed flag: one line, exit 2 (not argparse's usage block)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train_text_to_image_flax.py",
        description="Fine-tune a Stable Diffusion (1.x/2.x or XL) model on captioned images with JAX/Flax.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", type=str, required=True,
      help="Hub repo id or local diffusers pipeline folder, or one single-file checkpoint (file.safetensors, or "
           "owner/repo/file.safetensors on the Hub) in the original SD layout.")
    a("--single_file_config", type=str, default=None,
      help="For a single-file checkpoint: the diffusers folder or Hub id whose configs, tokenizers and scheduler "
           "go with it (default: the official SD 1.5 / SD 2.1 / SDXL base repo, configs only).")
    a("--revision", type=str, default=None, help="Hub revision (branch, tag or commit).")
    a("--variant", type=str, default=None, help="Weight file variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).")
    a("--from_pt", action="store_true", help="Accepted for compatibility; t2i_flax always reads safetensors directly.")
    a("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help="A VAE (folder or Hub id) to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix.")
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
    a("--proportion_empty_prompts", type=float, default=0.0,
      help="Fraction of captions replaced by an empty one (so that guidance has an unconditional prediction).")
    a("--shuffle_caption", action="store_true",
      help="Shuffle each caption's tags (split on --caption_separator, joined with ', '), per sample.")
    a("--keep_tokens", type=int, default=0,
      help="The first N tags stay first, in order, and are never dropped (with --shuffle_caption/--caption_tag_dropout).")
    a("--caption_tag_dropout", "--caption_tag_dropout_rate", dest="caption_tag_dropout", type=float, default=0.0,
      help="Drop each tag (after the first --keep_tokens) with this probability, per sample.")
    a("--caption_separator", type=str, default=",", help="What a caption's tags are separated by.")
    a("--image_interpolation_mode", type=str, default=DEFAULT_INTERPOLATION,
      help=f"The resize's filter, as torchvision's Resize on PIL images: {', '.join(INTERPOLATION_MODES)} "
           f"(diffusers' PyTorch scripts; the documented Flax script used bilinear).")
    a("--dataloader_num_workers", type=int, default=0, help="Decode worker processes (0: in the main process).")
    a("--aspect_ratio_buckets", action="store_true",
      help="Train each image at the bucket size nearest its aspect ratio (kohya's rule; see README).")
    a("--bucket_step", type=int, default=64, help="Bucket sides are multiples of this.")
    a("--min_bucket_resolution", type=int, default=256, help="The shortest bucket side.")
    a("--max_bucket_resolution", type=int, default=None, help="The longest bucket side (default 2 x --resolution).")
    a("--cache_latents", action="store_true",
      help="Encode every image once (both flips with --random_flip); train from the stored VAE posteriors.")
    a("--latent_cache_dir", type=str, default=None,
      help="Where the latent cache goes (default <output_dir>/latent_cache; shared storage on several hosts).")
    a("--validation_split", type=float, default=0.0,
      help="Keep this many images (or this fraction of them, when < 1) out of training, a seeded choice, and report "
           "their mean diffusion loss (val_loss) at every validation and at the end (0: off).")
    # training
    a("--output_dir", type=str, default="sd-model-finetuned")
    a("--seed", type=int, default=0)
    a("--train_batch_size", type=int, default=16, help="Per device.")
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    a("--optimizer", type=str, default="adamw",
      help="adamw | adafactor | lion | prodigy (optax's; which flags each reads: README). Prodigy estimates its step "
           "size: give it --learning_rate 1.0. Lion wants an lr 3-10x smaller than AdamW's.")
    a("--learning_rate", type=float, default=1e-4)
    a("--scale_lr", action="store_true", help="learning_rate x train_batch_size x device count.")
    a("--lr_scheduler", type=str, default="constant", help=", ".join(SCHEDULES))
    a("--lr_warmup_steps", type=int, default=500)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2, help="Applied to every parameter, as both reference scripts.")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--no_decay_bias_and_norm", action="store_true",
      help="Do not apply weight decay to biases and norm scales (the reference scripts decay everything).")
    a("--mixed_precision", type=str, default="no", help="no | bf16 (compute dtype; weights stay float32). fp16: see README.")
    a("--prediction_type", type=str, default=None, help="epsilon | v_prediction; default: the model's scheduler config.")
    a("--rescale_betas_zero_snr", action="store_true",
      help="Zero terminal SNR (Lin et al. 2023): train on the rescaled schedule (needs v_prediction); the export's "
           "scheduler config says so, with trailing timesteps.")
    a("--noise_offset", type=float, default=0.0)
    a("--input_perturbation", type=float, default=0.0,
      help="Noise the UNet's input with noise + this x fresh noise; the target stays the noise (0: off; 0.1 is usual).")
    a("--timestep_bias_strategy", type=str, default="none",
      help="earlier | later | range | none: draw the training timesteps more often (multiplier > 1) or less often "
           "(< 1) in the first or last --timestep_bias_portion of them, or in [--timestep_bias_begin, _end).")
    a("--timestep_bias_multiplier", type=float, default=1.0, help="The weight of the biased timesteps (others: 1).")
    a("--timestep_bias_begin", type=int, default=0, help="range: the first biased timestep.")
    a("--timestep_bias_end", type=int, default=1000, help="range: the biased timesteps stop before this one.")
    a("--timestep_bias_portion", type=float, default=0.25, help="earlier / later: the fraction of timesteps biased.")
    a("--dream_training", action="store_true",
      help="DREAM (train_text_to_image.py's): one more UNet forward without gradients adjusts the noised input and "
           "the target (epsilon prediction only).")
    a("--dream_detail_preservation", type=float, default=1.0, help="DREAM's p (> 0): lambda = sqrt(1 - alpha_t)^p.")
    a("--use_ema", action="store_true", help="Keep an EMA of the UNet; the export uses it.")
    a("--ema_decay", type=float, default=0.9999)
    # logging and hub
    a("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    a("--report_to", type=str, default="tensorboard", help="tensorboard | wandb | all | none")
    a("--log_every", type=int, default=10, help="Steps between logged (averaged) metrics.")
    a("--tracker_project_name", type=str, default=None,
      help="wandb's project, and TensorBoard's run folder under --logging_dir, as accelerate's trackers use it "
           "(default: wandb project t2i_flax, TensorBoard in --logging_dir itself).")
    # checkpoints
    a("--checkpointing_steps", type=int, default=500,
      help="Save a checkpoint every N steps (and always at the last step); 0: only at the last step.")
    a("--checkpoints_total_limit", type=int, default=3, help="Keep the newest N checkpoints (0: all).")
    a("--checkpoints_dir", type=str, default=None,
      help="Where checkpoints go (default <output_dir>/checkpoints); a gs://bucket/path on TPU VMs.")
    a("--resume_from_checkpoint", type=str, default=None,
      help="latest | <step> | checkpoint-<step> | the path of a step folder.")
    # validation images
    a("--validation_prompts", type=str, nargs="+", default=None, help="Prompts drawn while training and at the end.")
    a("--validation_prompt", type=str, default=None, help="One more prompt (the PyTorch LoRA script's flag).")
    a("--validation_epochs", type=int, default=5, help="Draw them every N epochs.")
    a("--validation_steps", type=int, default=None, help="Draw them every N steps (wins over --validation_epochs).")
    a("--num_validation_images", type=int, default=1, help="Images per prompt.")
    a("--validation_scheduler", type=str, default=None,
      help="ddim | pndm | euler | dpm++2m (default: the model's scheduler).")
    a("--validation_num_inference_steps", type=int, default=20)
    a("--validation_guidance_scale", type=float, default=7.5, help="Classifier-free guidance (<= 1: off).")
    a("--validation_guidance_rescale", type=float, default=0.0,
      help="0 to 1: diffusers' guidance_rescale for the validation images (0.7 with zero terminal SNR; 0: off).")
    a("--validation_height", type=int, default=None, help="Validation images' height (default --resolution).")
    a("--validation_width", type=int, default=None, help="Validation images' width (default --resolution).")
    # LoRA
    a("--lora_rank", "--rank", dest="lora_rank", type=int, default=None,
      help="Train LoRA adapters of this rank on the frozen UNet (default: full fine-tuning).")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank; scale = alpha / rank).")
    a("--lora_target_modules", type=str, default="to_q,to_k,to_v,to_out.0",
      help="UNet linear layers to adapt, PyTorch module names, comma-separated.")
    a("--lora_merge", action="store_true", help="Also export the full pipeline with the adapters merged.")
    a("--lora_format", type=str, default="peft",
      help="peft (diffusers' keys, default) | kohya (lora_unet_* keys: ComfyUI, A1111, Forge): the LoRA file's keys.")
    a("--use_dora", action="store_true",
      help="DoRA (PEFT's): also train a magnitude per output feature; the file loads in diffusers with PEFT.")
    a("--train_text_encoder", action="store_true",
      help="With --lora_rank: also train LoRA adapters on the text encoder(s) (SDXL: both), on their q_proj, k_proj, "
           "v_proj and out_proj (PEFT's default for CLIP, as diffusers' LoRA scripts). Full fine-tuning of the text "
           "encoder is not supported.")
    a("--lora_init", type=str, default=None,
      help="Continue training this LoRA file (PEFT or kohya keys; its rank and alpha must be --lora_rank's and "
           "--lora_alpha's): the adapters start from its tensors.")
    a("--export_single_file", action="store_true",
      help="Also write <output_dir>/<name>.safetensors: the pipeline as one file in the original SD layout "
           "(ComfyUI, A1111, Forge).")
    a("--export_dtype", type=str, default=None, help="float16 (default) | bfloat16 | float32: the single file's dtype.")
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
    a("--compilation_cache_dir", type=str, default=None,
      help="JAX's persistent compilation cache (default ~/.cache/t2i_flax/jax_compilation_cache; 'none': off).")
    # refused / not yet: parsed so that the refusal is a clear sentence, not 'unrecognized argument'
    a("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    a("--gradient_accumulation_steps", type=int, default=1, help=argparse.SUPPRESS)
    a("--enable_xformers_memory_efficient_attention", action="store_true", help=argparse.SUPPRESS)
    a("--snr_gamma", type=float, default=None, help=argparse.SUPPRESS)
    return p


def refuse_unsupported(args) -> None:
    """Raises FlagError with one line for a flag this trainer refuses (the typed config checks the rest)."""
    if args.gradient_checkpointing:
        raise FlagError(NOT_IN_FLAX_TRAINER["gradient_checkpointing"])
    if args.gradient_accumulation_steps != 1:
        if args.gradient_accumulation_steps < 1:
            raise FlagError("--gradient_accumulation_steps must be 1")
        raise FlagError(NOT_IN_FLAX_TRAINER["gradient_accumulation_steps"])
    if args.enable_xformers_memory_efficient_attention:
        raise FlagError(NOT_IN_FLAX_TRAINER["enable_xformers_memory_efficient_attention"])
    if args.snr_gamma is not None:
        raise FlagError(NOT_IN_FLAX_TRAINER["snr_gamma"])


def parse_config(argv=None) -> RunConfig:
    """Flags -> the typed run configuration; FlagError (one line) for anything wrong."""
    args = build_parser().parse_args(argv)
    refuse_unsupported(args)
    flags = vars(args)
    flags["validation_prompts"] = tuple(flags["validation_prompts"] or ()) + (
        (flags["validation_prompt"],) if flags["validation_prompt"] is not None else ())
    config = RunConfig.from_flags(flags)
    config.check_paths()
    return config


def setup_devices(cpu_devices: int | None) -> None:
    """Before jax is imported: N simulated CPU devices."""
    if cpu_devices is None:
        return
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != cpu_devices:
            raise FlagError(f"--cpu_devices {cpu_devices}: JAX is already initialised with {jax.device_count()} "
                             f"devices; set XLA_FLAGS=--xla_force_host_platform_device_count={cpu_devices}")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        setup_devices(config.devices.cpu_devices)
        if config.devices.multihost:
            import jax

            # TPU pods and SLURM are detected; elsewhere JAX_COORDINATOR_ADDRESS plus these two say who is who.
            env = {name: int(os.environ[key]) for name, key in (("num_processes", "JAX_NUM_PROCESSES"),
                                                                ("process_id", "JAX_PROCESS_ID")) if key in os.environ}
            jax.distributed.initialize(**env)
        from t2i_flax import checkpoint, compile_cache, train

        compile_cache.enable(config.devices.compilation_cache_dir)
        checkpoint.setup_process()  # process-wide settings for Orbax's background writes, once
        train.run(config)
    except (errors.UserError, errors.TrainingFailed) as error:  # anything else is a bug: traceback, exit 1
        return errors.report(error)
    except errors.Stopped as stopped:  # SIGTERM/SIGINT: the checkpoint is written and complete
        print(stopped, file=sys.stderr, flush=True)
        return errors.EXIT_STOPPED
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        return 130
    return 0
