"""Compiling the trainer's programs for the topology and measuring them: per-device memory from the compiler
(memory_analysis), arguments in the compiled layouts (TPU tile padding), and from the shapes."""
from __future__ import annotations

import re
import time

import numpy as np


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = tuple(leaf.shape)
        if getattr(leaf, "sharding", None) is not None:
            shape = leaf.sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def param_count(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in jax.tree_util.tree_leaves(tree))



def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    names = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
             "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
             "code_bytes": "generated_code_size_in_bytes"}
    memory = {key: int(getattr(analysis, name, 0) or 0) for key, name in names.items()}
    memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                             + memory["temp_bytes"])
    return memory


def _exhausted_lines(error: BaseException) -> list[str]:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0] if lines else repr(error))
    more = [line for line in lines if line != first and re.search(r"exceed|Used [\d.]+[GMK]? of", line)][:2]
    return [first[:500]] + [line[:500] for line in more]


def compile_measured(lowered, cache=None) -> dict:
    """{"fits", "compile_s", "memory" | "error", "flops_per_device", "input_layouts", "from_cache"} of a lowered
    program, compiled for its devices (RESOURCE_EXHAUSTED at compile time is "does not fit"), or what `cache`
    (cache.MeasureCache) kept of the same program compiled before."""
    key = cache.key(lowered.as_text()) if cache is not None else None
    kept = cache.get(key) if cache is not None else None
    if kept is not None:
        return dict(kept, from_cache=True)
    result = _compile(lowered)
    if cache is not None:
        cache.put(key, result)
    return dict(result, from_cache=False)


