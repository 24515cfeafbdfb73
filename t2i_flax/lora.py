"""LoRA adapters for the UNet (and, with --train_text_encoder, the CLIP text encoders), the math: targets, init,
apply inside the forward, merge. The files (PEFT, diffusers, kohya) are t2i_flax/lora_files.py and t2i_flax/kohya.py.

    modules = lora.adapted_modules(unet.abstract_params(), lora.DEFAULT_TARGET_MODULES)  # our paths -> (in, out)
    lora_params = lora.init_lora_params(key, unet.abstract_params(), rank=4)   # the trainable tree
    scale = lora.lora_scale(rank=4, alpha=None)                                 # alpha / rank
    noise_pred = lora.apply_unet(unet, base_params, lora_params, scale, noisy_latents, timesteps, context).sample
    hidden = lora.apply_module(text_encoder, te_base, te_lora, scale, input_ids).last_hidden_state  # any module
    merged = lora.merge_lora(base_params_float32, lora_params, scale)           # --lora_merge
    dora_params = lora.with_dora_magnitudes(lora_params, base_params, scale)    # --use_dora: m = ||W + s B A||

The trainable tree mirrors the UNet's module paths, one node per adapted nn.Dense, in our layout (kernels
are (in, out), so the adapters are the transposes of PEFT's):

    {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"query": {
        "lora_A": (in, r) float32,    # PEFT's lora_A.weight (r, in), "down"; Gaussian, std 1 / r
        "lora_B": (r, out) float32,   # PEFT's lora_B.weight (out, r), "up"; zero, so step 0 is the base model
    }}}}}, ...}

DoRA (`--use_dora`, PEFT's use_dora) adds one leaf per node, "lora_magnitude": (out,) float32, the magnitude m
of each output feature; the layer computes b + (m / ||W + s B A||) * (x W + s x A B), the norm per output feature
over the inputs (PEFT's for nn.Linear) and without gradient (the DoRA paper, section 4.3). m starts at ||W||
(`with_dora_magnitudes`), so the gain starts at 1 (to the rounding of the norm, which init and forward compute in
different XLA programs). The norm needs W + s A B per adapted layer in every step: DoRA costs a full float32
kernel per adapted layer where LoRA costs none.

Leaves are named lora_A/lora_B/lora_magnitude, never `kernel`, so sharding.PARTITION_RULES leaves them replicated
(they are small); optimizer state, EMA and checkpoints built on this tree cover the adapters only.

How the adapters are applied, and why. `apply_module` runs the unmodified UNet (or text encoder) under
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
`apply_module` with respect to `lora_params` flow through the adapter branch only; the base parameters are an
ordinary (non-differentiated) argument.

Scale: PEFT's `lora_alpha / r` (`--lora_alpha` defaults to the rank: scale 1)."""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from t2i_flax import weights
from t2i_flax.errors import FlagError, name_examples

# train_text_to_image_lora.py's targets (PyTorch module names, PEFT's matching rule: the name or a suffix
# after a dot).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# The text encoders' targets with --train_text_encoder: PEFT's default for CLIP, what diffusers' LoRA scripts give
# the text encoder's LoraConfig.
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
A, B = "lora_A", "lora_B"
M = "lora_magnitude"  # DoRA: the magnitude per output feature, (out,) float32

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


def kernel_shapes(abstract_params: Mapping) -> dict[Path, tuple[int, ...]]:
    """Module path -> kernel shape, for every module with a kernel (Dense: 2-d, Conv: 4-d)."""
    return {path[:-1]: tuple(np.shape(leaf)) for path, leaf in weights.flatten(abstract_params).items()
            if path[-1] == "kernel"}


