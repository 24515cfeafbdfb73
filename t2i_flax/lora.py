"""LoRA adapters for the UNet: targets, init, apply inside the forward, merge, and the diffusers/PEFT file.

    modules = lora.adapted_modules(unet.abstract_params(), lora.DEFAULT_TARGET_MODULES)  # our paths -> (in, out)
    lora_params = lora.init_lora_params(key, unet.abstract_params(), rank=4)   # the trainable tree
    scale = lora.lora_scale(rank=4, alpha=None)                                 # alpha / rank
    noise_pred = lora.apply_unet(unet, base_params, lora_params, scale, noisy_latents, timesteps, context).sample
    merged = lora.merge_lora(base_params_float32, lora_params, scale)           # --lora_merge
    lora.save_lora_weights(output_dir, lora_params, rank=4, alpha=4.0, target_modules=targets)
    lora_params, info = lora.load_lora_weights(path_or_folder, unet_abstract_params)   # ours, PEFT, diffusers

The trainable tree mirrors the UNet's module paths, one node per adapted nn.Dense, in our layout (kernels
are (in, out), so the adapters are the transposes of PEFT's):

    {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"query": {
        "lora_A": (in, r) float32,    # PEFT's lora_A.weight (r, in), "down"; Gaussian, std 1 / r
        "lora_B": (r, out) float32,   # PEFT's lora_B.weight (out, r), "up"; zero, so step 0 is the base model
    }}}}}, ...}

Leaves are named lora_A/lora_B, never `kernel`, so sharding.PARTITION_RULES leaves them replicated (they are
small); optimizer state, EMA and checkpoints built on this tree cover the adapters only.

How the adapters are applied, and why. `apply_unet` runs the unmodified UNet under
`flax.linen.intercept_methods`: the interceptor sees every module method call; for the `__call__` of an
`nn.Dense` whose path has an adapter it returns `base(x) + scale * ((x @ A) @ B)`, where base(x) is the
Dense's own call on the frozen kernel and the adapter branch is computed as the Dense computes (inputs and
the float32 A, B promoted to the module's compute dtype, the module's matmul precision). This is what PEFT
does in PyTorch (the delta beside the frozen layer, never merged), and it keeps `t2i_flax/models/` free of
LoRA code. The alternative, merging `W + scale * A @ B` inside the step, gives the same float32 numbers, but
with the frozen base in bf16 the merged kernel is rounded per element, and a delta below half a bf16 ulp of
each weight vanishes. Beside the layer the delta is rounded once, at the output, where an adapter whose
inputs lie along A (what training aligns it with) is about sqrt(in_features) times larger relative to the
base than per weight: on a 1280-wide bf16 projection with |A@B| / |W| = 6e-4, merging leaves 87% of the
kernel unchanged and loses 66% of the delta, the adapter beside it loses 16% (tests/test_lora.py). Merging
would also materialise a full kernel per adapted layer in every step.
The interceptor is plain Python at trace time, so the whole thing is jit/grad/shard friendly: gradients of
`apply_unet` with respect to `lora_params` flow through the adapter branch only; the base parameters are an
ordinary (non-differentiated) argument.

Scale: PEFT's `lora_alpha / r` (`--lora_alpha` defaults to the rank: scale 1). The file written by
`save_lora_weights` carries `lora_adapter_metadata` (r, lora_alpha, target_modules) as diffusers'
`save_lora_weights` writes it, so `load_lora_weights` in diffusers applies the same scale; B is stored as
trained (not pre-multiplied), so our files round-trip exactly."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from t2i_flax import weights
from t2i_flax.errors import FlagError, ModelError

# train_text_to_image_lora.py's targets (PyTorch module names, PEFT's matching rule: the name or a suffix
# after a dot).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_PREFIX = "unet"  # the key prefix diffusers' StableDiffusionLoraLoaderMixin filters the UNet's keys by
METADATA_KEY = "lora_adapter_metadata"  # the safetensors header entry diffusers reads the LoraConfig from
A, B = "lora_A", "lora_B"

Path = tuple[str, ...]


# ---- targets: PyTorch module names <-> our paths ---------------------------------------------------

def torch_module_name(path: Path) -> str:
    """Our module path -> the PyTorch module name: (..., "attn1", "proj_attn") -> "...attn1.to_out.0"."""
    return weights.flax_path_to_torch_key(tuple(path) + ("kernel",)).removesuffix(".weight")


def flax_module_path(name: str) -> Path:
    """The PyTorch module name -> our module path (weights.py's naming rule)."""
    return weights.torch_key_to_module_path(name + ".weight")[0]


def parse_target_modules(value: str | Sequence[str]) -> tuple[str, ...]:
    """`--lora_target_modules "to_q, to_k"` (or a list) -> ("to_q", "to_k"); FlagError when empty."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(name.strip() for name in names if name.strip())
    if not names:
        raise FlagError("--lora_target_modules is empty: name PyTorch modules, e.g. to_q,to_k,to_v,to_out.0")
    return names


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's full name or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _kernels(abstract_params: Mapping) -> dict[Path, tuple[int, ...]]:
    """Module path -> kernel shape, for every module with a kernel (Dense: 2-d, Conv: 4-d)."""
    return {path[:-1]: tuple(np.shape(leaf)) for path, leaf in weights.flatten(abstract_params).items()
            if path[-1] == "kernel"}


def adapted_modules(unet_abstract_params: Mapping, target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES
                    ) -> dict[Path, tuple[int, int]]:
    """The nn.Dense modules the targets name: our path -> (in_features, out_features), sorted by path.
    `target_modules`: PyTorch module names or their last parts ("to_q", "to_out.0", "ff.net.2", a full name),
    a list or the flag's comma-separated string.

    `unet_abstract_params`: the UNet's tree of ShapeDtypeStructs (`unet.abstract_params()`) or arrays.
    FlagError (one line) for a target that names no linear layer, or that names convolutions."""
    kernels = _kernels(unet_abstract_params)
    names = {torch_module_name(path): path for path in kernels}
    found: dict[Path, tuple[int, int]] = {}
    for target in parse_target_modules(target_modules):
        matched = [name for name in names if _matches(name, target)]
        convolutions = [name for name in matched if len(kernels[names[name]]) != 2]
        if convolutions:
            raise FlagError(f"--lora_target_modules: {target!r} names convolutions ({_examples(convolutions)}); "
                            f"LoRA here adapts linear layers only")
        if not matched:
            linear = sorted({_short(name) for name, path in names.items() if len(kernels[path]) == 2})
            raise FlagError(f"--lora_target_modules: {target!r} matches no linear layer of the UNet (PyTorch "
                            f"module names or their last parts, e.g. {', '.join(linear)})")
        for name in matched:
            found[names[name]] = kernels[names[name]]
    return dict(sorted(found.items()))


def _short(name: str) -> str:
    """The last part of a module name that a target would use: ...attn1.to_out.0 -> to_out.0, ...ff.net.2 ->
    net.2, ...to_q -> to_q."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


# ---- init and scale ---------------------------------------------------------------------------------

def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise FlagError(f"--lora_rank must be a positive integer (got {rank!r})")
    return int(rank)


def lora_scale(rank: int, alpha: float | None = None) -> float:
    """PEFT's scaling alpha / rank; `alpha` None means alpha = rank (scale 1), the PyTorch script's default."""
    rank = check_rank(rank)
    if alpha is None:
        return 1.0
    if not math.isfinite(alpha) or alpha <= 0:
        raise FlagError(f"--lora_alpha must be a positive number (got {alpha!r})")
    return float(alpha) / rank


def init_lora_params(rng, unet_abstract_params: Mapping, rank: int,
                     target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> dict:
    """The trainable tree (layout in the module docstring): A ~ N(0, (1/rank)^2) as PEFT's
    init_lora_weights="gaussian", B = 0, float32. Module i (in path order) draws from split(rng)[i].
    Jit-able with everything but `rng` static (e.g. jax.jit(functools.partial(...), out_shardings=...))."""
    rank = check_rank(rank)
    modules = adapted_modules(unet_abstract_params, target_modules)
    keys = jax.random.split(rng, len(modules))
    flat = {}
    for key, (path, (features_in, features_out)) in zip(keys, modules.items()):
        flat[path + (A,)] = jax.random.normal(key, (features_in, rank), jnp.float32) / rank
        flat[path + (B,)] = jnp.zeros((rank, features_out), jnp.float32)
    return weights.unflatten(flat)


def adapters(lora_params: Mapping) -> dict[Path, tuple[Any, Any]]:
    """Our module path -> (A (in, r), B (r, out)) for every node of a trainable tree."""
    nodes: dict[Path, dict[str, Any]] = collections.defaultdict(dict)
    for path, leaf in weights.flatten(lora_params).items():
        if path[-1] not in (A, B):
            raise ValueError(f"LoRA params have a leaf {'/'.join(path)}: expected only {A} and {B} leaves")
        nodes[path[:-1]][path[-1]] = leaf
    incomplete = [path for path, node in nodes.items() if set(node) != {A, B}]
    if incomplete:
        raise ValueError(f"LoRA params lack {A} or {B} at {'/'.join(incomplete[0])}")
    return {path: (node[A], node[B]) for path, node in sorted(nodes.items())}


def param_count(lora_params: Mapping) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in weights.flatten(lora_params).values()))


