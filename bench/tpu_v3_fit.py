"""Does the REAL SD 1.5 train step fit a TPU v3 core (16 GiB HBM, 15.48 GiB usable)? Ahead-of-time compile
for a v3-8 topology (8 cores, "v3:2x2") on a CPU host; one JSON line per (layout, EMA, per-core batch).

Needs libtpu (the compiler), not a TPU. Use a separate venv so the project's CPU venv stays as it is:

    python3 -m venv /tmp/tpu_venv
    /tmp/tpu_venv/bin/pip install -r requirements.txt "jax[tpu]==0.10.2"     # pulls libtpu==0.0.42.1
    JAX_PLATFORMS=cpu /tmp/tpu_venv/bin/python bench/tpu_v3_fit.py [--fsdp 1 8] [--batch 1 2 4] [--ema no yes]

The step compiled is t2i_flax.step.compile_train_step with the trainer's shardings (sharding.make_mesh over
the 8 topology devices, tree_shardings), 512 px, bf16 compute, float32 UNet params, AdamW (+ EMA), frozen
VAE encoder + CLIP in bf16, XLA attention (Pallas flash attention does not compile for v3 in bf16).
Everything is abstract (jax.eval_shape / ShapeDtypeStruct): no weights are materialised.

Each configuration compiles in a child process bounded by --timeout; per layout and EMA setting the batch
grows until a compile fails. A step that does not fit fails at compile with RESOURCE_EXHAUSTED and is
reported as {"fits": false, "error": <first line>}. Per-core memory comes from compiled.memory_analysis():
total = arguments + outputs - aliased (donated state) + temporaries.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# t2i_flax from the repo root, or from T2I_FLAX_PATH (e.g. a `git archive HEAD t2i_flax` snapshot, so that a
# long sweep is not hit by edits in the working tree).
sys.path.insert(0, os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR))
sys.path.insert(0, BENCH_DIR)

HBM_USABLE_GIB = 15.48  # what the v3 compiler reports as available per core (anchors.md section 5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v3:2x2", help="jax.experimental.topologies name (v3:2x2 = v3-8)")
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 8], help="layouts: size of the fsdp mesh axis")
    parser.add_argument("--ema", choices=("no", "yes"), nargs="+", default=["no", "yes"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4], help="per-core batches, ascending")
    parser.add_argument("--dtype", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--attention", choices=("none", "xla"), default="xla")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per compile (child process)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one configuration
    return parser.parse_args(argv)


def compile_one(args, fsdp: int, use_ema: bool, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import train_step as bench
    from t2i_flax import sharding, step

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = sharding.make_mesh(fsdp, devices)
    dtype = {"bf16": jnp.bfloat16, "no": jnp.float32}[args.dtype]
    attention = None if args.attention == "none" else args.attention
    unet, vae, text_encoder = bench.build_models(args.config, dtype, attention)
    config = bench.build_step_config(unet, vae, text_encoder, use_ema)

    with_sharding = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    abstract_state, state_sharding = step.state_shardings(config, mesh, unet.abstract_params())
    state = with_sharding(abstract_state, state_sharding)
    frozen = bench.abstract_frozen(vae, text_encoder, dtype)
    frozen_sharding = sharding.tree_shardings(mesh, frozen)
    frozen = with_sharding(frozen, frozen_sharding)
    batch_sds = bench.abstract_batch(mesh, batch * len(devices), args.res)

    train_step = step.compile_train_step(config, mesh, state_sharding, frozen_sharding)
    result = {"bench": "tpu_v3_fit", "topology": args.topology, "device_kind": devices[0].device_kind,
              "cores": len(devices), "config": args.config, "res": args.res, "dtype": args.dtype,
              "attention": args.attention, "layout": "dp" if fsdp == 1 else f"fsdp{fsdp}", "fsdp": fsdp,
              "ema": use_ema, "batch_per_core": batch, "global_batch": batch * len(devices)}
    start = time.perf_counter()
    try:
        lowered = train_step.lower(state, frozen, batch_sds)
        compiled = lowered.compile()
    except Exception as error:  # RESOURCE_EXHAUSTED ... exceeds available HBM
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        lines = [line for line in text.splitlines() if line.strip()]
        detail = next((line.strip() for line in lines if "exceed" in line.lower()), None)
        result.update(fits=False, error=lines[0][:400] if lines else repr(error)[:400],
                      error_detail=None if detail == (lines[0] if lines else None) else (detail or "")[:400],
                      compile_s=round(time.perf_counter() - start, 1))
        return result
    compile_s = time.perf_counter() - start
    analysis = bench.memory_analysis_dict(compiled)
    flops = bench.cost_flops(compiled)
    total = analysis["total_bytes"] if analysis else None
    result.update(fits=True, compile_s=round(compile_s, 1), per_core_gib=bench.gib(total),
                  headroom_gib=None if total is None else round(HBM_USABLE_GIB - total / 2**30, 3),
                  arguments_gib=bench.gib(analysis.get("argument_size_in_bytes")) if analysis else None,
                  temp_gib=bench.gib(analysis.get("temp_size_in_bytes")) if analysis else None,
                  memory_analysis=analysis, flops_per_core=flops,
                  anchor_flops_per_core=(bench.ANCHOR_FLOPS_PER_IMAGE_512 * (args.res / 512) ** 2 * batch
                                         if args.config == "sd15" else None))
    return result


def child_command(args, fsdp, ema, batch):
    return [sys.executable, os.path.abspath(__file__), "--one", "--topology", args.topology, "--config", args.config,
            "--res", str(args.res), "--dtype", args.dtype, "--attention", args.attention,
            "--fsdp", str(fsdp), "--ema", ema, "--batch", str(batch)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        import jax

        result = compile_one(args, args.fsdp[0], args.ema[0] == "yes", args.batch[0])
        result.update(jax=jax.__version__, libtpu=_libtpu_version(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        print("RESULT " + json.dumps(result), flush=True)
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for fsdp in args.fsdp:
        for ema in args.ema:
            for batch in sorted(args.batch):
                try:
                    done = subprocess.run(child_command(args, fsdp, ema, batch), capture_output=True, text=True,
                                          timeout=args.timeout, env=env)
                except subprocess.TimeoutExpired:
                    result = {"bench": "tpu_v3_fit", "fsdp": fsdp, "ema": ema == "yes", "batch_per_core": batch,
                              "fits": None, "error": f"compile timed out after {args.timeout}s"}
                    print(json.dumps(result), flush=True)
                    break
                lines = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if not lines:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                    result = {"bench": "tpu_v3_fit", "fsdp": fsdp, "ema": ema == "yes", "batch_per_core": batch,
                              "fits": None, "error": f"child exited {done.returncode}: " + " | ".join(tail)[-600:]}
                    print(json.dumps(result), flush=True)
                    break
                print(lines[-1], flush=True)
                if not json.loads(lines[-1])["fits"]:
                    break  # larger batches will not fit either


def _libtpu_version():
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:
        return None


if __name__ == "__main__":
    main()
