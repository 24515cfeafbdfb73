"""Aspect-ratio buckets (--aspect_ratio_buckets): a small fixed set of image sizes, each image trained at the one
nearest its own shape, every global batch from one bucket (one compiled step per bucket shape).

The set (config.bucket_sizes: the flags decide it), the rule users know from kohya's sd-scripts: sizes (width,
height), both multiples of `step`, each side in [min_side, max_side], area <= resolution^2; for each width the
largest such height, and the transposes. An image goes to the bucket whose log aspect ratio is nearest its own
(ties: the first in the table, which is sorted from the tallest to the widest).

An epoch: each bucket's images in a seeded order of their own (per epoch), cut into global batches; a remainder
that does not fill a global batch sits out that epoch (another remainder next epoch); then the batches of all
buckets in one seeded shuffle. The epoch's order is these batches, concatenated: host p reads slots
[p*B, (p+1)*B) of each global batch exactly as without buckets (data/order.py). Steps per epoch = the sum over the
buckets of their full batches.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from t2i_flax.config import checked_bucket_sizes
from t2i_flax.errors import DataError

_BUCKET_ORDER_TAG = 0x42554B54  # "BUKT": a bucket's order in an epoch
_BATCH_ORDER_TAG = 0x42415443   # "BATC": the order of all buckets' batches in an epoch


def assign(image_sizes: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """The bucket index (int32) of each image (width, height): the nearest log aspect ratio."""
    image_sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    bucket_ratios = np.log([width / height for width, height in buckets])
    ratios = np.log(image_sizes[:, 0] / image_sizes[:, 1])
    return np.argmin(np.abs(ratios[:, None] - bucket_ratios[None, :]), axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Which bucket each usable record is in, and the epochs' batches. `bucket_of`: per usable record (in the
    scan's order) its index into `sizes`."""
    resolution: int
    step: int
    sizes: tuple                   # ((width, height), ...)
    bucket_of: np.ndarray          # int32, one per usable record
    global_batch_size: int
    seed: int

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.bucket_of, minlength=len(self.sizes))

    @property
    def steps_per_epoch(self) -> int:
        return int((self.counts // self.global_batch_size).sum())

    @property
    def used_sizes(self) -> list[tuple[int, int]]:
        """The bucket sizes some global batch has: the step shapes a run compiles."""
        return [size for size, count in zip(self.sizes, self.counts) if count >= self.global_batch_size]

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions into the usable records, steps_per_epoch x G of them, batch after batch; each batch's bucket
        index). A pure function of (seed, epoch)."""
        batches, batch_buckets = [], []
        for bucket in range(len(self.sizes)):
            members = np.flatnonzero(self.bucket_of == bucket)
            full = len(members) // self.global_batch_size
            if not full:
                continue
            rng = np.random.default_rng([self.seed % 2**64, _BUCKET_ORDER_TAG, epoch, bucket])
            shuffled = members[rng.permutation(len(members))][:full * self.global_batch_size]
            batches.append(shuffled.reshape(full, self.global_batch_size))
            batch_buckets.append(np.full(full, bucket, np.int32))
        batches, batch_buckets = np.concatenate(batches), np.concatenate(batch_buckets)
        order = np.random.default_rng([self.seed % 2**64, _BATCH_ORDER_TAG, epoch]).permutation(len(batches))
        return batches[order].reshape(-1), batch_buckets[order]

    def table(self) -> dict:
        """What buckets.json holds."""
        g = self.global_batch_size
        counts = self.counts
        return {"resolution": self.resolution, "step": self.step,
                "buckets": [{"width": width, "height": height, "images": int(count),
                             "batches_per_epoch": int(count // g)}
                            for (width, height), count in zip(self.sizes, counts)],
                "left_out_per_epoch": int((counts % g).sum())}

    def describe(self) -> str:
        """The table for the log, one line per bucket that holds images."""
        table = self.table()
        lines = [f"aspect-ratio buckets: {len(self.used_sizes)} of {len(self.sizes)} hold a global batch of "
                 f"{self.global_batch_size}; {self.steps_per_epoch} steps/epoch, {table['left_out_per_epoch']} "
                 f"images sit out each epoch"]
        for entry in table["buckets"]:
            if entry["images"]:
                lines.append(f"  {entry['width']:>5} x {entry['height']:<5} {entry['images']:>7} images "
                             f"{entry['batches_per_epoch']:>6} batches")
        return "\n".join(lines)

    def write(self, output_dir: str) -> str:
        path = os.path.join(output_dir, "buckets.json")
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(self.table(), handle, indent=2)
        return path


def make_plan(image_sizes: np.ndarray, resolution: int, step: int, min_side: int, max_side: int,
              global_batch_size: int, seed: int) -> BucketPlan:
    """The bucket plan of the usable images' sizes; DataError (one line) when no bucket holds a full global batch."""
    sizes = checked_bucket_sizes(resolution, step, min_side, max_side)
    plan = BucketPlan(resolution, step, tuple(sizes), assign(image_sizes, sizes), global_batch_size, seed)
    if plan.steps_per_epoch == 0:
        fullest = int(np.argmax(plan.counts))
        width, height = sizes[fullest]
        raise DataError(f"--aspect_ratio_buckets: no bucket holds a full global batch of {global_batch_size} images "
                        f"(the fullest, {width}x{height}, holds {plan.counts[fullest]} of {len(plan.bucket_of)}): "
                        f"lower --train_batch_size, or widen the buckets (--bucket_step, --min_bucket_resolution)")
    return plan