# ---- apply (inside the forward) and merge -------------------------------------------------------------

def _dense_matmul(x, kernel, precision):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def lora_delta(dense: nn.Dense, inputs, lora_A, lora_B, scale):
    """scale * ((x @ A) @ B) as `dense` computes its own matmul: inputs and float32 adapters promoted to the
    module's dtype, its precision."""
    inputs, lora_A, lora_B = promote_dtype(inputs, lora_A, lora_B, dtype=dense.dtype)
    delta = _dense_matmul(_dense_matmul(inputs, lora_A, dense.precision), lora_B, dense.precision)
    return delta * jnp.asarray(scale, delta.dtype)


def apply_unet(unet: nn.Module, base_params: Mapping, lora_params: Mapping, scale, *args, **kwargs):
    """`unet.apply({"params": base_params}, *args, **kwargs)` with every adapter of `lora_params` added
    beside its nn.Dense (any flax module works, not only the UNet). `scale`: a Python float or a traced
    scalar. Use it inside the train step (differentiate with respect to `lora_params`) and, through
    `sampler_unet_fn`, in the sampler. ValueError when an adapter's module is never called (a tree that
    does not belong to this model)."""
    by_path = adapters(lora_params)
    used: set[Path] = set()

    def intercept(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*call_args, **call_kwargs)
        adapter = by_path.get(module.path)
        if adapter is None:
            return next_fun(*call_args, **call_kwargs)
        used.add(module.path)
        inputs = call_args[0] if call_args else call_kwargs["inputs"]
        return next_fun(*call_args, **call_kwargs) + lora_delta(module, inputs, *adapter, scale)

    with nn.intercept_methods(intercept):
        output = unet.apply({"params": base_params}, *args, **kwargs)
    unused = [path for path in by_path if path not in used]
    if unused:
        raise ValueError(f"LoRA adapters for modules the model never called: {_examples(map('/'.join, unused))}")
    return output


