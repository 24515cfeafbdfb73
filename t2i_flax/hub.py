"""Model references -> local folders: a local diffusers folder, or a Hub repo id downloaded with
huggingface_hub (revision, variant, cache_dir; HF_HUB_OFFLINE=1 uses the cache only), or one single-file
checkpoint (`file.safetensors` or `owner/repo/file.safetensors`), converted to a diffusers folder in the cache
(t2i_flax/single_file.py)."""
from __future__ import annotations

import os
import re

from t2i_flax.errors import ModelError, one_line

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# What training needs of a pipeline repo (not safety_checker/, feature_extractor/, ...).
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
LEGACY_WEIGHT_FILES = ("diffusion_flax_model", "flax_model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SNAPSHOT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


class ModelNotFoundError(ModelError):
    """The model reference is neither a folder nor a reachable Hub repo."""


def snapshot_commit(path: str) -> str | None:
    """The Hub commit of a path inside the Hugging Face cache (`.../snapshots/<commit>/...`); None elsewhere."""
    found = _SNAPSHOT.search(path)
    return found.group(1) if found else None


def _safetensors_patterns(prefix: str, variant: str | None) -> list[str]:
    v = f".{variant}" if variant else ""
    patterns = []
    for stem in WEIGHT_STEMS:
        patterns += [f"{prefix}{stem}{v}.safetensors", f"{prefix}{stem}{v}-*.safetensors",
                     f"{prefix}{stem}.safetensors.index{v}.json"]
    return patterns


def _legacy_patterns(prefix: str, variant: str | None) -> list[str]:
    v = f".{variant}" if variant else ""
    return [f"{prefix}{stem}{v}.msgpack" for stem in LEGACY_WEIGHT_FILES]


def _has_weights(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith((".safetensors", ".msgpack")) for f in os.listdir(folder))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_dir(name_or_path: str, subfolder: str | None = None, revision: str | None = None,
                      variant: str | None = None, cache_dir: str | None = None,
                      local_files_only: bool | None = None, single_file_config: str | None = None) -> str:
    """Returns the local folder holding the model (joined with `subfolder` when given).

    Downloads only configs, tokenizer files and safetensors weights (falling back to legacy Flax
    msgpack for components that have no safetensors); never PyTorch pickles. A single file takes its configs,
    tokenizers and scheduler from `single_file_config` (default: the official repo of its kind)."""
    from t2i_flax import single_file

    if single_file.is_single_file(name_or_path):
        folder = single_file.to_diffusers_folder(name_or_path, single_file_config, revision, cache_dir,
                                                 local_files_only)
        return os.path.join(folder, subfolder) if subfolder else folder
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
        if not os.path.isdir(folder):
            raise ModelNotFoundError(f"{name_or_path} has no '{subfolder}' folder: is it a diffusers pipeline folder?")
        return folder
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path
    if looks_local or not _REPO_ID.match(name_or_path) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name_or_path} does not exist (and it is not a Hub repo id)")
    return _download(name_or_path, subfolder, revision, variant, cache_dir,
                      _offline() if local_files_only is None else local_files_only)


def _download(repo_id, subfolder, revision, variant, cache_dir, local_files_only) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    # fnmatch's "*" also matches "/": name each component folder so nothing else is downloaded.
    prefixes = [f"{subfolder}/"] if subfolder else [""] + [f"{c}/" for c in PIPELINE_COMPONENTS]
    # README.md: the base model's card, whose license the model card of a fine-tune repeats.
    base = ["model_index.json", "README.md"] + [f"{p}{name}" for p in prefixes for name in ("*.json", "*.txt")]
    weights = [pattern for p in prefixes for pattern in _safetensors_patterns(p, variant)]
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=base + weights,
                                 local_files_only=local_files_only)
        # Components without safetensors (e.g. the old `flax` branches) fall back to msgpack.
        if subfolder:
            lacking = [subfolder] if not _has_weights(os.path.join(root, subfolder)) else []
        else:
            lacking = [d for d in PIPELINE_COMPONENTS
                       if os.path.isfile(os.path.join(root, d, "config.json")) and not _has_weights(os.path.join(root, d))]
            lacking += [""] if os.path.isfile(os.path.join(root, "config.json")) and not _has_weights(root) else []
        if lacking:
            legacy = [pattern for d in lacking for pattern in _legacy_patterns(f"{d}/" if d else "", variant)]
            root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=legacy,
                                     local_files_only=local_files_only)
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"{where} is not in the local Hugging Face cache and downloads are off "
                                 f"(HF_HUB_OFFLINE=1): download it once with network, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"Hub repo {repo_id} not found (or private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(f"could not download {where}: {str(error).splitlines()[0]}") from None
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"{where} has no '{subfolder}' folder")
    return folder


def resolve_config_dir(model_config) -> str:
    """The model folder, or for a Hub repo id a snapshot of its config and tokenizer files only (no weights): what
    compiling without weights (t2i_flax.aot) reads."""
    from t2i_flax import single_file

    name = model_config.pretrained_model_name_or_path
    if os.path.isdir(name):
        return resolve_model_dir(name)
    if single_file.is_single_file(name):  # the configs that go with it (its kind read from its header)
        return single_file.config_dir_of(name, getattr(model_config, "single_file_config", None),
                                         model_config.revision, model_config.cache_dir)
    if name.startswith((".", "/", "~")) or not _REPO_ID.match(name) or name.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name} does not exist (and it is not a Hub repo id)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"] + [f"{part}/{pattern}" for part in PIPELINE_COMPONENTS
                                       for pattern in ("*.json", "*.txt")]
    try:
        return snapshot_download(name, revision=model_config.revision, cache_dir=model_config.cache_dir,
                                 allow_patterns=patterns, local_files_only=_offline())
    except Exception as error:  # noqa: BLE001  (huggingface_hub's errors: not found, offline, network)
        raise ModelNotFoundError(f"could not get the configs of {name}: {one_line(error)[:200]}") from None
