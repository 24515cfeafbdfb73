"""Cached latents (--cache_latents): the VAE posterior of every usable image, computed once, read while
training instead of running the VAE encoder in every step.

    cache = LatentCache(directory, key_fields, loader, latent_shape_CHW)
    cache.build(encode_moments, mesh)          # the pass: resumable, each host its share, on the accelerators
    loader = loader.with_examples(CachedExampleAt(loader.example_fn, cache))

What is stored: per image its posterior's mean and std (float32, (C, h, w)), of the center-cropped image and,
with --random_flip, of its mirror image too (the VAE is not exactly mirror-symmetric, so both are encoded; for
SDXL, which flips before it crops, the centre crop of the flipped image), and the image's size after the
resize and as decoded (SDXL's time ids hold the latter). The step then samples latent = mean + std * noise
with the same random stream as the online step (t2i_flax/step.py), so the losses equal the online path's to
float rounding. Random crops would need one entry per crop and cannot be cached (refused by the config). With
aspect-ratio buckets there is one cache per bucket, of its images at its size.

Layout: <directory>/<key>/ with `meta.json` and one set of .npy files per (chunk, process): the usable
records are cut into global chunks of `process_count x per_host` records, host p encodes its part of
each chunk. A part is written to a temporary name and renamed, so an interrupted pass continues where it
stopped, and a part is either there whole or not at all. The key is a hash of everything the numbers
depend on (the VAE encoder's weights and compute dtype, the dataset and its usable records, columns,
resolution, the resize's interpolation mode, crop, flips), so a stale cache is never read: another key is another folder. Every host reads
any record (the epoch shuffle crosses host shares): on several hosts the directory must be on storage all
of them see."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from tqdm.auto import tqdm

from t2i_flax.data.images import (DEFAULT_INTERPOLATION, center_crop_offsets, decode_image, draw_crop_and_flip,
                                  resized_size, transform_image)
from t2i_flax.data.order import sample_rng
from t2i_flax.errors import DataError

FORMAT_VERSION = 2  # 2: sizes hold the decoded size too
PARTS = ("mean", "std", "sizes")


def params_digest(tree) -> str:
    """sha256 of a parameter tree's paths, shapes, dtypes and bytes (host arrays)."""
    from t2i_flax import weights

    digest = hashlib.sha256()
    for path, value in sorted(weights.flatten(tree).items()):
        value = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{'/'.join(path)}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class LatentCache:
    def __init__(self, directory: str, key_fields: dict, records: np.ndarray, random_flip: bool,
                 latent_shape_CHW: tuple[int, int, int], process_index: int, process_count: int, per_host: int,
                 flip_first: bool = False, interpolation: str = DEFAULT_INTERPOLATION):
        self.records = np.asarray(records, np.int64)
        self.random_flip = random_flip
        self.flip_first = flip_first
        self.interpolation = interpolation  # the resize's mode (--image_interpolation_mode): part of the key
        self.flips = 2 if random_flip else 1
        self.latent_shape = tuple(latent_shape_CHW)
        self.process_index, self.process_count, self.per_host = process_index, process_count, per_host
        self.chunk = per_host * process_count
        self.num_chunks = -(-len(self.records) // self.chunk)
        fields = dict(key_fields, version=FORMAT_VERSION, flips=self.flips, latent_shape=list(self.latent_shape),
                      flip_first=flip_first, interpolation=interpolation,
                      records=hashlib.sha256(self.records.tobytes()).hexdigest())
        self.key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        self.meta = dict(fields, key=self.key, num_records=len(self.records), process_count=process_count,
                         per_host=per_host)
        self.root = os.path.join(directory, self.key)
        self.position = {int(record): index for index, record in enumerate(self.records)}
        self._open: dict[str, np.ndarray] = {}

    # ---- where a record lives ---------------------------------------------------------------------
    def _part_path(self, chunk: int, process: int, part: str) -> str:
        return os.path.join(self.root, f"chunk{chunk:06d}_p{process}.{part}.npy")

    def _rows(self, chunk: int, process: int) -> np.ndarray:
        """Positions (into `records`) of host `process`'s part of `chunk` (the last chunk may be short)."""
        start = chunk * self.chunk + process * self.per_host
        return np.arange(start, min(start + self.per_host, len(self.records)))

    def _part_done(self, chunk: int, process: int) -> bool:
        return len(self._rows(chunk, process)) == 0 or all(
            os.path.exists(self._part_path(chunk, process, part)) for part in PARTS)

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not all(self._part_done(c, p) for p in range(self.process_count))]

    def _where(self, record: int) -> tuple[int, int, int]:
        chunk, within = divmod(self.position[record], self.chunk)
        process, row = divmod(within, self.per_host)
        return chunk, process, row

    def size(self, record: int) -> tuple[int, int]:
        """The record's image size after the resize to the resolution (width, height)."""
        chunk, process, row = self._where(record)
        width, height = self._array(chunk, process, "sizes")[row, :2]
        return int(width), int(height)

    def original_size(self, record: int) -> tuple[int, int]:
        """The record's image size as decoded (width, height)."""
        chunk, process, row = self._where(record)
        width, height = self._array(chunk, process, "sizes")[row, 2:]
        return int(width), int(height)

    def read(self, record: int, flipped: bool) -> tuple[np.ndarray, np.ndarray]:
        """The posterior's (mean, std), float32 (C, h, w), of the record's image or its mirror image."""
        chunk, process, row = self._where(record)
        flip = 1 if flipped else 0
        return (np.array(self._array(chunk, process, "mean")[row, flip]),
                np.array(self._array(chunk, process, "std")[row, flip]))

    def _array(self, chunk: int, process: int, part: str) -> np.ndarray:
        path = self._part_path(chunk, process, part)
        array = self._open.get(path)
        if array is None:
            if len(self._open) > 256:  # keep the number of open memory maps bounded
                self._open.clear()
            array = self._open[path] = np.load(path, mmap_mode="r")
        return array

    def __getstate__(self):  # worker processes open their own memory maps
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    # ---- the pass -------------------------------------------------------------------------------
    def build(self, dataset, image_column: str, target, encode_moments, mesh, show_progress: bool) -> int:
        """Encodes every chunk that is not complete; returns how many chunks this call encoded. Every
        process must call it (the encoder program is sharded over all devices). `target`: the images' size (a
        side, or a bucket's (width, height)); `encode_moments(pixels)`: a global batch (B, 3, H, W) -> (mean, std)
        global arrays (B, C, h, w)."""
        import jax
        from jax.experimental import multihost_utils

        from t2i_flax import sharding

        if jax.process_index() == 0:
            os.makedirs(self.root, exist_ok=True)
            with open(os.path.join(self.root, "meta.json"), "w") as handle:
                json.dump(self.meta, handle, indent=2, sort_keys=True)
        multihost_utils.sync_global_devices("latent cache folder")
        missing = self.missing_chunks()
        bar = tqdm(total=self.num_chunks, initial=self.num_chunks - len(missing), desc="latent cache", unit="chunk",
                   disable=not show_progress)
        for chunk in missing:
            rows = self._rows(chunk, self.process_index)
            pixels, sizes = self._load(dataset, image_column, target, rows)
            batch = np.concatenate(pixels) if self.random_flip else pixels[0]
            mean, std = encode_moments(sharding.global_batch(mesh, {"pixels": batch})["pixels"])
            mean, std = _local_rows(mean), _local_rows(std)
            if len(rows):
                n = len(rows)
                shape = (self.flips, self.per_host) + self.latent_shape
                self._write(chunk, {"mean": mean.reshape(shape)[:, :n].swapaxes(0, 1),
                                    "std": std.reshape(shape)[:, :n].swapaxes(0, 1), "sizes": sizes[:n]})
            bar.update(1)
        bar.close()
        multihost_utils.sync_global_devices("latent cache complete")
        if self.missing_chunks():
            raise DataError(f"the latent cache in {self.root} is incomplete after the pass: on several hosts it must "
                            f"be on storage every host sees (--latent_cache_dir)")
        return len(missing)

    def _load(self, dataset, image_column: str, target, rows: np.ndarray):
        """Center-cropped pixels of this host's rows ([unflipped, flipped]), padded to per_host with copies of the
        first (dropped again before writing), and the sizes (resized width and height, decoded width and height)."""
        from concurrent.futures import ThreadPoolExecutor

        records = [int(self.records[i]) for i in rows] or [int(self.records[0])]

        def one(record):
            image = decode_image(dataset[record][image_column])
            size = resized_size(image.size[0], image.size[1], target) + image.size
            pixels, _ = transform_image(image, target, center_crop=True, random_flip=False,
                                        rng=np.random.default_rng(0), interpolation=self.interpolation)
            if not self.random_flip:
                return (pixels,), size
            if self.flip_first:  # the centre crop of the mirror image (not the mirror of the centre crop)
                always_flip = _AlwaysFlip()
                flipped, _ = transform_image(image, target, center_crop=True, random_flip=True, rng=always_flip,
                                             flip_first=True, interpolation=self.interpolation)
            else:
                flipped = pixels[:, :, ::-1]
            return (pixels, flipped), size

        with ThreadPoolExecutor(max_workers=max(2, min(16, os.cpu_count() or 1))) as pool:
            loaded = list(pool.map(one, records))
        loaded += [loaded[0]] * (self.per_host - len(loaded))
        return ([np.stack([images[i] for images, _ in loaded]) for i in range(self.flips)],
                np.asarray([size for _, size in loaded], np.int32))

    def _write(self, chunk: int, parts: dict) -> None:
        for part, array in parts.items():
            path = self._part_path(chunk, self.process_index, part)
            temporary = f"{path[:-4]}.partial.npy"
            np.save(temporary, np.ascontiguousarray(array))
            os.replace(temporary, path)


