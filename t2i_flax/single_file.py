"""Single-file checkpoints: one `.safetensors` file in the original Stable Diffusion layout (what AUTOMATIC1111,
ComfyUI, Forge and InvokeAI load and what model hubs share), in and out, for SD 1.x, SD 2.x and SDXL base.

    original layout (one file)                                   diffusers folder
    model.diffusion_model.input_blocks.1.0.in_layers.0.weight    unet/  down_blocks.0.resnets.0.norm1.weight
    first_stage_model.decoder.up.0.block.0.conv1.weight          vae/   decoder.up_blocks.<last>.resnets.0.conv1.weight
    first_stage_model.encoder.mid.attn_1.q.weight  (C, C, 1, 1)  vae/   encoder.mid_block.attentions.0.to_q.weight (C, C)
    cond_stage_model.transformer.text_model.<key>      (SD 1.x)  text_encoder/  text_model.<key>
    cond_stage_model.model.transformer.resblocks.N.attn.in_proj_weight  (3D, D)   (SD 2.x, OpenCLIP)
                                                                 text_encoder/  ...layers.N.self_attn.{q,k,v}_proj.weight
    conditioner.embedders.0.transformer.text_model.<key>  (SDXL) text_encoder/
    conditioner.embedders.1.model.<OpenCLIP key>          (SDXL) text_encoder_2/ (text_projection transposed)

In: `to_diffusers_folder(reference)` tells the kind (SD 1.x, 2.x, XL) from the tensors' names and shapes, takes
the configs, tokenizers and scheduler from a diffusers folder or Hub id (`config`; default: the kind's official
repo, its config and tokenizer files only), and writes the tensors under their diffusers names into a folder in
the cache, which the trainer and `generate` then read as any pipeline folder. A `reference` is a local file or a
Hub file spelled `owner/repo/path/in/repo.safetensors` (downloaded with huggingface_hub: --revision,
--cache_dir, HF_HUB_OFFLINE). Pickle checkpoints (.ckpt, .pt, .pth, .bin) are refused: loading one can run code.

Out: `write_single_file(pipeline_dir, path, dtype)` writes a diffusers folder as one file in that layout, with
4-D (1x1 conv) VAE attention weights and the SD 2.x text encoder in OpenCLIP layout (fused in_proj), as
ComfyUI/A1111 need to recognise them.

One table (`entries`) drives both directions: for each tensor of the diffusers components (named from the
models' configs), its key in the single file and how its layout differs there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

import numpy as np

from t2i_flax import weights
from t2i_flax.errors import FlagError, ModelError, name_examples

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
EXPORT_DTYPES = ("float16", "bfloat16", "float32")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."     # transformers' CLIP keys (with `text_model.`)
SD2_TEXT_PREFIX = "cond_stage_model.model."           # OpenCLIP
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
# What a file cannot say: the official repo whose configs, tokenizers and scheduler go with each kind (diffusers'
# own defaults). SD 2.x: the 768 px v-prediction model; its 512 px epsilon base is stabilityai/stable-diffusion-2-1-base.
DEFAULT_CONFIGS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
KIND_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}
# Tensors real files carry that are no weights of the pipeline: the DDPM schedule's buffers, the EMA copy of
# the UNet (as diffusers, the non-EMA `model.diffusion_model.` weights are read), CLIP's position ids, OpenCLIP's
# logit scale and attention mask, SD 2.x's unused text projection, sgm's sigma buffers, the VAE's training loss
# (LPIPS, discriminator) that some files kept.
KNOWN_EXTRAS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$"
    r"|^model_ema\.|\.position_ids$|\.logit_scale$|\.attn_mask$|^cond_stage_model\.model\.text_projection$"
    r"|^denoiser\.(sigmas|log_sigmas)$|^first_stage_model\.loss\.")
COMPONENT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
CONVERSION_VERSION = 1  # part of the cache key: a change of the mapping converts again


class SingleFileError(ModelError):
    """A single-file checkpoint that t2i_flax cannot read: names the tensors or what the file is."""


# ---- references ------------------------------------------------------------------------------------------

def is_single_file(reference: str | None) -> bool:
    """A reference to one weight file (safetensors, or a pickle that `check_reference` refuses)."""
    return bool(reference) and reference.lower().endswith((SUFFIX,) + PICKLE_SUFFIXES) \
        and not os.path.isdir(reference)


def check_reference(reference: str) -> None:
    """ModelError (one line) for a pickle checkpoint."""
    if reference.lower().endswith(PICKLE_SUFFIXES) and not os.path.isdir(reference):
        raise SingleFileError(
            f"{reference} is a PyTorch pickle checkpoint: t2i_flax never loads pickles (loading one can run code); "
            f"use the model's .safetensors file")


def _hub_parts(reference: str) -> tuple[str, str] | None:
    """`owner/repo/path/file.safetensors` -> ("owner/repo", "path/file.safetensors"); None if not that spelling."""
    if reference.startswith((".", "/", "~")) or "//" in reference or "\\" in reference:
        return None
    parts = reference.split("/")
    if len(parts) < 3 or not all(parts) or not re.match(r"^[A-Za-z0-9][\w.-]*$", parts[0]):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_url(reference: str) -> str | None:
    """The huggingface.co address of a Hub single file (`owner/repo/path.safetensors`; None for anything else),
    as diffusers' from_single_file takes it."""
    if not is_single_file(reference) or os.path.exists(os.path.expanduser(reference)):
        return None
    parts = _hub_parts(reference)
    return f"https://huggingface.co/{parts[0]}/blob/main/{parts[1]}" if parts else None


