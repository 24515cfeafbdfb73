"""Training input pipeline: a captioned image dataset -> host-local numpy batches, on Grain.

Path of one example (record = a row of the `datasets` dataset):

  dataset row --decode_image--> RGB PIL image --preprocess_image--> float32 (3, R, R) in [-1, 1]
  dataset row --pick caption (string, or one of a list)--> tokenizer --> int32 (model_max_length,)

The transforms reproduce the reference PyTorch/torchvision pipeline on PIL images exactly
(Resize(R, bilinear) of the short side = PIL.Image.resize(BILINEAR) with torchvision's size rule,
CenterCrop with torchvision's rounding or RandomCrop(R), optional horizontal flip,
ToTensor + Normalize([0.5], [0.5])), with PIL and numpy only.

Image modes: everything becomes 8-bit RGB. Images with transparency (RGBA, LA, PA, RGBa, P or L/RGB
with a transparent colour) are composited on WHITE: rgb = 255 - round((255 - c) * alpha / 255)
(the reference, `convert("RGB")`, drops alpha, which turns transparent areas into whatever colour
they hold, often black). 16-bit modes (I;16*) are scaled by 1/257 (PIL would clip them to 255);
"I" (int32) is scaled the same way when its maximum exceeds 255, else used as is; "F" (float) is
taken as [0, 1] when its maximum is <= 1, else as [0, 255]; EXIF orientation is applied (as
`datasets` does when it decodes).

Randomness: a sample's random choices (caption in a list, crop offsets, flip) come from
numpy's generator seeded by (seed, epoch, record index), drawn in that fixed order, so the same
position always gives the same sample whatever the worker count or host count.

Order and sharding: per epoch a global permutation of the usable records (seeded by (seed, epoch)).
Global batch b of the epoch is permutation[b*G : (b+1)*G] with G = host batch x process count, and
host p takes its slice [p*B : (p+1)*B] of it. Hosts read disjoint records, the global batch does not
depend on the number of hosts, and the remainder (< G records) is dropped every epoch, like
`drop_last=True` on the global batch in the reference.

Unreadable images: a pre-scan (full decode; JPEGs decoded at 1/8 scale, which still reads all the
data) drops records whose image cannot be decoded, counts them, and logs one warning. A decode that
still fails during training (file changed, I/O error) is replaced by the next record of the epoch's
permutation and logged; it never crashes the run.

Resume: the iterator's state is {"next_batch": k, ...}. The pipeline is a random-access Grain
MapDataset, so restoring rebuilds it starting at batch k: exact, O(1), and valid for any
num_workers and any process count with the same global batch.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import io
import logging
import os
import weakref
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Domain tags that keep the random streams of the permutation and of the per-sample choices apart.
_SHUFFLE_TAG = 0x5348554646  # "SHUFF"
_SAMPLE_TAG = 0x53414D504C  # "SAMPL"
_STATE_VERSION = 1
_MAX_REPLACEMENTS = 64  # a failing record is replaced by at most this many successors
_SCAN_CHUNK = 256

# ToTensor + Normalize([0.5], [0.5]) of every uint8 value, computed as torch does in float32.
_UINT8_TO_UNIT = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)


# ----------------------------------------------------------------------------------------------
# Images: decode, mode -> RGB, transforms
# ----------------------------------------------------------------------------------------------


def _open_image(value: Any) -> Image.Image:
    """Opens an image given as PIL image, {"bytes", "path"} dict, path, raw bytes or HWC uint8 array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return Image.open(io.BytesIO(data))
        if path is None:
            raise ValueError("image record has neither bytes nor path")
        value = path
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:  # read whole file: no file handle stays open (multi-frame images)
            return Image.open(io.BytesIO(f.read()))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def image_to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return _gray_to_rgb(np.rint(np.asarray(image).astype(np.float64) / 257.0))
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and values.max() > 255:
            return _gray_to_rgb(np.rint(np.clip(values, 0, 65535) / 257.0))
        return _gray_to_rgb(np.clip(values, 0, 255))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            return _gray_to_rgb(np.rint(np.clip(values, 0, 1) * 255))
        return _gray_to_rgb(np.rint(np.clip(values, 0, 255)))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA")).astype(np.int32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        # 255 - round((255 - c) * a / 255), halves rounded up: compositing on white.
        out = 255 - ((255 - rgb) * alpha + 127) // 255
        return Image.fromarray(out.astype(np.uint8), "RGB")
    return image.convert("RGB")