def sampler_unet_params(base_params: Mapping, lora_params: Mapping, scale: float) -> dict:
    """params["unet"] for a diffusion.sample.Sampler built with `sampler_unet_fn`: the base, the adapters and
    the scale (a float32 scalar argument: another scale needs no recompile)."""
    return {"base": base_params, "lora": lora_params, "scale": np.float32(scale)}


def sampler_unet_fn(unet: nn.Module) -> Callable:
    """The Sampler's `unet_fn` hook: (sampler_unet_params(...), latents, timestep, context) -> noise_pred."""
    def unet_fn(unet_params, latents_NCHW, timestep, text_embeddings_NLD):
        return apply_unet(unet, unet_params["base"], unet_params["lora"], unet_params["scale"], latents_NCHW,
                          timestep, text_embeddings_NLD).sample
    return unet_fn


def merge_lora(base_params: Mapping, lora_params: Mapping, scale: float) -> dict:
    """The base tree with every adapted kernel replaced by W + scale * A @ B, in float32 (`--lora_merge`).
    Other leaves are the base's own arrays. Works on host arrays and on (sharded) jax arrays."""
    flat = dict(weights.flatten(base_params))
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        kernel_path = path + ("kernel",)
        if kernel_path not in flat:
            raise ValueError(f"LoRA adapter for {'/'.join(path)}, which has no kernel in the base params")
        product = jnp.matmul(jnp.asarray(lora_A, jnp.float32), jnp.asarray(lora_B, jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        flat[kernel_path] = jnp.asarray(flat[kernel_path], jnp.float32) + jnp.float32(scale) * product
    return weights.unflatten(flat)


# ---- the file: save ----------------------------------------------------------------------------------

def lora_state_dict(lora_params: Mapping) -> dict[str, np.ndarray]:
    """PEFT keys (`unet.<module>.lora_A.weight` (r, in), `lora_B.weight` (out, r)), float32 numpy."""
    tensors = {}
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        name = f"{UNET_PREFIX}.{torch_module_name(path)}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lora_A, np.float32).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lora_B, np.float32).T)
    return tensors


def save_lora_weights(folder: str, lora_params: Mapping, rank: int, alpha: float | None,
                      target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> str:
    """Writes `<folder>/pytorch_lora_weights.safetensors` (returns its path): PEFT keys, and the
    `lora_adapter_metadata` header entry (unet.r, unet.lora_alpha, unet.target_modules) that makes diffusers'
    `load_lora_weights` use scale alpha / rank. `alpha` None: the rank. Host (fully addressable) arrays."""
    from safetensors.numpy import save_file

    rank = check_rank(rank)
    alpha = float(rank if alpha is None else alpha)
    lora_scale(rank, alpha)  # checks alpha
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        if np.shape(lora_A)[1] != rank or np.shape(lora_B)[0] != rank:
            raise ValueError(f"LoRA adapter {'/'.join(path)} has rank {np.shape(lora_A)[1]}, not {rank}")
    config = {"r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
              "target_modules": list(parse_target_modules(target_modules)), "init_lora_weights": "gaussian"}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{UNET_PREFIX}.{key}": value for key, value in
                                                          config.items()}, indent=2, sort_keys=True)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA_WEIGHTS_NAME)
    partial = path + ".partial"
    save_file(lora_state_dict(lora_params), partial, metadata=metadata)
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


PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
ATTN_PROCS_KEY = re.compile(r"^(?P<attention>.+)\.processor\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
                            r"(?P<part>down|up)\.weight$")
ALPHA_KEY = re.compile(r"^(?P<module>.+?)(\.lora)?\.alpha$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.")
OTHER_ADAPTERS = (("lora_magnitude_vector", "DoRA magnitude vectors"), ("dora_scale", "DoRA scales"),
                  ("lora_B.bias", "LoRA biases"), ("lokr_", "LoKr factors"), ("hada_", "LoHa factors"))
STYLES = {PEFT_KEY: "peft", DIFFUSERS_KEY: "diffusers", ATTN_PROCS_KEY: "diffusers-attn-procs"}


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _examples(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
            raise ModelError(f"LoRA folder {path} has only PyTorch pickles ({_examples(pickles)}); t2i_flax never "
                             f"unpickles them: save the LoRA as {LORA_WEIGHTS_NAME}")
        found = f"several .safetensors files ({_examples(safetensors)}): pass one" if safetensors else "no LoRA file"
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


def _refuse_what_cannot_apply(path: str, keys: Sequence[str]) -> None:
    keys = sorted(keys)
    kohya = [key for key in keys if key.startswith(KOHYA_PREFIXES)]
    if kohya:
        text = sum(key.startswith(KOHYA_PREFIXES[1:]) for key in kohya)
        example = next((key for key in kohya if key.startswith(KOHYA_PREFIXES[0])), kohya[0])
        raise ModelError(f"LoRA file {path} is Kohya-style ({len(kohya) - text} lora_unet_ and {text} lora_te_ "
                         f"tensors, e.g. {example}); t2i_flax reads the PEFT/diffusers keys: load it in diffusers "
                         f"and save it again with save_lora_weights")
    text_encoder = [key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        raise ModelError(f"LoRA file {path} holds text-encoder adapters ({_count(len(text_encoder), 'tensor')}, e.g. "
                         f"{text_encoder[0]}); t2i_flax applies UNet adapters only")
    for marker, what in OTHER_ADAPTERS:
        found = [key for key in keys if marker in key]
        if found:
            raise ModelError(f"LoRA file {path} holds {what} ({_count(len(found), 'tensor')}, e.g. {found[0]}), which "
                             f"t2i_flax cannot apply (plain LoRA only)")
    prefixes = sorted({key.split(".", 1)[0] for key in keys if key.split(".", 1)[0] not in
                       (UNET_PREFIX, "down_blocks", "mid_block", "up_blocks", "time_embedding", "conv_in",
                        "conv_out")})
    if prefixes:
        raise ModelError(f"LoRA file {path} holds adapters for {', '.join(prefixes)}, not for a Stable Diffusion "
                         f"UNet")


def _parse_keys(path: str, tensors: Mapping[str, np.ndarray]):
    """-> ({pytorch module: {"down": (r, in...), "up": (out, r...)}}, {module: alpha}, key styles)."""
    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    alphas: dict[str, float] = {}
    styles, unknown = set(), []
    for key, tensor in tensors.items():
        name = key.removeprefix(UNET_PREFIX + ".")
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
        else:
            module = match.group("module")
        part = {"lora_A": "down", "lora_B": "up"}.get(match.group("part"), match.group("part"))
        pairs[module][part] = tensor
    if unknown:
        raise ModelError(f"LoRA file {path} has tensors that are not LoRA down/up matrices: {_examples(unknown)}")
    if not pairs:
        raise ModelError(f"LoRA file {path} holds no LoRA tensors")
    half = [module for module, pair in pairs.items() if set(pair) != {"down", "up"}]
    if half:
        raise ModelError(f"LoRA file {path} has a down or an up matrix without the other for {_examples(half)}")
    stray = [module for module in alphas if module not in pairs]
    if stray:
        raise ModelError(f"LoRA file {path} has alpha values for modules without LoRA matrices: {_examples(stray)}")
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
    if metadata.get("use_dora"):
        raise ModelError(f"LoRA file {path} is a DoRA adapter (use_dora in its metadata), which t2i_flax cannot apply")
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
    """A LoRA file (or its folder) -> (the trainable tree, LoraInfo); apply with scale `info.scale`.

    Reads our files and diffusers-format files others trained: PEFT keys (`unet.<module>.lora_A.weight`,
    scale from `lora_adapter_metadata`), diffusers keys (`unet.<module>.lora.down.weight`/`lora.up.weight`,
    `<module>.alpha` if present, else alpha = rank) and the older attention-processor keys
    (`<attention>.processor.to_q_lora.down.weight`). One-line ModelError naming what the file holds when it
    cannot be applied: Kohya-style keys, text-encoder adapters, convolution adapters, DoRA, modules or shapes
    this UNet lacks. Keys without the `unet.` prefix are read as the UNet's. When modules have different
    scales (per-module alphas), each is multiplied into its B and info.scale is 1."""
    file = find_lora_file(path)
    tensors, metadata = _read(file)
    _refuse_what_cannot_apply(file, list(tensors))
    if metadata is not None:
        metadata = {key.removeprefix(UNET_PREFIX + "."): value for key, value in metadata.items()
                    if key.startswith(UNET_PREFIX + ".")} or None
    pairs, alphas, styles = _parse_keys(file, tensors)

    convolutions = [module for module, pair in pairs.items() if pair["down"].ndim != 2 or pair["up"].ndim != 2]
    if convolutions:
        raise ModelError(f"LoRA file {file} holds convolution adapters ({_count(len(convolutions), 'module')}, e.g. "
                         f"{_examples(convolutions, 2)}); t2i_flax applies adapters of linear layers only")
    kernels = _kernels(unet_abstract_params)
    lacking, mismatched, flat = [], [], {}
    for module, pair in sorted(pairs.items()):
        ours = flax_module_path(module)
        shape = kernels.get(ours)
        if shape is None:
            lacking.append(module)
            continue
        down, up = pair["down"], pair["up"]
        if len(shape) != 2 or down.shape[1] != shape[0] or up.shape != (shape[1], down.shape[0]):
            kind = "a convolution" if len(shape) != 2 else f"linear {shape[0]} -> {shape[1]}"
            mismatched.append(f"{module} (down {tuple(down.shape)}, up {tuple(up.shape)}; here {kind})")
            continue
        flat[module] = (ours, np.ascontiguousarray(np.asarray(down, np.float32).T),
                        np.ascontiguousarray(np.asarray(up, np.float32).T))
    if lacking:
        raise ModelError(f"LoRA file {file} adapts {_count(len(lacking), 'module')} this UNet does not have "
                         f"({_examples(lacking, 2)}): it was trained for another model")
    if mismatched:
        raise ModelError(f"LoRA file {file} does not fit this UNet: {_examples(mismatched, 2)}")

    scales = _module_scales(file, pairs, alphas, metadata)
    folded = len(set(scales.values())) > 1
    params = {}
    for module, (ours, down, up) in flat.items():
        params[ours + (A,)] = down
        params[ours + (B,)] = up * np.float32(scales[module]) if folded else up
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
                    key_style="+".join(sorted(styles)), folded=folded, modules=len(pairs))
    return weights.unflatten(params), info
