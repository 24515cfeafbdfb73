"""Training input pipeline: a captioned image dataset -> host-local numpy batches, on Grain.

Path of one example (record = a row of the `datasets` dataset):

  dataset row --decode_image--> RGB PIL image --preprocess_image--> float32 (3, R, R) in [-1, 1]
  dataset row --pick caption (string, or one of a list)--> [empty prompt, tag shuffle/dropout] --> tokenizer
      --> int32 (model_max_length,)

  sources.py     the "train" split of a datasets dataset or an imagefolder; columns; captions; identity
  images.py      decode, image modes -> RGB, the bad-file check, resize/crop/flip/normalize
  captions.py    caption tags: shuffle, keep the first N, tag dropout (kohya's options)
  scan.py        which records are usable: each host scans its share, the hosts exchange and merge
  scan_cache.py  the scan's result as a small keyed JSON file (a resumed run reads it instead of scanning)
  order.py       record selection, epoch permutations, host slots, per-sample random streams
  examples.py    the per-position example function Grain maps (decode failures replaced)
  loader.py      build_train_loader, the Grain pipeline, the checkpointable iterator (resume)

Startup: each host decodes only its share of the images (1/P of them), and none when the scan file of
an earlier run with the same data is there (`build_train_loader(..., scan_cache_path=...)`).
"""
from t2i_flax.data.images import (
    IMAGE_DECODE_ERRORS,
    center_crop_offsets,
    check_image,
    decode_image,
    image_to_rgb,
    preprocess_image,
    resized_size,
)
from t2i_flax.data.loader import TrainIterator, TrainLoader, build_train_loader
from t2i_flax.data.order import epoch_permutation, sample_rng, selected_records
from t2i_flax.data.scan import DataStats, ScanResult
from t2i_flax.data.sources import load_train_dataset

__all__ = [
    "IMAGE_DECODE_ERRORS", "DataStats", "ScanResult", "TrainIterator", "TrainLoader", "build_train_loader",
    "center_crop_offsets", "check_image", "decode_image", "epoch_permutation", "image_to_rgb",
    "load_train_dataset", "preprocess_image", "resized_size", "sample_rng", "selected_records",
]
