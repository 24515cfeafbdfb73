"""The run's configuration: the command line's flags as typed, grouped, frozen dataclasses.

Each group checks its own fields (`FlagError`, one line). The loop, the checkpoints and
`training_args.json` all read this one object. `RunConfig.to_dict()` leaves out secrets (the Hub token).

On resume, every field that changes the computation must equal the checkpoint's; the fields a group lists
in `MAY_CHANGE` (how long to train, where to write, how to log, how many workers, the device layout) may
differ. The per-device batch may change too, as long as the global batch (per-device x devices) is the
same: that check is made on the resolved values (see `train.Plan`)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, ClassVar

from t2i_flax.errors import FlagError

OPTIMIZERS = ("adamw", "adafactor", "lion", "prodigy")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_END_LR = 1e-7
REPORT_TO = ("tensorboard", "wandb", "all", "none")
# --image_interpolation_mode: the lower-cased torchvision InterpolationMode names diffusers' PyTorch scripts accept
# (data/images.py maps them to PIL's filters as torchvision does on PIL images); their default.
INTERPOLATION_MODES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")
DEFAULT_INTERPOLATION = "lanczos"
# What a checkpoint written before a field existed computed with, where that is not the field's default: runs
# before --image_interpolation_mode resized with bilinear.
BEFORE_THE_FLAG = {"image_interpolation_mode": "bilinear"}
SECRET_FIELDS = ("hub_token",)
TIMESTEP_BIAS_STRATEGIES = ("earlier", "later", "range", "none")  # train_text_to_image_sdxl.py's
# Compared as real paths on resume when they name existing local folders (or single files).
PATH_FIELDS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "dataset_name", "train_data_dir",
               "single_file_config")


def _positive(group, *names):
    for name in names:
        value = getattr(group, name)
        if value is not None and not value > 0:
            raise FlagError(f"--{name} must be positive (got {value})")


def _non_negative(group, *names):
    for name in names:
        value = getattr(group, name)
        if value is not None and value < 0:
            raise FlagError(f"--{name} must be >= 0 (got {value})")


def _one_of(name, value, allowed):
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise FlagError(f"--{name} {value!r} is not one of: {shown}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model and how it computes."""
    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    from_pt: bool = False
    cache_dir: str | None = None            # Hub and datasets cache
    mixed_precision: str = "no"             # compute dtype; parameters stay float32
    prediction_type: str | None = None      # None: the model's scheduler config
    rescale_betas_zero_snr: bool = False    # zero terminal SNR: the schedule rescaled (and its export, trailing)
    attention: str | None = None            # dot_product_attention implementation
    pretrained_vae_model_name_or_path: str | None = None  # a VAE (folder or Hub id) replacing the pipeline's
    single_file_config: str | None = None   # a single-file base model's configs/tokenizers (folder or Hub id)
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"from_pt", "cache_dir", "attention"})

    def __post_init__(self):
        if self.mixed_precision == "fp16":
            raise FlagError("--mixed_precision fp16 is not supported: float16 needs loss scaling and TPUs have no "
                            "float16 units; use --mixed_precision bf16 (TPU, and GPUs from Ampere on)")
        _one_of("mixed_precision", self.mixed_precision, ("no", "bf16"))
        _one_of("prediction_type", self.prediction_type, (None, "epsilon", "v_prediction"))
        _one_of("attention", self.attention, (None, "xla", "cudnn"))
        if self.attention == "cudnn" and self.mixed_precision != "bf16":
            raise FlagError("--attention cudnn needs --mixed_precision bf16 (cuDNN flash attention has no float32)")
        from t2i_flax import single_file

        if self.single_file_config is not None and not single_file.is_single_file(self.pretrained_model_name_or_path):
            raise FlagError("--single_file_config needs a single-file checkpoint (a .safetensors file) as "
                            "--pretrained_model_name_or_path")
        single_file.check_reference(self.pretrained_model_name_or_path)


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """The bucket set [(width, height)], sorted by aspect ratio, from the tallest to the widest."""
    area = resolution * resolution
    sizes, longest = set(), max_side // step * step
    for width in range(-(-min_side // step) * step, longest + 1, step):
        height = min(longest, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def checked_bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """`bucket_sizes`, or a FlagError (one line, naming the numbers) when the flags leave no bucket."""
    sizes = bucket_sizes(resolution, step, min_side, max_side)
    if not sizes:
        raise FlagError(f"--aspect_ratio_buckets: no bucket has both sides multiples of --bucket_step {step} within "
                        f"[--min_bucket_resolution {min_side}, --max_bucket_resolution {max_side}] and at most "
                        f"--resolution {resolution} squared pixels: lower --min_bucket_resolution or --bucket_step")
    return sizes


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the captioned images come from and how they become a batch."""
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None       # an imagefolder; with dataset_name: a folder inside that dataset
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 0
    cache_latents: bool = False             # encode every image once; the step reads the stored posterior
    latent_cache_dir: str | None = None     # default <output_dir>/latent_cache; shared storage on several hosts
    proportion_empty_prompts: float = 0.0   # captions replaced by "" (drawn from each sample's random stream)
    aspect_ratio_buckets: bool = False      # each image at the bucket size nearest its shape (data/buckets.py)
    bucket_step: int = 64
    min_bucket_resolution: int = 256
    max_bucket_resolution: int | None = None  # default 2 x resolution
    shuffle_caption: bool = False           # shuffle the caption's tags (after the first keep_tokens)
    keep_tokens: int = 0                    # the first N tags stay first and are never dropped
    caption_tag_dropout: float = 0.0        # drop each other tag with this probability
    caption_separator: str = ","            # what the tags are split on (joined with ", ")
    image_interpolation_mode: str = DEFAULT_INTERPOLATION  # the resize's filter (diffusers' PyTorch scripts')
    # --validation_split: images kept out of training for the held-out loss (data/held_out.py): a count, or a fraction
    # of the usable images when < 1; 0: off. Which images train depends on it, so it may not change on resume.
    validation_split: float = 0.0
    # Cached latents give the online path's losses to float rounding: switching on resume is allowed.
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"dataloader_num_workers", "cache_latents", "latent_cache_dir"})

    def __post_init__(self):
        if self.dataset_name is None and self.train_data_dir is None:
            raise FlagError("give --dataset_name or --train_data_dir")
        _positive(self, "resolution", "max_train_samples")
        _non_negative(self, "dataloader_num_workers")
        if self.resolution % 8:
            raise FlagError(f"--resolution {self.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.cache_latents and not self.center_crop:
            raise FlagError("--cache_latents needs --center_crop: a random crop is another image every time and "
                            "cannot be cached (flips can: both are stored)")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise FlagError(f"--proportion_empty_prompts {self.proportion_empty_prompts} must be between 0 and 1")
        if not 0.0 <= self.caption_tag_dropout <= 1.0:
            raise FlagError(f"--caption_tag_dropout {self.caption_tag_dropout} must be between 0 and 1")
        _non_negative(self, "keep_tokens")
        if not self.caption_separator:
            raise FlagError("--caption_separator must not be empty")
        _one_of("image_interpolation_mode", self.image_interpolation_mode, INTERPOLATION_MODES)
        if not self.validation_split >= 0 or (self.validation_split >= 1 and self.validation_split % 1):
            raise FlagError(f"--validation_split {self.validation_split:g} must be a number of images (a whole number) "
                            f"or a fraction of the images below 1 (0: off)")
        if self.aspect_ratio_buckets:
            _positive(self, "bucket_step", "min_bucket_resolution", "max_bucket_resolution")
            if self.bucket_step % 8:
                raise FlagError(f"--bucket_step {self.bucket_step} must be a multiple of 8 (the VAE downsamples by 8)")
            checked_bucket_sizes(self.resolution, self.bucket_step, self.min_bucket_resolution, self.bucket_max_side)

    @property
    def bucket_max_side(self) -> int:
        """--max_bucket_resolution, default twice --resolution."""
        return self.max_bucket_resolution or 2 * self.resolution

    def train_sizes(self) -> list[tuple[int, int]]:
        """Every (width, height) a step may train at: the bucket set, or the square."""
        if not self.aspect_ratio_buckets:
            return [(self.resolution, self.resolution)]
        return bucket_sizes(self.resolution, self.bucket_step, self.min_bucket_resolution, self.bucket_max_side)

    def check_paths(self) -> None:
        # With --dataset_name, datasets reads --train_data_dir as a folder of that dataset (it need not be local).
        if self.dataset_name is None and not os.path.isdir(self.train_data_dir):
            raise FlagError(f"--train_data_dir {self.train_data_dir} is not a folder")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """clip_by_global_norm, then the optimizer (AdamW by default) with a diffusers learning-rate schedule."""
    optimizer: str = "adamw"                # adamw | adafactor | lion | prodigy (optax's; t2i_flax/optim.py)
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    no_decay_bias_and_norm: bool = False    # opt-in: no weight decay on biases and norm scales
    MAY_CHANGE: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        _positive(self, "max_grad_norm")
        _non_negative(self, "learning_rate", "lr_warmup_steps", "adam_weight_decay", "adam_epsilon")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FlagError(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        _one_of("lr_scheduler", self.lr_scheduler, SCHEDULES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.no_decay_bias_and_norm and self.optimizer not in ("adamw", "lion"):
            raise FlagError(f"--no_decay_bias_and_norm is for --optimizer adamw or lion: {self.optimizer} "
                            f"{'has no weight decay' if self.optimizer == 'adafactor' else 'decays every parameter'}")
        if self.lr_scheduler == "polynomial" and not self.learning_rate > POLYNOMIAL_END_LR:
            raise FlagError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_END_LR}: --learning_rate must be larger")

    @property
    def warmup(self) -> bool:
        """Whether the first update's learning rate is 0 (a warmup schedule with warmup steps, or lr 0)."""
        return self.learning_rate == 0 or (self.lr_scheduler != "constant" and self.lr_warmup_steps > 0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: batch, length, randomness, what the step does besides the optimizer."""
    seed: int = 0
    train_batch_size: int = 16              # per device
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0         # the UNet's input noised with noise + gamma x fresh noise (target: noise)
    timestep_bias_strategy: str = "none"    # earlier | later | range | none: timesteps drawn from biased weights
    timestep_bias_multiplier: float = 1.0   # the weight of the biased timesteps (the others' is 1)
    timestep_bias_begin: int = 0            # range: the first biased timestep
    timestep_bias_end: int = 1000           # range: the biased timesteps stop before this one
    timestep_bias_portion: float = 0.25     # earlier / later: the fraction of the timesteps biased
    dream_training: bool = False            # DREAM: one more UNet forward (no gradients) moves input and target
    dream_detail_preservation: float = 1.0  # DREAM's p: lambda = sqrt(1 - alpha_t)^p
    use_ema: bool = False
    ema_decay: float = 0.9999
    # The global batch must stay the same on resume (checked on the resolved plan), not the per-device one.
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"train_batch_size", "num_train_epochs", "max_train_steps"})

    def __post_init__(self):
        _positive(self, "train_batch_size", "num_train_epochs", "max_train_steps")
        _non_negative(self, "noise_offset", "input_perturbation")
        _one_of("timestep_bias_strategy", self.timestep_bias_strategy, TIMESTEP_BIAS_STRATEGIES)
        if self.dream_training and not self.dream_detail_preservation > 0:
            raise FlagError(f"--dream_detail_preservation must be positive (got {self.dream_detail_preservation})")
        if self.timestep_bias_strategy != "none":
            if not self.timestep_bias_multiplier > 0:
                raise FlagError(f"--timestep_bias_multiplier must be positive (got {self.timestep_bias_multiplier}); "
                                f"to turn the bias off use --timestep_bias_strategy none")
            if not 0.0 <= self.timestep_bias_portion <= 1.0:
                raise FlagError(f"--timestep_bias_portion {self.timestep_bias_portion} must be between 0 and 1")
            if self.timestep_bias_strategy == "range" and not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
                raise FlagError(f"--timestep_bias_begin {self.timestep_bias_begin} and --timestep_bias_end "
                                f"{self.timestep_bias_end} must satisfy 0 <= begin < end")
        if not 0.0 < self.ema_decay <= 1.0:
            raise FlagError(f"--ema_decay must be in (0, 1] (got {self.ema_decay})")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the exported pipeline, metrics and logs go."""
    output_dir: str = "sd-model-finetuned"
    logging_dir: str = "logs"               # relative to output_dir
    report_to: str = "tensorboard"
    log_every: int = 10
    tracker_project_name: str | None = None  # wandb's project and TensorBoard's run folder (None: t2i_flax, logs/)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None            # never saved or printed
    export_single_file: bool = False        # also <output_dir>/<name>.safetensors in the original SD layout
    export_dtype: str | None = None         # its dtype: float16 (None), bfloat16, float32
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"output_dir", "logging_dir", "report_to", "log_every",
                                                 "tracker_project_name", "push_to_hub",
                                                 "hub_model_id", "hub_token", "export_single_file", "export_dtype"})

    def __post_init__(self):
        _positive(self, "log_every")
        if self.tracker_project_name is not None and (not self.tracker_project_name.strip()
                                                      or os.sep in self.tracker_project_name):
            raise FlagError(f"--tracker_project_name {self.tracker_project_name!r} must be a non-empty name without "
                            f"{os.sep!r} (it is also TensorBoard's run folder)")
        _one_of("export_dtype", self.export_dtype, (None, "float16", "bfloat16", "float32"))
        if self.export_dtype is not None and not self.export_single_file:
            raise FlagError("--export_dtype needs --export_single_file (the diffusers folder is float32)")
        _one_of("report_to", self.report_to, REPORT_TO)
        if self.report_to in ("wandb", "all") and self.hub_token is not None:
            raise FlagError("--hub_token with --report_to wandb would expose the token in the run's config; "
                            "log in with `hf auth login` instead of passing --hub_token")

    def check_paths(self) -> None:
        if self.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
            raise FlagError(f"--report_to {self.report_to} needs the wandb package: pip install wandb")
        if os.path.isfile(self.output_dir):
            raise FlagError(f"--output_dir {self.output_dir} is a file, not a folder")

    @property
    def logs_path(self) -> str:
        return os.path.join(self.output_dir, self.logging_dir)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: when, how many, where, and which one to resume from."""
    checkpointing_steps: int = 500          # 0: only the last step (and a stop on SIGTERM/SIGINT)
    checkpoints_total_limit: int = 3        # newest kept; 0 keeps all
    checkpoints_dir: str | None = None      # default <output_dir>/checkpoints; may be gs://bucket/path
    resume_from_checkpoint: str | None = None  # latest | <step> | checkpoint-<step> | <step folder path>
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"checkpointing_steps", "checkpoints_total_limit", "checkpoints_dir",
                                                 "resume_from_checkpoint"})

    def __post_init__(self):
        _non_negative(self, "checkpointing_steps", "checkpoints_total_limit")

    def directory(self, output_dir: str) -> str:
        return self.checkpoints_dir or os.path.join(output_dir, "checkpoints")


SAMPLERS = ("ddim", "pndm", "euler", "dpm++2m")
LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # the PyTorch LoRA script's


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning: adapters on the frozen UNet (and, --train_text_encoder, text encoders) are the only trained
    parameters."""
    lora_rank: int | None = None            # None: full fine-tuning; also --rank (the PyTorch LoRA script's)
    lora_alpha: float | None = None         # default: the rank (scale 1)
    lora_target_modules: str = LORA_TARGETS  # PyTorch module names, comma-separated
    lora_merge: bool = False                # also export the full pipeline with the adapters merged
    lora_format: str = "peft"               # the LoRA file's keys: peft (diffusers) | kohya (ComfyUI, A1111, Forge)
    lora_init: str | None = None            # start from this LoRA file's adapters (a resumed checkpoint wins)
    use_dora: bool = False                  # DoRA (PEFT's): a trained magnitude per output feature of each layer
    train_text_encoder: bool = False        # also LoRA on the text encoder(s) (their q/k/v/out projections)
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"lora_merge", "lora_format", "lora_init"})

    def __post_init__(self):
        if self.train_text_encoder and self.lora_rank is None:
            raise FlagError("--train_text_encoder without --lora_rank: t2i_flax does not fine-tune the whole text "
                            "encoder; add --lora_rank to train LoRA adapters on it (and the UNet)")
        _one_of("lora_format", self.lora_format, ("peft", "kohya"))
        if self.lora_rank is not None:
            _positive(self, "lora_rank", "lora_alpha")
        elif self.lora_alpha is not None or self.lora_merge or self.lora_target_modules != LORA_TARGETS \
                or self.lora_format != "peft" or self.lora_init is not None or self.use_dora:
            raise FlagError("--lora_alpha, --lora_target_modules, --lora_merge, --lora_init, --use_dora and "
                            "--lora_format need --lora_rank (which turns LoRA on)")
        if self.use_dora and self.lora_format == "kohya":
            raise FlagError("--use_dora with --lora_format kohya: kohya LoRA keys have no DoRA magnitudes that "
                            "diffusers reads (it drops dora_scale); use --lora_format peft")

    @property
    def enabled(self) -> bool:
        return self.lora_rank is not None

    @property
    def scale(self) -> float:
        """PEFT's alpha / rank (alpha defaults to the rank)."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.lora_rank


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Images drawn from the current weights while training (EMA with --use_ema), and at the end."""
    validation_prompts: tuple = ()          # also --validation_prompt (the PyTorch LoRA script's, singular)
    validation_epochs: int = 5              # every N epochs (the PyTorch script's meaning and default)
    validation_steps: int | None = None     # every N steps; wins over validation_epochs when given
    num_validation_images: int = 1          # per prompt
    validation_scheduler: str | None = None  # default: the model's own scheduler
    validation_num_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    validation_guidance_rescale: float = 0.0  # diffusers' guidance_rescale (rescale_noise_cfg); 0: off
    validation_height: int | None = None    # default --resolution
    validation_width: int | None = None
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"validation_prompts", "validation_epochs", "validation_steps",
                                                 "num_validation_images", "validation_scheduler",
                                                 "validation_num_inference_steps", "validation_guidance_scale",
                                                 "validation_guidance_rescale",
                                                 "validation_height", "validation_width"})

    def __post_init__(self):
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts or ()))
        _positive(self, "validation_epochs", "validation_steps", "num_validation_images",
                  "validation_num_inference_steps", "validation_height", "validation_width")
        for name in ("validation_height", "validation_width"):
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise FlagError(f"--{name} {getattr(self, name)} must be a multiple of 8 (the VAE downsamples by 8)")
        _one_of("validation_scheduler", self.validation_scheduler, (None,) + SAMPLERS)
        if not self.validation_guidance_scale >= 0:
            raise FlagError(f"--validation_guidance_scale must be >= 0 (got {self.validation_guidance_scale})")
        if not 0.0 <= self.validation_guidance_rescale <= 1.0:
            raise FlagError(f"--validation_guidance_rescale must be between 0 and 1 "
                            f"(got {self.validation_guidance_rescale})")

    def size(self, resolution: int) -> tuple[int, int]:
        """(height, width) of the validation images."""
        return self.validation_height or resolution, self.validation_width or resolution

    def interval(self, steps_per_epoch: int, held_out: bool = False) -> int:
        """Steps between validation passes (0: no validation): with prompts to draw, or held-out images to measure
        (`held_out`: --validation_split) without any."""
        if not self.validation_prompts and not held_out:
            return 0
        return self.validation_steps or self.validation_epochs * steps_per_epoch


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Which devices and how they are laid out."""
    cpu_devices: int | None = None          # simulate N CPU devices
    multihost: bool = False
    fsdp: int = 1                           # devices on the "fsdp" mesh axis
    local_rank: int = -1                    # accepted for compatibility
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache; "none": off
    MAY_CHANGE: ClassVar[frozenset] = frozenset({"cpu_devices", "multihost", "fsdp", "local_rank",
                                                 "compilation_cache_dir"})

    def __post_init__(self):
        _positive(self, "cpu_devices", "fsdp")


GROUPS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "train": TrainConfig,
          "output": OutputConfig, "checkpoint": CheckpointConfig, "validation": ValidationConfig,
          "lora": LoraConfig, "devices": DeviceConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    output: OutputConfig
    checkpoint: CheckpointConfig
    validation: ValidationConfig
    lora: LoraConfig
    devices: DeviceConfig

    def __post_init__(self):
        if self.output.export_single_file and self.lora.enabled and not self.lora.lora_merge:
            raise FlagError("--export_single_file with --lora_rank needs --lora_merge: a single file holds a whole "
                            "pipeline, the adapters merged")

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "RunConfig":
        """From a flat {flag name: value} mapping (argparse's namespace); unknown names are ignored."""
        groups = {}
        for group_name, group_cls in GROUPS.items():
            names = [f.name for f in dataclasses.fields(group_cls)]
            groups[group_name] = group_cls(**{name: flags[name] for name in names if name in flags})
        return cls(**groups)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunConfig":
        """From `to_dict()` output (a checkpoint's or training_args.json); secrets come back as None."""
        return cls(**{name: GROUPS[name](**saved.get(name, {})) for name in GROUPS})

    def check_paths(self) -> None:
        """What this machine must provide for a training run (a config read back from a checkpoint for an
        export is not checked against it)."""
        self.data.check_paths()
        self.output.check_paths()

    def to_dict(self) -> dict:
        """{group: {field: value}}, JSON-able, without secrets."""
        out = {}
        for name in GROUPS:
            values = dataclasses.asdict(getattr(self, name))
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
                         if k not in SECRET_FIELDS}
        return out

    def resume_differences(self, saved: dict) -> list[str]:
        """'--flag: X in the checkpoint, Y now' for every computation-relevant field that differs from `saved`."""
        differences = []
        now = self.to_dict()
        for name, group_cls in GROUPS.items():
            for field in dataclasses.fields(group_cls):
                if field.name in group_cls.MAY_CHANGE or field.name in SECRET_FIELDS:
                    continue
                default = None if field.default is dataclasses.MISSING else field.default
                default = BEFORE_THE_FLAG.get(field.name, default)
                before = saved.get(name, {}).get(field.name, default)
                if not _same_setting(field.name, before, now[name][field.name]):
                    differences.append(f"--{field.name}: {before!r} in the checkpoint, {now[name][field.name]!r} now")
        return differences


def _same_setting(name: str, before, now) -> bool:
    if before == now:
        return True
    if name in PATH_FIELDS and isinstance(before, str) and isinstance(now, str) and os.path.exists(now):
        return os.path.realpath(before) == os.path.realpath(now)
    return False


def may_change_on_resume() -> list[str]:
    """The flags a resumed run may set differently from its checkpoint."""
    return sorted(f"--{name}" for group in GROUPS.values() for name in group.MAY_CHANGE if name not in SECRET_FIELDS)
