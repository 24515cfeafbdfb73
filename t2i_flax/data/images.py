"""Images: decode any record to 8-bit RGB, check that a record decodes, and the training transforms.

The transforms reproduce the reference PyTorch/torchvision pipeline on PIL images exactly
(Resize(R, interpolation=mode) of the short side = PIL.Image.resize with the filter torchvision maps that mode
to on PIL images and torchvision's size rule, CenterCrop with torchvision's rounding or RandomCrop(R), optional
horizontal flip, ToTensor + Normalize([0.5], [0.5])), with PIL and numpy only. The mode is
--image_interpolation_mode: the choices and default (lanczos) of diffusers' PyTorch scripts; the documented
Flax script resized with bilinear.

Image modes: everything becomes 8-bit RGB. Images with transparency (RGBA, LA, PA, RGBa, P or L/RGB
with a transparent colour) are composited on WHITE: rgb = 255 - round((255 - c) * alpha / 255)
(the reference, `convert("RGB")`, drops alpha, which turns transparent areas into whatever colour
they hold, often black). 16-bit modes (I;16*) are scaled by 1/257 (PIL would clip them to 255);
"I" (int32) is scaled the same way when its maximum exceeds 255, else used as is; "F" (float) is
taken as [0, 1] when its maximum is <= 1, else as [0, 255]; EXIF orientation is applied (as
`datasets` does when it decodes).

Bad files: only what PIL raises for a bad or truncated file (IMAGE_DECODE_ERRORS) means "skip this
record". A value that is not an image at all (the wrong column) is a DataError.
"""
from __future__ import annotations

import io
import os
import re
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from t2i_flax.config import DEFAULT_INTERPOLATION  # diffusers' PyTorch scripts' (lanczos, since diffusers #11426)
from t2i_flax.errors import DataError

# What PIL raises for a bad or truncated image file (UnidentifiedImageError is an OSError). Nothing else
# is caught around decoding: any other exception is a bug and must surface.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)

# EXIF orientations that turn the image by 90 degrees (width and height swap when applied).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# --image_interpolation_mode -> the PIL filter torchvision's Resize uses on a PIL image (its pil_modes_mapping):
# the lower-cased names of torchvision's InterpolationMode, which diffusers' PyTorch scripts accept. On PIL images
# torchvision runs nearest_exact as PIL's NEAREST (only its tensor path differs).
INTERPOLATION_MODES = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}

# ToTensor + Normalize([0.5], [0.5]) of every uint8 value, computed as torch does in float32.
_UINT8_TO_UNIT = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)


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
    raise DataError(f"the image column holds {type(value).__name__} values, not images (PIL images, "
                    f"{{'bytes', 'path'}} records, paths, bytes or arrays): check --image_column")


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
    """Returns None when the image decodes, else the reason ("OSError: ..."). A value that is not an image at all
    raises DataError."""
    return inspect_image(value)[0]


def inspect_image(value: Any) -> tuple[str | None, tuple[int, int] | None]:
    """(None, (width, height) as `decode_image` gives it) when the image decodes, else (the reason, None).

    JPEGs are decoded at 1/8 scale (draft mode): all of the data is still read and checked, at a
    fraction of the cost; the size is the file's, read before. A value that is not an image at all raises
    DataError."""
    try:
        image = _open_image(value)
        width, height = image.size
        if image.getexif().get(Image.ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        if getattr(image, "format", None) == "JPEG":
            image.draft(None, (1, 1))
        image.load()
        image_to_rgb(image)
        return None, (int(width), int(height))
    except DataError:
        raise
    except IMAGE_DECODE_ERRORS as e:  # a bad file: skip the record
        return _reason(e), None


def _reason(error: BaseException) -> str:
    """"Type: message", without the memory addresses PIL puts in some messages ("<_io.BytesIO object at
    0x7f...>"), so that the same bad file gives the same reason on every host and in every run."""
    return re.sub(r" object at 0x[0-9a-fA-F]+", " object", f"{type(error).__name__}: {error}")


def _pair(size) -> tuple[int, int]:
    """(width, height) of a target given as one side (square) or (width, height)."""
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resized_size(width: int, height: int, target) -> tuple[int, int]:
    """(width, height) after resizing to cover `target` (a side, or (width, height)) with the shape kept: the side
    that is relatively shorter becomes the target's and the other is truncated, as torchvision's Resize(R) of the
    short side does for a square target."""
    target_width, target_height = _pair(target)
    if width * target_height > target_width * height:  # relatively wider than the target: the height fits
        return max(target_width, int(target_height * width / height)), target_height
    return target_width, max(target_height, int(target_width * height / width))


def resize(image: Image.Image, size: tuple[int, int], mode: str = DEFAULT_INTERPOLATION) -> Image.Image:
    """`image` resized to `size` (width, height) as torchvision's Resize with InterpolationMode `mode` resizes a PIL
    image: PIL's resize with the matching filter (no reducing_gap); the image itself when it has that size."""
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"interpolation mode {mode!r} is not one of: {', '.join(INTERPOLATION_MODES)}")
    if tuple(size) == image.size:
        return image
    return image.resize(tuple(size), INTERPOLATION_MODES[mode])


