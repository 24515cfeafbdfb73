"""LoRA files: writing ours (PEFT keys and diffusers' metadata, the file `load_lora_weights` in diffusers reads)
and reading ours, PEFT's and diffusers' older styles into the adapter tree of t2i_flax/lora.py.

    lora_files.save_lora_weights(output_dir, lora_params, rank=4, alpha=4.0, target_modules=targets)
    lora_params, info = lora_files.load_lora_weights(path_or_folder, unet_abstract_params)

The file written by `save_lora_weights` carries `lora_adapter_metadata` (r, lora_alpha, target_modules) as
diffusers' `save_lora_weights` writes it, so `load_lora_weights` in diffusers applies the same scale; B is
stored as trained (not pre-multiplied), so our files round-trip exactly."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from t2i_flax import weights
from t2i_flax.errors import ModelError, count_of, name_examples
from t2i_flax.lora import (A, B, DEFAULT_TARGET_MODULES, M, TEXT_ENCODER_TARGET_MODULES, adapters, check_rank,
                           flax_module_path, kernel_shapes, lora_scale, magnitudes, parse_target_modules,
                           torch_module_name)

METADATA_KEY = "lora_adapter_metadata"  # the safetensors header entry diffusers reads the LoraConfig from
UNET_PREFIX = "unet"  # the key prefix diffusers' StableDiffusionLoraLoaderMixin filters the UNet's keys by
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# ---- the file: save ----------------------------------------------------------------------------------

MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude (out,), saved without PEFT's ".weight"


def lora_state_dict(lora_params: Mapping, prefix: str = UNET_PREFIX) -> dict[str, np.ndarray]:
    """PEFT keys (`unet.<module>.lora_A.weight` (r, in), `lora_B.weight` (out, r), with DoRA
    `lora_magnitude_vector` (out,)), float32 numpy. `prefix`: the component's (`text_encoder` for a text
    encoder's adapters: `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`)."""
    tensors = {}
    dora = magnitudes(lora_params)
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        name = f"{prefix}.{torch_module_name(path)}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lora_A, np.float32).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lora_B, np.float32).T)
        if path in dora:
            # transformers (5.x) loads a text encoder's DoRA magnitude only as `lora_magnitude_vector.weight` (PEFT's
            # own `lora_magnitude_vector` key is left out and re-initialised, silently); diffusers' UNet loader
            # takes PEFT's key.
            suffix = "" if prefix == UNET_PREFIX else ".weight"
            tensors[f"{name}.{MAGNITUDE}{suffix}"] = np.ascontiguousarray(np.asarray(dora[path], np.float32))
    return tensors


LORA_FORMATS = ("peft", "kohya")


def _check_ranks(lora_params: Mapping, rank: int) -> None:
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        if np.shape(lora_A)[1] != rank or np.shape(lora_B)[0] != rank:
            raise ValueError(f"LoRA adapter {'/'.join(path)} has rank {np.shape(lora_A)[1]}, not {rank}")


