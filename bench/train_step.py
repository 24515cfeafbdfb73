"""Speed of OUR train step (t2i_flax.step) on random weights of the real SD 1.5 shapes; one JSON line.

    python bench/train_step.py --config sd15 --res 512 --batch 8 --dtype bf16 --attention cudnn   # GPU
    python bench/train_step.py --config tiny --res 32 --batch 2 --steps 3 --cpu_devices 8         # CPU smoke
    python bench/train_step.py --config sd15 --batch 1 --dtype no --compile_only \
        --compilation_cache_dir /tmp/cc   # twice: SD 1.5 compile time, cold then warm cache (CPU)

What is timed: the whole online step as the trainer runs it (VAE encode + CLIP text encoder + UNet forward
and backward + clip + AdamW [+ EMA]), compiled ahead of time with the trainer's shardings, on one fixed
batch already on the devices (no data loading). `--steps` steps after `--warmup` untimed ones; step_s is
their mean wall time (dispatch is asynchronous: the clock stops when the last state is ready).

MFU: FLOPs of one step on one device from the compiled program's cost_analysis() (flops_source
"cost_analysis"), else anchors.md's 3.55 TF per image at 512 px scaled by (res/512)^2 (sd15 only), divided
by step_s and the device's dense bf16 peak (PEAK_FLOPS, matched on device_kind; null when unknown, e.g.
CPU). mfu_anchor always uses the anchors.md count, so it compares directly with the PyTorch anchor's.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# t2i_flax from the repo root, or from T2I_FLAX_PATH (e.g. a `git archive HEAD t2i_flax` snapshot, so that a
# long sweep is not hit by edits in the working tree).
sys.path.insert(0, os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR))
sys.path.insert(0, BENCH_DIR)                   # configs.py

# anchors.md section 4: online step (VAE encoder + CLIP + UNet fwd/bwd) per 512 px image.
ANCHOR_FLOPS_PER_IMAGE_512 = 3.55e12
# Dense bf16 peak per JAX device, matched as a substring of device.device_kind (first match wins).
# TPU v2/v3 devices are cores (2 per chip): the per-chip peak is halved.
PEAK_FLOPS = (
    ("H200", 989e12, "H200 dense bf16 (NVIDIA spec, same SXM tensor cores as H100)"),
    ("H100", 989e12, "H100 SXM dense bf16 (NVIDIA spec)"),
    ("A100", 312e12, "A100 dense bf16 (NVIDIA spec)"),
    ("TPU v3", 123e12 / 2, "TPU v3: 123 TFLOP/s bf16 per chip / 2 cores"),
    ("TPU v2", 45e12 / 2, "TPU v2: 45 TFLOP/s bf16 per chip / 2 cores"),
    ("TPU v4", 275e12, "TPU v4: 275 TFLOP/s bf16 per chip (megacore: one device per chip)"),
    ("TPU v5 lite", 197e12, "TPU v5e: 197 TFLOP/s bf16 per chip"),
    ("TPU v5e", 197e12, "TPU v5e: 197 TFLOP/s bf16 per chip"),
    ("TPU v5p", 459e12, "TPU v5p: 459 TFLOP/s bf16 per chip"),
    ("TPU v5", 459e12, "TPU v5p: 459 TFLOP/s bf16 per chip"),
    ("TPU v6", 918e12, "TPU v6e: 918 TFLOP/s bf16 per chip"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "sd15", "sdxl"), default="tiny")
    parser.add_argument("--res", type=int, default=None,
                        help="pixels (default: 512 for sd15, 1024 for sdxl, 32 for tiny)")
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    parser.add_argument("--dtype", choices=("bf16", "no"), default="bf16", help="compute dtype (params stay float32)")
    parser.add_argument("--attention", choices=("none", "xla", "cudnn"), default="xla")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--cache_latents", action="store_true",
                        help="the step of --cache_latents: posterior moments in the batch, no VAE encoder")
    parser.add_argument("--cpu_devices", type=int, default=0, help="N host devices (sets XLA_FLAGS before jax)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile_only", action="store_true",
                        help="lower and compile from ShapeDtypeStructs (nothing materialised: SD 1.5 on a 24 GiB "
                             "host), report compile_s and cost_analysis, run no step")
    parser.add_argument("--compilation_cache_dir", default="none",
                        help="JAX's persistent compilation cache folder (as the trainer's flag; default none: "
                             "every run compiles). Run twice with one folder for the cold and the warm compile_s.")
    return parser.parse_args(argv)


def build_setup(args, res: int, devices):
    """The trainer's own setup (t2i_flax/setup.py, as train.run and aot build it) for a config-only model folder of
    the named config (bench/aot_fit.py's), from the trainer's flags: the program timed is the trainer's."""
    import tempfile

    from aot_fit import write_models

    from t2i_flax import cli, setup, sharding

    folder = tempfile.mkdtemp(prefix="t2i_flax_bench_models_")
    with contextlib.redirect_stdout(io.StringIO()):
        write_models(folder)
    flags = ["--pretrained_model_name_or_path", os.path.join(folder, args.config), "--dataset_name", "<none>",
             "--resolution", str(res), "--train_batch_size", str(args.batch), "--mixed_precision", args.dtype,
             "--fsdp", str(args.fsdp), "--learning_rate", "1e-5", "--lr_warmup_steps", "0", "--max_train_steps",
             "1000", "--seed", str(args.seed)]
    flags += ["--attention", args.attention] if args.attention != "none" else []
    flags += ["--use_ema"] if args.use_ema else []
    flags += ["--cache_latents", "--center_crop"] if args.cache_latents else []
    config = cli.parse_config(flags)
    base = setup.read_base_model(os.path.join(folder, args.config))
    mesh = sharding.make_mesh(args.fsdp, devices)
    plan = setup.Plan.without_data(config, len(devices), len(devices))
    return setup.build(config, base, mesh, plan)


def random_like(abstract_tree, rng, scale=0.02):
    """Host numpy arrays normal(0, scale) of each leaf's shape, in the leaf's dtype (float32 here)."""
    import jax
    import numpy as np

    return jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * scale).astype(s.dtype), abstract_tree)