def local_file(reference: str, revision: str | None = None, cache_dir: str | None = None,
               local_files_only: bool | None = None) -> str:
    """The local path of a single file: the file itself, or a Hub file (`owner/repo/path.safetensors`) from the
    Hugging Face cache, downloaded if needed."""
    check_reference(reference)
    path = os.path.expanduser(reference)
    if os.path.isfile(path):
        return path
    hub_parts = _hub_parts(reference)
    if hub_parts is None:
        raise SingleFileError(f"{reference} does not exist (and it is not a Hub file spelled "
                              f"owner/repo/file.safetensors)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from t2i_flax import hub

    repo_id, filename = hub_parts
    where = f"{filename} of the Hub repo {repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               local_files_only=hub._offline() if local_files_only is None else local_files_only)
    except LocalEntryNotFoundError:
        raise hub.ModelNotFoundError(f"{reference} is no local file, and as a Hub file ({where}) it is not in the "
                                     f"local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1): download it "
                                     f"once with network, or pass a local file") from None
    except RepositoryNotFoundError:
        raise hub.ModelNotFoundError(f"Hub repo {repo_id} not found (or private: log in with `hf auth login`)") \
            from None
    except RevisionNotFoundError:
        raise hub.ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise hub.ModelNotFoundError(f"the Hub repo {repo_id} has no file {filename}") from None
    except (HfHubHTTPError, OSError) as error:
        raise hub.ModelNotFoundError(f"could not download {where}: {str(error).splitlines()[0]}") from None


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from the file's header, without reading the tensors."""
    with open(path, "rb") as handle:
        header, _ = weights.read_safetensors_header(handle, path, SingleFileError)
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items() if name != "__metadata__"}


