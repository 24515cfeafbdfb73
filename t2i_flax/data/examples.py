"""The per-position example function, which Grain maps over host-local sample positions (in threads or
worker processes): position -> (epoch, record) -> {"pixel_values", "input_ids"} (SDXL also "input_ids_2" from
its second tokenizer and "time_ids": original height and width, crop top and left, target height and width).
With aspect-ratio buckets (data/buckets.py) the target is the size of the bucket of the sample's global batch.

A decode that fails during training (a file changed since the scan, an I/O error) is replaced by the
next record of the epoch's permutation and logged; 64 failures in a row are a DataError. Only what PIL
raises for bad files (IMAGE_DECODE_ERRORS) is caught: any other exception is a bug and surfaces with its
traceback.
"""
from __future__ import annotations

import logging

import numpy as np

from t2i_flax.data.captions import TagOptions
from t2i_flax.data.images import DEFAULT_INTERPOLATION, IMAGE_DECODE_ERRORS, decode_image, transform_image
from t2i_flax.data.order import HostSlots, epoch_permutation, sample_rng
from t2i_flax.data.sources import caption_choices
from t2i_flax.errors import DataError

logger = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # a failing record is replaced by at most this many successors


class ExampleAt:
    """Host-local sample position -> {"pixel_values": float32 (3,H,W), "input_ids": int32 (L,)}; a pure
    function of the position. `records` are the usable record indices (the scan's result); `buckets`: a
    buckets.BucketPlan over them, or None (every image at resolution x resolution)."""

    def __init__(self, dataset, records: np.ndarray, *, image_column: str, caption_column: str, tokenizer,
                 resolution: int, center_crop: bool, random_flip: bool, seed: int, slots: HostSlots,
                 tokenizer_2=None, size_conditioning: bool = False, proportion_empty_prompts: float = 0.0,
                 tags: TagOptions = TagOptions(), interpolation: str = DEFAULT_INTERPOLATION, buckets=None):
        self.dataset = dataset
        self.records = records
        self.image_column, self.caption_column = image_column, caption_column
        self.tokenizer = tokenizer
        self.max_length = int(tokenizer.model_max_length)
        self.tokenizer_2 = tokenizer_2
        self.size_conditioning = size_conditioning  # SDXL: time ids, and the flip before the crop (as its script)
        self.proportion_empty_prompts = proportion_empty_prompts
        self.tags = tags  # --shuffle_caption, --keep_tokens, --caption_tag_dropout (data/captions.py)
        self.interpolation = interpolation  # --image_interpolation_mode
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed = seed
        self.slots = slots
        self.buckets = buckets
        self.num_replaced = 0  # decode failures during iteration (in this process)
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_orders"] = {}
        return state

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(the epoch's order: positions into `records`, slot after slot; each global batch's bucket or None)."""
        found = self._orders.get(epoch)
        if found is None:
            if self.buckets is None:
                found = epoch_permutation(self.seed, epoch, len(self.records)), None
            else:
                found = self.buckets.epoch_order(epoch)
            self._orders = {epoch: found}  # keep one epoch; threads may race harmlessly
        return found

    def _order(self, epoch: int) -> np.ndarray:
        return self._epoch(epoch)[0]

    def target(self, epoch: int, slot: int) -> tuple[int, int]:
        """(width, height) of the sample at `slot` of the epoch: its global batch's bucket, or the square."""
        batch_buckets = self._epoch(epoch)[1]
        if batch_buckets is None:
            return self.resolution, self.resolution
        return self.buckets.sizes[batch_buckets[slot // self.slots.global_batch_size]]

    def load(self, epoch: int, record: int, target: tuple[int, int]) -> dict[str, np.ndarray]:
        row = self.dataset[record]
        rng = sample_rng(self.seed, epoch, record)
        caption = self.pick_caption(row[self.caption_column], record, rng)
        image = decode_image(row[self.image_column])
        pixel_values, crop = transform_image(image, target, center_crop=self.center_crop,
                                             random_flip=self.random_flip, rng=rng,
                                             flip_first=self.size_conditioning, interpolation=self.interpolation)
        return {"pixel_values": pixel_values,
                **self.text_inputs(self.final_caption(caption, rng), image.size, crop, target)}

    def pick_caption(self, value, record: int, rng: np.random.Generator) -> str:
        """The sample's caption: one of a list (the first draw of the sample's stream)."""
        captions = caption_choices(value, self.caption_column, record)
        return captions[int(rng.integers(0, len(captions)))]

    def empty_or(self, caption: str, rng: np.random.Generator) -> str:
        """"" with probability --proportion_empty_prompts, drawn after the crop and flip (only when it is set, so
        that runs without it keep their streams)."""
        if self.proportion_empty_prompts and rng.random() < self.proportion_empty_prompts:
            return ""
        return caption

    def final_caption(self, caption: str, rng: np.random.Generator) -> str:
        """The picked caption after the options that follow the image's draws, in this order: the whole caption
        dropped (--proportion_empty_prompts), then its tags shuffled and dropped (captions.TagOptions); an
        emptied caption stays empty."""
        return self.tags.apply(self.empty_or(caption, rng), rng)

    def text_inputs(self, caption: str, original_size: tuple[int, int], crop: tuple[int, int],
                    target: tuple[int, int]) -> dict:
        """Token ids of each tokenizer and, for SDXL, the time ids. `original_size` and `target`: (width, height),
        as decoded and as trained."""
        def ids(tokenizer):
            tokens = tokenizer(caption, max_length=int(tokenizer.model_max_length), padding="max_length",
                               truncation=True)
            return np.asarray(tokens["input_ids"], dtype=np.int32)

        inputs = {"input_ids": ids(self.tokenizer)}
        if self.tokenizer_2 is not None:
            inputs["input_ids_2"] = ids(self.tokenizer_2)
        if self.size_conditioning:
            width, height = original_size
            inputs["time_ids"] = np.asarray([height, width, crop[0], crop[1], target[1], target[0]], np.float32)
        return inputs

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = self.slots.slot(int(position))
        order = self._order(epoch)
        target = self.target(epoch, slot)
        n = len(order)
        for attempt in range(min(n, MAX_REPLACEMENTS)):  # a replacement is transformed to the batch's size too
            record = int(self.records[order[(slot + attempt) % n]])
            try:
                return self.load(epoch, record, target)
            except DataError:
                raise
            except IMAGE_DECODE_ERRORS as e:  # a file that changed since the scan: use the next record
                self.num_replaced += 1
                logger.warning("record %d could not be decoded during training (%s: %s); using the next one",
                               record, type(e).__name__, e)
        raise DataError(f"{min(n, MAX_REPLACEMENTS)} images in a row could not be decoded during training "
                        f"(they were readable when the run started): check the dataset's files")