def memory_analysis_dict(compiled) -> dict | None:
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
             "host_alias_size_in_bytes", "host_temp_size_in_bytes")
    result = {name: int(getattr(analysis, name)) for name in names if hasattr(analysis, name)}
    # What the program needs live on one device: inputs + outputs (donated inputs counted once) + scratch.
    result["total_bytes"] = (result.get("argument_size_in_bytes", 0) + result.get("output_size_in_bytes", 0)
                             - result.get("alias_size_in_bytes", 0) + result.get("temp_size_in_bytes", 0))
    return result


def cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def peak_flops(device_kind: str):
    for key, value, source in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value, source
    return None, f"no peak known for device_kind {device_kind!r}"


def gib(value):
    return None if value is None else round(value / 2**30, 3)


def compile_only(args, built, res: int) -> None:
    """The step lowered from sharded ShapeDtypeStructs and compiled: compile_s, FLOPs, compiled memory."""
    import jax

    start = time.perf_counter()
    lowered = built.lower()
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analysis = memory_analysis_dict(compiled)
    print(json.dumps({
        "bench": "t2i_flax_train_step_compile", "config": args.config, "res": res, "batch_per_device": args.batch,
        "devices": built.mesh.size, "platform": jax.devices()[0].platform, "dtype": args.dtype,
        "attention": args.attention, "fsdp": args.fsdp, "use_ema": args.use_ema, "cache_latents": args.cache_latents,
        "compilation_cache_dir": args.compilation_cache_dir, "lower_s": round(lower_s, 3),
        "compile_s": round(compile_s, 3), "flops_per_step_per_device": cost_flops(compiled),
        "compiled_mem_gib": gib(analysis["total_bytes"]) if analysis else None, "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    res = args.res or {"sd15": 512, "sdxl": 1024}.get(args.config, 32)

    import jax
    import numpy as np

    from t2i_flax import compile_cache, sharding, step

    compile_cache.enable(args.compilation_cache_dir)
    devices = jax.devices()
    built = build_setup(args, res, devices)
    mesh = built.mesh
    global_size = built.plan.global_batch_size
    rng = np.random.default_rng(args.seed)

    if args.compile_only:
        return compile_only(args, built, res)

    # ---- state, frozen models, batch on the devices (random weights of the real shapes) --------------
    start = time.perf_counter()
    params = random_like(built.trained.abstract_params(built.unet), rng)
    state, _ = step.create_state(built.step_config, mesh, params, args.seed)
    del params
    frozen = random_like({name: tree for name, tree in built.frozen.items() if name != "hyperparameters"}, rng)
    frozen["hyperparameters"] = built.step_config.hyperparameters.arrays()  # the run's lr, epsilon, ... (not random)
    frozen = jax.device_put(frozen, built.frozen_sharding)
    host_batch = {name: rng.integers(0, built.text_encoder.vocab_size, built.batch[name].shape, dtype=np.int32)
                  for name in ("input_ids", "input_ids_2") if name in built.batch}
    if "time_ids" in built.batch:  # SDXL: original size, crop, target size
        host_batch["time_ids"] = np.tile(np.asarray([[res, res, 0, 0, res, res]], np.float32), (global_size, 1))
    if args.cache_latents:
        latent = built.batch["latent_mean"].shape
        host_batch.update(latent_mean=rng.normal(size=latent).astype(np.float32),
                          latent_std=rng.uniform(0.01, 0.1, latent).astype(np.float32))
    else:
        host_batch["pixel_values"] = rng.uniform(-1, 1, built.batch["pixel_values"].shape).astype(np.float32)
    batch = sharding.global_batch(mesh, host_batch)  # single process: the host batch is the global batch
    jax.block_until_ready((state, frozen, batch))
    setup_s = time.perf_counter() - start

    # ---- compile ahead (as train.compile_ahead), then run -------------------------------------------
    start = time.perf_counter()
    compiled = built.lower().compile()
    compile_s = time.perf_counter() - start

    for _ in range(args.warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics) if args.warmup else state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / max(1, args.steps)
    loss = float(metrics["loss"])

    # ---- report ------------------------------------------------------------------------------
    device = devices[0]
    device_kind = device.device_kind
    flops = cost_flops(compiled)  # per device: the SPMD-partitioned program
    anchor_flops = (ANCHOR_FLOPS_PER_IMAGE_512 * (res / 512) ** 2 * args.batch) if args.config == "sd15" else None
    flops_source = "cost_analysis" if flops else ("anchors.md 3.55 TF/img at 512 x (res/512)^2" if anchor_flops
                                                  else None)
    flops_used = flops or anchor_flops
    peak, peak_source = peak_flops(device_kind)
    mfu = flops_used / step_s / peak if (flops_used and peak) else None
    mfu_anchor = anchor_flops / step_s / peak if (anchor_flops and peak) else None
    memory = None
    try:
        memory = device.memory_stats()
    except Exception:
        pass
    peak_bytes = (memory or {}).get("peak_bytes_in_use")
    analysis = memory_analysis_dict(compiled)
    result = {
        "bench": "t2i_flax_train_step", "config": args.config, "res": res, "batch_per_device": args.batch,
        "global_batch": global_size, "devices": len(devices), "platform": device.platform,
        "device_kind": device_kind, "dtype": args.dtype, "attention": args.attention, "fsdp": args.fsdp,
        "use_ema": args.use_ema, "cache_latents": args.cache_latents, "steps": args.steps, "warmup": args.warmup,
        "compilation_cache_dir": args.compilation_cache_dir,
        "setup_s": round(setup_s, 3), "compile_s": round(compile_s, 3), "step_s": round(step_s, 5),
        "img_per_s": round(global_size / step_s, 3),
        "flops_per_step_per_device": flops_used, "flops_source": flops_source,
        "anchor_flops_per_step_per_device": anchor_flops,
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "mfu": None if mfu is None else round(mfu, 4), "mfu_anchor": None if mfu_anchor is None else round(mfu_anchor, 4),
        "peak_mem_gib": gib(peak_bytes),
        "peak_mem_source": "device.memory_stats() peak_bytes_in_use" if peak_bytes is not None else None,
        "compiled_mem_gib": gib(analysis["total_bytes"]) if analysis else None,
        "memory_analysis": analysis, "loss": loss,
        "jax": jax.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