# ---- what a file is ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a pipeline's components sit in a single file: the kind, and each text encoder's prefix and key style
    ("clip": transformers' names under `text_model.`; "open_clip": OpenCLIP's, fused q/k/v)."""
    kind: str                     # sd1 | sd2 | sdxl
    text_encoders: tuple          # ((component, prefix, style), ...)


LAYOUTS = {
    "sd1": Layout("sd1", (("text_encoder", SD1_TEXT_PREFIX, "clip"),)),
    "sd2": Layout("sd2", (("text_encoder", SD2_TEXT_PREFIX, "open_clip"),)),
    "sdxl": Layout("sdxl", (("text_encoder", SDXL_TEXT_PREFIX, "clip"),
                            ("text_encoder_2", SDXL_TEXT_2_PREFIX, "open_clip"))),
}


def detect_layout(header: dict, source: str) -> Layout:
    """The kind of a single file from its tensors' names and shapes; SingleFileError for what t2i_flax does not
    train (a file without a UNet, an inpainting model, the SDXL refiner)."""
    conv_in = header.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        unet_like = [name for name in header if name.startswith(("lora_", "down_blocks.", "unet."))]
        what = " (its keys look like a LoRA or a diffusers component)" if unet_like else ""
        raise SingleFileError(f"{source} is not a Stable Diffusion single-file checkpoint: it has no "
                              f"{UNET_PREFIX}* UNet tensors{what}")
    if len(conv_in[1]) == 4 and conv_in[1][1] == 9:
        raise SingleFileError(f"{source} is an inpainting checkpoint (its UNet reads 9 channels); t2i_flax trains "
                              f"text-to-image SD 1.x/2.x and SDXL base models")
    if any(name.startswith(SDXL_TEXT_2_PREFIX) for name in header):
        return LAYOUTS["sdxl"]
    if any(name.startswith("conditioner.embedders.0.model.") for name in header):
        raise SingleFileError(f"{source} is an SDXL refiner (one OpenCLIP text encoder); t2i_flax trains SD 1.x/2.x "
                              f"and SDXL base models")
    if any(name.startswith(SD2_TEXT_PREFIX) for name in header):
        return LAYOUTS["sd2"]
    if any(name.startswith(SD1_TEXT_PREFIX) for name in header):
        # An SD 2.x model written with transformers' key names (as diffusers reads too): its 1024-wide context.
        context = header.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        return Layout("sd2" if context and context[1][-1] == 1024 else "sd1", LAYOUTS["sd1"].text_encoders)
    raise SingleFileError(f"{source} has a UNet but no text encoder ({SD1_TEXT_PREFIX}*, {SD2_TEXT_PREFIX}* or "
                          f"conditioner.embedders.*): t2i_flax needs the whole pipeline in one file")


def export_layout(family, text_encoder_config: dict) -> Layout:
    """The layout a diffusers pipeline is written in: SDXL's; SD 2.x (an OpenCLIP text encoder, whose activation is
    the exact GELU) in OpenCLIP layout; SD 1.x otherwise."""
    if family.size_conditioning:
        return LAYOUTS["sdxl"]
    return LAYOUTS["sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd1"]


# ---- the table ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the single file: its key, the component and diffusers key(s) it holds, and how it is laid
    out there: "same"; "conv1x1" (a Dense weight (O, I) stored as a 1x1 conv (O, I, 1, 1)); "transpose" (OpenCLIP's
    text projection, (in, out)); "fused" (OpenCLIP's in_proj: q, k and v stacked on the first axis)."""
    original: str
    component: str
    diffusers: tuple
    layout: str = "same"

    def original_shape(self, shapes: dict) -> tuple:
        first = tuple(shapes[self.diffusers[0]])
        if self.layout == "conv1x1":
            return first + (1, 1)
        if self.layout == "transpose":
            return first[::-1]
        if self.layout == "fused":
            return (first[0] * len(self.diffusers),) + first[1:]
        return first

    def to_original(self, tensors: dict) -> np.ndarray:
        values = [tensors[key] for key in self.diffusers]
        if self.layout == "conv1x1":
            return values[0].reshape(values[0].shape + (1, 1))
        if self.layout == "transpose":
            return np.ascontiguousarray(values[0].T)
        if self.layout == "fused":
            return np.concatenate(values, axis=0)
        return values[0]

    def from_original(self, value: np.ndarray) -> dict:
        if self.layout == "conv1x1":
            return {self.diffusers[0]: value.reshape(value.shape[:2])}  # 2-D (older files) or (O, I, 1, 1)
        if self.layout == "transpose":
            return {self.diffusers[0]: np.ascontiguousarray(value.T)}
        if self.layout == "fused":
            return dict(zip(self.diffusers, np.split(value, len(self.diffusers), axis=0)))
        return {self.diffusers[0]: value}


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _layers_per_block(config: dict) -> int:
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise SingleFileError(f"a UNet with layers_per_block {list(layers)} has no single-file layout "
                                  f"(SD 1.x/2.x and SDXL use one number)")
        layers = layers[0]
    return int(layers)