def decode_image(value: Any) -> Image.Image:
    """Decodes one image record fully into an RGB PIL image (EXIF orientation applied). Raises on failure."""
    image = _open_image(value)
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image_to_rgb(image)


def check_image(value: Any) -> str | None:
    """Returns None when the image decodes, else the reason ("OSError: ...").

    JPEGs are decoded at 1/8 scale (draft mode): all of the data is still read and checked, at a
    fraction of the cost.
    """
    try:
        image = _open_image(value)
        if getattr(image, "format", None) == "JPEG":
            image.draft(None, (1, 1))
        image.load()
        image_to_rgb(image)
        return None
    except Exception as e:  # any failure means: skip the record
        return f"{type(e).__name__}: {e}"


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resolution): the short side becomes `resolution`."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_offsets(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop (Python round, i.e. halves to even)."""
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))


def preprocess_image(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """RGB PIL image -> float32 (3, R, R) in [-1, 1], as Resize/Crop/Flip/ToTensor/Normalize.

    Draws from `rng`, always in this order and always both: crop top, crop left (integers, used
    only for random crop), flip (a float, used only with random_flip).
    """
    width, height = image.size
    new_width, new_height = resized_size(width, height, resolution)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    random_top = int(rng.integers(0, new_height - resolution + 1))
    random_left = int(rng.integers(0, new_width - resolution + 1))
    flip = rng.random() < 0.5
    if center_crop:
        top, left = center_crop_offsets(new_width, new_height, resolution)
    else:
        top, left = random_top, random_left
    if (top, left, new_width, new_height) != (0, 0, resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image).transpose(2, 0, 1)  # (R, R, 3) uint8 HWC -> CHW view
    if random_flip and flip:
        pixels = pixels[:, :, ::-1]
    return _UINT8_TO_UNIT[pixels]  # the lookup writes a new C-contiguous float32 (3, R, R)


def sample_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    """The generator of one sample's random choices."""
    return np.random.default_rng([seed % 2**64, _SAMPLE_TAG, epoch, record_index])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**64, _SHUFFLE_TAG, epoch]).permutation(n)


# ----------------------------------------------------------------------------------------------
# Dataset loading and validation
# ----------------------------------------------------------------------------------------------


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
):
    """The "train" split as a `datasets.Dataset`.

    dataset_name: a Hub dataset (from the local cache when offline), a local folder that
    `load_dataset` understands (parquet/json/csv/imagefolder...), or a folder written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. Otherwise train_data_dir is read as an
    imagefolder (metadata.jsonl or metadata.csv with `file_name` and the caption column).
    """
    import datasets

    if dataset_name is not None:
        is_saved = os.path.isdir(dataset_name) and any(
            os.path.exists(os.path.join(dataset_name, f)) for f in ("state.json", "dataset_dict.json")
        )
        if is_saved:
            loaded = datasets.load_from_disk(dataset_name)
        else:
            loaded = datasets.load_dataset(
                dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir
            )
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} is not a folder")
        loaded = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    else:
        raise ValueError("give --dataset_name or --train_data_dir")
    return _train_split(loaded)


def _train_split(loaded):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"the dataset has no 'train' split; splits: {', '.join(loaded)}")
        loaded = loaded["train"]
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(f"need a map-style datasets.Dataset (random access), got {type(loaded).__name__}")
    return loaded


def _prepare_columns(dataset, image_column: str, caption_column: str):
    """Checks the columns, keeps only those two, and turns off image decoding by `datasets`."""
    import datasets

    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column of the dataset; columns: {', '.join(columns)}")
    dataset = dataset.select_columns(list(dict.fromkeys([image_column, caption_column])))
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _caption_choices(caption: Any, caption_column: str, record_index: int) -> list[str]:
    """A record's caption as a list of alternatives; a clear ValueError when it is not text."""
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, (list, tuple, np.ndarray)):
        choices = list(caption)
        if choices and all(isinstance(c, str) for c in choices):
            return choices
        what = "an empty list" if not choices else "a list with non-string items"
    else:
        what = type(caption).__name__
    raise ValueError(
        f"caption column {caption_column!r} should contain strings or lists of strings; "
        f"record {record_index} has {what}"
    )


@dataclasses.dataclass
class DataStats:
    num_records: int  # rows used (after max_train_samples)
    num_examples: int  # rows with a readable image
    num_skipped_images: int
    skipped: list[tuple[int, str]]  # (record index, reason), first 20
    num_captions: int  # caption strings (every alternative of list captions)
    num_truncated_captions: int  # of those, longer than the tokenizer's model_max_length