def adapted_modules(unet_abstract_params: Mapping, target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
                    model: str = "UNet") -> dict[Path, tuple[int, int]]:
    """The nn.Dense modules the targets name: our path -> (in_features, out_features), sorted by path.
    `target_modules`: PyTorch module names or their last parts ("to_q", "to_out.0", "ff.net.2", a full name),
    a list or the flag's comma-separated string.

    `unet_abstract_params`: the UNet's tree of ShapeDtypeStructs (`unet.abstract_params()`) or arrays (or another
    model's: `model` names it in the errors). FlagError (one line) for a target that names no linear layer, or that
    names convolutions."""
    kernels = kernel_shapes(unet_abstract_params)
    names = {torch_module_name(path): path for path in kernels}
    found: dict[Path, tuple[int, int]] = {}
    for target in parse_target_modules(target_modules):
        matched = [name for name in names if _matches(name, target)]
        convolutions = [name for name in matched if len(kernels[names[name]]) != 2]
        if convolutions:
            raise FlagError(f"--lora_target_modules: {target!r} names convolutions ({name_examples(convolutions)}); "
                            f"LoRA here adapts linear layers only")
        if not matched:
            linear = sorted({_short(name) for name, path in names.items() if len(kernels[path]) == 2})
            raise FlagError(f"--lora_target_modules: {target!r} matches no linear layer of the {model} (PyTorch "
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
                     target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, model: str = "UNet") -> dict:
    """The trainable tree (layout in the module docstring): A ~ N(0, (1/rank)^2) as PEFT's
    init_lora_weights="gaussian", B = 0, float32. Module i (in path order) draws from split(rng)[i].
    Jit-able with everything but `rng` static (e.g. jax.jit(functools.partial(...), out_shardings=...))."""
    rank = check_rank(rank)
    modules = adapted_modules(unet_abstract_params, target_modules, model)
    keys = jax.random.split(rng, len(modules))
    flat = {}
    for key, (path, (features_in, features_out)) in zip(keys, modules.items()):
        flat[path + (A,)] = jax.random.normal(key, (features_in, rank), jnp.float32) / rank
        flat[path + (B,)] = jnp.zeros((rank, features_out), jnp.float32)
    return weights.unflatten(flat)


def _nodes(lora_params: Mapping) -> dict[Path, dict[str, Any]]:
    nodes: dict[Path, dict[str, Any]] = collections.defaultdict(dict)
    for path, leaf in weights.flatten(lora_params).items():
        if path[-1] not in (A, B, M):
            raise ValueError(f"LoRA params have a leaf {'/'.join(path)}: expected only {A}, {B} (and {M}) leaves")
        nodes[path[:-1]][path[-1]] = leaf
    incomplete = [path for path, node in nodes.items() if not {A, B} <= set(node)]
    if incomplete:
        raise ValueError(f"LoRA params lack {A} or {B} at {'/'.join(incomplete[0])}")
    return dict(sorted(nodes.items()))


def adapters(lora_params: Mapping) -> dict[Path, tuple[Any, Any]]:
    """Our module path -> (A (in, r), B (r, out)) for every node of a trainable tree."""
    return {path: (node[A], node[B]) for path, node in _nodes(lora_params).items()}


def magnitudes(lora_params: Mapping) -> dict[Path, Any]:
    """Our module path -> DoRA's magnitude (out,) for the nodes that have one (none: plain LoRA)."""
    return {path: node[M] for path, node in _nodes(lora_params).items() if M in node}


def is_dora(lora_params: Mapping) -> bool:
    return bool(magnitudes(lora_params))