def unet_original_key(key: str, config: dict) -> str:
    """A diffusers UNet key -> its key under `model.diffusion_model.` (LDM's openaimodel names)."""
    per_block = _layers_per_block(config)
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    parts = key.split(".")

    def resnet(rest: list) -> str:
        return ".".join([_UNET_RESNET.get(rest[0], rest[0])] + rest[1:])

    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        first = 1 + block * (per_block + 1)
        if kind == "downsamplers":  # down_blocks.B.downsamplers.0.conv.X
            return f"input_blocks.{first + per_block}.0.op.{'.'.join(parts[5:])}"
        index = first + int(parts[3])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{resnet(parts[4:])}"
        if kind == "attentions":
            return f"input_blocks.{index}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        position = {"resnets": 2 * int(parts[2]), "attentions": 1}[parts[1]]
        rest = resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
        return f"middle_block.{position}.{rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        first = block * (per_block + 1)
        if kind == "upsamplers":  # after the block's attention, if it has one
            has_attention = "CrossAttn" in config["up_block_types"][block]
            return f"output_blocks.{first + per_block}.{2 if has_attention else 1}.{'.'.join(parts[4:])}"
        index = first + int(parts[3])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{resnet(parts[4:])}"
        if kind == "attentions":
            return f"output_blocks.{index}.1.{'.'.join(parts[4:])}"
    raise SingleFileError(f"the UNet tensor {key} has no place in the single-file layout")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_original_key(key: str, config: dict) -> tuple[str, str]:
    """A diffusers VAE key -> (its key under `first_stage_model.`, its layout there)."""
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return key, "same"
    top = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    if rest[0] in top:
        return ".".join([side, top[rest[0]]] + rest[1:]), "same"

    def resnet(names: list) -> str:
        return ".".join(["nin_shortcut" if names[0] == "conv_shortcut" else names[0]] + names[1:])

    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{resnet(rest[3:])}", "same"
        module = ".".join(rest[3:-1])
        layout = "conv1x1" if rest[-1] == "weight" and module != "group_norm" else "same"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[module]}.{rest[-1]}", layout
    if rest[0] in ("down_blocks", "up_blocks"):
        block = int(rest[1])
        if rest[0] == "up_blocks":  # LDM's decoder counts its levels from the lowest resolution up
            block = len(config["up_block_types"]) - 1 - block
        level = f"{side}.{'down' if rest[0] == 'down_blocks' else 'up'}.{block}"
        if rest[2] == "resnets":
            return f"{level}.block.{rest[3]}.{resnet(rest[4:])}", "same"
        if rest[2] in ("downsamplers", "upsamplers"):
            return f"{level}.{'downsample' if rest[2] == 'downsamplers' else 'upsample'}.{'.'.join(rest[4:])}", "same"
    raise SingleFileError(f"the VAE tensor {key} has no place in the single-file layout")


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def text_entries(component: str, keys, prefix: str, style: str) -> list[Entry]:
    """The entries of a CLIP text encoder (diffusers keys with `text_model.`) in `style` under `prefix`."""
    if style == "clip":
        return [Entry(prefix + key, component, (key,)) for key in keys]
    entries, fused = [], {}
    for key in keys:
        if key in _OPEN_CLIP_TOP:
            entries.append(Entry(prefix + _OPEN_CLIP_TOP[key], component, (key,)))
        elif key == "text_projection.weight":  # OpenCLIP multiplies x @ P: (in, out)
            entries.append(Entry(prefix + "text_projection", component, (key,), "transpose"))
        elif _LAYER.match(key):
            layer, module, leaf = _LAYER.match(key).groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}attn.in_proj_{leaf}", {})[module[10]] = key
            else:
                entries.append(Entry(f"{base}{_OPEN_CLIP_LAYER[module]}.{leaf}", component, (key,)))
        else:
            raise SingleFileError(f"the text encoder tensor {key} has no place in the OpenCLIP layout")
    for original, parts in fused.items():
        entries.append(Entry(original, component, tuple(parts[name] for name in "qkv"), "fused"))
    return entries


def entries(layout: Layout, keys: dict, configs: dict) -> list[Entry]:
    """The whole table: `keys` {component: [diffusers keys]} (as our models name them), `configs` {component:
    config.json contents}."""
    table = [Entry(UNET_PREFIX + unet_original_key(key, configs["unet"]), "unet", (key,)) for key in keys["unet"]]
    for key in keys["vae"]:
        original, kind = vae_original_key(key, configs["vae"])
        table.append(Entry(VAE_PREFIX + original, "vae", (key,), kind))
    for component, prefix, style in layout.text_encoders:
        table += text_entries(component, keys[component], prefix, style)
    return table