def _scan(dataset, records: np.ndarray, image_column, caption_column, tokenizer, validate_images, num_threads):
    """Validates captions (types, truncation count) and images of `records`; returns (usable, stats)."""
    from t2i_flax.tokenizer import count_truncated

    captions_only = dataset.select_columns([caption_column])
    usable, skipped = [], []
    num_captions = num_truncated = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
        for start in range(0, len(records), _SCAN_CHUNK):
            chunk = [int(r) for r in records[start : start + _SCAN_CHUNK]]
            rows = (dataset if validate_images else captions_only)[chunk]
            images = rows[image_column] if validate_images else [None] * len(chunk)
            captions = []
            for record, caption in zip(chunk, rows[caption_column]):
                captions.extend(_caption_choices(caption, caption_column, record))
            num_captions += len(captions)
            num_truncated += count_truncated(tokenizer, captions)
            reasons = pool.map(check_image, images) if validate_images else [None] * len(chunk)
            for record, reason in zip(chunk, reasons):
                if reason is None:
                    usable.append(record)
                else:
                    skipped.append((record, reason))
    stats = DataStats(
        num_records=len(records), num_examples=len(usable), num_skipped_images=len(skipped),
        skipped=skipped[:20], num_captions=num_captions, num_truncated_captions=num_truncated,
    )
    return np.asarray(usable, dtype=np.int64), stats


# ----------------------------------------------------------------------------------------------
# The per-position example function (runs in grain threads / worker processes)
# ----------------------------------------------------------------------------------------------


class _ExampleAt:
    """Host-local sample position -> {"pixel_values", "input_ids"}; a pure function of the position."""

    def __init__(self, dataset, records, image_column, caption_column, tokenizer, resolution, center_crop,
                 random_flip, seed, host_batch_size, process_index, process_count, steps_per_epoch):
        self.dataset = dataset
        self.records = records
        self.image_column, self.caption_column = image_column, caption_column
        self.tokenizer = tokenizer
        self.max_length = int(tokenizer.model_max_length)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed = seed
        self.host_batch_size = host_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = steps_per_epoch
        self.num_replaced = 0  # decode failures during iteration (in this process)
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_orders"] = {}
        return state

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_permutation(self.seed, epoch, len(self.records))
            self._orders = {epoch: order}  # keep one epoch; threads may race harmlessly
        return order

    def slot(self, position: int) -> tuple[int, int]:
        """(epoch, index into the epoch's permutation) of a host-local sample position."""
        batch, j = divmod(position, self.host_batch_size)
        epoch, step = divmod(batch, self.steps_per_epoch)
        global_batch = self.host_batch_size * self.process_count
        return epoch, step * global_batch + self.process_index * self.host_batch_size + j

    def load(self, epoch: int, record: int) -> dict[str, np.ndarray]:
        row = self.dataset[record]
        rng = sample_rng(self.seed, epoch, record)
        captions = _caption_choices(row[self.caption_column], self.caption_column, record)
        caption = captions[int(rng.integers(0, len(captions)))]
        pixel_values = preprocess_image(
            decode_image(row[self.image_column]), self.resolution,
            center_crop=self.center_crop, random_flip=self.random_flip, rng=rng,
        )
        input_ids = self.tokenizer(caption, max_length=self.max_length, padding="max_length", truncation=True)
        return {"pixel_values": pixel_values, "input_ids": np.asarray(input_ids["input_ids"], dtype=np.int32)}

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = self.slot(int(position))
        order = self._order(epoch)
        n = len(order)
        for attempt in range(min(n, _MAX_REPLACEMENTS)):
            record = int(self.records[order[(slot + attempt) % n]])
            try:
                return self.load(epoch, record)
            except Exception as e:  # never crash training on one bad image
                self.num_replaced += 1
                logger.warning("record %d could not be decoded during training (%s: %s); using the next one",
                               record, type(e).__name__, e)
        raise RuntimeError(f"{min(n, _MAX_REPLACEMENTS)} records in a row failed to decode; the dataset is unreadable")