def save_lora_weights(folder: str, lora_params: Mapping, rank: int, alpha: float | None,
                      target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, lora_format: str = "peft",
                      unet_abstract_params: Mapping | None = None, sdxl: bool = False,
                      text_encoders: Mapping[str, Mapping] | None = None) -> str:
    """Writes `<folder>/pytorch_lora_weights.safetensors` (returns its path): PEFT keys, and the
    `lora_adapter_metadata` header entry (unet.r, unet.lora_alpha, unet.target_modules) that makes diffusers'
    `load_lora_weights` use scale alpha / rank. `alpha` None: the rank. Host (fully addressable) arrays.
    `lora_format="kohya"`: kohya-ss keys instead (t2i_flax/kohya.py; needs the UNet's `unet_abstract_params`,
    and `sdxl` for SDXL's original module names), with kohya's `ss_network_*` metadata; not for DoRA.
    DoRA adapters (a magnitude per module) are written with PEFT's `lora_magnitude_vector` keys and `use_dora`.
    `text_encoders`: {"text_encoder"[, "text_encoder_2"]: adapters} (--train_text_encoder), written as diffusers'
    `save_lora_weights(text_encoder_lora_layers=..., text_encoder_2_lora_layers=...)` writes PEFT state dicts: the
    component's name as the keys' prefix and as its metadata entries' (text_encoder.r, ...), targets PEFT's CLIP
    default; kohya: `lora_te_` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_` (SDXL) keys."""
    from safetensors.numpy import save_file

    from t2i_flax import kohya

    rank = check_rank(rank)
    alpha = float(rank if alpha is None else alpha)
    lora_scale(rank, alpha)  # checks alpha
    components = {UNET_PREFIX: (lora_params, list(parse_target_modules(target_modules)))}
    components.update({name: (params, list(TEXT_ENCODER_TARGET_MODULES))
                       for name, params in (text_encoders or {}).items()})
    entries, tensors = {}, {}
    for prefix, (params, targets) in components.items():
        _check_ranks(params, rank)
        config = {"r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "target_modules": targets,
                  "init_lora_weights": "gaussian"}
        if magnitudes(params):
            config["use_dora"] = True  # diffusers builds PEFT's LoraConfig from this: DoRA layers
        entries.update({f"{prefix}.{key}": value for key, value in config.items()})
        tensors.update(lora_state_dict(params, prefix))
    metadata = {"format": "pt", METADATA_KEY: json.dumps(entries, indent=2, sort_keys=True)}
    if lora_format == "kohya":
        tensors = kohya.lora_state_dict(lora_params, rank, alpha, unet_abstract_params, sdxl)
        for name, params in (text_encoders or {}).items():
            tensors.update(kohya.text_encoder_state_dict(params, rank, alpha, kohya.text_encoder_prefix(name, sdxl)))
        metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                    "ss_network_alpha": str(int(alpha) if alpha.is_integer() else alpha)}
    elif lora_format != "peft":
        raise ValueError(f"lora_format {lora_format!r} is not one of {LORA_FORMATS}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA_WEIGHTS_NAME)
    partial = path + ".partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)
    return path


# ---- the file: load (ours, PEFT and diffusers files others trained) --------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file says besides its tensors."""
    path: str
    scale: float  # multiply B(Ax) by this (1.0 where per-module scales were folded into B)
    rank: int  # the adapters' rank (the largest, if they differ)
    alpha: float | None  # lora_alpha from the metadata or the common `.alpha` value; None: neither (alpha = rank)
    target_modules: tuple[str, ...]  # the metadata's, else the adapted modules' PyTorch names
    key_style: str  # "peft", "diffusers" (lora.down/up), "diffusers-attn-procs" (processor.to_q_lora.down)
    folded: bool  # per-module scales differed: each module's scale was multiplied into its B
    modules: int
    dora: bool = False  # DoRA: a magnitude per module (PEFT's lora_magnitude_vector)


PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
ATTN_PROCS_KEY = re.compile(r"^(?P<attention>.+)\.processor\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
                            r"(?P<part>down|up)\.weight$")
# Text encoders: diffusers' own keys (`convert_state_dict_to_diffusers` of a PEFT state dict, what its LoRA scripts
# save) and its older ones (`self_attn.to_q_lora.down.weight`).
LINEAR_LAYER_KEY = re.compile(r"^(?P<module>.+)\.lora_linear_layer\.(?P<part>down|up)\.weight$")
TEXT_ATTN_KEY = re.compile(r"^(?P<attention>.+)\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
MAGNITUDE_KEY = re.compile(rf"^(?P<module>.+)\.{MAGNITUDE}(\.weight)?$")
ALPHA_KEY = re.compile(r"^(?P<module>.+?)(\.lora)?\.alpha$")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.")
OTHER_ADAPTERS = (("dora_scale", "DoRA scales (kohya/LyCORIS)"),
                  ("lora_B.bias", "LoRA biases"), ("lokr_", "LoKr factors"), ("hada_", "LoHa factors"))
STYLES = {PEFT_KEY: "peft", DIFFUSERS_KEY: "diffusers", ATTN_PROCS_KEY: "diffusers-attn-procs",
          LINEAR_LAYER_KEY: "diffusers", TEXT_ATTN_KEY: "diffusers-attn-procs"}  # first match wins
# The components a file's keys are for (the prefix diffusers' loaders filter them by) and how errors name them.
MODEL_NAMES = {UNET_PREFIX: "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
TEXT_MODEL = "text_model."  # CLIP's transformer; transformers 5's CLIPTextModel (and its PEFT keys) lack the prefix


def find_lora_file(path: str) -> str:
    """A .safetensors file, or a folder with pytorch_lora_weights.safetensors (or with one .safetensors file,
    as diffusers guesses)."""
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        if LORA_WEIGHTS_NAME in files:
            return os.path.join(path, LORA_WEIGHTS_NAME)
        safetensors = [name for name in files if name.endswith(".safetensors")]
        if len(safetensors) == 1:
            return os.path.join(path, safetensors[0])
        pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles and not safetensors:
            raise ModelError(f"LoRA folder {path} has only PyTorch pickles ({name_examples(pickles)}); t2i_flax never "
                             f"unpickles them: save the LoRA as {LORA_WEIGHTS_NAME}")
        found = f"several .safetensors files ({name_examples(safetensors)}): pass one" if safetensors else "no LoRA file"
        raise ModelError(f"LoRA folder {path} has no {LORA_WEIGHTS_NAME} and {found}")
    if os.path.isfile(path):
        if not path.endswith(".safetensors") and path.endswith((".bin", ".pt", ".pth", ".ckpt")):
            raise ModelError(f"LoRA file {path} is a PyTorch pickle; t2i_flax never unpickles: use safetensors")
        return path
    raise ModelError(f"LoRA {path} does not exist (give a {LORA_WEIGHTS_NAME} file or its folder)")


def _read(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """Tensors and the parsed lora_adapter_metadata (None if absent)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                raise ModelError(f"LoRA file {path} is not a safetensors file")
            try:
                header = json.loads(handle.read(header_size))
            except ValueError:
                raise ModelError(f"LoRA file {path} is not a safetensors file (its header does not parse)") from None
        tensors = weights.read_safetensors(path)
    except OSError as error:
        raise ModelError(f"cannot read the LoRA file {path}: {error.strerror or error}") from None
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        return tensors, None
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise ModelError(f"LoRA file {path}: its {METADATA_KEY} is not JSON") from None
    return tensors, metadata


def _refuse_what_cannot_apply(path: str, keys: Sequence[str], component: str = UNET_PREFIX) -> None:
    keys = sorted(keys)
    text_encoder = [key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text_encoder and component == UNET_PREFIX:
        _refuse_text_encoder_adapters(path, text_encoder)
    for marker, what in OTHER_ADAPTERS:
        found = [key for key in keys if marker in key]
        if found:
            raise ModelError(f"LoRA file {path} holds {what} ({count_of(len(found), 'tensor')}, e.g. {found[0]}), which "
                             f"t2i_flax cannot apply (plain LoRA only)")
    if component != UNET_PREFIX:
        return
    prefixes = sorted({key.split(".", 1)[0] for key in keys if key.split(".", 1)[0] not in
                       (UNET_PREFIX, "down_blocks", "mid_block", "up_blocks", "time_embedding", "conv_in",
                        "conv_out")})
    if prefixes:
        raise ModelError(f"LoRA file {path} holds adapters for {', '.join(prefixes)}, not for a Stable Diffusion "
                         f"UNet")


def _refuse_text_encoder_adapters(path: str, keys: Sequence[str]) -> None:
    raise ModelError(f"LoRA file {path} holds text-encoder adapters ({count_of(len(keys), 'tensor')}, e.g. "
                     f"{sorted(keys)[0]}); a UNet-only LoRA does not apply them (train with --train_text_encoder)")


def _by_component(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A diffusers-format file's tensors by the component their key's prefix names (keys kept); keys without a
    component prefix are the UNet's."""
    groups: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        component = next((name for name in ("text_encoder_2", "text_encoder") if key.startswith(name + ".")),
                         UNET_PREFIX)
        groups[component][key] = tensor
    return dict(groups)


def _parse_keys(path: str, tensors: Mapping[str, np.ndarray], component: str = UNET_PREFIX):
    """-> ({pytorch module: {"down": (r, in...), "up": (out, r...)[, "magnitude": (out,)]}}, {module: alpha},
    key styles) of one component's tensors (keys with or without its prefix)."""
    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    alphas, magnitude = {}, {}
    styles, unknown = set(), []
    for key, tensor in tensors.items():
        name = key.removeprefix(component + ".")
        if component != UNET_PREFIX and not name.startswith(TEXT_MODEL):
            name = TEXT_MODEL + name
        dora = MAGNITUDE_KEY.match(name)
        if dora:
            magnitude[dora.group("module")] = tensor
            continue
        for pattern, style in STYLES.items():
            match = pattern.match(name)
            if match:
                break
        else:
            alpha = ALPHA_KEY.match(name)
            if alpha and np.size(tensor) == 1:
                alphas[alpha.group("module")] = float(np.asarray(tensor, np.float64).reshape(()))
            else:
                unknown.append(key)
            continue
        styles.add(style)
        if pattern is ATTN_PROCS_KEY:
            projection = match.group("projection")
            module = f"{match.group('attention')}.{'to_out.0' if projection == 'to_out' else projection}"
        elif pattern is TEXT_ATTN_KEY:
            module = f"{match.group('attention')}.{TEXT_PROJECTIONS[match.group('projection')]}"
        else:
            module = match.group("module")
        part = {"lora_A": "down", "lora_B": "up"}.get(match.group("part"), match.group("part"))
        pairs[module][part] = tensor
    if unknown:
        raise ModelError(f"LoRA file {path} has tensors that are not LoRA down/up matrices: {name_examples(unknown)}")
    if not pairs:
        raise ModelError(f"LoRA file {path} holds no LoRA tensors")
    half = [module for module, pair in pairs.items() if set(pair) != {"down", "up"}]
    if half:
        raise ModelError(f"LoRA file {path} has a down or an up matrix without the other for {name_examples(half)}")
    stray = [module for module in alphas if module not in pairs]
    if stray:
        raise ModelError(f"LoRA file {path} has alpha values for modules without LoRA matrices: {name_examples(stray)}")
    if magnitude and set(magnitude) != set(pairs):
        raise ModelError(f"LoRA file {path} has DoRA magnitudes for some modules only: "
                         f"{name_examples(set(magnitude) ^ set(pairs))} differ")
    for module, vector in magnitude.items():
        pairs[module]["magnitude"] = vector
    return dict(pairs), alphas, styles


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name that it ends (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_scales(path: str, pairs, alphas, metadata) -> dict[str, float]:
    """The scale PEFT (through diffusers) gives each module: metadata first, else `.alpha` keys, else 1."""
    ranks = {module: int(pair["down"].shape[0]) for module, pair in pairs.items()}
    if metadata is None:
        return {module: (alphas[module] / ranks[module] if module in alphas else 1.0) for module in pairs}
    if metadata.get("use_dora") and not all("magnitude" in pair for pair in pairs.values()):
        raise ModelError(f"LoRA file {path} says use_dora in its metadata but has no {MAGNITUDE} tensors")
    try:
        rank, alpha = metadata["r"], metadata.get("lora_alpha", 8)  # LoraConfig's own default alpha
        rank_pattern, alpha_pattern = metadata.get("rank_pattern") or {}, metadata.get("alpha_pattern") or {}
        root = math.sqrt if metadata.get("use_rslora") else (lambda r: r)
        scales = {}
        for module in pairs:
            module_rank = int(_pattern_value(rank_pattern, module, rank))
            if module_rank != ranks[module]:
                raise ModelError(f"LoRA file {path}: its metadata says rank {module_rank} for {module}, its tensors "
                                 f"have rank {ranks[module]}")
            scales[module] = float(_pattern_value(alpha_pattern, module, alpha)) / root(module_rank)
    except (KeyError, TypeError, ValueError, re.error) as error:
        if isinstance(error, ModelError):
            raise
        raise ModelError(f"LoRA file {path}: its {METADATA_KEY} is not a LoRA config ({error!r})") from None
    return scales


def load_lora_weights(path: str, unet_abstract_params: Mapping) -> tuple[dict, LoraInfo]:
    """A LoRA file (or its folder) of UNet adapters -> (the trainable tree, LoraInfo); apply with scale `info.scale`.
    `load_lora_components` with the UNet only: a file with text-encoder adapters is a one-line ModelError."""
    params, infos = load_lora_components(path, {UNET_PREFIX: unet_abstract_params})
    if UNET_PREFIX not in params:
        raise ModelError(f"LoRA file {find_lora_file(path)} holds no LoRA tensors")
    return params[UNET_PREFIX], infos[UNET_PREFIX]


def load_lora_components(path: str, abstract_params: Mapping[str, Mapping]) -> tuple[dict, dict]:
    """A LoRA file (or its folder) -> ({component: the trainable tree}, {component: LoraInfo}) for the components
    of `abstract_params` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}: the models' trees of
    ShapeDtypeStructs) that the file adapts; apply each with its `info.scale`.

    Reads our files and diffusers-format files others trained: PEFT keys (`unet.<module>.lora_A.weight`,
    scale from `lora_adapter_metadata`), diffusers keys (`unet.<module>.lora.down.weight`/`lora.up.weight`,
    `<module>.alpha` if present, else alpha = rank), the older attention-processor keys
    (`<attention>.processor.to_q_lora.down.weight`) and kohya-ss keys (`lora_unet_<module>.lora_down.weight`,
    t2i_flax/kohya.py), with PEFT's DoRA magnitudes (`lora_magnitude_vector`). Text encoders' keys start with
    `text_encoder.`/`text_encoder_2.` (kohya: `lora_te_`, `lora_te1_`, `lora_te2_`), in PEFT's, diffusers'
    (`lora_linear_layer.down`) or its older (`self_attn.to_q_lora.down`) style, with or without CLIP's `text_model.`.
    One-line ModelError naming what the file holds when it cannot be applied: adapters of a component not in
    `abstract_params`, convolution adapters, kohya DoRA scales, modules or shapes the model lacks. Keys without a
    component prefix are read as the UNet's. When a component's modules have different scales (per-module alphas),
    each is multiplied into its B and its info.scale is 1."""
    from t2i_flax import kohya

    file = find_lora_file(path)
    tensors, metadata = _read(file)
    from_kohya = kohya.is_kohya(tensors)
    groups = kohya.by_component(tensors) if from_kohya else _by_component(tensors)
    unwanted = [key for component, group in groups.items() if component not in abstract_params for key in group]
    if unwanted:
        _refuse_text_encoder_adapters(file, unwanted)
    params, infos = {}, {}
    for component, group in groups.items():
        abstract = abstract_params[component]
        if from_kohya:  # -> diffusers' `<module>.lora.down.weight` / `<module>.alpha` keys, read below
            group, group_metadata = kohya.to_module_keys(file, group, abstract, component), None
        else:
            group_metadata = None if metadata is None else {
                key.removeprefix(component + "."): value for key, value in metadata.items()
                if key.startswith(component + ".")} or None
        _refuse_what_cannot_apply(file, list(group), component)
        params[component], infos[component] = _component_adapters(file, component, group, group_metadata, abstract,
                                                                  "kohya" if from_kohya else None)
    return params, infos


def _component_adapters(file: str, component: str, tensors: Mapping[str, np.ndarray], metadata: dict | None,
                        abstract_params: Mapping, key_style: str | None) -> tuple[dict, LoraInfo]:
    """One component's tensors (keys without its prefix) -> (its trainable tree, LoraInfo)."""
    model = MODEL_NAMES[component]
    pairs, alphas, styles = _parse_keys(file, tensors, component)

    convolutions = [module for module, pair in pairs.items() if pair["down"].ndim != 2 or pair["up"].ndim != 2]
    if convolutions:
        raise ModelError(f"LoRA file {file} holds convolution adapters ({count_of(len(convolutions), 'module')}, e.g. "
                         f"{name_examples(convolutions, 2)}); t2i_flax applies adapters of linear layers only")
    kernels = kernel_shapes(abstract_params)
    lacking, mismatched, flat = [], [], {}
    for module, pair in sorted(pairs.items()):
        ours = flax_module_path(module)
        shape = kernels.get(ours)
        if shape is None:
            lacking.append(module)
            continue
        down, up, magnitude = pair["down"], pair["up"], pair.get("magnitude")
        if len(shape) != 2 or down.shape[1] != shape[0] or up.shape != (shape[1], down.shape[0]) or (
                magnitude is not None and magnitude.shape != (shape[1],)):
            kind = "a convolution" if len(shape) != 2 else f"linear {shape[0]} -> {shape[1]}"
            dora = "" if magnitude is None else f", magnitude {tuple(magnitude.shape)}"
            mismatched.append(f"{module} (down {tuple(down.shape)}, up {tuple(up.shape)}{dora}; here {kind})")
            continue
        flat[module] = (ours, np.ascontiguousarray(np.asarray(down, np.float32).T),
                        np.ascontiguousarray(np.asarray(up, np.float32).T),
                        None if magnitude is None else np.asarray(magnitude, np.float32))
    if lacking:
        raise ModelError(f"LoRA file {file} adapts {count_of(len(lacking), 'module')} this {model} does not have "
                         f"({name_examples(lacking, 2)}): it was trained for another model")
    if mismatched:
        raise ModelError(f"LoRA file {file} does not fit this {model}: {name_examples(mismatched, 2)}")

    scales = _module_scales(file, pairs, alphas, metadata)
    folded = len(set(scales.values())) > 1
    params = {}
    for module, (ours, down, up, magnitude) in flat.items():
        params[ours + (A,)] = down
        params[ours + (B,)] = up * np.float32(scales[module]) if folded else up
        if magnitude is not None:
            params[ours + (M,)] = magnitude
    ranks = sorted({int(pair["down"].shape[0]) for pair in pairs.values()})
    if metadata is not None:
        alpha = metadata.get("lora_alpha", 8)
        targets = metadata.get("target_modules") or sorted(pairs)
    else:
        alpha = alphas[next(iter(alphas))] if alphas and len(set(alphas.values())) == 1 else None
        targets = sorted(pairs)
    targets = [targets] if isinstance(targets, str) else targets  # PEFT allows one regex string
    info = LoraInfo(path=file, scale=1.0 if folded else next(iter(scales.values())), rank=ranks[-1],
                    alpha=None if alpha is None else float(alpha), target_modules=tuple(targets),
                    key_style=key_style or "+".join(sorted(styles)), folded=folded,
                    modules=len(pairs), dora=any("magnitude" in pair for pair in pairs.values()))
    return weights.unflatten(params), info
