"""Startup with aspect-ratio buckets: how long the trainer takes to compile one train step per bucket, cold and with
a warm compilation cache, for the tiny test model on 2 simulated CPU devices at a realistic bucket set (512 px, the
default bucket flags, images at 11 common aspect ratios; the test VAE with SD's 8x downsampling; --cache_latents).
One JSON line per run.

    python bench/bucket_startup.py --workdir /tmp/bucket_startup
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)

# width:height of the photos people train on: square, 5:4, 4:3, 3:2, 16:9, 2:1, and the portraits
RATIOS = ((1, 1), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2))


def write_dataset(folder: str, resolution: int, per_ratio: int) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for ratio_w, ratio_h in RATIOS:
        width = round(resolution * (ratio_w / ratio_h) ** 0.5)
        height = round(resolution * (ratio_h / ratio_w) ** 0.5)
        for _ in range(per_ratio):
            name = f"{len(rows):04d}.png"
            Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3))).save(
                os.path.join(folder, name))
            rows.append({"file_name": name, "text": "a photo"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bucket_startup")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)

    from t2i_flax.demo import TINY_VAE, write_tiny_pipeline

    model_dir, data_dir = os.path.join(args.workdir, "tiny"), os.path.join(args.workdir, "data")
    cache_dir = os.path.join(args.workdir, "compilation_cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    # The tiny test model with a VAE that downsamples 8 times, as SD's: 64 x 64 latents at 512 px (the test VAE's 2
    # would put 65536 positions into the UNet's self-attention, terabytes of scores).
    write_tiny_pipeline(model_dir, vae_config=dict(TINY_VAE, block_out_channels=[32, 32, 64, 64],
                                                   down_block_types=["DownEncoderBlock2D"] * 4,
                                                   up_block_types=["UpDecoderBlock2D"] * 4))
    write_dataset(data_dir, args.resolution, per_ratio=8)
    for run in ("cold", "warm"):
        output_dir = os.path.join(args.workdir, "out")
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [sys.executable, os.path.join(ROOT, "train_text_to_image_flax.py"),
                   "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir",
                   output_dir, "--resolution", str(args.resolution), "--aspect_ratio_buckets", "--center_crop",
                   "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none", "--cpu_devices", "2",
                   "--cache_latents",  # the step without the VAE encoder; 2 devices: at 512 px 8 would not fit 24 GiB
                   "--compilation_cache_dir", cache_dir]
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        compiled = re.search(r"compiled the train step for (\d+) image sizes in ([\d.]+)s", done.stdout)
        table = json.load(open(os.path.join(output_dir, "buckets.json")))
        print(json.dumps({"bench": "bucket_startup", "run": run, "resolution": args.resolution,
                          "buckets_in_set": len(table["buckets"]), "buckets_compiled": int(compiled.group(1)),
                          "compile_s": float(compiled.group(2)),
                          "used": [f"{b['width']}x{b['height']}" for b in table["buckets"] if b["batches_per_epoch"]]}),
              flush=True)


if __name__ == "__main__":
    main()
