"""--validation_split: which usable images are held out of training, and the fixed batches they are measured in.

The choice is a pure function of (seed, the usable record list), so every host makes the same one, and a resumed run
(the same scan, the same seed) too. The held-out images never enter an epoch's permutation: the loader trains on the
others (data/loader.py). Each held-out image is the sample its training draw of epoch HELD_OUT_EPOCH would make
(caption pick, crop, flip, empty caption: data/examples.py), always the same one. With aspect-ratio buckets it goes to
the bucket nearest its aspect ratio among those the run trains at (the buckets that hold a global batch of training
images): its own bucket, unless too few training images share it; so the held-out loss needs no program of an image
size that training does not compile.

Batches: the held-out images of each size, in record order, cut into global batches and the last one padded to the
global batch with copies of its first image at weight 0 (a weighted mean ignores them). Host p reads slots
[p*B, (p+1)*B) of each global batch, as in training (data/order.py), so the global batch, and the loss, do not depend
on the number of hosts.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from t2i_flax.errors import FlagError

_HELD_OUT_TAG = 0x48454C44  # "HELD": the choice's random stream, apart from the epochs' and the samples'
HELD_OUT_EPOCH = 0  # whose sample draw (data/order.py sample_rng) makes a held-out image's fixed sample


def held_out_count(validation_split: float, num_usable: int) -> int:
    """--validation_split as a number of images: itself, or a fraction of the usable images (rounded, at least 1)."""
    if validation_split >= 1:
        return int(validation_split)
    return max(1, int(round(validation_split * num_usable))) if validation_split > 0 else 0


def choose(validation_split: float, num_usable: int, global_batch_size: int, seed: int) -> np.ndarray:
    """A bool mask over the usable records: True for the held-out ones. FlagError (one line) when the split holds out
    every image or leaves fewer than one global batch to train on."""
    count = held_out_count(validation_split, num_usable)
    if count >= num_usable or num_usable - count < global_batch_size:
        raise FlagError(f"--validation_split {validation_split:g} holds out {count} of the {num_usable} usable images, "
                        f"leaving {max(0, num_usable - count)} to train on, fewer than one global batch "
                        f"({global_batch_size}): hold out fewer images")
    mask = np.zeros(num_usable, bool)
    mask[np.random.default_rng([seed % 2**64, _HELD_OUT_TAG]).permutation(num_usable)[:count]] = True
    return mask


@dataclasses.dataclass(frozen=True)
class HeldOutBatch:
    """One global batch of held-out samples at one image size."""
    size: tuple                  # (width, height)
    records: np.ndarray          # int64 (G,): dataset rows (the padding repeats the first)
    indices: np.ndarray          # int32 (G,): each sample's index in the held-out set (its fixed noise)
    weights: np.ndarray          # float32 (G,): 1, or 0 for the padding


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
    """The held-out records (dataset rows, in the usable records' order) and the (width, height) each is measured at."""
    records: np.ndarray
    sizes: tuple                 # ((width, height), ...), one per record
    global_batch_size: int

    def __len__(self) -> int:
        return len(self.records)

    def batches(self) -> list[HeldOutBatch]:
        """The fixed global batches: by size (sorted), each size's records in order, the last batch padded."""
        g = self.global_batch_size
        out = []
        for size in sorted(set(self.sizes)):
            members = np.asarray([i for i, own in enumerate(self.sizes) if own == size], np.int32)
            for start in range(0, len(members), g):
                chunk = members[start:start + g]
                padding = g - len(chunk)
                indices = np.concatenate([chunk, np.full(padding, chunk[0], np.int32)])
                weights = np.concatenate([np.ones(len(chunk), np.float32), np.zeros(padding, np.float32)])
                out.append(HeldOutBatch(size, self.records[indices], indices, weights))
        return out

    def host_batch(self, batch: HeldOutBatch, example_at, process_index: int, process_count: int) -> dict:
        """This host's slots of `batch` as a host-local batch: the training batch's arrays (`example_at.load`, the
        online or cached example function) plus "held_out_index" (int32) and "weight" (float32)."""
        per_host = self.global_batch_size // process_count
        mine = slice(process_index * per_host, (process_index + 1) * per_host)
        samples = [example_at.load(HELD_OUT_EPOCH, int(record), batch.size) for record in batch.records[mine]]
        stacked = {name: np.stack([sample[name] for sample in samples]) for name in samples[0]}
        return dict(stacked, held_out_index=batch.indices[mine], weight=batch.weights[mine])


def held_out_set(records: np.ndarray, image_sizes: np.ndarray | None, resolution: int, bucket_sizes,
                 global_batch_size: int) -> HeldOutSet:
    """The held-out records and their sizes: the bucket each one's aspect ratio is nearest (`bucket_sizes`: the
    buckets the run trains at), or the square resolution."""
    if bucket_sizes is None:
        sizes = ((resolution, resolution),) * len(records)
    else:
        from t2i_flax.data.buckets import assign

        sizes = tuple(tuple(bucket_sizes[b]) for b in assign(image_sizes, list(bucket_sizes)))
    return HeldOutSet(np.asarray(records, np.int64), sizes, global_batch_size)
