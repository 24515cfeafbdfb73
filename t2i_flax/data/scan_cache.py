"""The scan's result as a small JSON file, keyed by everything it depends on, so that a resumed run (or a
second run on the same data) reads it instead of decoding every image again.

The key: the dataset's identity (names, `datasets` fingerprint, row count, and the listing of every local
folder it came from: each file's relative path, size and mtime), the two columns, the record selection
(row count, max_train_samples, and the seed when max_train_samples shuffles), whether images are checked,
and the tokenizer (its vocabulary, merges and model_max_length: they decide the truncation count). A file
whose key differs in anything is stale: it is never used, the scan runs and overwrites it.

The body: the usable records as a bitmap over the record list (base64; 1M records = 167 KB), their images'
sizes (int32 width and height, base64; 1M images = 11 MB), the skipped
count with the first reasons, and the caption counts. Only process 0 writes (to a temporary name, then
renamed), when the caller says so (the trainer: once its inputs are all checked, since nothing is written
for a run that stops on bad input). Every process reads it; the processes then agree (one allgather of a
digest) and use it only when every one of them read the same valid result, else all of them scan, so no
host diverges.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from t2i_flax.data.scan import DataStats, HostGroup, ScanResult, scan_records

logger = logging.getLogger(__name__)

SCAN_FILE_FORMAT = 2  # 2: the usable images' sizes


class _MalformedScanFile(ValueError):
    """A scan file with the right key whose body is not what this module writes."""


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """{"class", "model_max_length", "sha256"}: the digest covers the vocabulary and merges (the backend's
    JSON without its per-call truncation/padding settings), or the vocabulary of a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "model_max_length": int(tokenizer.model_max_length),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def scan_key(*, dataset_identity: dict[str, Any] | None, image_column: str, caption_column: str, num_rows: int,
             max_train_samples: int | None, seed: int, validate_images: bool, tokenizer) -> dict[str, Any] | None:
    """The key of a scan (JSON values only). None when the dataset cannot be identified: then no file."""
    if dataset_identity is None:
        return None
    return {
        "dataset": dataset_identity,
        "columns": {"image": image_column, "caption": caption_column},
        "records": {"num_rows": int(num_rows), "max_train_samples": max_train_samples,
                    "seed": int(seed) if max_train_samples is not None else None},
        "validate_images": bool(validate_images),
        "tokenizer": tokenizer_identity(tokenizer),
    }


def scan_document(key: dict[str, Any], records: np.ndarray, result: ScanResult) -> dict[str, Any]:
    usable = np.isin(records, result.usable)
    stats = result.stats
    return {
        "format": SCAN_FILE_FORMAT,
        "key": key,
        "num_records": stats.num_records,
        "num_examples": stats.num_examples,
        "usable_bitmap": base64.b64encode(np.packbits(usable).tobytes()).decode("ascii"),
        "sizes": base64.b64encode(np.ascontiguousarray(result.sizes, dtype="<i4").tobytes()).decode("ascii"),
        "num_skipped_images": stats.num_skipped_images,
        "skipped": [[int(record), reason] for record, reason in stats.skipped],
        "num_captions": stats.num_captions,
        "num_truncated_captions": stats.num_truncated_captions,
    }


