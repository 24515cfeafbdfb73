"""Diffusers/transformers weight files <-> our Flax parameter trees.

Our trees use the names of the removed diffusers/transformers Flax classes (so legacy
`*flax_model.msgpack` files load as they are); the files on disk use PyTorch names and layouts:

  PyTorch key                                            Flax path
  down_blocks.0.attentions.1.transformer_blocks.0.        down_blocks_0/attentions_1/transformer_blocks_0/
      attn1.to_q.weight            (out, in)                  attn1/query/kernel          (in, out)
  conv_in.weight                   (out, in, kh, kw)      conv_in/kernel                  (kh, kw, in, out)
  mid_block.resnets.0.norm1.weight                        mid_block/resnets_0/norm1/scale
  text_model.encoder.layers.3.mlp.fc1.weight              text_model/encoder/layers/3/mlp/fc1/kernel
  text_model.embeddings.token_embedding.weight            text_model/embeddings/token_embedding/embedding
  text_projection.weight           (out, in)              text_projection/kernel          (in, out)

Conversion is driven by the target tree (from `jax.eval_shape`), so every file tensor must find
exactly one parameter of the right shape and every parameter must be found.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from t2i_flax.errors import ModelError

# PyTorch container modules whose numbered children become `name_N` in Flax.
NUMBERED_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
                       "downsamplers", "upsamplers", "net")
# transformers' CLIP keeps the number as its own path segment: `layers/0`.
SEPARATE_NUMBER_CONTAINERS = ("layers",)
TORCH_TO_FLAX_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value"}
FLAX_TO_TORCH_ATTENTION = {v: k for k, v in TORCH_TO_FLAX_ATTENTION.items()}
# diffusers 0.13-0.39 saved UNet attention as to_q/to_k/to_v/to_out_0; earlier releases (the Hub's
# `flax` branches) and every VAE used query/key/value/proj_attn, which is our naming.
LEGACY_FLAX_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# Buffers some checkpoints carry that are not parameters.
IGNORED_TORCH_KEYS = re.compile(r"(^|\.)position_ids$")
_NUMBERED = re.compile(r"^(%s)_(\d+)$" % "|".join(NUMBERED_CONTAINERS))


class WeightsError(ModelError):
    """A weight file does not match the model: names the offending tensors."""


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """`a.b.0.c.weight` -> (("a", "b_0", "c"), "weight"): the Flax module path and the torch leaf name."""
    parts = key.split(".")
    leaf, parts = parts[-1], parts[:-1]
    path: list[str] = []
    for part in parts:
        if part.isdigit() and path:
            previous = path[-1]
            if previous == "to_out" and part == "0":
                path[-1] = "proj_attn"
            elif previous in SEPARATE_NUMBER_CONTAINERS:
                path.append(part)
            else:
                path[-1] = f"{previous}_{part}"
        else:
            path.append(TORCH_TO_FLAX_ATTENTION.get(part, part))
    return tuple(path), leaf


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of the naming rule: (..., "attn1", "query", "kernel") -> "...attn1.to_q.weight"."""
    *modules, leaf = path
    parts: list[str] = []
    for name in modules:
        numbered = _NUMBERED.match(name)
        if numbered:
            parts += [numbered.group(1), numbered.group(2)]
        elif name == "proj_attn":
            parts += ["to_out", "0"]
        else:
            parts.append(FLAX_TO_TORCH_ATTENTION.get(name, name))
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def torch_to_flax_layout(array: np.ndarray, flax_leaf: str, target_ndim: int) -> np.ndarray:
    """PyTorch tensor layout -> Flax layout for a leaf called `flax_leaf`."""
    if flax_leaf != "kernel":
        return array
    if array.ndim == 4 and target_ndim == 2:  # 1x1 conv stored where we use a Dense (old VAE attention)
        array = array[:, :, 0, 0]
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    if array.ndim == 2:
        return np.transpose(array)  # (out, in) -> (in, out)
    return array


