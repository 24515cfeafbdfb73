"""Input pipeline startup and throughput on an imagefolder of JPEGs; one JSON line per measurement.

    python bench/data_scan.py make /tmp/jpegs --n 10000 --size 512        # the test folder (JPEG q90)
    python bench/data_scan.py startup /tmp/jpegs --hf_cache /tmp/hf --scan_file none          # cold
    python bench/data_scan.py startup /tmp/jpegs --hf_cache /tmp/hf --scan_file /tmp/s.json  # writes, then reads
    python bench/data_scan.py startup /tmp/jpegs --hf_cache /tmp/hf --module /tmp/data_old.py # the old module
    python bench/data_scan.py shares /tmp/jpegs --hf_cache /tmp/hf --hosts 1 2 4 8            # one host's share
    python bench/data_scan.py throughput /tmp/jpegs --hf_cache /tmp/hf --workers 0 1 2
    python bench/data_scan.py make /tmp/mixed --n 2000 --size 512 --mixed   # t2i_flax.synthetic's aspect ratios
    python bench/data_scan.py throughput /tmp/mixed --hf_cache /tmp/hf --workers 1 2 --aspect_ratio_buckets

startup: in this (fresh) process, the time from calling build_train_loader (load the dataset from the
`datasets` cache, scan or read the scan file, set up) to the first host batch, split into load_s (the
imagefolder's Arrow table from the `datasets` cache; the first load ever builds it: build_s of `make`),
scan_s (everything else build_train_loader does) and first_batch_s. --module times another copy of the data
module (e.g. `git show HEAD:t2i_flax/data.py > /tmp/data_old.py`, the single-file module before the scan
work: every host decodes every image).
shares: the scan of host 0's share for P hosts (positions 0, P, 2P, ...): what each host of a P-host run
pays (the exchange is one allgather of N/8 bytes per host and is not in this number).
throughput: host batches per second of the running pipeline (after --warmup batches: worker start-up) for each
--dataloader_num_workers value, as images/s and images/s per worker process (--aspect_ratio_buckets: the images
trained at their buckets' sizes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import time

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("T2I_FLAX_PATH") or os.path.dirname(BENCH_DIR))


def _write_jpeg(job):
    """One JPEG: smooth colour fields, a few rectangles and mild noise (compresses like a photo: ~50-100 KB)."""
    folder, index, size, mixed = job
    from PIL import Image

    width = height = size
    if mixed:  # about size^2 pixels at one of the synthetic dataset's aspect ratios, in turn
        from t2i_flax.synthetic import ASPECT_RATIOS

        ratio_w, ratio_h = ASPECT_RATIOS[index % len(ASPECT_RATIOS)]
        width, height = round(size * (ratio_w / ratio_h) ** 0.5), round(size * (ratio_h / ratio_w) ** 0.5)
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(6.28 * (fx * x + fy * y) + phase))
    pixels = np.stack(channels, -1)
    for _ in range(6):
        top, left = rng.integers(0, min(width, height) - 32, 2)
        box_height, box_width = rng.integers(16, size // 3, 2)
        pixels[top:top + box_height, left:left + box_width] = rng.uniform(0, 255, 3)
    pixels += 6 * rng.standard_normal(pixels.shape, dtype=np.float32)
    name = f"{index:06d}.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, name), quality=90)
    return name


def make(args) -> dict:
    os.makedirs(args.folder, exist_ok=True)
    start = time.perf_counter()
    with multiprocessing.Pool(args.processes) as pool:
        names = pool.map(_write_jpeg, [(args.folder, i, args.size, args.mixed) for i in range(args.n)], chunksize=64)
    with open(os.path.join(args.folder, "metadata.jsonl"), "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"file_name": name, "text": f"a synthetic photo number {i}"}) + "\n")
    write_s = time.perf_counter() - start
    total_bytes = sum(os.path.getsize(os.path.join(args.folder, name)) for name in names)
    start = time.perf_counter()
    from t2i_flax.data import load_train_dataset

    load_train_dataset(train_data_dir=args.folder, cache_dir=args.hf_cache)  # builds the datasets cache
    return {"bench": "make", "n": args.n, "size": args.size, "mean_kb": round(total_bytes / args.n / 1024, 1),
            "write_s": round(write_s, 1), "build_s": round(time.perf_counter() - start, 2)}


def _data_module(path: str | None):
    if path is None:
        from t2i_flax import data

        return data
    spec = importlib.util.spec_from_file_location("t2i_flax_data_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tokenizer():
    import tempfile

    from t2i_flax.tokenizer import load_tokenizer, write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as folder:
        write_tiny_clip_tokenizer(folder)
        return load_tokenizer(folder)  # read into memory: the folder is not needed afterwards


def _data_config(args, num_workers: int = 0):
    from t2i_flax.config import DataConfig

    return DataConfig(train_data_dir=args.folder, resolution=args.res, center_crop=False, random_flip=True,
                      dataloader_num_workers=num_workers, aspect_ratio_buckets=args.aspect_ratio_buckets)


def _loader_options(args) -> dict:
    return dict(host_batch_size=args.batch, cache_dir=args.hf_cache, seed=0, process_index=0, process_count=1)


def startup(args) -> dict:
    import_start = time.perf_counter()
    data = _data_module(args.module)
    tokenizer = _tokenizer()
    import_s = time.perf_counter() - import_start
    options = _loader_options(args)
    if args.scan_file != "none":
        options["scan_cache_path"] = args.scan_file
    start = time.perf_counter()
    dataset = data.load_train_dataset(train_data_dir=args.folder, cache_dir=args.hf_cache)
    load_s = time.perf_counter() - start
    # The loaded dataset is handed over (train_data_dir still names the folder: the scan file's key lists it).
    if args.module is None:
        loader = data.build_train_loader(_data_config(args), tokenizer, dataset=dataset, **options)
    else:  # an older copy of the module: its keyword signature (the config's fields were keywords)
        loader = data.build_train_loader(tokenizer, dataset=dataset, resolution=args.res, train_data_dir=args.folder,
                                         center_crop=False, random_flip=True, **options)
    built = time.perf_counter()
    iterator = loader.iterator()
    next(iterator)
    first = time.perf_counter()
    iterator.close()
    return {"bench": "startup", "module": args.module or "t2i_flax.data", "scan_file": args.scan_file,
            "from_scan_file": getattr(loader, "scan_from_cache", False), "examples": loader.num_examples,
            "batch": args.batch, "res": args.res, "import_s": round(import_s, 2), "load_s": round(load_s, 2),
            "scan_s": round(built - start - load_s, 2), "first_batch_s": round(first - built, 2),
            "to_first_batch_s": round(first - start, 2)}


def shares(args) -> list[dict]:
    from t2i_flax.data.order import selected_records
    from t2i_flax.data.scan import scan_host_share
    from t2i_flax.data.sources import load_train_dataset, prepare_columns

    tokenizer = _tokenizer()
    dataset = prepare_columns(load_train_dataset(train_data_dir=args.folder, cache_dir=args.hf_cache), "image", "text")
    records = selected_records(len(dataset), None, 0)
    lines = []
    for hosts in args.hosts:
        start = time.perf_counter()
        share = scan_host_share(dataset, records, image_column="image", caption_column="text", tokenizer=tokenizer,
                                validate_images=True, process_index=0, process_count=hosts,
                                num_threads=max(2, min(32, os.cpu_count() or 1)))
        seconds = time.perf_counter() - start
        lines.append({"bench": "scan_share", "hosts": hosts, "records": len(records),
                      "share": len(records[0::hosts]), "usable_in_share": len(share.usable_positions),
                      "scan_s": round(seconds, 2), "img_per_s": round(len(records[0::hosts]) / seconds, 1)})
    return lines


def throughput(args) -> list[dict]:
    from t2i_flax import data

    tokenizer = _tokenizer()
    lines = []
    for workers in args.workers:
        loader = data.build_train_loader(_data_config(args, workers), tokenizer,
                                         scan_cache_path=args.scan_file_for_throughput, **_loader_options(args))
        iterator = loader.iterator()
        for _ in range(args.warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        seconds = time.perf_counter() - start
        iterator.close()
        images_per_s = args.batches * args.batch / seconds
        lines.append({"bench": "throughput", "workers": workers, "buckets": args.aspect_ratio_buckets,
                      "decoders": f"{loader.prefetch_batches} threads" if workers == 0 else f"{workers} processes",
                      "batch": args.batch, "res": args.res, "batches": args.batches,
                      "img_per_s": round(images_per_s, 1),
                      "img_per_s_per_worker": round(images_per_s / workers, 1) if workers else None})
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("make", "startup", "shares", "throughput"))
    parser.add_argument("folder")
    parser.add_argument("--hf_cache", default="/tmp/bench_hf_cache", help="datasets cache_dir")
    parser.add_argument("--n", type=int, default=10000, help="make: images")
    parser.add_argument("--size", type=int, default=512, help="make: side in px")
    parser.add_argument("--processes", type=int, default=2, help="make: writer processes")
    parser.add_argument("--module", default=None, help="startup: a data module file to time instead of t2i_flax.data")
    parser.add_argument("--scan_file", default="none", help="startup: scan_cache_path, or none")
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4, 8], help="shares: host counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="throughput: num_workers values")
    parser.add_argument("--batches", type=int, default=30, help="throughput: timed batches")
    parser.add_argument("--warmup", type=int, default=3, help="throughput: untimed batches first")
    parser.add_argument("--batch", type=int, default=8, help="host batch")
    parser.add_argument("--res", type=int, default=512)
    parser.add_argument("--mixed", action="store_true", help="make: mixed aspect ratios")
    parser.add_argument("--aspect_ratio_buckets", action="store_true", help="throughput: train in buckets")
    args = parser.parse_args(argv)
    args.scan_file_for_throughput = os.path.join(args.hf_cache, "bench_data_scan.json")
    results = {"make": make, "startup": startup, "shares": shares, "throughput": throughput}[args.command](args)
    for line in results if isinstance(results, list) else [results]:
        line.update(host=platform.node(), cpus=os.cpu_count())
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
