"""The loader: source -> scan (or its cached file) -> the per-position example function -> Grain pipeline
-> host-local numpy batches, through a checkpointable iterator.

Resume: the iterator's state is {"next_batch": k, ...}. The pipeline is a random-access Grain
MapDataset, so restoring rebuilds it starting at batch k: exact, O(1), and valid for any
num_workers and any process count with the same global batch. The state also holds a digest of the
usable record list (and, with aspect-ratio buckets, of the bucket table and each record's bucket), so a resume
onto a different list (files changed) is refused instead of silently training on another order.
"""
from __future__ import annotations

import atexit
import copy
import functools
import hashlib
import logging
import os
import weakref
from typing import Any, Callable

import grain
import numpy as np

from t2i_flax.config import DataConfig
from t2i_flax.data import buckets as bucketing
from t2i_flax.data import held_out
from t2i_flax.data.captions import TagOptions
from t2i_flax.data.examples import ExampleAt
from t2i_flax.data.order import HostSlots, selected_records
from t2i_flax.data.scan import DataStats, host_group
from t2i_flax.data import scan_cache
from t2i_flax.data.sources import dataset_identity, load_train_dataset, prepare_columns, train_split
from t2i_flax.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

_STATE_VERSION = 2  # 2: the state holds records_digest

_LIVE_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    """Stops worker processes and frees their shared memory before the interpreter tears modules
    down (grain's own __del__ cleanup fails at that point and leaks shared memory)."""
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


