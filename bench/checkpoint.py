"""Checkpoints of the real SD 1.5 UNet train state (random weights of the real shapes): size on disk, how long
the loop is blocked by an asynchronous save, how long the whole save takes, and the restore time. One JSON
line. The state is the trainer's (t2i_flax.step.create_state, clip + AdamW), saved and restored with
t2i_flax.checkpoint.Checkpoints as the training loop does.

    python bench/checkpoint.py --dir /tmp/ckpt_bench [--use_ema] [--config sd15]

Host RAM: float32 UNet params 3.4 GB, Adam moments 6.9 GB, EMA 3.4 GB, and Orbax copies the arrays to host
memory while it writes: without EMA the run peaks near 21 GB (this machine has 24 GiB)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR))
sys.path.insert(0, BENCH_DIR)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def make_noisy(leaves: list, shardings: list, rng) -> None:
    """Replaces every float array in `leaves` (the only reference to them) by small random values, one at a
    time, so that host RAM holds one leaf more at the most; integer leaves (counters) stay."""
    import jax
    import numpy as np

    for index in range(len(leaves)):
        shape, dtype = leaves[index].shape, leaves[index].dtype
        if np.issubdtype(dtype, np.floating):
            leaves[index] = None
            leaves[index] = jax.device_put((rng.standard_normal(shape, dtype=np.float32) * 1e-4).astype(dtype),
                                           shardings[index])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a scratch folder (deleted first)")
    parser.add_argument("--config", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--use_ema", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from train_step import build_models, build_step_config, random_like
    from t2i_flax import checkpoint, sharding, step

    unet, vae, text_encoder = build_models(args.config, jax.numpy.bfloat16, None)
    config = build_step_config(unet, vae, text_encoder, args.use_ema)
    params = random_like(unet.abstract_params(), np.random.default_rng(0))
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    state, shardings = step.create_state(config, mesh, params, seed=0)
    del params
    # Adam's moments start at zero, which Orbax's compression shrinks to nothing: give them (and EMA) values,
    # as after training, so that the size and times are a trained state's.
    leaves, treedef = jax.tree_util.tree_flatten(state.opt_state)
    state = state.replace(opt_state=None)
    make_noisy(leaves, jax.tree_util.tree_leaves(shardings.opt_state), np.random.default_rng(1))
    state = state.replace(opt_state=jax.tree_util.tree_unflatten(treedef, leaves))
    del leaves
    jax.block_until_ready(state)
    shutil.rmtree(args.dir, ignore_errors=True)
    checkpoint.setup_process()  # as the command lines do (the array handler the measured saves use)
    manager = checkpoint.Checkpoints(args.dir, keep=2)
    record = {"version": 1}
    start = time.perf_counter()
    manager.save(1, state, {"next_batch": 1}, record)
    blocked = time.perf_counter() - start
    manager.wait()
    total = time.perf_counter() - start
    size = folder_bytes(os.path.join(args.dir, "1"))
    # A second save, while the first is complete: what a periodic save costs the loop in steady state.
    start = time.perf_counter()
    manager.save(2, state, {"next_batch": 2}, record)
    blocked_second = time.perf_counter() - start
    manager.wait()
    total_second = time.perf_counter() - start
    abstract, _ = step.state_shardings(config, mesh, unet.abstract_params(), seed=0)
    placed = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
    del state
    manager.close()
    start = time.perf_counter()
    restored = checkpoint.Checkpoints(args.dir, read_only=True).restore_state(2, placed)
    jax.block_until_ready(restored)
    restore = time.perf_counter() - start
    print(json.dumps({
        "bench": "checkpoint", "config": args.config, "use_ema": args.use_ema, "jax": jax.__version__,
        "device": jax.devices()[0].device_kind, "checkpoint_gb": round(size / 1e9, 3),
        "save_blocking_s": round(blocked, 2), "save_total_s": round(total, 2),
        "second_save_blocking_s": round(blocked_second, 2), "second_save_total_s": round(total_second, 2),
        "restore_s": round(restore, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