# ----------------------------------------------------------------------------------------------
# Loader and checkpointable iterator
# ----------------------------------------------------------------------------------------------


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

    @property
    def epoch(self) -> int:
        return self._next_batch // self._loader.steps_per_epoch

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
        }

    def set_state(self, state: dict[str, Any]) -> None:
        loader = self._loader
        expected = {"version": _STATE_VERSION, "seed": loader.seed, "global_batch_size": loader.global_batch_size,
                    "num_examples": loader.num_examples}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data iterator state does not match this loader: {key}={state.get(key)!r} in the "
                    f"checkpoint, {value!r} now (exact resume needs the same data, seed and global batch)"
                )
        self._start(int(state["next_batch"]))

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        self._ensure_started()
        self._inner.start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(next_batch={self._next_batch})"


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18's mp_prefetch reads an absl flag (worker profiling) and fails with
    UnparsedFlagAccessError in programs that do not parse absl flags (google/grain#1355, fixed
    upstream later). Marking the flags parsed leaves every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainLoader:
    """Host-local training batches over epochs. Build with `build_train_loader`.

    Attributes: num_examples (usable records, all hosts), steps_per_epoch, host_batch_size,
    global_batch_size, num_epochs (None: unbounded), total_batches, stats (DataStats).
    """

    def __init__(self, example_fn: _ExampleAt, stats: DataStats, *, num_epochs: int | None, num_workers: int,
                 prefetch_batches: int):
        self._example_fn = example_fn
        self.stats = stats
        self.seed = example_fn.seed
        self.host_batch_size = example_fn.host_batch_size
        self.global_batch_size = example_fn.host_batch_size * example_fn.process_count
        self.process_index, self.process_count = example_fn.process_index, example_fn.process_count
        self.resolution = example_fn.resolution
        self.num_examples = stats.num_examples
        self.steps_per_epoch = example_fn.steps_per_epoch
        self.num_epochs = num_epochs
        self.total_batches = (
            self.steps_per_epoch * num_epochs if num_epochs is not None
            else (2**62 // self.host_batch_size)  # "forever"
        )
        self.num_workers = num_workers
        self.prefetch_batches = prefetch_batches

    def __len__(self) -> int:
        return self.num_examples

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
                                             per_worker_buffer_size=self.prefetch_batches)
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
    tokenizer,
    *,
    host_batch_size: int,
    resolution: int = 512,
    dataset: Any = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    center_crop: bool = False,
    random_flip: bool = False,
    max_train_samples: int | None = None,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_epochs: int | None = None,
    prefetch_batches: int = 2,
    validate_images: bool = True,
) -> TrainLoader:
    """Builds the training loader of this host (see the module docstring for order, sharding, resume).

    dataset: an already loaded `datasets.Dataset` (else dataset_name / train_data_dir are loaded).
    host_batch_size: per-device batch x local device count. process_index / process_count default to
    jax.process_index() / jax.process_count(). num_workers: decode processes (0 = in this process).
    num_epochs: None = iterate forever. validate_images: pre-scan and drop undecodable images.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if host_batch_size < 1 or resolution < 1 or num_workers < 0 or prefetch_batches < 1:
        raise ValueError("host_batch_size, resolution and prefetch_batches must be >= 1, num_workers >= 0")
    if dataset is None:
        dataset = load_train_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    dataset = _prepare_columns(_train_split(dataset), image_column, caption_column)

    records = np.arange(len(dataset), dtype=np.int64)
    if max_train_samples is not None:
        # As the reference: dataset.shuffle(seed).select(range(n)) (same permutation as `datasets`).
        records = np.random.default_rng(seed).permutation(len(dataset))[: max(0, int(max_train_samples))]
    num_threads = max(2, min(32, os.cpu_count() or 1))
    usable, stats = _scan(dataset, records, image_column, caption_column, tokenizer, validate_images, num_threads)
    if stats.num_skipped_images:
        first, reason = stats.skipped[0]
        logger.warning("skipped %d of %d images that could not be decoded (first: record %d, %s)",
                       stats.num_skipped_images, stats.num_records, first, reason)
    if stats.num_truncated_captions:
        logger.warning("%d of %d captions are longer than %d tokens and were truncated",
                       stats.num_truncated_captions, stats.num_captions, tokenizer.model_max_length)
    if len(usable) == 0:
        raise ValueError(f"no readable image among the {stats.num_records} records of the dataset")
    global_batch_size = host_batch_size * process_count
    steps_per_epoch = len(usable) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(usable)} usable images, fewer than one global batch "
                         f"({global_batch_size}); lower --train_batch_size")
    example_fn = _ExampleAt(dataset, usable, image_column, caption_column, tokenizer, resolution, center_crop,
                            random_flip, seed, host_batch_size, process_index, process_count, steps_per_epoch)
    return TrainLoader(example_fn, stats, num_epochs=num_epochs, num_workers=num_workers,
                       prefetch_batches=prefetch_batches)