def _component_keys(modules) -> dict:
    """{component: {diffusers key: shape}} of the models (configs only, no weights), as our files name them."""
    from t2i_flax import weights

    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(modules, name)
        if module is not None:
            out[name] = {weights.flax_path_to_torch_key(path): _torch_shape(tuple(leaf.shape), path[-1])
                         for path, leaf in weights.flatten(module.abstract_params()).items()}
    return out


def _torch_shape(shape: tuple, leaf: str) -> tuple:
    """A Flax parameter's shape in PyTorch layout (weights.flax_to_torch_layout's transposes)."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def _read_configs(folder: str, components) -> dict:
    configs = {}
    for name in components:
        with open(os.path.join(folder, name, "config.json")) as handle:
            configs[name] = json.load(handle)
    return configs


# ---- in: a single file -> a diffusers folder ------------------------------------------------------------------

def config_folder(kind: str, config: str | None, cache_dir: str | None = None) -> str:
    """The diffusers folder (local, or a Hub id's snapshot of its configs and tokenizers) whose configs,
    tokenizers and scheduler go with a single file of `kind`."""
    from t2i_flax import hub

    reference = config or DEFAULT_CONFIGS[kind]
    if os.path.isdir(reference):
        return reference
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise FlagError(f"--single_file_config {reference}: not a folder (and not a Hub repo id)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "README.md"] + [f"{part}/{pattern}" for part in hub.PIPELINE_COMPONENTS
                                                    for pattern in ("*.json", "*.txt")]
    try:
        return snapshot_download(reference, cache_dir=cache_dir, allow_patterns=patterns,
                                 local_files_only=hub._offline())
    except Exception as error:  # noqa: BLE001  (huggingface_hub's errors: not found, offline, network)
        from t2i_flax.errors import one_line

        how = "" if config else f" (the default configs for an {KIND_NAMES[kind]} file; or pass --single_file_config)"
        raise hub.ModelNotFoundError(f"could not get the configs of {reference}{how}: {one_line(error)[:200]}") \
            from None


def config_dir_of(reference: str, config: str | None, revision: str | None = None,
                  cache_dir: str | None = None) -> str:
    """The config folder a single file goes with, without reading (or downloading) its tensors (what compiling
    without weights, t2i_flax.aot, needs): `config`, else the official repo of the kind its header tells (a Hub
    file not in the cache: its header alone, read with a range request)."""
    check_reference(reference)
    if config:
        return config_folder("sd1", config, cache_dir)  # the kind only names the default
    path = os.path.expanduser(reference)
    if os.path.isfile(path):
        header = read_header(path)
    else:
        try:
            header = read_header(local_file(reference, revision, cache_dir, local_files_only=True))
        except ModelError:
            header = _hub_header(reference, revision)
    return config_folder(detect_layout(header, reference).kind, None, cache_dir)


def _hub_header(reference: str, revision: str | None) -> dict:
    from huggingface_hub import HfApi

    from t2i_flax import hub
    from t2i_flax.errors import one_line

    repo_id, filename = _hub_parts(reference)
    if hub._offline():
        raise hub.ModelNotFoundError(f"{reference} is not in the local Hugging Face cache and downloads are off "
                                     f"(HF_HUB_OFFLINE=1): pass --single_file_config, or download it once")
    try:
        metadata = HfApi().parse_safetensors_file_metadata(repo_id, filename, revision=revision)
    except Exception as error:  # noqa: BLE001  (huggingface_hub's errors: not found, offline, network)
        raise hub.ModelNotFoundError(f"could not read the header of {reference}: {one_line(error)[:200]}") from None
    return {name: (info.dtype, tuple(info.shape)) for name, info in metadata.tensors.items()}


def cache_root() -> str:
    """Where converted single files go: $T2I_FLAX_SINGLE_FILE_CACHE, else ~/.cache/t2i_flax/single_file."""
    return os.environ.get("T2I_FLAX_SINGLE_FILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "t2i_flax", "single_file")


def _cache_key(path: str, config_dir: str) -> str:
    stat = os.stat(path)
    text = json.dumps([CONVERSION_VERSION, os.path.realpath(path), stat.st_size, stat.st_mtime_ns,
                       os.path.realpath(config_dir)])
    stem = re.sub(r"[^\w.-]", "_", os.path.basename(path)[: -len(SUFFIX)])[:60]
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def source_commit(folder: str) -> str | None:
    """The Hub commit the single file converted into `folder` was downloaded from (None: a local file, or not a
    converted folder): a resumed run asks for that commit again, not for what the branch points at by then."""
    try:
        with open(os.path.join(folder, "single_file.json")) as handle:
            return json.load(handle).get("hub_commit")
    except (OSError, ValueError):
        return None


def to_diffusers_folder(reference: str, config: str | None = None, revision: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool | None = None) -> str:
    """The diffusers folder of a single file (converted once, then read from the cache)."""
    path = local_file(reference, revision, cache_dir, local_files_only)
    header = read_header(path)
    layout = detect_layout(header, reference)
    configs_dir = config_folder(layout.kind, config, cache_dir)
    target = os.path.join(cache_root(), _cache_key(path, configs_dir))
    if os.path.isfile(os.path.join(target, "single_file.json")):
        return target
    import tempfile

    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=cache_root())  # unique across hosts
    try:
        convert(path, header, layout, configs_dir, staging, reference)
        if os.path.isdir(target):  # a conversion that stopped before its last file
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            if not os.path.isfile(os.path.join(target, "single_file.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def plan(header: dict, layout: Layout, configs_dir: str, source: str) -> tuple[list[Entry], object]:
    """The table for this file and config folder, checked: every tensor the models need is there with its shape,
    and every other tensor is a known extra (SingleFileError naming them otherwise)."""
    import jax.numpy as jnp

    from t2i_flax import family as families

    family = families.detect(configs_dir)
    wants_xl = layout.kind == "sdxl"
    if family.size_conditioning != wants_xl:
        raise SingleFileError(f"{source} is an {KIND_NAMES[layout.kind]} checkpoint but the configs in {configs_dir} "
                              f"are {family.name}'s: pass a matching --single_file_config")
    modules = family.modules(configs_dir, jnp.float32)
    keys = _component_keys(modules)
    configs = _read_configs(configs_dir, keys)
    for component, prefix, style in layout.text_encoders:
        act = configs[component].get("hidden_act")
        if style == "open_clip" and act != "gelu":
            raise SingleFileError(f"{source} has an OpenCLIP text encoder ({prefix}*) but {configs_dir}/{component} "
                                  f"is configured with hidden_act {act!r} (OpenCLIP's is gelu): pass a matching "
                                  f"--single_file_config")
    table = entries(layout, keys, configs)
    shapes = {component: component_keys for component, component_keys in keys.items()}
    missing, wrong = [], []
    for entry in table:
        if entry.original not in header:
            missing.append(entry.original)
            continue
        expected = entry.original_shape(shapes[entry.component])
        found = header[entry.original][1]
        if found != expected and not (entry.layout == "conv1x1" and found == expected[:2]):
            wrong.append(f"{entry.original} {found} (expected {expected})")
    used = {entry.original for entry in table}
    unknown = [name for name in header if name not in used and not _ignored(name, header[name], layout, configs)]
    problems = [f"{what}: {name_examples(names, 4)}" for what, names in
                (("missing tensors", missing), ("wrongly shaped tensors", wrong), ("unknown tensors", unknown))
                if names]
    if problems:
        hint = " (does --single_file_config match this file?)" if missing or wrong else ""
        raise SingleFileError(f"{source} does not match the {KIND_NAMES[layout.kind]} models of {configs_dir}{hint}: "
                              + "; ".join(problems))
    return table, family


def _ignored(name: str, entry: tuple, layout: Layout, configs: dict) -> bool:
    """A tensor of the file that is no weight of the pipeline: a known extra, SD 2.x's last OpenCLIP block
    (its text encoder stops one block early: the penultimate layer), or something that does not look like a
    model weight (not under a component's prefix, not a float .weight/.bias)."""
    if KNOWN_EXTRAS.search(name):
        return True
    if layout.kind == "sd2" and name.startswith(SD2_TEXT_PREFIX + "transformer.resblocks."):
        block = int(name[len(SD2_TEXT_PREFIX + "transformer.resblocks."):].split(".")[0])
        return block >= configs["text_encoder"]["num_hidden_layers"]
    looks_like_weights = name.startswith(COMPONENT_PREFIXES) or name.endswith((".weight", ".bias"))
    return not looks_like_weights


def convert(path: str, header: dict, layout: Layout, configs_dir: str, folder: str, source: str) -> None:
    """Writes the diffusers folder of the single file at `path` into `folder` (tensors in the file's dtype)."""
    from t2i_flax import hub, weights

    table, family = plan(header, layout, configs_dir, source)
    tensors = weights.read_safetensors(path)
    components: dict[str, dict] = {}
    for entry in table:
        components.setdefault(entry.component, {}).update(entry.from_original(tensors.pop(entry.original)))
    del tensors
    os.makedirs(folder, exist_ok=True)
    for name in ("model_index.json", "README.md"):
        if os.path.isfile(os.path.join(configs_dir, name)):
            shutil.copy(os.path.join(configs_dir, name), folder)
    for name in family.tokenizer_folders + ("scheduler",):
        shutil.copytree(os.path.join(configs_dir, name), os.path.join(folder, name),
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.msgpack"))
    for name, state in components.items():
        os.makedirs(os.path.join(folder, name))
        shutil.copy(os.path.join(configs_dir, name, "config.json"), os.path.join(folder, name))
        weights_name = "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        write_safetensors(os.path.join(folder, name, weights_name), state)
    with open(os.path.join(folder, "single_file.json"), "w") as handle:  # written last: the folder is complete
        json.dump({"single_file": source, "path": os.path.realpath(path), "kind": layout.kind,
                   "config": os.path.realpath(configs_dir), "hub_commit": hub.snapshot_commit(path)}, handle, indent=2)


# ---- out: a diffusers folder -> a single file ------------------------------------------------------------------

SAFETENSORS_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64",
                     "int32": "I32", "uint8": "U8", "int8": "I8", "bool": "BOOL", "int16": "I16"}


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of numpy arrays (bfloat16 through ml_dtypes, which safetensors.numpy cannot write),
    written tensor by tensor."""
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        array = tensors[name]
        header[name] = {"dtype": SAFETENSORS_NAMES[np.dtype(array.dtype).name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name in names:
            handle.write(np.ascontiguousarray(tensors[name]).tobytes())


def _dtype(name: str):
    if name not in EXPORT_DTYPES:
        raise FlagError(f"--export_dtype {name!r} is not one of: {', '.join(EXPORT_DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def single_file_path(output_dir: str) -> str:
    """<output_dir>/<name of output_dir>.safetensors"""
    name = os.path.basename(os.path.normpath(os.path.abspath(output_dir))) or "model"
    return os.path.join(output_dir, name + SUFFIX)


def write_single_file(pipeline_dir: str, path: str, dtype: str = "float16") -> dict:
    """Writes the diffusers pipeline folder `pipeline_dir` as one safetensors file in the original layout, its
    tensors in `dtype`; returns {"path", "kind", "tensors", "bytes"}."""
    import jax.numpy as jnp

    from t2i_flax import family as families
    from t2i_flax import weights
    from t2i_flax.family import text_encoder_class
    from t2i_flax.models import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    target = _dtype(dtype)
    family = families.detect(pipeline_dir)
    modules = family.modules(pipeline_dir, jnp.float32)
    keys = _component_keys(modules)
    configs = _read_configs(pipeline_dir, keys)
    layout = export_layout(family, configs["text_encoder"])
    table = entries(layout, keys, configs)
    classes = {"unet": FlaxUNet2DConditionModel, "vae": FlaxAutoencoderKL}
    out = {}
    for component in keys:  # one component's float32 parameters in memory at a time
        cls = classes.get(component) or text_encoder_class(component)
        _, params = cls.from_pretrained(pipeline_dir, subfolder=component)
        state = {weights.flax_path_to_torch_key(p): weights.flax_to_torch_layout(np.asarray(v), p[-1]).astype(target)
                 for p, v in weights.flatten(params).items()}
        del params
        for entry in table:
            if entry.component == component:
                out[entry.original] = entry.to_original(state)
        del state
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, out, {"format": "pt", "t2i_flax.kind": layout.kind})
    return {"path": path, "kind": layout.kind, "tensors": len(out), "bytes": os.path.getsize(path)}
