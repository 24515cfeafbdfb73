"""The largest per-core batch that fits a TPU, found with `python -m t2i_flax.aot` (the trainer's own step,
compiled ahead of time for a TPU topology on this CPU host). One JSON line per compile, then a table.

    python bench/aot_fit.py models /tmp/aot_models          # config-only SD 1.5 / 2-base / 2.1 folders
    python bench/aot_fit.py search /tmp/aot_models --out /tmp/aot_fit.jsonl --jobs 2 --budget_min 90 \\
        --series sd15:dp:ema sd15:fsdp8:ema:start=4 sd21:fsdp8:noema:res=768 sd15:dp:ema:lora=4:start=8
    python bench/aot_fit.py table /tmp/aot_fit.jsonl          # markdown table of what was measured

A series is `model:layout:ema[:res=N][:lora=R][:start=B][:max=B][:known=B][:bisect]`: model sd15 | sd2-base | sd21 | sdxl | tiny
(their native resolution unless res=), layout dp (--fsdp 1) | fsdp8, ema | noema. Each series compiles batch
`start` (default 1) and doubles it while it fits (up to max, default 64), or halves it while it does not; with
`bisect` it then bisects between the largest batch that fits and the smallest that does not (exact answer;
without it the answer is "fits B, 2B does not"; `known=B`: batch B is known to fit, never compiled again). Series run `--jobs` at a time, each compile in its own
`python -m t2i_flax.aot --json` process bounded by --timeout; no compile starts after --budget_min. The flags
are the trainer's: --mixed_precision bf16, --train_batch_size B, --resolution, --fsdp, --use_ema, --lora_rank.

The model folders hold configs and a tokenizer only, no weights: aot needs nothing else. Their configs are
bench/configs.py's (SD 1.5; SD 2.x: attention_head_dim (5, 10, 20, 20), cross_attention_dim 1024, linear
projections, OpenCLIP-H text encoder 1024 wide x 23 layers; 2.1 at 768 px with upcast attention).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH_DIR)

SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "clip_sample": False}


def write_models(folder: str) -> None:
    from configs import CONFIGS, NATIVE, SDXL_CONFIGS

    from t2i_flax import family, tokenizer
    from t2i_flax.models import (FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection,
                                 FlaxUNet2DConditionModel)

    for name, (unet, vae, clip, *clip_2) in {**CONFIGS, **SDXL_CONFIGS}.items():
        root = os.path.join(folder, name)
        parts = [("unet", FlaxUNet2DConditionModel, unet), ("vae", FlaxAutoencoderKL, vae),
                 ("text_encoder", FlaxCLIPTextModel, clip)]
        if clip_2:  # SDXL: its second text encoder and tokenizer, and the folder's kind
            parts.append(("text_encoder_2", FlaxCLIPTextModelWithProjection, clip_2[0]))
            tokenizer.write_tiny_clip_tokenizer(os.path.join(root, "tokenizer_2"), pad_token=tokenizer.SDXL_PAD_TOKEN)
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "model_index.json"), "w") as handle:
                json.dump(family.STABLE_DIFFUSION_XL.model_index(), handle, indent=2)
        for sub, cls, config in parts:
            module = cls.from_config(dict(config))
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            with open(os.path.join(root, sub, cls.config_name), "w") as handle:
                json.dump(module.to_config(), handle, indent=2)
        os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
        with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as handle:
            json.dump(dict(SCHEDULER, prediction_type=NATIVE[name][1]), handle, indent=2)
        tokenizer.write_tiny_clip_tokenizer(os.path.join(root, "tokenizer"))  # 77 tokens, as CLIP's
        print(root)


def parse_series(text: str) -> dict:
    from configs import NATIVE

    model, layout, ema, *options = text.split(":")
    series = {"model": model, "fsdp": 1 if layout == "dp" else int(layout.removeprefix("fsdp")),
              "ema": ema == "ema", "res": NATIVE[model][0], "lora": None, "start": 1, "max": 64, "known": 0, "bisect": False}
    for option in options:
        if option == "bisect":
            series["bisect"] = True
            continue
        key, value = option.split("=")
        series[key] = int(value)
    series["name"] = text
    return series


def aot_command(models: str, series: dict, batch: int, topology: str) -> list[str]:
    command = [sys.executable, "-m", "t2i_flax.aot", "--json", "--topology", topology,
               "--pretrained_model_name_or_path", os.path.join(models, series["model"]),
               "--mixed_precision", "bf16", "--resolution", str(series["res"]), "--train_batch_size", str(batch),
               "--fsdp", str(series["fsdp"])]
    if series["ema"]:
        command.append("--use_ema")
    if series["lora"]:
        command += ["--lora_rank", str(series["lora"])]
    return command


def compile_once(models: str, series: dict, batch: int, args) -> dict:
    start = time.perf_counter()
    record = {"series": series["name"], "model": series["model"], "fsdp": series["fsdp"], "ema": series["ema"],
              "lora": series["lora"], "res": series["res"], "batch": batch, "topology": args.topology}
    try:
        done = subprocess.run(aot_command(models, series, batch, args.topology), capture_output=True, text=True,
                              timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        record.update(fits=None, error=f"timed out after {args.timeout}s")
        return record
    record["wall_s"] = round(time.perf_counter() - start, 1)
    if done.returncode not in (0, 3):
        record.update(fits=None, error=f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
        return record
    result = json.loads(done.stdout)
    step = result["train_step"]
    record.update(fits=step["fits"], compile_s=step["compile_s"], memory=step["memory"], error=step["error"],
                  usable_hbm_bytes=result["usable_hbm_bytes"], padded=step["padded"], shapes=step["shapes"],
                  trained_params=step["trained_params"], libtpu=result["libtpu"], jax=result["jax"])
    return record


def run_series(models, series, args, deadline, out, lock):
    fits, fails = series["known"], None  # the largest batch known to fit, the smallest known not to
    batch = series["start"]
    while batch is not None and time.time() < deadline:
        record = compile_once(models, series, batch, args)
        with lock:
            print(json.dumps(record), flush=True)
            with open(out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if record["fits"] is None:  # a timeout or a crash: the series stops here, unresolved
            return
        if record["fits"]:
            fits = batch
        else:
            fails = batch
        if fails is None:
            batch = batch * 2 if batch * 2 <= series["max"] else None
        elif fits == 0 and fails > 1:  # the start batch does not fit: halve down to 1
            batch = fails // 2
        else:
            batch = (fits + fails) // 2 if series["bisect"] and fails - fits > 1 else None


def search(args) -> None:
    deadline = time.time() + args.budget_min * 60
    queue = [parse_series(text) for text in args.series]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                series = queue.pop(0)
            run_series(args.models, series, args, deadline, args.out, lock)

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(table(args.out))


def table(path: str) -> str:
    records = [json.loads(line) for line in open(path)]
    by_series: dict[str, list] = {}
    for record in records:
        by_series.setdefault(record["series"], []).append(record)
    rows = ["| model | px | layout | EMA | LoRA | largest batch/core that fits (global) | its per-core GiB "
            "(args / temps) | next batch up | compiles (s each) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in by_series.items():
        first = runs[0]
        fit = [r for r in runs if r["fits"]]
        best = max(fit, key=lambda r: r["batch"]) if fit else None
        above = sorted((r for r in runs if r["fits"] is False and (best is None or r["batch"] > best["batch"])),
                       key=lambda r: r["batch"])
        unresolved = [r for r in runs if r["fits"] is None]
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        if best:
            m = best["memory"]
            size = f"{gib(m['total_bytes'])} ({gib(m['argument_bytes'])} / {gib(m['temp_bytes'])})"
            largest = f"{best['batch']} ({best['batch'] * 8})"
        else:
            size, largest = "-", "none (batch 1 does not fit)" if above and above[0]["batch"] == 1 else "?"
        if above:
            next_up = f"{above[0]['batch']}: no ({_short_error(above[0]['error'])})"
        elif unresolved:
            next_up = f"{unresolved[0]['batch']}: {unresolved[0]['error'][:60]}"
        else:
            next_up = f"not tried (max {max(r['batch'] for r in runs)})"
        times = ", ".join(f"{r['batch']}:{r.get('compile_s', r.get('wall_s', '?'))}" for r in runs)
        layout = "dp" if first["fsdp"] == 1 else f"fsdp{first['fsdp']}"
        rows.append(f"| {first['model']} | {first['res']} | {layout} "
                    f"| {'yes' if first['ema'] else 'no'} | {first['lora'] or '-'} | {largest} | {size} | {next_up} "
                    f"| {times} |")
    return "\n".join(rows)


def _short_error(lines) -> str:
    import re

    text = lines[0] if lines else ""
    found = re.search(r"\(([\d.]+[GMT])\) exceeds available HBM \(([\d.]+G)\)", text)
    return f"needs {found.group(1)} of {found.group(2)}" if found else text[:80]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models")
    models.add_argument("folder")
    run = sub.add_parser("search")
    run.add_argument("models")
    run.add_argument("--series", nargs="+", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--topology", default="v3-8")
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    run.add_argument("--budget_min", type=float, default=90, help="no compile starts after this many minutes")
    show = sub.add_parser("table")
    show.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "models":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        write_models(args.folder)
    elif args.command == "search":
        search(args)
    else:
        print(table(args.path))


if __name__ == "__main__":
    main()
