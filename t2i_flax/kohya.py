"""kohya-ss LoRA keys, the LoRA format ComfyUI, AUTOMATIC1111 and Forge load, <-> our UNet modules.

    lora_unet_<module>.lora_down.weight  (r, in)     lora_unet_<module>.lora_up.weight  (out, r)
    lora_unet_<module>.alpha             ()          (the scale is alpha / r, as PEFT's)

<module> is a UNet module's path with "_" for ".": for SD 1.x/2.x the diffusers path
(`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`: kohya sd-scripts trains a diffusers UNet there), for
SDXL the original (sgm) UNet's path (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), as sd-scripts writes SDXL
files. Reading takes both spellings for every kind (as ComfyUI does): "_" is ambiguous ("to_q"), so names are
looked up in a table of the UNet's own modules, never split.

    tensors = kohya.lora_state_dict(lora_params, rank, alpha, unet_abstract_params, sdxl=False)
    renamed = kohya.to_module_keys(path, tensors, unet_abstract_params)   # -> `<module>.lora.down.weight` ...
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from t2i_flax.errors import ModelError, count_of, name_examples

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KEY = re.compile(r"^lora_unet_(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def _layout_config(unet_abstract_params: Mapping) -> dict:
    """What single_file.unet_original_key reads of a UNet config, from the parameter tree: the layers per block
    and which up blocks have attentions."""
    names = set(unet_abstract_params)
    layers = sum(1 for name in unet_abstract_params.get("down_blocks_0", {}) if name.startswith("resnets_"))
    up = sorted((int(name.split("_")[-1]) for name in names if name.startswith("up_blocks_")))
    types = ["CrossAttnUpBlock2D" if any(child.startswith("attentions_") for child in
                                         unet_abstract_params[f"up_blocks_{i}"]) else "UpBlock2D" for i in up]
    return {"layers_per_block": layers, "up_block_types": types}


def module_names(unet_abstract_params: Mapping) -> dict[str, tuple[str, str]]:
    """{torch module name: (diffusers-style kohya name, original-style kohya name)} of every module with a kernel."""
    from t2i_flax.lora import kernel_shapes, torch_module_name
    from t2i_flax.single_file import unet_original_key

    config = _layout_config(unet_abstract_params)
    out = {}
    for path in kernel_shapes(unet_abstract_params):
        module = torch_module_name(path)
        original = unet_original_key(module + ".weight", config).removesuffix(".weight")
        out[module] = (module.replace(".", "_"), original.replace(".", "_"))
    return out


def lora_state_dict(lora_params: Mapping, rank: int, alpha: float | None, unet_abstract_params: Mapping,
                    sdxl: bool) -> dict[str, np.ndarray]:
    """Our adapters as kohya keys (float32): original-style names for SDXL, diffusers-style for SD 1.x/2.x; one
    alpha per module, the run's (diffusers ignores per-module alphas that differ)."""
    from t2i_flax.lora import adapters, magnitudes, torch_module_name

    if magnitudes(lora_params):
        raise ValueError("kohya keys cannot hold DoRA magnitudes (config.LoraConfig refuses --use_dora with kohya)")
    names = module_names(unet_abstract_params)
    alpha = np.asarray(float(rank if alpha is None else alpha), np.float32)
    tensors = {}
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        name = UNET_PREFIX + names[torch_module_name(path)][1 if sdxl else 0]
        tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(np.asarray(lora_A, np.float32).T)
        tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(np.asarray(lora_B, np.float32).T)
        tensors[f"{name}.alpha"] = alpha
    return tensors


def is_kohya(keys) -> bool:
    return any(key.startswith((UNET_PREFIX,) + TEXT_ENCODER_PREFIXES) for key in keys)


def to_module_keys(path: str, tensors: Mapping[str, np.ndarray], unet_abstract_params: Mapping) -> dict:
    """A kohya file's tensors renamed to diffusers' `<module>.lora.down.weight` / `.lora.up.weight` / `<module>.alpha`
    (what lora_files reads); one-line ModelError for text-encoder adapters, DoRA scales and names this UNet lacks."""
    keys = sorted(tensors)
    text = [key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text:
        raise ModelError(f"LoRA file {path} holds text-encoder adapters ({count_of(len(text), 'tensor')}, e.g. "
                         f"{text[0]}); t2i_flax applies UNet adapters only (load it without them, or in diffusers)")
    dora = [key for key in keys if key.endswith(".dora_scale")]
    if dora:
        raise ModelError(f"LoRA file {path} holds DoRA scales ({count_of(len(dora), 'tensor')}, e.g. {dora[0]}), "
                         f"which t2i_flax cannot apply (plain LoRA only)")
    table = {}
    for module, spellings in module_names(unet_abstract_params).items():
        for spelling in spellings:
            table[spelling] = module
    renamed, unknown, lacking = {}, [], set()
    for key in keys:
        match = KEY.match(key)
        if not match:
            unknown.append(key)
            continue
        module = table.get(match.group("name"))
        if module is None:
            lacking.add(match.group("name"))
            continue
        part = match.group("part")
        renamed[f"{module}.alpha" if part == "alpha" else f"{module}.lora.{part.split('_')[1].split('.')[0]}.weight"] = \
            tensors[key]
    if unknown:
        raise ModelError(f"LoRA file {path} has kohya tensors that are not lora_down/lora_up/alpha: "
                         f"{name_examples(unknown)}")
    if lacking:
        raise ModelError(f"LoRA file {path} adapts {count_of(len(lacking), 'module')} this UNet does not have "
                         f"(lora_unet_{name_examples(lacking, 2)}): it was trained for another model")
    return renamed
