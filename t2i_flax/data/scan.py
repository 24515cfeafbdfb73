"""The scan: which records are usable (their image decodes), and caption counts, found by the hosts
together.

Each host scans only its share of the record list, positions p, p + P, p + 2P, ... (p = process index,
P = process count), then the hosts exchange their findings (one allgather of a bitmap and a small JSON
text) and every host merges them into the same ScanResult. The merge is a pure function of the shares,
so the result is the same for any P, and equal to one process scanning everything.

Per record: the caption is checked (a string or a non-empty list of strings) and counted, with how many
are longer than the tokenizer's limit; the image is decoded (JPEGs at 1/8 scale, which still reads all
the data) and its size is kept (aspect-ratio buckets are chosen from it, without opening the image again). An
image that does not decode is skipped with its reason. A caption that is not text, or an
image column that holds no images, is the user's DataError: a host that finds one stops and reports it,
and every host raises the one at the smallest position, so no host waits on the others in a collective
that never comes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from t2i_flax.data.images import inspect_image
from t2i_flax.data.sources import caption_choices
from t2i_flax.errors import DataError

MAX_SKIPPED_REASONS = 20  # (record, reason) pairs kept for the report
_CHUNK = 256  # records read from the dataset at a time
PROGRESS_MIN_RECORDS = 500  # a host share this large shows a progress bar on process 0

# allgather(tree of numpy arrays, same shapes on every host) -> the same tree, each leaf stacked over hosts.
Allgather = Callable[[Any], Any]


@dataclasses.dataclass
class DataStats:
    num_records: int  # rows used (after max_train_samples)
    num_examples: int  # rows with a readable image
    num_skipped_images: int
    skipped: list[tuple[int, str]]  # (record index, reason), first MAX_SKIPPED_REASONS in record-list order
    num_captions: int  # caption strings (every alternative of list captions)
    num_truncated_captions: int  # of those, longer than the tokenizer's model_max_length


@dataclasses.dataclass(eq=False)
class ScanResult:
    usable: np.ndarray  # int64 record indices with a readable image, in record-list order
    stats: DataStats
    sizes: np.ndarray | None = None  # int32 (len(usable), 2): each usable image's (width, height) as decoded


@dataclasses.dataclass
class HostScan:
    """One host's share of the scan: positions process_index, process_index + process_count, ... of the
    record list (positions index the record list, not the dataset)."""

    process_index: int
    process_count: int
    num_positions: int  # length of the whole record list
    usable_positions: np.ndarray  # int64, increasing
    sizes: np.ndarray  # int32 (len(usable_positions), 2): (width, height); zeros when images are not checked
    skipped: list[tuple[int, str]]  # (position, reason), the share's first MAX_SKIPPED_REASONS
    num_skipped: int
    num_captions: int
    num_truncated_captions: int
    error: tuple[int, str] | None  # the share's first DataError: (position, message)


@dataclasses.dataclass(frozen=True)
class HostGroup:
    """The processes that scan together: this one's index, their count, and how they allgather."""

    index: int
    count: int
    allgather: Allgather


def local_allgather(tree: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
    """The allgather of a group of one process: every array gets a leading axis of 1."""
    if isinstance(tree, dict):
        return {key: np.asarray(value)[None] for key, value in tree.items()}
    return np.asarray(tree)[None]


def jax_process_allgather(tree: Any) -> Any:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree)


def host_group(process_index: int, process_count: int) -> HostGroup:
    """The jax processes when the loader's hosts are them (jax.distributed), else this process alone
    (the scan is then done whole here: hosts simulated in one process cannot exchange anything)."""
    if process_count > 1:
        import jax

        if jax.process_count() == process_count and jax.process_index() == process_index:
            return HostGroup(process_index, process_count, jax_process_allgather)
    return HostGroup(0, 1, local_allgather)


def share_positions(num_positions: int, process_index: int, process_count: int) -> np.ndarray:
    return np.arange(process_index, num_positions, process_count, dtype=np.int64)