def center_crop_offsets(width: int, height: int, target) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop (Python round, i.e. halves to even)."""
    target_width, target_height = _pair(target)
    return int(round((height - target_height) / 2.0)), int(round((width - target_width) / 2.0))


def draw_crop_and_flip(rng: np.random.Generator, new_width: int, new_height: int, target):
    """A sample's crop offsets and flip, drawn in this order, always all three (also when unused), so that
    the cached-latent path (data/latent_cache.py) reproduces the same stream from the resized size."""
    target_width, target_height = _pair(target)
    random_top = int(rng.integers(0, new_height - target_height + 1))
    random_left = int(rng.integers(0, new_width - target_width + 1))
    return random_top, random_left, bool(rng.random() < 0.5)


def preprocess_image(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> np.ndarray:
    """RGB PIL image -> float32 (3, R, R) in [-1, 1], as Resize/Crop/Flip/ToTensor/Normalize.

    Draws from `rng`, always in this order and always both: crop top, crop left (integers, used
    only for random crop), flip (a float, used only with random_flip).
    """
    return transform_image(image, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng,
                           interpolation=interpolation)[0]


def transform_image(image: Image.Image, target, *, center_crop: bool, random_flip: bool,
                    rng: np.random.Generator, flip_first: bool = False,
                    interpolation: str = DEFAULT_INTERPOLATION) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels float32 (3, H, W) in [-1, 1], crop (top, left)); `target`: a side (square) or an aspect-ratio
    bucket's (width, height). The image is resized to cover it (`interpolation`: the resize's mode, `resize`), then
    cropped to it. `flip_first`: flip, then crop the flipped image, and give the crop's offsets in it (diffusers'
    SDXL script, whose time ids hold them); else crop, then flip (the SD script). Both draw from `rng` as
    `preprocess_image`."""
    target_width, target_height = _pair(target)
    width, height = image.size
    new_width, new_height = resized_size(width, height, (target_width, target_height))
    image = resize(image, (new_width, new_height), interpolation)
    random_top, random_left, flip = draw_crop_and_flip(rng, new_width, new_height, (target_width, target_height))
    flip = random_flip and flip
    if center_crop:
        top, left = center_crop_offsets(new_width, new_height, (target_width, target_height))
    else:
        top, left = random_top, random_left
    # A crop at `left` of the flipped image is the flip of the crop at new_width - W - left of the image.
    crop_left = new_width - target_width - left if (flip_first and flip) else left
    if (top, crop_left, new_width, new_height) != (0, 0, target_width, target_height):
        image = image.crop((crop_left, top, crop_left + target_width, top + target_height))
    pixels = np.asarray(image).transpose(2, 0, 1)  # (H, W, 3) uint8 HWC -> CHW view
    if flip:
        pixels = pixels[:, :, ::-1]
    # The lookup's result has its index's memory order: the index is made C-contiguous (CHW) first, so that the
    # batch is too. A batch that is not goes from a loader worker to the trainer pickled through a pipe instead of
    # shared memory (grain), and a worker that is stopped with a batch in the full pipe is killed after 25 s.
    return _UINT8_TO_UNIT[np.ascontiguousarray(pixels)], (top, left)  # a new float32 (3, H, W)
