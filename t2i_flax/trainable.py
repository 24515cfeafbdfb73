"""What is trained: the whole UNet, LoRA adapters beside the frozen UNet, or (--train_text_encoder) LoRA adapters
beside the frozen UNet and the frozen text encoder(s). Chosen once from the config (`trainable.from_config(config,
modules)`); the setup, the step, validation, aot and the export ask it what to do, so a kind is one class here, not
branches through the trainer (DoRA is LoRA with a magnitude per layer: --use_dora).

    kind = trainable.from_config(config, modules)
    shapes = kind.abstract_params(unet)                  # the trained tree: state, Adam, EMA, checkpoints
    params = kind.initial_params(unet, unet_params, base_params)   # step 0 (host or device arrays)
    frozen_unet = kind.frozen_unet(unet_params)          # frozen["unet"] of the step (None: the UNet is trained)
    conditioning = kind.frozen_conditioning(family, modules, frozen, batch)  # outside the gradient (None: trained)
    context, added = kind.condition(family, modules, params, frozen, batch, conditioning)  # inside it
    output = kind.apply_unet(unet, params, frozen, latents, timesteps, context, train=True, rngs=...)
    unet_params, unet_fn = kind.sampler_unet(unet, trained, frozen)   # what the sampler reads
    text_params, text_encoder_fn = kind.sampler_text_encoders(trained, frozen)
    what = kind.export(writer, trained)                  # the end of training's files (export.PipelineWriter)
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from t2i_flax import lora, lora_files, weights
from t2i_flax.errors import FlagError, count_of, name_examples

LORA_INIT_STREAM = 0x4C6F5241  # "LoRA": the adapters' init key, apart from the step's random streams
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class FrozenTextEncoders:
    """The text encoders are frozen: their conditioning is computed once per step, outside the gradient."""

    def frozen_conditioning(self, family, modules, frozen: dict, batch: dict):
        return family.condition(modules, frozen, batch)

    def condition(self, family, modules, params, frozen: dict, batch: dict, frozen_conditioning):
        return frozen_conditioning

    def sampler_text_encoders(self, trained, frozen: dict) -> tuple[dict, Callable | None]:
        """({name: the sampler's params[name]} of each text encoder, its text_encoder_fn (None: frozen params))."""
        return {name: frozen[name] for name in TEXT_ENCODERS if name in frozen}, None


class FullUNet(FrozenTextEncoders):
    """Full fine-tuning: the trained tree is the UNet's own parameters (float32)."""
    is_adapter = False

    def needs_unet_weights(self, resuming: bool) -> bool:
        return not resuming  # a restored state holds the trained UNet

    def abstract_params(self, unet):
        return unet.abstract_params()

    def initial_params(self, unet, unet_params, base_params: dict | None = None):
        return unet_params

    def frozen_unet(self, unet_params):
        return None

    def apply_unet(self, unet, params, frozen: dict, *args, **kwargs):
        return unet.apply({"params": params}, *args, **kwargs)

    def sampler_unet(self, unet, trained, frozen: dict) -> tuple[object, Callable | None]:
        return trained, None

    def describe(self, unet) -> str | None:
        return None

    def card_settings(self) -> dict:
        return {}

    def export(self, writer, trained) -> str:
        writer.write_pipeline(trained)
        return "fine-tuned pipeline"


class LoraAdapters(FrozenTextEncoders):
    """LoRA: the trained tree is the adapters (t2i_flax/lora.py); the UNet is a frozen input of the step. The methods
    take the adapted module where they say `unet`: TextEncoderLora uses one LoraAdapters per text encoder too
    (`targets`, the init key's `stream` and the `model` named in errors given)."""
    is_adapter = True

    def __init__(self, lora_config, seed: int, targets=None, stream: int = 0, model: str = "UNet",
                 targets_flag: str = "--lora_target_modules"):
        self.settings = lora_config
        self.rank = lora.check_rank(lora_config.lora_rank)
        self.scale = lora_config.scale
        self.targets = lora.parse_target_modules(lora_config.lora_target_modules if targets is None else targets)
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), LORA_INIT_STREAM)
        if stream:  # another adapted model: its own init key (the UNet's stays a UNet-only run's)
            self.key = jax.random.fold_in(self.key, stream)
        self.dora = bool(lora_config.use_dora)
        self.model, self.targets_flag = model, targets_flag

    def needs_unet_weights(self, resuming: bool) -> bool:
        return True  # the frozen base

    def _init(self, unet):
        """The adapters at step 0 (A Gaussian, B zero), as a jitted function of nothing."""
        return jax.jit(lambda: lora.init_lora_params(self.key, unet.abstract_params(), self.rank, self.targets,
                                                     self.model))

    def _with_magnitudes(self, params, unet_params):
        """DoRA: each adapter's magnitude from the frozen kernel it sits on, ||W + scale B A|| (||W|| at B = 0)."""
        base = weights.flatten(unet_params)
        kernels = {path + ("kernel",): base[path + ("kernel",)] for path in lora.adapters(params)}
        return jax.jit(lambda p, k: lora.with_dora_magnitudes(p, weights.unflatten(k), self.scale))(params, kernels)

    def abstract_params(self, unet):
        plain = jax.eval_shape(self._init(unet))
        return jax.eval_shape(self._with_magnitudes, plain, unet.abstract_params()) if self.dora else plain

    def initial_params(self, unet, unet_params, base_params: dict | None = None):
        """Step 0: A Gaussian and B zero, or (--lora_init) the adapters of a LoRA file, which must have this run's
        layout: the modules the targets name, the rank and the alpha (FlagError naming both otherwise). DoRA's
        magnitudes come from `unet_params` (the frozen base), or from a DoRA file."""
        path = self.settings.lora_init
        return self.start(unet, unet_params, None if path is None else
                          lora_files.load_lora_weights(path, unet.abstract_params()))

    def start(self, unet, unet_params, loaded: tuple | None):
        """Step 0 from `loaded` ((adapters, LoraInfo) of a file) or, None, from the init."""
        params = self._init(unet)() if loaded is None else self._checked(unet, *loaded)
        if self.dora and not lora.is_dora(params):
            params = self._with_magnitudes(params, unet_params)
        return params

    def _checked(self, unet, params, info):
        """A file's adapters if they have this run's layout (FlagError otherwise)."""
        if info.dora and not self.dora:
            raise FlagError(f"--lora_init {info.path} is a DoRA adapter (lora_magnitude_vector tensors): add "
                            f"--use_dora")
        alpha = self.settings.lora_alpha or self.rank
        ranks = sorted({int(shape[-1]) for (name, shape) in _shapes(params).items() if name[-1] == lora.A})
        if info.folded:
            raise FlagError(f"--lora_init {info.path}: its modules have different alphas; t2i_flax trains one alpha "
                            f"(--lora_alpha)")
        file_alpha = info.rank if info.alpha is None else info.alpha
        if ranks != [self.rank] or file_alpha != alpha:
            raise FlagError(f"--lora_init {info.path} has rank {'/'.join(map(str, ranks))} and alpha {file_alpha:g}, "
                            f"this run --lora_rank {self.rank} and --lora_alpha {alpha:g}: give the file's")
        want, have = _shapes(jax.eval_shape(self._init(unet))), _shapes(params)
        modules = lambda shapes: {path[:-1] for path in shapes if path[-1] != lora.M}  # noqa: E731
        missing = sorted(map(lora.torch_module_name, modules(want) - modules(have)))
        extra = sorted(map(lora.torch_module_name, modules(have) - modules(want)))
        if missing or extra:
            what = [f"lacks {count_of(len(missing), 'module')} that {self.targets_flag} names "
                    f"({name_examples(missing, 2)})"] if missing else []
            what += [f"adapts {count_of(len(extra), 'module')} that {self.targets_flag} does not name "
                     f"({name_examples(extra, 2)})"] if extra else []
            raise FlagError(f"--lora_init {info.path} {' and '.join(what)} (the file's targets: "
                            f"{name_examples(info.target_modules, 4)})")
        return params

    def frozen_unet(self, unet_params):
        return unet_params

    def apply_unet(self, unet, params, frozen: dict, *args, **kwargs):
        return lora.apply_unet(unet, frozen["unet"], params, self.scale, *args, **kwargs)

    def sampler_unet(self, unet, trained, frozen: dict) -> tuple[object, Callable | None]:
        return lora.sampler_unet_params(frozen["unet"], trained, self.scale), lora.sampler_unet_fn(unet)

    def describe(self, unet) -> str:
        shapes = unet.abstract_params()
        return (f"{'DoRA' if self.dora else 'LoRA'}: rank {self.rank}, scale {self.scale:g}, "
                f"{len(lora.adapted_modules(shapes, self.targets))} "
                f"adapted layers, {lora.param_count(self.abstract_params(unet)):,} trained parameters")

    def card_settings(self) -> dict:
        settings = self.settings
        return {"LoRA": f"rank {settings.lora_rank}, alpha {settings.lora_alpha or settings.lora_rank}, "
                        f"targets {settings.lora_target_modules}{', DoRA' if self.dora else ''}"}

    def export(self, writer, trained) -> str:
        """The adapters' file (PEFT or, --lora_format kohya, kohya keys); with --lora_merge also the pipeline with
        them merged into the float32 UNet."""
        family = writer.family
        lora_files.save_lora_weights(writer.output_dir, trained, self.rank, self.settings.lora_alpha, self.targets,
                                     self.settings.lora_format, writer.unet.abstract_params(),
                                     sdxl=bool(family is not None and family.size_conditioning))
        if not self.settings.lora_merge:
            keys = ", kohya keys" if self.settings.lora_format == "kohya" else ""
            return f"LoRA adapters ({lora_files.LORA_WEIGHTS_NAME}{keys})"
        writer.write_pipeline(jax.device_get(lora.merge_lora(writer.base_unet_params(), trained, self.scale)))
        return f"LoRA adapters ({lora_files.LORA_WEIGHTS_NAME}) and the pipeline with them merged"