class _AlwaysFlip:
    """A stand-in random stream whose flip draw always flips (crop draws 0: unused with a centre crop)."""

    def integers(self, low, high):
        return low

    def random(self):
        return 0.0


def _local_rows(array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas along the other mesh axis hold the same rows
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


class CachedExampleAt:
    """The per-position example function over cached latents: the same records, order and random stream
    as `examples.ExampleAt` (whose caption pick, crop and flip draws it repeats from the stored resized
    size), giving {"latent_mean", "latent_std": float32 (C, h, w), "input_ids": int32 (L,)}. `caches`: {(width,
    height): the LatentCache of the images trained at that size} (one, or one per aspect-ratio bucket)."""

    def __init__(self, online, caches: dict):
        self.online, self.caches = online, caches
        self.captions = online.dataset.select_columns([online.caption_column])
        self.records, self.seed, self.slots = online.records, online.seed, online.slots

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = self.slots.slot(int(position))
        order = self.online._order(epoch)
        record = int(self.records[order[slot % len(order)]])
        return self.load(epoch, record, self.online.target(epoch, slot))

    def load(self, epoch: int, record: int, target: tuple[int, int]) -> dict[str, np.ndarray]:
        """The sample of `record` in `epoch` at the size `target`, as ExampleAt.load makes it online."""
        online = self.online
        cache = self.caches[target]
        rng = sample_rng(self.seed, epoch, record)
        caption = online.pick_caption(self.captions[record][online.caption_column], record, rng)
        width, height = cache.size(record)
        _, _, flip = draw_crop_and_flip(rng, width, height, target)
        mean, std = cache.read(record, online.random_flip and flip)
        crop = center_crop_offsets(width, height, target)
        return {"latent_mean": mean, "latent_std": std,
                **online.text_inputs(online.final_caption(caption, rng), cache.original_size(record), crop, target)}