def _field(document: dict[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _MalformedScanFile(f"field {name!r} is {value!r}")
    return value


def result_from_document(document: dict[str, Any], records: np.ndarray) -> ScanResult:
    """The ScanResult of a document whose key matched; _MalformedScanFile when its body is inconsistent."""
    num_records = _field(document, "num_records", int)
    if num_records != len(records):
        raise _MalformedScanFile(f"{num_records} records in the file, {len(records)} now")
    packed = base64.b64decode(_field(document, "usable_bitmap", str), validate=True)
    if len(packed) != (num_records + 7) // 8:
        raise _MalformedScanFile(f"a bitmap of {len(packed)} bytes for {num_records} records")
    usable = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=num_records).astype(bool)
    skipped = []
    for entry in _field(document, "skipped", list):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and isinstance(entry[1], str)):
            raise _MalformedScanFile(f"skipped entry {entry!r}")
        skipped.append((entry[0], entry[1]))
    stats = DataStats(
        num_records=num_records, num_examples=_field(document, "num_examples", int),
        num_skipped_images=_field(document, "num_skipped_images", int), skipped=skipped,
        num_captions=_field(document, "num_captions", int),
        num_truncated_captions=_field(document, "num_truncated_captions", int),
    )
    if stats.num_examples != int(usable.sum()) or stats.num_skipped_images != num_records - stats.num_examples:
        raise _MalformedScanFile("counts that do not match the bitmap")
    sizes = np.frombuffer(base64.b64decode(_field(document, "sizes", str), validate=True), dtype="<i4")
    if sizes.size != 2 * stats.num_examples:
        raise _MalformedScanFile(f"{sizes.size // 2} image sizes for {stats.num_examples} usable records")
    return ScanResult(usable=np.asarray(records, dtype=np.int64)[usable], stats=stats,
                      sizes=sizes.reshape(-1, 2).astype(np.int32))


def read_scan_file(path: str, key: dict[str, Any], records: np.ndarray) -> ScanResult | None:
    """The result stored at `path` when its key is `key`; None (and a log line saying why) otherwise."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as error:  # unreadable here, or not JSON: this host scans
        logger.warning("cannot read the data scan file %s (%s: %s); scanning the images", path,
                       type(error).__name__, error)
        return None
    if not isinstance(document, dict) or document.get("format") != SCAN_FILE_FORMAT:
        logger.info("data scan file %s has another format; scanning the images", path)
        return None
    stored_key = document.get("key")
    if stored_key != key:
        differs = [name for name in key if not isinstance(stored_key, dict) or stored_key.get(name) != key[name]]
        logger.info("data scan file %s is stale (%s changed); scanning the images", path,
                    ", ".join(differs) or "key")
        return None
    try:
        return result_from_document(document, records)
    except (_MalformedScanFile, binascii.Error) as error:
        logger.warning("data scan file %s is damaged (%s); scanning the images", path, error)
        return None


def write_scan_file(path: str, key: dict[str, Any], records: np.ndarray, result: ScanResult) -> None:
    """Writes the document atomically (temporary name, then rename). A folder that cannot be written is a
    warning: the run goes on, and the next one scans again."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(scan_document(key, records, result), f)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not write the data scan file %s (%s: %s)", path, type(error).__name__, error)


def result_digest(result: ScanResult) -> bytes:
    digest = hashlib.sha256(np.ascontiguousarray(result.usable, dtype=np.int64).tobytes())
    digest.update(json.dumps(dataclasses.asdict(result.stats), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(result.sizes, dtype=np.int32).tobytes())
    return digest.digest()


def agree_on_cached(cached: ScanResult | None, group: HostGroup) -> bool:
    """True when every host of the group read the same valid result (one allgather of 33 bytes)."""
    if group.count == 1:
        return cached is not None
    mine = np.zeros(33, dtype=np.uint8)
    if cached is not None:
        mine[0] = 1
        mine[1:] = np.frombuffer(result_digest(cached), dtype=np.uint8)
    every = np.asarray(group.allgather(mine))
    return bool(every[0, 0] == 1 and (every == every[0]).all())


def load_or_scan(dataset, records: np.ndarray, *, image_column: str, caption_column: str, tokenizer,
                 validate_images: bool, group: HostGroup, key: dict[str, Any] | None, cache_path: str | None,
                 show_progress: bool) -> tuple[ScanResult, bool]:
    """(the scan result, whether it came from the file). Every host of the group takes the same branch.
    Writes nothing: the caller writes the file (write_scan_file, process 0) when its run may write."""
    cached = None
    if cache_path is not None and key is not None:
        cached = read_scan_file(cache_path, key, records)
    if agree_on_cached(cached, group):
        logger.info("data scan: read %s (%d usable records)", cache_path, cached.stats.num_examples)
        return cached, True
    result = scan_records(dataset, records, image_column=image_column, caption_column=caption_column,
                          tokenizer=tokenizer, validate_images=validate_images, group=group,
                          show_progress=show_progress)
    return result, False