def _compile(lowered) -> dict:
    import jax

    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"fits": False, "compile_s": round(time.perf_counter() - start, 1), "memory": None,
                "error": _exhausted_lines(error), "flops_per_device": None, "input_layouts": None}
    result = {"fits": True, "compile_s": round(time.perf_counter() - start, 1), "memory": _memory(compiled),
              "error": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result["flops_per_device"] = float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001  (informational only)
        result["flops_per_device"] = None
    result["input_layouts"] = input_layouts(compiled)
    return result


def input_layouts(compiled) -> list | None:
    """[[major_to_minor, first tile or None] per argument leaf] of a compiled program; None where the backend
    has no input layouts."""
    import jax

    try:
        formats = jax.tree_util.tree_leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
    except Exception:  # noqa: BLE001  (a backend without input layouts)
        return None
    layouts = [getattr(each, "layout", None) for each in formats]
    if any(layout is None for layout in layouts):
        return None
    return [[list(layout.major_to_minor), list(layout.tiling[0]) if layout.tiling else None] for layout in layouts]


def padded_bytes(leaf, layout) -> int:
    """Bytes of one device's shard of `leaf` in the compiled `layout` ([major_to_minor, first tile]): the
    dimensions in major-to-minor order, the minor ones rounded up to the tile, e.g. (8, 128) for a float32 matrix
    on a TPU."""
    import numpy as np

    major_to_minor, tile = layout
    shape = tuple(leaf.sharding.shard_shape(tuple(leaf.shape)))
    dims = [shape[d] for d in major_to_minor] if shape else [1]
    tile = tuple(tile or ())
    for i in range(1, len(tile) + 1):
        if i <= len(dims):
            dims[-i] = -(-dims[-i] // tile[-i]) * tile[-i]
        else:
            dims.insert(0, tile[-i])
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def argument_breakdown(layouts: list | None, groups: dict) -> dict | None:
    """{group: per-device bytes in the compiled layouts} for the compiled program's arguments (`layouts`, from
    input_layouts), given as {group: tree} in argument order; None where the layouts are unknown or do not line
    up."""
    import jax

    leaves = [(name, leaf) for name, tree in groups.items() for leaf in jax.tree_util.tree_leaves(tree)]
    if layouts is None or len(layouts) != len(leaves):
        return None
    breakdown = dict.fromkeys(groups, 0)
    for (name, leaf), layout in zip(leaves, layouts):
        breakdown[name] += padded_bytes(leaf, layout)
    return breakdown


def train_step_report(setup, size: tuple[int, int] | None = None, cache=None) -> dict:
    """The train step of a setup.TrainSetup: memory, FLOPs, argument sizes; `size`: the images' (width, height)
    (an aspect-ratio bucket), default the square batch; `cache`: a cache.MeasureCache."""
    result = compile_measured(setup.lower(size), cache)
    state = setup.state
    batch = setup.batch if size is None else setup.batch_at(size)
    groups = {"params": state.params, "opt_state": state.opt_state, "ema": state.ema_params,
              "step_and_rng": (state.step, state.rng), "frozen": setup.frozen, "batch": batch}
    result["shapes"] = {f"{name}_bytes": per_device_bytes(tree) for name, tree in groups.items()}
    result["shapes"]["state_bytes"] = per_device_bytes(state)
    result["shapes"]["argument_bytes"] = sum(per_device_bytes(tree) for tree in groups.values())
    # TrainState's leaves come in field order (step, params, opt_state, ema_params, rng): regroup them.
    ordered = {"step_and_rng": state.step, "params": state.params, "opt_state": state.opt_state,
               "ema": state.ema_params, "rng": state.rng, "frozen": setup.frozen, "batch": batch}
    padded = argument_breakdown(result.pop("input_layouts"), ordered)
    if padded is not None:
        padded["step_and_rng"] += padded.pop("rng")
        padded = {f"{name}_bytes": value for name, value in padded.items()}
        padded["argument_bytes"] = sum(padded.values())
    result["padded"] = padded
    result["trained_params"] = param_count(state.params)
    result["optimizer"] = setup.config.optimizer.optimizer
    return result


def validation_report(setup, cache=None) -> dict:
    """The validation sampler as validation.Validation compiles it (same batch padding, scheduler, params and
    shardings), and its memory with the rest of the training state resident."""
    import jax

    from t2i_flax import family, sharding
    from t2i_flax.diffusion import sample, schedulers

    config = setup.config
    settings = config.validation
    mesh = setup.mesh
    count = len(settings.validation_prompts) * settings.num_validation_images
    batch = -(-count // mesh.size) * mesh.size
    scheduler = schedulers.make_scheduler(setup.sampling_scheduler_config, settings.validation_num_inference_steps,
                                          settings.validation_scheduler)
    model_params, hooks = setup.sampler_models(setup.state, setup.frozen)
    model_params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), model_params)
    unet_params = model_params["unet"]
    force_zeros = family.force_zeros_for_empty_prompt(setup.base.model_dir, setup.family)
    sampler = sample.Sampler(setup.unet, setup.vae, setup.text_encoder, mesh, hooks["unet_fn"],
                             setup.modules.text_encoder_2, setup.family, force_zeros, hooks["text_encoder_fn"])
    # What Validation puts on the devices of the VAE: the decoder half, in the compute dtype.
    vae_params = setup.vae.abstract_params()
    decoder = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, setup.dtype),
                                     {name: vae_params[name] for name in sample.VAE_DECODER_PARAMS})
    decoder = jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                     decoder, sharding.tree_shardings(mesh, decoder))
    abstract = sample.sampler_params(unet_params, model_params["text_encoder"], decoder,
                                     model_params.get("text_encoder_2"))
    guidance = settings.validation_guidance_scale > 1.0
    lengths = [int(each.model_max_length) for each in setup.base.tokenizers]
    result = compile_measured(sampler.lower(
        abstract, scheduler, batch, *settings.size(config.data.resolution), guidance, max_length=lengths,
        zero_negative=sampler.zero_negative(guidance, None),
        guidance_rescale=settings.validation_guidance_rescale > 0), cache)
    del result["input_layouts"]
    shared = per_device_bytes([leaf for leaf in jax.tree_util.tree_leaves(model_params)
                               if getattr(leaf, "sharding", None) is not None])
    # While sampling, the training state and frozen models stay on the devices; the sampler's own arguments
    # already count the UNet (or adapters + frozen UNet) and the text encoder among them.
    resident = per_device_bytes(setup.state) + per_device_bytes(setup.frozen) - shared
    result.update(images=count, batch=batch, scheduler=scheduler.kind, steps=settings.validation_num_inference_steps,
                  guidance=guidance, resident_bytes=resident, decoder_bytes=per_device_bytes(decoder))
    if result["memory"] is not None:
        result["with_training_bytes"] = result["memory"]["total_bytes"] + resident
    return result
