"""Time to the first step of the trainer, cold and with a warm compilation cache (tiny model, CPU mesh).

    python bench/startup.py --workdir /tmp/startup [--runs 2] [--no_validation]

Writes the demo's tiny pipeline and synthetic dataset, then runs the real command line (the demo's flags:
8 simulated CPU devices, EMA, validation images unless --no_validation) `--runs` times in fresh processes,
all with one new `--compilation_cache_dir`: the first run compiles, the later ones load the compiled
programs. `first_step_s` is from the process start to the first line of metrics.jsonl (logged after step 1,
so it holds the imports, loading, the data scan, the ahead-of-time compiles of the step and the sampler,
and step 1); `total_s` is the whole 2-step run. One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a scratch folder (deleted first)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no_validation", action="store_true")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    sys.path.insert(0, ROOT)
    model_dir, data_dir = os.path.join(args.workdir, "tiny-sd"), os.path.join(args.workdir, "shapes")
    cache_dir = os.path.join(args.workdir, "jax_cache")
    # Writing the inputs needs jax; do it in a child so that this process stays light.
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                    "from t2i_flax import demo, synthetic; demo.write_tiny_pipeline(sys.argv[2]);"
                    "synthetic.write_synthetic_dataset(sys.argv[3], 64, resolution=32, seed=0)",
                    ROOT, model_dir, data_dir], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    validation = [] if args.no_validation else [
        "--validation_prompts", "a red circle on a blue background", "--num_validation_images", "4",
        "--validation_steps", "1000", "--validation_num_inference_steps", "20"]
    for run in range(args.runs):
        output_dir = os.path.join(args.workdir, f"out{run}")
        command = [sys.executable, os.path.join(ROOT, "train_text_to_image_flax.py"),
                   "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir,
                   "--output_dir", output_dir, "--resolution", "32", "--center_crop", "--random_flip",
                   "--train_batch_size", "2", "--max_train_steps", "2", "--use_ema", "--cpu_devices", "8",
                   "--log_every", "1", "--report_to", "none", "--compilation_cache_dir", cache_dir, *validation]
        metrics = os.path.join(output_dir, "metrics.jsonl")
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
        first_step_s = None
        while process.poll() is None:
            if first_step_s is None and os.path.exists(metrics) and os.path.getsize(metrics):
                first_step_s = time.perf_counter() - start
            time.sleep(0.02)
        total_s = time.perf_counter() - start
        stderr = process.stderr.read()
        if process.returncode:
            raise SystemExit(f"run {run} failed ({process.returncode}): {stderr[-2000:]}")
        cached = sum(len(files) for _, _, files in os.walk(cache_dir))
        print(json.dumps({"bench": "startup", "run": run, "cache": "cold" if run == 0 else "warm",
                          "validation": not args.no_validation, "first_step_s": round(first_step_s, 2),
                          "total_s": round(total_s, 2), "cache_files": cached}), flush=True)


if __name__ == "__main__":
    main()
