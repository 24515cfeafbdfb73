"""Order: which records a run uses, their order per epoch, which host reads which slot, and each sample's
random stream. Pure functions of (seed, epoch, record/position): the same on every host and in every
worker process.

Records: all rows, or with max_train_samples the first N of a seeded shuffle, as the reference's
`dataset.shuffle(seed).select(range(N))` (the same permutation as `datasets`).

Per epoch a global permutation of the usable records (seeded by (seed, epoch)). Global batch b of the
epoch is permutation[b*G : (b+1)*G] with G = host batch x process count, and host p takes its slice
[p*B : (p+1)*B] of it. Hosts read disjoint records, the global batch does not depend on the number of
hosts, and the remainder (< G records) is dropped every epoch, like `drop_last=True` on the global batch
in the reference.

A sample's random choices (caption in a list, crop offsets, flip) come from numpy's generator seeded by
(seed, epoch, record index), drawn in a fixed order, so the same position always gives the same sample
whatever the worker count or host count.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Domain tags that keep the random streams of the permutation and of the per-sample choices apart.
_SHUFFLE_TAG = 0x5348554646  # "SHUFF"
_SAMPLE_TAG = 0x53414D504C  # "SAMPL"


def selected_records(num_rows: int, max_train_samples: int | None, seed: int) -> np.ndarray:
    """The record indices (int64) the run uses, in the order the scan and the epoch permutation see them."""
    if max_train_samples is None:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng(seed).permutation(num_rows)[: max(0, int(max_train_samples))].astype(np.int64)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**64, _SHUFFLE_TAG, epoch]).permutation(n)


def sample_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    """The generator of one sample's random choices."""
    return np.random.default_rng([seed % 2**64, _SAMPLE_TAG, epoch, record_index])


@dataclasses.dataclass(frozen=True)
class HostSlots:
    """Where a host-local sample position falls in the epochs' permutations."""

    host_batch_size: int
    process_index: int
    process_count: int
    steps_per_epoch: int

    @property
    def global_batch_size(self) -> int:
        return self.host_batch_size * self.process_count

    def slot(self, position: int) -> tuple[int, int]:
        """(epoch, index into the epoch's permutation) of a host-local sample position."""
        batch, j = divmod(position, self.host_batch_size)
        epoch, step = divmod(batch, self.steps_per_epoch)
        return epoch, step * self.global_batch_size + self.process_index * self.host_batch_size + j