class TrainIterator(grain.DatasetIterator):
    """Yields host-local batches {"pixel_values": float32 (B,3,R,R), "input_ids": int32 (B,L)}.

    get_state() -> {"next_batch": k, ...} (JSON-able); set_state(state) continues at batch k exactly.
    Also a grain DatasetIterator, so grain's Orbax handler (grain.checkpoint) can save it.
    """

    def __init__(self, loader: "TrainLoader", start_batch: int = 0):
        super().__init__()
        self._loader = loader
        self._next_batch = 0
        self._inner = None
        self._start(start_batch)

    def _start(self, start_batch: int) -> None:
        """Positions the iterator; the grain pipeline (and its workers) starts lazily on first use."""
        if not 0 <= start_batch <= self._loader.total_batches:
            raise ValueError(f"batch {start_batch} is outside this loader's {self._loader.total_batches} batches")
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._next_batch = start_batch

    def _ensure_started(self) -> None:
        if self._inner is None:
            self._inner = iter(self._loader._pipeline(self._next_batch))
            _LIVE_ITERATORS.add(self)

    @property
    def next_batch(self) -> int:
        """Index (over all epochs) of the batch the next call returns."""
        return self._next_batch

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        self._ensure_started()
        batch = next(self._inner)
        self._next_batch += 1
        # Worker batches arrive in shared memory; plain arrays release it now, not at interpreter exit.
        return {key: np.array(value) for key, value in batch.items()}

    def get_state(self) -> dict[str, Any]:
        loader = self._loader
        return {
            "version": _STATE_VERSION,
            "next_batch": self._next_batch,
            "seed": loader.seed,
            "global_batch_size": loader.global_batch_size,
            "num_examples": loader.num_examples,
            "records_digest": loader.records_digest,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        loader = self._loader
        expected = {"version": _STATE_VERSION, "seed": loader.seed, "global_batch_size": loader.global_batch_size,
                    "num_examples": loader.num_examples, "records_digest": loader.records_digest}
        for key, value in expected.items():
            if state.get(key) != value:
                raise CheckpointError(
                    f"data iterator state does not match this loader: {key}={state.get(key)!r} in the "
                    f"checkpoint, {value!r} now (exact resume needs the same data, seed and global batch)"
                )
        self._start(int(state["next_batch"]))

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(next_batch={self._next_batch})"


def _start_worker(worker_index: int, worker_count: int) -> None:
    """In each decode worker, before it reads anything.

    SIGINT and SIGTERM are ignored: this process's owner stops it. A Ctrl-C at a terminal, `timeout`, a
    scheduler's stop signal the whole process group, workers included, while the trainer finishes its step and
    then closes its iterator, which stops the workers. Killed by the signal instead, a worker leaks the shared
    memory of the batch it holds (grain unlinks only what reached its queue), and one killed while writing a
    batch into the queue's pipe leaves half a message there, which close() then waits for forever (grain 0.2.18:
    ProcessPrefetchDatasetIterator._stop_prefetch reads the queue empty with get_nowait, and a message whose
    writer died never ends, as the training process holds the pipe's write end too). CPython's resource tracker,
    also a helper process, ignores the two signals too.

    The worker exits when the training process is gone, also after a SIGKILL (a preempted VM, an OOM kill),
    which leaves it no chance to stop its workers; else they would linger, holding memory and the parent's
    output pipes. (Not prctl(PR_SET_PDEATHSIG): that follows the thread that started the worker, and grain
    starts them from threads that end.)"""
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="t2i_flax-parent-watch", daemon=True).start()


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18's mp_prefetch reads an absl flag (worker profiling) and fails with
    UnparsedFlagAccessError in programs that do not parse absl flags (google/grain#1355, fixed
    upstream later). Marking the flags parsed leaves every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def records_digest(records: np.ndarray, buckets: "bucketing.BucketPlan | None" = None) -> str:
    """A short digest of the usable record list (what the epoch permutations index) and, with aspect-ratio buckets,
    of the bucket sizes and each record's bucket (what the epochs' batches are made of)."""
    digest = hashlib.sha256(np.ascontiguousarray(records, dtype=np.int64).tobytes())
    if buckets is not None:
        digest.update(repr(buckets.sizes).encode())
        digest.update(np.ascontiguousarray(buckets.bucket_of, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


class TrainLoader:
    """Host-local training batches over epochs. Build with `build_train_loader`.

    Attributes: num_examples (usable records that train, all hosts), steps_per_epoch, host_batch_size,
    global_batch_size, num_epochs (None: unbounded), total_batches, stats (DataStats),
    scan_from_cache (the scan result was read from the scan file), records_digest, held_out (data/held_out.py's
    HeldOutSet with --validation_split, else None).
    """

    held_out = None  # --validation_split's HeldOutSet (build_train_loader sets it)

    def __init__(self, example_fn: ExampleAt, stats: DataStats, *, num_epochs: int | None, num_workers: int,
                 prefetch_batches: int, scan_from_cache: bool = False,
                 unwritten_scan_file: Callable[[], None] | None = None):
        slots = example_fn.slots
        self._example_fn = example_fn
        self.stats = stats
        self.scan_from_cache = scan_from_cache
        self._unwritten_scan_file = unwritten_scan_file
        self.records_digest = records_digest(example_fn.records, example_fn.buckets)
        self.buckets = example_fn.buckets  # buckets.BucketPlan, or None
        self.seed = example_fn.seed
        self.host_batch_size = slots.host_batch_size
        self.global_batch_size = slots.global_batch_size
        self.process_index, self.process_count = slots.process_index, slots.process_count
        self.resolution = example_fn.resolution
        self.num_examples = len(example_fn.records)  # the trained ones (--validation_split holds out the others)
        self.steps_per_epoch = slots.steps_per_epoch
        self.num_epochs = num_epochs
        self.total_batches = (
            self.steps_per_epoch * num_epochs if num_epochs is not None
            else (2**62 // self.host_batch_size)  # "forever"
        )
        self.num_workers = num_workers
        self.prefetch_batches = prefetch_batches

    def __len__(self) -> int:
        return self.num_examples

    @property
    def example_fn(self) -> ExampleAt:
        return self._example_fn

    def with_examples(self, example_fn) -> "TrainLoader":
        """The same loader (order, sharding, resume state) over another per-position example function, e.g.
        one reading cached latents (data/latent_cache.py)."""
        other = copy.copy(self)
        other._example_fn = example_fn
        return other

    def write_scan_file(self) -> bool:
        """Writes the scan file now, if this loader holds one to write (process 0, after a scan, with a
        scan_cache_path and write_scan_file=False at build). True when it wrote."""
        write, self._unwritten_scan_file = self._unwritten_scan_file, None
        if write is None:
            return False
        write()
        return True

    def _pipeline(self, start_batch: int):
        b = self.host_batch_size
        dataset = (
            grain.MapDataset.range(start_batch * b, self.total_batches * b)
            .map(self._example_fn)
            .batch(b, drop_remainder=True)
        )
        if self.num_workers > 0:
            _mark_absl_flags_parsed()
            # Each worker process computes whole batches ahead into its own buffer.
            return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers,
                                             per_worker_buffer_size=self.prefetch_batches),
                worker_init_fn=_start_worker,
            )
        # In process: threads decode the next batches (PIL releases the GIL while decoding/resizing).
        return dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=self.prefetch_batches, prefetch_buffer_size=self.prefetch_batches)
        )

    def iterator(self, start_batch: int = 0) -> TrainIterator:
        return TrainIterator(self, start_batch)

    def __iter__(self) -> TrainIterator:
        return self.iterator()

    def restore(self, state: dict[str, Any]) -> TrainIterator:
        """A new iterator positioned by a state from TrainIterator.get_state()."""
        iterator = self.iterator(0)
        iterator.set_state(state)
        return iterator