def flax_to_torch_layout(array: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    if flax_leaf == "kernel" and array.ndim == 2:
        return np.ascontiguousarray(np.transpose(array))
    return np.ascontiguousarray(array)


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _describe(names, limit=8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _add_missing_top_prefix(state_dict: Mapping[str, np.ndarray], targets: Mapping) -> Mapping[str, np.ndarray]:
    """transformers 5 saves CLIPTextModel keys without the `text_model.` prefix that 4.x wrote (and that our
    tree has, as the legacy Flax class had): when the tree has one top module and no key starts with it, add it."""
    tops = {path[0] for path in targets}
    if len(tops) != 1:
        return state_dict
    prefix = next(iter(tops)) + "."
    if any(key.startswith(prefix) for key in state_dict):
        return state_dict
    return {prefix + key: value for key, value in state_dict.items()}


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Mapping,
                         dtype=np.float32, source: str = "weights") -> dict:
    """PyTorch-named tensors -> our parameter tree, checked against `abstract_params` (shapes)."""
    targets = flatten(abstract_params)
    leaves_by_module: dict[tuple[str, ...], set[str]] = {}
    for path in targets:
        leaves_by_module.setdefault(path[:-1], set()).add(path[-1])

    state_dict = _add_missing_top_prefix(state_dict, targets)
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, wrong_shape = [], []
    for key, tensor in state_dict.items():
        if IGNORED_TORCH_KEYS.search(key):
            continue
        module, torch_leaf = torch_key_to_module_path(key)
        candidates = leaves_by_module.get(module, set())
        if torch_leaf == "bias":
            leaf = "bias" if "bias" in candidates else None
        else:
            leaf = next((name for name in ("kernel", "scale", "embedding") if name in candidates), None)
        if leaf is None:
            unexpected.append(key)
            continue
        path = module + (leaf,)
        target_shape = tuple(targets[path].shape)
        value = torch_to_flax_layout(np.asarray(tensor), leaf, len(target_shape))
        if tuple(value.shape) != target_shape:
            wrong_shape.append(f"{key} {tuple(np.shape(tensor))} (expected {target_shape} as {'/'.join(path)})")
            continue
        found[path] = value.astype(dtype, copy=False)
    missing = [flax_path_to_torch_key(path) for path in targets if path not in found]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong_shape:
        problems.append(f"wrongly shaped tensors: {_describe(wrong_shape)}")
    if problems:
        raise WeightsError(f"{source} do not match the model config: " + "; ".join(problems))
    return unflatten(found)


def params_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our parameter tree -> PyTorch-named, PyTorch-layout numpy tensors."""
    return {flax_path_to_torch_key(path): flax_to_torch_layout(np.asarray(value), path[-1])
            for path, value in flatten(params).items()}


def legacy_tree_to_params(tree: Mapping, abstract_params: Mapping, dtype=np.float32,
                          source: str = "msgpack") -> dict:
    """A legacy Flax msgpack tree (already in our naming and layout) -> checked parameter tree."""
    if set(tree) == {"params"}:
        tree = tree["params"]
    targets = flatten(abstract_params)
    given = {tuple(LEGACY_FLAX_ALIASES.get(name, name) for name in path): value
             for path, value in flatten(tree).items()}
    missing = ["/".join(p) for p in targets if p not in given]
    unexpected = ["/".join(p) for p in given if p not in targets]
    wrong_shape = [f"{'/'.join(p)} {tuple(np.shape(v))} (expected {tuple(targets[p].shape)})"
                   for p, v in given.items() if p in targets and tuple(np.shape(v)) != tuple(targets[p].shape)]
    problems = [f"{what}: {_describe(names)}" for what, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("wrongly shaped tensors", wrong_shape)) if names]
    if problems:
        raise WeightsError(f"{source} does not match the model config: " + "; ".join(problems))
    return unflatten({p: np.asarray(v).astype(dtype, copy=False) for p, v in given.items()})


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def variant_name(filename: str, variant: str | None) -> str:
    """`diffusion_pytorch_model.safetensors` + fp16 -> `diffusion_pytorch_model.fp16.safetensors`."""
    if not variant:
        return filename
    stem, ext = os.path.splitext(filename)  # an index gets it too: x.safetensors.index.fp16.json
    return f"{stem}.{variant}{ext}"


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors_header(handle, path: str, error=None) -> tuple[dict, int]:
    """(the parsed JSON header, the offset of the tensor data) of a safetensors file open at its start; `error`
    (default WeightsError) for a file whose header length does not fit it or whose header does not parse."""
    error = error or WeightsError
    head = handle.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    file_size = os.fstat(handle.fileno()).st_size
    if header_size < 2 or 8 + header_size > file_size:  # a cut download, or another kind of file
        raise error(f"{path} is truncated or not a safetensors file: its header length {header_size} "
                    f"does not fit the file's {file_size} bytes")
    try:
        return json.loads(handle.read(header_size)), 8 + header_size
    except ValueError:
        raise error(f"{path} is not a safetensors file (its header does not parse)") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads each tensor straight into its own numpy array (one copy in memory, no mmap of the file,
    bfloat16 through ml_dtypes): peak host memory stays about the size of the file."""
    import ml_dtypes

    tensors = {}
    with open(path, "rb") as handle:
        header, data_start = read_safetensors_header(handle, path)
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise WeightsError(f"{path}: tensor {key} has dtype {entry['dtype']}, which t2i_flax cannot read")
            name = SAFETENSORS_DTYPES[entry["dtype"]]
            dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
            begin, end = entry["data_offsets"]
            handle.seek(data_start + begin)
            count = (end - begin) // dtype.itemsize
            array = np.fromfile(handle, dtype=dtype, count=count)
            if array.size != count:
                raise WeightsError(f"{path} is truncated: tensor {key} needs {end - begin} bytes from offset "
                                   f"{data_start + begin}, the file ends before")
            tensors[key] = array.reshape(entry["shape"])
    return tensors


def find_weight_files(folder: str, weights_name: str, legacy_weights_name: str | None,
                      variant: str | None) -> tuple[str, list[str]]:
    """Returns ("safetensors" | "msgpack", [files]) or raises a WeightsError saying what is there."""
    single = os.path.join(folder, variant_name(weights_name, variant))
    if os.path.isfile(single):
        return "safetensors", [single]
    index = os.path.join(folder, variant_name(weights_name + ".index.json", variant))
    if os.path.isfile(index):
        try:
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (ValueError, KeyError):
            raise WeightsError(f"{index} is not a safetensors index (JSON with a weight_map)") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if absent:
            raise WeightsError(f"{index} lists shards that are not there: {_describe(absent)}")
        return "safetensors", [os.path.join(folder, s) for s in shards]
    if legacy_weights_name:
        legacy = os.path.join(folder, variant_name(legacy_weights_name, variant))
        if os.path.isfile(legacy):
            return "msgpack", [legacy]
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    pickles = [f for f in present if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    wanted = variant_name(weights_name, variant)
    if pickles:
        raise WeightsError(
            f"{folder} has only PyTorch pickle weights ({_describe(pickles)}); t2i_flax never unpickles "
            f"them: convert them to safetensors (e.g. load with diffusers/transformers and "
            f"save_pretrained(..., safe_serialization=True)) to get {wanted}")
    stem = weights_name.split(".")[0]
    variants = sorted({m.group(1) for f in present for m in [re.match(re.escape(stem) + r"\.(\w+?)(-\d+-of-\d+)?"
                                                                      r"\.safetensors$", f)] if m})
    if not variant and variants:
        raise WeightsError(f"{folder} has no {wanted} but has variant weights: pass --variant {variants[0]}")
    if variant and any(f.endswith((".safetensors", ".msgpack")) for f in present):
        raise WeightsError(f"{folder} has no {wanted} for --variant {variant}; files there: {_describe(present)}")
    raise WeightsError(f"no weights in {folder}: expected {wanted}"
                       + (f" or {legacy_weights_name}" if legacy_weights_name else "")
                       + (f"; files there: {_describe(present)}" if present else " (folder is empty or missing)"))


def load_params(folder: str, weights_name: str, legacy_weights_name: str | None, abstract_params: Mapping,
                variant: str | None = None, dtype=np.float32) -> dict:
    kind, files = find_weight_files(folder, weights_name, legacy_weights_name, variant)
    try:
        return _load_files(kind, files, folder, abstract_params, dtype)
    except OSError as error:  # unreadable (permissions, I/O) or truncated files are the user's to fix
        raise WeightsError(f"cannot read the weights in {folder}: {error.strerror or error}") from None


def _load_files(kind, files, folder, abstract_params, dtype) -> dict:
    if kind == "msgpack":
        from flax import serialization

        with open(files[0], "rb") as handle:
            try:
                tree = serialization.msgpack_restore(handle.read())
            except ValueError as error:  # msgpack's unpack errors (truncated or not msgpack)
                raise WeightsError(f"{files[0]} is not a readable msgpack file: {error}") from None
        return legacy_tree_to_params(tree, abstract_params, dtype, source=files[0])
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(read_safetensors(file))
    source = files[0] if len(files) == 1 else f"{len(files)} shards in {folder}"
    return state_dict_to_params(state_dict, abstract_params, dtype, source=source)


def save_params(folder: str, weights_name: str, params: Mapping) -> str:
    """Writes `params` as one safetensors file with PyTorch names and layouts."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, weights_name)
    save_file(params_to_state_dict(params), path, metadata={"format": "pt"})
    return path
