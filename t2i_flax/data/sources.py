"""Sources: the "train" split of a `datasets` dataset or an imagefolder, its two columns, its captions,
and what identifies it (for the scan cache).

dataset_name: a Hub dataset (from the local cache when offline), a local folder that `load_dataset`
understands (parquet/json/csv/imagefolder...), or a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`. Otherwise train_data_dir is read as an imagefolder (metadata.jsonl or
metadata.csv with `file_name` and the caption column).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from t2i_flax.errors import DataError, one_line


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
):
    """The "train" split as a `datasets.Dataset` (sources in the module docstring)."""
    import datasets

    if dataset_name is not None:
        is_saved = os.path.isdir(dataset_name) and any(
            os.path.exists(os.path.join(dataset_name, f)) for f in ("state.json", "dataset_dict.json")
        )
        if is_saved:
            loaded = datasets.load_from_disk(dataset_name)
        else:
            loaded = _load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
    elif train_data_dir is not None:
        loaded = _load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    else:
        raise DataError("give --dataset_name or --train_data_dir")
    return train_split(loaded)


def _load_dataset(name, config_name=None, **kwargs):
    """datasets.load_dataset. What it raises for a name, folder or config that is not there (or not cached
    when offline) is an OSError (DatasetNotFoundError among them) or a ValueError: the user's DataError."""
    import datasets

    where = name if kwargs.get("data_dir") is None else f"{name} (data_dir {kwargs['data_dir']})"
    try:
        return datasets.load_dataset(name, config_name, **kwargs)
    except (OSError, ValueError) as error:
        raise DataError(f"could not load the dataset {where}: {one_line(error)}") from None


def train_split(loaded):
    """The "train" split of a DatasetDict, or the Dataset itself; a DataError for anything else."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"the dataset has no 'train' split; splits: {', '.join(loaded)}")
        loaded = loaded["train"]
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"need a map-style datasets.Dataset (random access), got {type(loaded).__name__}")
    return loaded


def prepare_columns(dataset, image_column: str, caption_column: str):
    """Checks the columns, keeps only those two, and turns off image decoding by `datasets`."""
    import datasets

    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise DataError(f"{flag} {column!r} is not a column of the dataset; columns: {', '.join(columns)}")
    dataset = dataset.select_columns(list(dict.fromkeys([image_column, caption_column])))
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def caption_choices(caption: Any, caption_column: str, record_index: int) -> list[str]:
    """A record's caption as a list of alternatives; a DataError when it is not text."""
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, (list, tuple, np.ndarray)):
        choices = list(caption)
        if choices and all(isinstance(c, str) for c in choices):
            return choices
        what = "an empty list" if not choices else "a list with non-string items"
    else:
        what = type(caption).__name__
    raise DataError(
        f"caption column {caption_column!r} should contain strings or lists of strings; "
        f"record {record_index} has {what}"
    )


def folder_listing(folder: str) -> dict[str, Any]:
    """{"files": count, "sha256": digest} of every file under `folder`: relative path, size, mtime (ns).

    Any added, removed, resized or rewritten file (or metadata.jsonl edit) changes the digest.
    """
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            info = os.stat(path)
            relative = os.path.relpath(path, folder)
            digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def dataset_identity(dataset, *, dataset_name: str | None, dataset_config_name: str | None,
                     train_data_dir: str | None) -> dict[str, Any] | None:
    """What identifies the rows of `dataset`, as JSON: the names it was loaded by, the `datasets`
    fingerprint (a hash of its source files or content and of the transforms applied), its row count,
    and the listing of every local folder it came from. None when the dataset has no fingerprint
    (then nothing about it can be cached)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not isinstance(fingerprint, str):
        return None
    local_folders = {}
    for role, where in (("dataset_name", dataset_name), ("train_data_dir", train_data_dir)):
        if where is not None and os.path.isdir(where):
            local_folders[role] = folder_listing(where)
    return {
        "dataset_name": dataset_name,
        "dataset_config_name": dataset_config_name,
        "train_data_dir": train_data_dir,
        "fingerprint": fingerprint,
        "num_rows": len(dataset),
        "local_folders": local_folders,
    }