def build_train_loader(
    data_config: DataConfig,
    tokenizer,
    *,
    host_batch_size: int,
    seed: int,
    cache_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    dataset: Any = None,
    num_epochs: int | None = None,
    prefetch_batches: int = 2,
    validate_images: bool = True,
    scan_cache_path: str | None = None,
    write_scan_file: bool = True,
    tokenizer_2=None,
    size_conditioning: bool = False,
) -> TrainLoader:
    """Builds the training loader of this host (order and sharding: data/order.py; resume: above).

    data_config: the source (dataset_name, dataset_config_name, train_data_dir), its columns,
    max_train_samples, resolution, center_crop, random_flip, dataloader_num_workers (decode processes,
    0 = in this process) and the aspect-ratio bucket flags. dataset: an already loaded `datasets.Dataset`; the config's names then only say
    where it came from (they are part of its identity, which keys the scan file and a latent cache).
    cache_dir: the `datasets` cache. host_batch_size: per-device batch x local device count.
    process_index / process_count default to jax.process_index() / jax.process_count().
    num_epochs: None = iterate forever. validate_images: scan the images and drop undecodable ones.
    scan_cache_path: a JSON file for the scan's result (data/scan_cache.py): read when it matches this
    dataset and these options, else written by process 0 after the scan; with write_scan_file=False
    only when the caller calls loader.write_scan_file() (a trainer writes nothing before its inputs are
    all checked). When the hosts are jax processes (jax.distributed), each scans only its share of the
    records and they exchange the results. tokenizer_2 / size_conditioning: SDXL's second tokenizer and its
    time ids (family.StableDiffusionXL).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if host_batch_size < 1 or prefetch_batches < 1:
        raise ValueError("host_batch_size and prefetch_batches must be >= 1")
    dataset_name, dataset_config_name = data_config.dataset_name, data_config.dataset_config_name
    train_data_dir, max_train_samples = data_config.train_data_dir, data_config.max_train_samples
    image_column, caption_column = data_config.image_column, data_config.caption_column
    if dataset is None:
        dataset = load_train_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    dataset = prepare_columns(train_split(dataset), image_column, caption_column)

    records = selected_records(len(dataset), max_train_samples, seed)
    key = None
    identity = dataset_identity(dataset, dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                                train_data_dir=train_data_dir)
    if scan_cache_path is not None:
        key = scan_cache.scan_key(
            dataset_identity=identity, image_column=image_column, caption_column=caption_column,
            num_rows=len(dataset), max_train_samples=max_train_samples, seed=seed,
            validate_images=validate_images, tokenizer=tokenizer)
    scan, scan_from_cache = scan_cache.load_or_scan(
        dataset, records, image_column=image_column, caption_column=caption_column, tokenizer=tokenizer,
        validate_images=validate_images, group=host_group(process_index, process_count), key=key,
        cache_path=scan_cache_path, show_progress=process_index == 0)
    unwritten_scan_file = None
    if key is not None and not scan_from_cache and process_index == 0:
        unwritten_scan_file = functools.partial(scan_cache.write_scan_file, scan_cache_path, key, records, scan)
    stats = scan.stats
    if stats.num_skipped_images:
        first, reason = stats.skipped[0]
        logger.warning("skipped %d of %d images that could not be decoded (first: record %d, %s)",
                       stats.num_skipped_images, stats.num_records, first, reason)
    if stats.num_truncated_captions:
        logger.warning("%d of %d captions are longer than %d tokens and were truncated",
                       stats.num_truncated_captions, stats.num_captions, tokenizer.model_max_length)
    if stats.num_examples == 0:
        raise DataError(f"no readable image among the {stats.num_records} records of the dataset")
    global_batch_size = host_batch_size * process_count
    trained, trained_sizes, held_out_mask = scan.usable, scan.sizes, None
    if data_config.validation_split:  # the held-out images never enter an epoch (data/held_out.py)
        held_out_mask = held_out.choose(data_config.validation_split, len(scan.usable), global_batch_size, seed)
        trained, trained_sizes = scan.usable[~held_out_mask], scan.sizes[~held_out_mask]
    bucket_plan = None
    if data_config.aspect_ratio_buckets:
        if not validate_images:
            raise ValueError("aspect-ratio buckets need the images' sizes: scan with validate_images=True")
        bucket_plan = bucketing.make_plan(trained_sizes, data_config.resolution, data_config.bucket_step,
                                          data_config.min_bucket_resolution, data_config.bucket_max_side,
                                          global_batch_size, seed)
        steps_per_epoch = bucket_plan.steps_per_epoch
    else:
        steps_per_epoch = len(trained) // global_batch_size
    slots = HostSlots(host_batch_size=host_batch_size, process_index=process_index, process_count=process_count,
                      steps_per_epoch=steps_per_epoch)
    if slots.steps_per_epoch == 0:
        raise DataError(f"the dataset has {stats.num_examples} usable images, fewer than one global batch "
                        f"({slots.global_batch_size}); lower --train_batch_size")
    example_fn = ExampleAt(dataset, trained, image_column=image_column, caption_column=caption_column,
                           tokenizer=tokenizer, resolution=data_config.resolution,
                           center_crop=data_config.center_crop, random_flip=data_config.random_flip, seed=seed,
                           slots=slots, tokenizer_2=tokenizer_2, size_conditioning=size_conditioning,
                           proportion_empty_prompts=data_config.proportion_empty_prompts,
                           tags=TagOptions(shuffle=data_config.shuffle_caption, keep_tokens=data_config.keep_tokens,
                                           dropout=data_config.caption_tag_dropout,
                                           separator=data_config.caption_separator),
                           interpolation=data_config.image_interpolation_mode, buckets=bucket_plan)
    loader = TrainLoader(example_fn, stats, num_epochs=num_epochs, num_workers=data_config.dataloader_num_workers,
                         prefetch_batches=prefetch_batches, scan_from_cache=scan_from_cache,
                         unwritten_scan_file=unwritten_scan_file)
    loader.dataset_identity = identity  # what a latent cache of this data is keyed by (None: not cacheable)
    loader.held_out = None if held_out_mask is None else held_out.held_out_set(
        scan.usable[held_out_mask], scan.sizes[held_out_mask], data_config.resolution,
        None if bucket_plan is None else bucket_plan.used_sizes, global_batch_size)
    if write_scan_file:
        loader.write_scan_file()
    return loader