def column_norms(kernel, lora_A, lora_B, scale):
    """||W + scale * B A|| per output feature, float32: PEFT's weight norm for nn.Linear (its weight (out, in),
    the norm over the input dimension of each row), here over axis 0 of our (in, out) kernel."""
    product = jnp.matmul(jnp.asarray(lora_A, jnp.float32), jnp.asarray(lora_B, jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    weight = jnp.asarray(kernel, jnp.float32) + jnp.asarray(scale, jnp.float32) * product
    return jnp.sqrt(jnp.sum(weight * weight, axis=0))


def with_dora_magnitudes(lora_params: Mapping, base_params: Mapping, scale) -> dict:
    """DoRA's init: every adapter gets the magnitude ||W + scale B A|| per output feature (||W|| where B is zero,
    so the adapted layer computes its base, to the rounding of the norm), as PEFT initialises
    lora_magnitude_vector."""
    kernels = weights.flatten(base_params)
    flat = dict(weights.flatten(lora_params))
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        flat[path + (M,)] = column_norms(kernels[path + ("kernel",)], lora_A, lora_B, scale)
    return weights.unflatten(flat)


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


def dora_output(base_output, kernel, bias, lora_A, lora_B, magnitude, delta, scale):
    """DoRA beside the frozen layer, as PEFT computes it for nn.Linear: with n = ||W + scale B A|| per output
    feature (no gradient flows through n, the DoRA paper's section 4.3) and g = m / n, the layer gives
    b + g * (x W + scale x A B) = base(x) + (g - 1) (base(x) - b) + g * delta, where delta = scale x A B.
    g is exactly 1 where m = n as computed here; at the init (m = ||W||, B = 0) to the rounding of the norm."""
    gain = magnitude.astype(jnp.float32) / jax.lax.stop_gradient(column_norms(kernel, lora_A, lora_B, scale))
    gain = gain.astype(base_output.dtype)
    without_bias = base_output if bias is None else base_output - jnp.asarray(bias, base_output.dtype)
    return base_output + (gain - 1) * without_bias + gain * delta


def apply_module(module: nn.Module, base_params: Mapping, lora_params: Mapping, scale, *args, **kwargs):
    """`module.apply({"params": base_params}, *args, **kwargs)` with every adapter of `lora_params` added
    beside its nn.Dense (any flax module: the UNet, a CLIP text encoder). `scale`: a Python float or a traced
    scalar. Use it inside the train step (differentiate with respect to `lora_params`) and, through
    `sampler_unet_fn`, in the sampler. ValueError when an adapter's module is never called (a tree that
    does not belong to this model)."""
    by_path, dora = adapters(lora_params), magnitudes(lora_params)
    base_flat = weights.flatten(base_params) if dora else {}
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
        output, delta = next_fun(*call_args, **call_kwargs), lora_delta(module, inputs, *adapter, scale)
        if module.path not in dora:
            return output + delta
        return dora_output(output, base_flat[module.path + ("kernel",)],
                           base_flat.get(module.path + ("bias",)), *adapter, dora[module.path], delta, scale)

    with nn.intercept_methods(intercept):
        output = module.apply({"params": base_params}, *args, **kwargs)
    unused = [path for path in by_path if path not in used]
    if unused:
        raise ValueError(f"LoRA adapters for modules the model never called: {name_examples(map('/'.join, unused))}")
    return output


apply_unet = apply_module  # the UNet with its adapters


def sampler_unet_params(base_params: Mapping, lora_params: Mapping, scale: float) -> dict:
    """params["unet"] (or a text encoder's) for a diffusion.sample.Sampler built with `sampler_unet_fn` (or
    `apply_adapted` as its text_encoder_fn): the base, the adapters and the scale (a float32 scalar argument: another
    scale needs no recompile)."""
    return {"base": base_params, "lora": lora_params, "scale": np.float32(scale)}


def apply_adapted(module: nn.Module, adapted: Mapping, *args, **kwargs):
    """`apply_module` of a `sampler_unet_params(...)` tree: the Sampler's text_encoder_fn hook with adapters."""
    return apply_module(module, adapted["base"], adapted["lora"], adapted["scale"], *args, **kwargs)


def sampler_unet_fn(unet: nn.Module) -> Callable:
    """The Sampler's `unet_fn` hook: (sampler_unet_params(...), latents, timestep, context, **added) -> noise_pred."""
    def unet_fn(unet_params, latents_NCHW, timestep, text_embeddings_NLD, **added):
        return apply_adapted(unet, unet_params, latents_NCHW, timestep, text_embeddings_NLD, **added).sample
    return unet_fn


def merge_lora(base_params: Mapping, lora_params: Mapping, scale: float) -> dict:
    """The base tree with every adapted kernel replaced by W + scale * A @ B, in float32 (`--lora_merge`); with
    DoRA by the DoRA weight, (m / ||W + scale A B||) * (W + scale A B) per output feature. Other leaves are the
    base's own arrays. Works on host arrays and on (sharded) jax arrays."""
    flat = dict(weights.flatten(base_params))
    dora = magnitudes(lora_params)
    for path, (lora_A, lora_B) in adapters(lora_params).items():
        kernel_path = path + ("kernel",)
        if kernel_path not in flat:
            raise ValueError(f"LoRA adapter for {'/'.join(path)}, which has no kernel in the base params")
        product = jnp.matmul(jnp.asarray(lora_A, jnp.float32), jnp.asarray(lora_B, jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        merged = jnp.asarray(flat[kernel_path], jnp.float32) + jnp.float32(scale) * product
        if path in dora:
            merged = merged * (jnp.asarray(dora[path], jnp.float32) / jnp.sqrt(jnp.sum(merged * merged, axis=0)))
        flat[kernel_path] = merged
    return weights.unflatten(flat)
