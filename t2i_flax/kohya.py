"""kohya-ss LoRA keys, the LoRA format ComfyUI, AUTOMATIC1111 and Forge load, <-> our UNet modules.

    lora_unet_<module>.lora_down.weight  (r, in)     lora_unet_<module>.lora_up.weight  (out, r)
    lora_unet_<module>.alpha             ()          (the scale is alpha / r, as PEFT's)

<module> is a UNet module's path with "_" for ".": for SD 1.x/2.x the diffusers path
(`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`: kohya sd-scripts trains a diffusers UNet there), for
SDXL the original (sgm) UNet's path (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), as sd-scripts writes SDXL
files. Reading takes both spellings for every kind (as ComfyUI does): "_" is ambiguous ("to_q"), so names are
looked up in a table of the UNet's own modules, never split.

Text encoders (--train_text_encoder): `lora_te_<module>` for SD 1.x/2.x's one, `lora_te1_`/`lora_te2_` for SDXL's two,
<module> the transformers module path with "_" (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).

    tensors = kohya.lora_state_dict(lora_params, rank, alpha, unet_abstract_params, sdxl=False)
    tensors.update(kohya.text_encoder_state_dict(te_params, rank, alpha, kohya.text_encoder_prefix("text_encoder", sdxl)))
    groups = kohya.by_component(tensors)                                  # {"unet": ..., "text_encoder": ...}
    renamed = kohya.to_module_keys(path, groups["unet"], unet_abstract_params)   # -> `<module>.lora.down.weight` ...
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from t2i_flax.errors import ModelError, count_of, name_examples

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
# The component (diffusers' name) each prefix adapts; diffusers reads lora_te_ and lora_te1_ alike.
COMPONENTS = {UNET_PREFIX: "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2"}
KEY = re.compile(r"^(?P<prefix>lora_unet_|lora_te[12]?_)(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


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


def text_encoder_prefix(component: str, sdxl: bool) -> str:
    """lora_te_ (SD 1.x/2.x's one text encoder), lora_te1_ / lora_te2_ (SDXL's two), as sd-scripts writes them."""
    return {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]


def text_encoder_state_dict(lora_params: Mapping, rank: int, alpha: float | None, prefix: str) -> dict[str, np.ndarray]:
    """A text encoder's adapters as kohya keys (float32): `<prefix><transformers module path with _>`, one alpha per
    module, the run's."""
    from t2i_flax.lora import adapters, magnitudes, torch_module_name

    if magnitudes(lora_params):
        raise ValueError("kohya keys cannot hold DoRA magnitudes (config.LoraConfig refuses --use_dora with kohya)")
    alpha = np.asarray(float(rank if alpha is None else alpha), np.float32)
    tensors = {}
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        name = prefix + torch_module_name(path).replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(np.asarray(lora_A, np.float32).T)
        tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(np.asarray(lora_B, np.float32).T)
        tensors[f"{name}.alpha"] = alpha
    return tensors


def is_kohya(keys) -> bool:
    return any(key.startswith((UNET_PREFIX,) + TEXT_ENCODER_PREFIXES) for key in keys)


def by_component(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A kohya file's tensors by the component their prefix adapts (keys kept; other keys go with the UNet's, where
    to_module_keys names them)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        prefix = next((prefix for prefix in COMPONENTS if key.startswith(prefix)), UNET_PREFIX)
        groups.setdefault(COMPONENTS[prefix], {})[key] = tensor
    return groups


def _text_encoder_names(abstract_params: Mapping) -> dict[str, str]:
    """{kohya name: torch module name} of every module with a kernel of a text encoder."""
    from t2i_flax.lora import kernel_shapes, torch_module_name

    return {torch_module_name(path).replace(".", "_"): torch_module_name(path) for path in kernel_shapes(abstract_params)}


def to_module_keys(path: str, tensors: Mapping[str, np.ndarray], abstract_params: Mapping,
                   component: str = "unet") -> dict:
    """One component's kohya tensors (by_component) renamed to diffusers' `<module>.lora.down.weight` /
    `.lora.up.weight` / `<module>.alpha` (what lora_files reads); `abstract_params`: that component's tree. One-line
    ModelError for DoRA scales and names the model lacks."""
    keys = sorted(tensors)
    dora = [key for key in keys if key.endswith(".dora_scale")]
    if dora:
        raise ModelError(f"LoRA file {path} holds DoRA scales ({count_of(len(dora), 'tensor')}, e.g. {dora[0]}), "
                         f"which t2i_flax cannot apply (plain LoRA only)")
    if component == "unet":
        table = {}
        for module, spellings in module_names(abstract_params).items():
            for spelling in spellings:
                table[spelling] = module
        model = "UNet"
    else:
        table, model = _text_encoder_names(abstract_params), "text encoder"
    renamed, unknown, lacking = {}, [], set()
    for key in keys:
        match = KEY.match(key)
        if not match:
            unknown.append(key)
            continue
        module = table.get(match.group("name"))
        if module is None:
            lacking.add(match.group("prefix") + match.group("name"))
            continue
        part = match.group("part")
        renamed[f"{module}.alpha" if part == "alpha" else f"{module}.lora.{part.split('_')[1].split('.')[0]}.weight"] = \
            tensors[key]
    if unknown:
        raise ModelError(f"LoRA file {path} has kohya tensors that are not lora_down/lora_up/alpha: "
                         f"{name_examples(unknown)}")
    if lacking:
        raise ModelError(f"LoRA file {path} adapts {count_of(len(lacking), 'module')} this {model} does not have "
                         f"({name_examples(lacking, 2)}): it was trained for another model")
    return renamed