def _check_image_or_error(value: Any) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(reason the image is unreadable or None, its size or None, DataError message or None) for one image."""
    try:
        return *inspect_image(value), None
    except DataError as error:  # the wrong column: reported to every host, then raised by all
        return None, None, str(error)


def scan_host_share(
    dataset,
    records: np.ndarray,
    *,
    image_column: str,
    caption_column: str,
    tokenizer,
    validate_images: bool,
    process_index: int,
    process_count: int,
    num_threads: int,
    show_progress: bool = False,
) -> HostScan:
    """Scans positions process_index::process_count of `records` (see the module docstring)."""
    from tqdm.auto import tqdm

    from t2i_flax.tokenizer import count_truncated

    positions = share_positions(len(records), process_index, process_count)
    captions_only = dataset.select_columns([caption_column])
    usable, sizes, skipped = [], [], []
    num_skipped = num_captions = num_truncated = 0
    error = None
    progress = tqdm(total=len(positions), desc="checking images", unit="img", dynamic_ncols=True,
                    disable=not show_progress)
    with progress, concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
        for start in range(0, len(positions), _CHUNK):
            chunk_positions = [int(p) for p in positions[start:start + _CHUNK]]
            chunk_records = [int(records[p]) for p in chunk_positions]
            rows = (dataset if validate_images else captions_only)[chunk_records]
            caption_error = None
            captions = []
            for position, record, caption in zip(chunk_positions, chunk_records, rows[caption_column]):
                try:
                    captions.extend(caption_choices(caption, caption_column, record))
                except DataError as bad_caption:
                    caption_error = (position, str(bad_caption))
                    break
            num_captions += len(captions)
            num_truncated += count_truncated(tokenizer, captions)
            if validate_images:
                checks = list(pool.map(_check_image_or_error, rows[image_column]))
            else:
                checks = [(None, (0, 0), None)] * len(chunk_positions)
            image_error = next(((p, message) for p, (_, _, message) in zip(chunk_positions, checks)
                                if message is not None), None)
            errors = [e for e in (caption_error, image_error) if e is not None]
            if errors:
                error = min(errors, key=lambda e: e[0])  # a caption's error first at the same position
                break
            for position, (reason, size, _) in zip(chunk_positions, checks):
                if reason is None:
                    usable.append(position)
                    sizes.append(size)
                else:
                    num_skipped += 1
                    if len(skipped) < MAX_SKIPPED_REASONS:
                        skipped.append((position, reason))
            progress.update(len(chunk_positions))
    return HostScan(process_index=process_index, process_count=process_count, num_positions=len(records),
                    usable_positions=np.asarray(usable, dtype=np.int64),
                    sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2), skipped=skipped, num_skipped=num_skipped,
                    num_captions=num_captions, num_truncated_captions=num_truncated, error=error)


def merge_host_scans(records: np.ndarray, scans: Sequence[HostScan]) -> ScanResult:
    """Every host's share -> the scan of the whole record list (or the DataError at the smallest position)."""
    scans = sorted(scans, key=lambda s: s.process_index)
    count = len(scans)
    if [s.process_index for s in scans] != list(range(count)) or any(s.process_count != count for s in scans):
        raise ValueError(f"need the shares of processes 0..{count - 1}, got "
                         f"{[(s.process_index, s.process_count) for s in scans]}")
    if any(s.num_positions != len(records) for s in scans):
        raise ValueError("the shares were scanned over record lists of different lengths")
    errors = [s.error for s in scans if s.error is not None]
    if errors:
        raise DataError(min(errors, key=lambda e: e[0])[1])
    usable_positions = np.sort(np.concatenate([s.usable_positions for s in scans]))
    sizes = np.zeros((len(records), 2), np.int32)
    for share in scans:
        sizes[share.usable_positions] = share.sizes
    skipped = sorted((p, reason) for s in scans for p, reason in s.skipped)[:MAX_SKIPPED_REASONS]
    stats = DataStats(
        num_records=len(records), num_examples=len(usable_positions),
        num_skipped_images=sum(s.num_skipped for s in scans),
        skipped=[(int(records[p]), reason) for p, reason in skipped],
        num_captions=sum(s.num_captions for s in scans),
        num_truncated_captions=sum(s.num_truncated_captions for s in scans),
    )
    return ScanResult(usable=np.asarray(records, dtype=np.int64)[usable_positions], stats=stats,
                      sizes=sizes[usable_positions])


def exchange_host_scans(scan: HostScan, allgather: Allgather) -> list[HostScan]:
    """This host's share -> every host's share, through two allgathers (text lengths, then a usable-position
    bitmap and the image sizes over the whole record list, and the padded JSON text of the rest)."""
    bitmap = np.zeros(scan.num_positions, dtype=bool)
    bitmap[scan.usable_positions] = True
    sizes = np.zeros((scan.num_positions, 2), np.int32)
    sizes[scan.usable_positions] = scan.sizes
    text = json.dumps({
        "skipped": scan.skipped, "num_skipped": scan.num_skipped, "num_captions": scan.num_captions,
        "num_truncated_captions": scan.num_truncated_captions, "error": scan.error,
    }).encode()
    lengths = np.asarray(allgather(np.asarray([len(text)], dtype=np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[:len(text)] = np.frombuffer(text, dtype=np.uint8)
    gathered = allgather({"bitmap": np.packbits(bitmap), "sizes": sizes, "text": padded})
    bitmaps, texts = np.asarray(gathered["bitmap"]), np.asarray(gathered["text"])
    every_sizes = np.asarray(gathered["sizes"])
    scans = []
    for index, length in enumerate(lengths):
        fields = json.loads(texts[index, :int(length)].tobytes())
        usable = np.flatnonzero(np.unpackbits(bitmaps[index], count=scan.num_positions)).astype(np.int64)
        scans.append(HostScan(
            process_index=index, process_count=len(lengths), num_positions=scan.num_positions,
            usable_positions=usable, sizes=every_sizes[index][usable], skipped=[(int(p), str(r)) for p, r in fields["skipped"]],
            num_skipped=int(fields["num_skipped"]), num_captions=int(fields["num_captions"]),
            num_truncated_captions=int(fields["num_truncated_captions"]),
            error=None if fields["error"] is None else (int(fields["error"][0]), str(fields["error"][1])),
        ))
    return scans


def scan_records(dataset, records: np.ndarray, *, image_column: str, caption_column: str, tokenizer,
                 validate_images: bool, group: HostGroup, show_progress: bool) -> ScanResult:
    """This host's share, exchanged with the group's other hosts, merged: the same result on every host."""
    share = scan_host_share(
        dataset, records, image_column=image_column, caption_column=caption_column, tokenizer=tokenizer,
        validate_images=validate_images, process_index=group.index, process_count=group.count,
        num_threads=max(2, min(32, os.cpu_count() or 1)),
        show_progress=show_progress and len(records) // group.count >= PROGRESS_MIN_RECORDS,
    )
    return merge_host_scans(records, exchange_host_scans(share, group.allgather))