def _shapes(tree) -> dict:
    return {path: tuple(np.shape(leaf)) for path, leaf in weights.flatten(tree).items()}


class TextEncoderLora:
    """--train_text_encoder with --lora_rank: LoRA adapters beside the frozen UNet (LoraAdapters) and beside each
    frozen CLIP text encoder's attention projections (PEFT's default CLIP targets, lora.TEXT_ENCODER_TARGET_MODULES;
    SDXL: both encoders, not text_encoder_2's projection), trained together with one rank, alpha and --use_dora. The
    trained tree is {"unet": adapters, "text_encoder": adapters[, "text_encoder_2": adapters]}; the conditioning is
    computed inside the differentiated function (`condition`), by the family's own conditioning with the encoders
    applied through lora.apply_adapted."""
    is_adapter = True

    def __init__(self, lora_config, seed: int, modules):
        self.settings = lora_config
        self.unet_adapters = LoraAdapters(lora_config, seed)
        self.encoders = {name: getattr(modules, name) for name in TEXT_ENCODERS if getattr(modules, name) is not None}
        targets_flag = f"--train_text_encoder ({','.join(lora.TEXT_ENCODER_TARGET_MODULES)})"
        self.encoder_adapters = {
            name: LoraAdapters(lora_config, seed, targets=lora.TEXT_ENCODER_TARGET_MODULES, stream=index + 1,
                               model=lora_files.MODEL_NAMES[name], targets_flag=targets_flag)
            for index, name in enumerate(self.encoders)}
        self.scale, self.rank, self.dora = self.unet_adapters.scale, self.unet_adapters.rank, self.unet_adapters.dora

    def _parts(self, unet) -> dict:
        """{component: (its LoraAdapters, its module)}."""
        return {"unet": (self.unet_adapters, unet),
                **{name: (self.encoder_adapters[name], module) for name, module in self.encoders.items()}}

    def needs_unet_weights(self, resuming: bool) -> bool:
        return True  # the frozen base

    def abstract_params(self, unet):
        return {name: adapters.abstract_params(module) for name, (adapters, module) in self._parts(unet).items()}

    def initial_params(self, unet, unet_params, base_params: dict | None = None):
        """Step 0 of every component (LoraAdapters.start): the init, or (--lora_init) the file's adapters; a
        component the file does not adapt (a UNet-only file) starts from the init. `base_params`: the loaded
        {component: host tree} (the text encoders' kernels give DoRA's initial magnitudes)."""
        parts, path = self._parts(unet), self.settings.lora_init
        base = dict(base_params or {}, unet=unet_params)
        loaded, infos = ({}, {}) if path is None else lora_files.load_lora_components(
            path, {name: module.abstract_params() for name, (_, module) in parts.items()})
        return {name: adapters.start(module, base.get(name), (loaded[name], infos[name]) if name in loaded else None)
                for name, (adapters, module) in parts.items()}

    def frozen_unet(self, unet_params):
        return unet_params

    def frozen_conditioning(self, family, modules, frozen: dict, batch: dict):
        return None  # the text encoders' outputs depend on the trained adapters: `condition` computes them

    def _adapted_text_encoders(self, adapters: dict, frozen: dict) -> dict:
        return {name: lora.sampler_unet_params(frozen[name], adapters[name], self.scale) for name in self.encoders}

    def condition(self, family, modules, params, frozen: dict, batch: dict, frozen_conditioning):
        return family.condition(modules, self._adapted_text_encoders(params, frozen), batch, lora.apply_adapted)

    def apply_unet(self, unet, params, frozen: dict, *args, **kwargs):
        return self.unet_adapters.apply_unet(unet, params["unet"], frozen, *args, **kwargs)

    def sampler_unet(self, unet, trained, frozen: dict) -> tuple[object, Callable | None]:
        return self.unet_adapters.sampler_unet(unet, trained["unet"], frozen)

    def sampler_text_encoders(self, trained, frozen: dict) -> tuple[dict, Callable | None]:
        return self._adapted_text_encoders(trained, frozen), lora.apply_adapted

    def describe(self, unet) -> str:
        layers = {name: len(lora.adapted_modules(module.abstract_params(), adapters.targets))
                  for name, (adapters, module) in self._parts(unet).items()}
        encoders = " and ".join(f"{layers[name]} of {name}" for name in self.encoders)
        return (f"{'DoRA' if self.dora else 'LoRA'}: rank {self.rank}, scale {self.scale:g}, {layers['unet']} "
                f"adapted layers of the UNet, {encoders}, {lora.param_count(self.abstract_params(unet)):,} trained "
                f"parameters")

    def card_settings(self) -> dict:
        return {**self.unet_adapters.card_settings(),
                "text encoder": f"LoRA on {', '.join(self.encoders)} (targets "
                                f"{','.join(lora.TEXT_ENCODER_TARGET_MODULES)})"}

    def export(self, writer, trained) -> str:
        """The adapters' file with the text encoders' keys (PEFT: `text_encoder.`/`text_encoder_2.`, kohya:
        `lora_te_`/`lora_te1_`/`lora_te2_`); with --lora_merge also the pipeline with the adapters merged into the
        float32 UNet and text encoder(s)."""
        family, settings = writer.family, self.settings
        text_encoders = {name: trained[name] for name in self.encoders}
        lora_files.save_lora_weights(writer.output_dir, trained["unet"], self.rank, settings.lora_alpha,
                                     self.unet_adapters.targets, settings.lora_format, writer.unet.abstract_params(),
                                     sdxl=bool(family is not None and family.size_conditioning),
                                     text_encoders=text_encoders)
        what = f"LoRA adapters of the UNet and {' and '.join(self.encoders)} ({lora_files.LORA_WEIGHTS_NAME}"
        if not settings.lora_merge:
            return what + (", kohya keys)" if settings.lora_format == "kohya" else ")")
        merged = {name: jax.device_get(lora.merge_lora(writer.base_text_encoder_params(name), adapters, self.scale))
                  for name, adapters in text_encoders.items()}
        writer.write_pipeline(jax.device_get(lora.merge_lora(writer.base_unet_params(), trained["unet"], self.scale)),
                              text_encoders=merged)
        return what + ") and the pipeline with them merged"


FULL_UNET = FullUNet()


def from_config(config, modules=None) -> FullUNet | LoraAdapters | TextEncoderLora:
    """What the run trains, from the typed RunConfig; `modules` (family.Modules) are needed with
    --train_text_encoder (its adapters' layout is the text encoders')."""
    if config.lora.train_text_encoder:
        if modules is None:
            raise ValueError("--train_text_encoder: trainable.from_config needs the modules (the text encoders)")
        return TextEncoderLora(config.lora, config.train.seed, modules)
    if config.lora.enabled:
        return LoraAdapters(config.lora, config.train.seed)
    return FULL_UNET
