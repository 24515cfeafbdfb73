"""The per-position example function, which Grain maps over host-local sample positions (in threads or
worker processes): position -> (epoch, record) -> {"pixel_values", "input_ids"}.

A decode that fails during training (a file changed since the scan, an I/O error) is replaced by the
next record of the epoch's permutation and logged; 64 failures in a row are a DataError. Only what PIL
raises for bad files (IMAGE_DECODE_ERRORS) is caught: any other exception is a bug and surfaces with its
traceback.
"""
from __future__ import annotations

import logging

import numpy as np

from t2i_flax.data.images import IMAGE_DECODE_ERRORS, decode_image, preprocess_image
from t2i_flax.data.order import HostSlots, epoch_permutation, sample_rng
from t2i_flax.data.sources import caption_choices
from t2i_flax.errors import DataError

logger = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # a failing record is replaced by at most this many successors


class ExampleAt:
    """Host-local sample position -> {"pixel_values": float32 (3,R,R), "input_ids": int32 (L,)}; a pure
    function of the position. `records` are the usable record indices (the scan's result)."""

    def __init__(self, dataset, records: np.ndarray, *, image_column: str, caption_column: str, tokenizer,
                 resolution: int, center_crop: bool, random_flip: bool, seed: int, slots: HostSlots):
        self.dataset = dataset
        self.records = records
        self.image_column, self.caption_column = image_column, caption_column
        self.tokenizer = tokenizer
        self.max_length = int(tokenizer.model_max_length)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed = seed
        self.slots = slots
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

    def load(self, epoch: int, record: int) -> dict[str, np.ndarray]:
        row = self.dataset[record]
        rng = sample_rng(self.seed, epoch, record)
        captions = caption_choices(row[self.caption_column], self.caption_column, record)
        caption = captions[int(rng.integers(0, len(captions)))]
        pixel_values = preprocess_image(
            decode_image(row[self.image_column]), self.resolution,
            center_crop=self.center_crop, random_flip=self.random_flip, rng=rng,
        )
        input_ids = self.tokenizer(caption, max_length=self.max_length, padding="max_length", truncation=True)
        return {"pixel_values": pixel_values, "input_ids": np.asarray(input_ids["input_ids"], dtype=np.int32)}

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = self.slots.slot(int(position))
        order = self._order(epoch)
        n = len(order)
        for attempt in range(min(n, MAX_REPLACEMENTS)):
            record = int(self.records[order[(slot + attempt) % n]])
            try:
                return self.load(epoch, record)
            except DataError:
                raise
            except IMAGE_DECODE_ERRORS as e:  # a file that changed since the scan: use the next record
                self.num_replaced += 1
                logger.warning("record %d could not be decoded during training (%s: %s); using the next one",
                               record, type(e).__name__, e)
        raise DataError(f"{min(n, MAX_REPLACEMENTS)} images in a row could not be decoded during training "
                        f"(they were readable when the run started): check the dataset's files")
