"""What is trained: the whole UNet, or LoRA adapters beside the frozen UNet. Chosen once from the config
(`trainable.from_config(config)`); the setup, the step, validation, aot and the export ask it what to do, so
the next kind (text-encoder LoRA) is one more class here, not branches through the trainer (DoRA is LoRA with a
magnitude per layer: LoraAdapters with --use_dora).

    kind = trainable.from_config(config)
    shapes = kind.abstract_params(unet)                  # the trained tree: state, Adam, EMA, checkpoints
    params = kind.initial_params(unet, unet_params)      # step 0 (host or device arrays)
    frozen_unet = kind.frozen_unet(unet_params)          # frozen["unet"] of the step (None: the UNet is trained)
    output = kind.apply_unet(unet, params, frozen, latents, timesteps, context, train=True, rngs=...)
    unet_params, unet_fn = kind.sampler_unet(unet, trained, frozen)   # what the sampler reads
    what = kind.export(writer, trained)                  # the end of training's files (export.PipelineWriter)
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from t2i_flax import lora, lora_files, weights
from t2i_flax.errors import FlagError, count_of, name_examples

LORA_INIT_STREAM = 0x4C6F5241  # "LoRA": the adapters' init key, apart from the step's random streams


class FullUNet:
    """Full fine-tuning: the trained tree is the UNet's own parameters (float32)."""
    is_adapter = False

    def needs_unet_weights(self, resuming: bool) -> bool:
        return not resuming  # a restored state holds the trained UNet

    def abstract_params(self, unet):
        return unet.abstract_params()

    def initial_params(self, unet, unet_params):
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


class LoraAdapters:
    """LoRA: the trained tree is the adapters (t2i_flax/lora.py); the UNet is a frozen input of the step."""
    is_adapter = True

    def __init__(self, lora_config, seed: int):
        self.settings = lora_config
        self.rank = lora.check_rank(lora_config.lora_rank)
        self.scale = lora_config.scale
        self.targets = lora.parse_target_modules(lora_config.lora_target_modules)
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), LORA_INIT_STREAM)
        self.dora = bool(lora_config.use_dora)

    def needs_unet_weights(self, resuming: bool) -> bool:
        return True  # the frozen base

    def _init(self, unet):
        """The adapters at step 0 (A Gaussian, B zero), as a jitted function of nothing."""
        return jax.jit(lambda: lora.init_lora_params(self.key, unet.abstract_params(), self.rank, self.targets))

    def _with_magnitudes(self, params, unet_params):
        """DoRA: each adapter's magnitude from the frozen kernel it sits on, ||W + scale B A|| (||W|| at B = 0)."""
        base = weights.flatten(unet_params)
        kernels = {path + ("kernel",): base[path + ("kernel",)] for path in lora.adapters(params)}
        return jax.jit(lambda p, k: lora.with_dora_magnitudes(p, weights.unflatten(k), self.scale))(params, kernels)

    def abstract_params(self, unet):
        plain = jax.eval_shape(self._init(unet))
        return jax.eval_shape(self._with_magnitudes, plain, unet.abstract_params()) if self.dora else plain

    def initial_params(self, unet, unet_params):
        """Step 0: A Gaussian and B zero, or (--lora_init) the adapters of a LoRA file, which must have this run's
        layout: the modules the targets name, the rank and the alpha (FlagError naming both otherwise). DoRA's
        magnitudes come from `unet_params` (the frozen base), or from a DoRA file."""
        path = self.settings.lora_init
        params = self._init(unet)() if path is None else self._from_file(unet, path)
        if self.dora and not lora.is_dora(params):
            params = self._with_magnitudes(params, unet_params)
        return params

    def _from_file(self, unet, path: str):
        params, info = lora_files.load_lora_weights(path, unet.abstract_params())
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
            what = [f"lacks {count_of(len(missing), 'module')} that --lora_target_modules names "
                    f"({name_examples(missing, 2)})"] if missing else []
            what += [f"adapts {count_of(len(extra), 'module')} that --lora_target_modules does not name "
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


FULL_UNET = FullUNet()


def from_config(config) -> FullUNet | LoraAdapters:
    """What the run trains, from the typed RunConfig."""
    if config.lora.enabled:
        return LoraAdapters(config.lora, config.train.seed)
    return FULL_UNET
