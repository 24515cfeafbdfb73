"""Input pipeline: transforms, image modes, unreadable images, captions, order, sharding, resume."""
import dataclasses
import io
import json
import logging
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from t2i_flax import data, synthetic
from t2i_flax.config import DataConfig
from t2i_flax.errors import CheckpointError, DataError
from t2i_flax.data import (
    build_train_loader,
    center_crop_offsets,
    check_image,
    decode_image,
    preprocess_image,
    resized_size,
    sample_rng,
)
from t2i_flax.tokenizer import load_tokenizer, write_tiny_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tiny_clip_tokenizer(directory)
    return load_tokenizer(directory)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """The reference's ToTensor + Normalize([0.5], [0.5]) computed by torch, HWC uint8 -> CHW float32."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(255)
    return t.sub(0.5).div(0.5).numpy()


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def color_of(i: int) -> tuple[int, int, int]:
    return (i * 13 % 256, i * 29 % 256, i * 53 % 256)  # distinct for i < 256


def solid_dataset(n: int, size=(12, 10), captions=None) -> datasets.Dataset:
    """n solid-colour images (record i has color_of(i)) with captions "number i" unless given."""
    images = [{"bytes": png_bytes(Image.new("RGB", size, color_of(i))), "path": None} for i in range(n)]
    captions = [f"number {i}" for i in range(n)] if captions is None else captions
    text_feature = datasets.Value("string") if isinstance(captions[0], str) else datasets.Sequence(datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(), "text": text_feature})
    return datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)


def record_of(batch, j: int) -> int:
    """The record a solid-colour sample came from (its colour), checked against its caption."""
    pixel = np.rint((batch["pixel_values"][j, :, 0, 0] * 0.5 + 0.5) * 255).astype(int)
    return [color_of(i) for i in range(256)].index(tuple(pixel))


DATA_CONFIG_FIELDS = {field.name for field in dataclasses.fields(DataConfig)}
IN_MEMORY = "in-memory test dataset"  # the name a DataConfig needs; the loader reads the dataset handed to it


def loader(tokenizer, dataset, **kwargs):
    """A loader over an in-memory dataset; kwargs: DataConfig fields and build_train_loader keywords."""
    options = dict(host_batch_size=4, resolution=8, center_crop=True, seed=0, process_index=0, process_count=1)
    options.update(kwargs)
    config = DataConfig(dataset_name=IN_MEMORY, **{k: v for k, v in options.items() if k in DATA_CONFIG_FIELDS})
    return build_train_loader(config, tokenizer, dataset=dataset,
                              **{k: v for k, v in options.items() if k not in DATA_CONFIG_FIELDS})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7) % 256, (y * 11) % 256, (x * 3 + y * 5) % 256], -1).astype(np.uint8)


def test_normalization_matches_torch_bit_for_bit_and_spans_minus_one_to_one():
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    out = preprocess_image(Image.fromarray(every_value), 16, center_crop=True, random_flip=False,
                           rng=np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out, normalize(every_value))
    assert out.min() == -1.0 and out.max() == 1.0


def test_center_crop_takes_exact_window_with_torchvision_rounding():
    resolution = 8
    # torchvision: int(round((size - crop) / 2)), Python rounding: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    assert [center_crop_offsets(resolution + d, resolution, resolution)[1] for d in range(6)] == [0, 0, 1, 2, 2, 2]
    assert center_crop_offsets(8, 11, 8) == (2, 0)
    pixels = gradient(resolution, resolution + 3)  # short side already == resolution: no resize
    out = preprocess_image(Image.fromarray(pixels), resolution, center_crop=True, random_flip=False,
                           rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, normalize(pixels[:, 2:10]))
    tall = gradient(resolution + 5, resolution)
    out = preprocess_image(Image.fromarray(tall), resolution, center_crop=True, random_flip=False,
                           rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, normalize(tall[2:10, :]))


def test_random_crop_windows_are_exact_and_cover_every_offset():
    pixels = gradient(8, 11)
    windows = {np.ascontiguousarray(pixels[:, left:left + 8]).tobytes(): left for left in range(4)}
    seen = set()
    for seed in range(40):
        out = preprocess_image(Image.fromarray(pixels), 8, center_crop=False, random_flip=False,
                               rng=np.random.default_rng(seed))
        crop = np.rint((out.transpose(1, 2, 0) * 0.5 + 0.5) * 255).astype(np.uint8)
        left = windows[crop.tobytes()]  # KeyError if not an exact window
        np.testing.assert_array_equal(out, normalize(pixels[:, left:left + 8]))
        # the same generator state gives the same window
        again = preprocess_image(Image.fromarray(pixels), 8, center_crop=False, random_flip=False,
                                 rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)
        seen.add(left)
    assert seen == {0, 1, 2, 3}


def test_flip_mirrors_exactly_and_happens_about_half_the_time():
    pixels = gradient(8, 12)
    flips = 0
    for seed in range(40):
        kwargs = dict(center_crop=False)
        plain = preprocess_image(Image.fromarray(pixels), 8, random_flip=False, rng=np.random.default_rng(seed), **kwargs)
        maybe = preprocess_image(Image.fromarray(pixels), 8, random_flip=True, rng=np.random.default_rng(seed), **kwargs)
        if np.array_equal(maybe, plain):
            continue
        np.testing.assert_array_equal(maybe, plain[:, :, ::-1])  # same crop, mirrored left-right
        flips += 1
    assert 10 <= flips <= 30


def test_resize_short_side_size_rule_and_values_against_torch_antialias():
    assert resized_size(300, 200, 64) == (96, 64)
    assert resized_size(200, 300, 64) == (64, 96)
    assert resized_size(100, 100, 64) == (64, 64)
    assert resized_size(333, 100, 10) == (33, 10)  # int(10 * 333 / 100), as torchvision
    assert resized_size(5, 7, 16) == (16, 22)  # upscaling too
    rng = np.random.default_rng(0)
    for height, width, resolution in [(30, 45, 16), (50, 20, 16), (12, 12, 20)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        out = preprocess_image(Image.fromarray(pixels), resolution, center_crop=True, random_flip=False,
                               rng=np.random.default_rng(0), interpolation="bilinear")
        new_width, new_height = resized_size(width, height, resolution)
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), size=(new_height, new_width),
            mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = center_crop_offsets(new_width, new_height, resolution)
        expected = resized[:, top:top + resolution, left:left + resolution].numpy() / 255 * 2 - 1
        # PIL (what torchvision runs on PIL images) vs torch's float antialiased bilinear: rounding only
        assert np.abs(out - expected).max() <= 2 / 255 + 1e-6


# torchvision's pil_modes_mapping (torchvision/transforms/functional.py): the PIL filter its Resize uses on a PIL
# image for each InterpolationMode (nearest_exact too runs as PIL's NEAREST there). Written out here, not read from
# t2i_flax, so that the test is a second source.
TORCHVISION_PIL_FILTERS = {"nearest": 0, "nearest_exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
                           "lanczos": 1}


def torchvision_resize(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    """transforms.Resize(resolution, interpolation=mode) on a PIL image: torchvision itself where it is installed,
    else what it runs, PIL's resize with the mapped filter at torchvision's size (checked above)."""
    try:
        from torchvision import transforms
    except ImportError:
        size = resized_size(*image.size, resolution)
        return image if size == image.size else image.resize(size, TORCHVISION_PIL_FILTERS[mode])
    return transforms.Resize(resolution, interpolation=transforms.InterpolationMode[mode.upper()])(image)


def test_interpolation_modes_are_torchvisions_names_and_lanczos_by_default():
    from t2i_flax import config

    assert set(config.INTERPOLATION_MODES) == set(TORCHVISION_PIL_FILTERS)
    assert DataConfig(dataset_name=IN_MEMORY).image_interpolation_mode == "lanczos"  # diffusers' PyTorch scripts
    try:
        from torchvision.transforms import InterpolationMode
    except ImportError:
        return
    # the choices diffusers' train_text_to_image.py builds from torchvision
    assert set(config.INTERPOLATION_MODES) == {f.lower() for f in dir(InterpolationMode)
                                                if not f.startswith("__") and not f.endswith("__")}


@pytest.mark.parametrize("mode", sorted(TORCHVISION_PIL_FILTERS))
def test_every_interpolation_mode_gives_torchvisions_pixels(mode):
    """resize() and the whole transform equal torchvision's Resize(R, mode) on PIL images pixel for pixel, when
    shrinking, enlarging and at the size already (no resize); the modes really differ from each other."""
    from t2i_flax.data.images import resize

    rng = np.random.default_rng(1)
    for height, width, resolution in [(30, 45, 16), (50, 20, 16), (12, 12, 20), (9, 7, 24), (16, 24, 16)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        want = torchvision_resize(image, resolution, mode)
        got = resize(image, resized_size(width, height, resolution), mode)
        assert got.size == want.size
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        out = preprocess_image(image, resolution, center_crop=True, random_flip=False, rng=np.random.default_rng(0),
                               interpolation=mode)
        top, left = center_crop_offsets(*want.size, resolution)
        np.testing.assert_array_equal(out, normalize(np.array(want)[top:top + resolution, left:left + resolution]))
    image = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    others = {other: np.asarray(resize(image, (24, 16), other)).tobytes() for other in TORCHVISION_PIL_FILTERS}
    assert len(set(others.values())) == 6  # seven names, six filters (nearest_exact is nearest on PIL images)
    with pytest.raises(ValueError, match="'cubic' is not one of: "):
        resize(image, (24, 16), "cubic")


def test_the_latent_cache_and_resume_are_keyed_on_the_interpolation_mode(tmp_path):
    from t2i_flax.config import RunConfig
    from t2i_flax.data import latent_cache

    def cache(**kwargs):
        return latent_cache.LatentCache(str(tmp_path), {"test": 1}, np.arange(4), True, (4, 2, 2), 0, 1, per_host=4,
                                        **kwargs)

    assert cache().root == cache(interpolation="lanczos").root != cache(interpolation="bilinear").root
    assert cache(interpolation="bicubic").meta["interpolation"] == "bicubic"
    flags = {"pretrained_model_name_or_path": "m", "dataset_name": IN_MEMORY}
    lanczos, bilinear = (RunConfig.from_flags(dict(flags, image_interpolation_mode=mode))
                         for mode in ("lanczos", "bilinear"))
    assert lanczos.resume_differences(bilinear.to_dict()) == [
        "--image_interpolation_mode: 'bilinear' in the checkpoint, 'lanczos' now"]
    before_the_flag = lanczos.to_dict()  # a checkpoint written before the flag resized with bilinear
    del before_the_flag["data"]["image_interpolation_mode"]
    assert bilinear.resume_differences(before_the_flag) == []
    assert lanczos.resume_differences(before_the_flag) == [
        "--image_interpolation_mode: 'bilinear' in the checkpoint, 'lanczos' now"]


# ---------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------


def rgb_of(encoded) -> list:
    image = decode_image({"bytes": encoded, "path": None})
    assert image.mode == "RGB"
    return np.asarray(image).reshape(-1, 3).tolist()


def test_alpha_is_composited_on_white():
    rgba = Image.frombytes("RGBA", (4, 1), bytes([255, 0, 0, 255, 0, 0, 255, 0, 0, 0, 0, 128, 200, 100, 50, 51]))
    assert rgb_of(png_bytes(rgba)) == [[255, 0, 0], [255, 255, 255], [127, 127, 127], [244, 224, 214]]
    la = Image.frombytes("LA", (2, 1), bytes([100, 0, 100, 255]))
    assert rgb_of(png_bytes(la)) == [[255, 255, 255], [100, 100, 100]]


def test_palette_gray_bilevel_and_cmyk_modes():
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2])
    assert rgb_of(png_bytes(palette)) == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    assert rgb_of(png_bytes(palette, transparency=1)) == [[10, 20, 30], [255, 255, 255], [70, 80, 90]]
    gray = Image.frombytes("L", (3, 1), bytes([0, 77, 255]))
    assert rgb_of(png_bytes(gray)) == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    bilevel = gray.convert("1", dither=Image.Dither.NONE)
    assert rgb_of(png_bytes(bilevel)) == [[0, 0, 0], [0, 0, 0], [255, 255, 255]]
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([255, 0, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0]))
    assert rgb_of(png_bytes(cmyk, "TIFF")) == [[0, 255, 255], [255, 255, 255], [255, 0, 255]]
    assert rgb_of(png_bytes(cmyk, "JPEG", quality=100))[1] == [255, 255, 255]


def test_high_bit_depth_and_float_modes_are_scaled_not_clipped():
    sixteen = Image.fromarray(np.array([[0, 257, 1000, 65535]], np.uint16))
    assert sixteen.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        assert rgb_of(png_bytes(sixteen, fmt)) == [[0] * 3, [1] * 3, [4] * 3, [255] * 3]
    wide = Image.fromarray(np.array([[0, 300, 70000]], np.int32))
    assert wide.mode == "I"
    assert rgb_of(png_bytes(wide, "TIFF")) == [[0] * 3, [1] * 3, [255] * 3]  # max > 255: 16-bit scale
    narrow = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert rgb_of(png_bytes(narrow, "TIFF")) == [[0] * 3, [100] * 3, [255] * 3]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    assert rgb_of(png_bytes(unit, "TIFF")) == [[0] * 3, [128] * 3, [255] * 3]  # [0, 1] range
    byte_range = Image.fromarray(np.array([[0.0, 100.4, 300.0]], np.float32))
    assert rgb_of(png_bytes(byte_range, "TIFF")) == [[0] * 3, [100] * 3, [255] * 3]


def test_exif_orientation_is_applied():
    image = Image.frombytes("RGB", (2, 1), bytes([255, 0, 0, 0, 0, 255]))  # red | blue
    exif = Image.Exif()
    exif[Image.ExifTags.Base.Orientation] = 6  # stored rotated: display = 90 degrees clockwise
    decoded = decode_image(png_bytes(image, exif=exif))
    assert decoded.size == (1, 2)
    assert np.asarray(decoded).reshape(-1, 3).tolist() == [[255, 0, 0], [0, 0, 255]]


def test_every_input_kind_decodes(tmp_path):
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    path = tmp_path / "x.png"
    image.save(path)
    for value in (image, str(path), path, {"bytes": None, "path": str(path)}, path.read_bytes(),
                  np.asarray(image)):
        assert np.asarray(decode_image(value)).tolist() == np.asarray(image).tolist()
    assert check_image(path.read_bytes()) is None
    assert check_image(b"not an image").startswith("UnidentifiedImageError")
    with pytest.raises(DataError, match="the image column holds int values, not images"):
        check_image(12)  # not a bad file but the wrong column: an error, not a skipped record


# ---------------------------------------------------------------------------------------------
# Unreadable images
# ---------------------------------------------------------------------------------------------


def write_folder(directory, n_good, extra_files=(), metadata="jsonl"):
    """An imagefolder of n_good solid images ("number i") plus extra (name, bytes, caption) files."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        Image.new("RGB", (10, 12), color_of(i)).save(directory / f"good{i:02d}.png")
        rows.append({"file_name": f"good{i:02d}.png", "text": f"number {i}"})
    for name, content, caption in extra_files:
        (directory / name).write_bytes(content)
        rows.append({"file_name": name, "text": caption})
    if metadata == "jsonl":
        (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (directory / "metadata.csv").write_text(
            "file_name,text\n" + "".join(f"{r['file_name']},\"{r['text']}\"\n" for r in rows))
    return rows


def bad_files():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    jpeg, png = png_bytes(noise, "JPEG"), png_bytes(noise)
    return [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "bad 1"),
        ("truncated.png", png[: len(png) // 2], "bad 2"),
        ("truncated.jpg", jpeg[: int(len(jpeg) * 0.7)], "bad 3"),
        ("notes.jpg", b"these are my notes, not an image\n", "bad 4"),
    ]


def test_unreadable_images_are_skipped_counted_and_warned_once(tmp_path, tokenizer, caplog):
    write_folder(tmp_path / "imgs", 8, bad_files())
    with caplog.at_level(logging.WARNING, logger="t2i_flax.data"):
        train = build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=8, center_crop=True),
                                   tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=4, seed=0,
                                   process_index=0, process_count=1)
    stats = train.stats
    assert (stats.num_records, stats.num_examples, stats.num_skipped_images) == (12, 8, 4)
    assert len(train) == 8 and train.steps_per_epoch == 2
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("t2i_flax.data")]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 4 of 12 images")
    # the skipped records are exactly the bad files (their captions say so)
    dataset = data.load_train_dataset(train_data_dir=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "c"))
    assert sorted(dataset["text"][r] for r, _ in stats.skipped) == ["bad 1", "bad 2", "bad 3", "bad 4"]
    # an epoch yields each good record once, each paired with its own caption
    batches = take(iter(train), 2)
    seen = []
    for batch in batches:
        for j in range(4):
            record = record_of(batch, j)
            caption = tokenizer.decode(batch["input_ids"][j], skip_special_tokens=True)
            assert caption == f"number {' '.join(str(record))}"
            seen.append(record)
    assert sorted(seen) == list(range(8))


def test_decode_failure_during_training_is_replaced_not_fatal(tmp_path, tokenizer, caplog):
    write_folder(tmp_path / "imgs", 8)
    train = build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=8, center_crop=True),
                               tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=4, seed=0, process_index=0,
                               process_count=1, prefetch_batches=1)
    (tmp_path / "imgs" / "good03.png").write_bytes(b"gone bad after the scan")
    with caplog.at_level(logging.WARNING, logger="t2i_flax.data"):
        batches = take(iter(train), 2)
    records = [record_of(b, j) for b in batches for j in range(4)]
    assert 3 not in records and len(records) == 8  # replaced by the next record of the permutation
    assert train._example_fn.num_replaced == 1
    assert any("could not be decoded during training" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_images_that_all_go_bad_during_training_are_one_data_error(tmp_path, tokenizer, num_workers):
    """Readable at the scan, garbage afterwards: after 64 replacements in a row the run stops with a
    DataError (a user's problem, one line), also when the decoding happens in worker processes."""
    write_folder(tmp_path / "imgs", 70)
    train = build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=8, center_crop=True,
                                          dataloader_num_workers=num_workers),
                               tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=2, seed=0, process_index=0,
                               process_count=1, prefetch_batches=1)
    for path in (tmp_path / "imgs").glob("*.png"):
        path.write_bytes(b"gone bad after the scan")
    batches = iter(train)
    with pytest.raises(DataError, match="^64 images in a row could not be decoded during training"):
        next(batches)
    batches.close()


def test_dataset_without_a_readable_image_is_an_error(tmp_path, tokenizer):
    write_folder(tmp_path / "imgs", 0, bad_files())
    with pytest.raises(DataError, match="no readable image among the 4 records"):
        build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=8), tokenizer,
                           cache_dir=str(tmp_path / "c"), host_batch_size=1, seed=0, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# Columns and captions
# ---------------------------------------------------------------------------------------------


def test_wrong_columns_list_the_existing_ones(tokenizer):
    dataset = solid_dataset(4)
    with pytest.raises(DataError, match=r"^--image_column 'img' is not a column of the dataset; columns: image, text$"):
        loader(tokenizer, dataset, image_column="img")
    with pytest.raises(DataError, match=r"^--caption_column 'caption' .* columns: image, text$"):
        loader(tokenizer, dataset, caption_column="caption")


def test_a_dataset_dict_uses_its_train_split(tokenizer):
    train = loader(tokenizer, datasets.DatasetDict({"train": solid_dataset(4)}))
    assert sorted(record_of(next(iter(train)), j) for j in range(4)) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="no 'train' split; splits: validation"):
        loader(tokenizer, datasets.DatasetDict({"validation": solid_dataset(4)}))


def test_non_string_captions_are_a_clear_error(tokenizer):
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(Image.new("RGB", (8, 8))), "path": None}] * 3, "text": [1.5, 2.5, 3.5]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("float32")}))
    with pytest.raises(DataError, match="should contain strings or lists of strings; record 0 has float"):
        loader(tokenizer, dataset, host_batch_size=1)
    empty_list = solid_dataset(2, captions=[["a red circle"], []])
    with pytest.raises(DataError, match="record 1 has an empty list"):
        loader(tokenizer, empty_list, host_batch_size=1)


def test_caption_lists_pick_deterministically_per_seed_and_epoch(tokenizer):
    choices = [[f"number {i} {word}" for word in ("red", "green", "blue")] for i in range(8)]
    dataset = solid_dataset(8, captions=choices)

    def picks(seed):
        batches = take(iter(loader(tokenizer, dataset, seed=seed)), 6)  # 3 epochs of 2 batches
        table = {}
        for n, batch in enumerate(batches):
            for j in range(4):
                record = record_of(batch, j)
                text = tokenizer.decode(batch["input_ids"][j], skip_special_tokens=True)
                assert text in [c.replace(str(record), " ".join(str(record))) for c in choices[record]]
                table[(n // 2, record)] = text.split()[-1]
        return table

    first = picks(0)
    assert picks(0) == first  # deterministic
    assert len(first) == 24
    for (epoch, record), word in first.items():  # exactly the documented draw
        assert word == ("red", "green", "blue")[sample_rng(0, epoch, record).integers(0, 3)]
    assert any(first[(0, r)] != first[(1, r)] for r in range(8))  # differs across epochs
    other = picks(1)
    assert any(first[k] != other[k] for k in first)  # and across seeds


def test_empty_captions_are_allowed(tokenizer):
    batch = next(iter(loader(tokenizer, solid_dataset(4, captions=[""] * 4))))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert batch["input_ids"].tolist() == [[bos] + [eos] * 76] * 4


def test_truncated_captions_are_counted(tokenizer):
    captions = ["red " * 80, "a red circle", "blue " * 76, "a blue square"]
    train = loader(tokenizer, solid_dataset(4, captions=captions))
    assert (train.stats.num_captions, train.stats.num_truncated_captions) == (4, 2)
    assert next(iter(train))["input_ids"].shape == (4, 77)


def test_max_train_samples_selects_like_datasets_shuffle_select(tokenizer):
    dataset = solid_dataset(20)
    train = loader(tokenizer, dataset, max_train_samples=8, seed=3)
    assert (train.stats.num_records, len(train), train.steps_per_epoch) == (8, 8, 2)
    expected = sorted(int(t.split()[1]) for t in dataset.shuffle(seed=3).select(range(8))["text"])
    seen = sorted(record_of(b, j) for b in take(iter(train), 2) for j in range(4))
    assert seen == expected
    assert len(loader(tokenizer, dataset, max_train_samples=100)) == 20  # more than there are: all


# ---------------------------------------------------------------------------------------------
# Batches, order, sharding, resume
# ---------------------------------------------------------------------------------------------


def test_batches_shapes_epochs_and_pairing(tokenizer):
    train = loader(tokenizer, solid_dataset(10, size=(13, 9)), host_batch_size=4, num_epochs=2)
    assert (len(train), train.steps_per_epoch, train.total_batches) == (10, 2, 4)
    iterator = iter(train)
    batches = list(iterator)
    assert len(batches) == 4 and iterator.next_batch == 2 * train.steps_per_epoch  # at the start of epoch 2
    for batch in batches:
        assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape == (4, 3, 8, 8)
        assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (4, 77)
    epochs = [[record_of(b, j) for b in batches[2 * e: 2 * e + 2] for j in range(4)] for e in range(2)]
    for records in epochs:
        assert len(set(records)) == 8  # no repeats within an epoch; 2 dropped (10 % 8)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_two_hosts_read_disjoint_shards_of_the_same_global_batches(tokenizer):
    dataset = solid_dataset(12)
    hosts = [take(iter(loader(tokenizer, dataset, host_batch_size=3, process_index=p, process_count=2)), 4)
             for p in range(2)]
    single = take(iter(loader(tokenizer, dataset, host_batch_size=6)), 4)
    for step in range(4):
        for key in ("pixel_values", "input_ids"):  # global batch = host 0 rows then host 1 rows
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][key], hosts[1][step][key]]),
                                          single[step][key])
    for epoch in range(2):
        shards = [{record_of(b, j) for b in hosts[p][2 * epoch: 2 * epoch + 2] for j in range(3)} for p in range(2)]
        assert len(shards[0]) == len(shards[1]) == 6
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(12))
    # a single-host state resumes on two hosts (same global batch): the state counts global batches
    state = iter(loader(tokenizer, dataset, host_batch_size=6)).get_state() | {"next_batch": 3}
    resumed = [next(loader(tokenizer, dataset, host_batch_size=3, process_index=p, process_count=2).restore(state))
               for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([r["pixel_values"] for r in resumed]), single[3]["pixel_values"])


def test_grain_orbax_checkpoint_handler_saves_and_restores_the_iterator(tmp_path, tokenizer):
    import grain
    from etils import epath

    dataset = solid_dataset(8)
    iterator = iter(loader(tokenizer, dataset, host_batch_size=2, random_flip=True))
    take(iterator, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=iterator)
    assert json.loads((tmp_path / "process_0-of-1.json").read_text())["next_batch"] == 3
    expected = take(iterator, 2)
    restored = handler.restore(epath.Path(tmp_path), item=loader(tokenizer, dataset, host_batch_size=2,
                                                                   random_flip=True).iterator())
    assert_batches_equal(take(restored, 2), expected)


def test_state_restores_exactly_in_a_fresh_loader(tokenizer):
    dataset = solid_dataset(10, size=(14, 9))
    options = dict(center_crop=False, random_flip=True, host_batch_size=3)  # 3 steps per epoch
    iterator = iter(loader(tokenizer, dataset, **options))
    take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["next_batch"] == 2
    expected = take(iterator, 4)  # crosses into epoch 1
    restored = loader(tokenizer, dataset, **options).restore(state)
    assert_batches_equal(take(restored, 4), expected)
    assert restored.get_state()["next_batch"] == 6
    # set_state on a running iterator rewinds it too
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), expected)
    with pytest.raises(CheckpointError, match="seed=0 in the checkpoint, 1 now"):
        loader(tokenizer, dataset, **{**options, "seed": 1}).restore(state)


def test_worker_processes_give_the_same_batches_and_resume(tokenizer):
    dataset = solid_dataset(10, size=(14, 9))
    options = dict(center_crop=False, random_flip=True, host_batch_size=3)
    in_process = iter(loader(tokenizer, dataset, **options))
    take(in_process, 2)
    state = in_process.get_state()
    expected = take(in_process, 4)
    # C-contiguous, every array of a batch: what grain moves from a worker through shared memory (else pickled)
    assert all(batch[key].flags.c_contiguous for batch in expected for key in batch)
    workers = loader(tokenizer, dataset, dataloader_num_workers=2, **options).restore(state)
    try:
        assert_batches_equal(take(workers, 4), expected)
        assert workers.get_state()["next_batch"] == 6
        assert workers._loader._example_fn._orders == {}  # nothing was computed in this process
    finally:
        workers.close()


# One training process with 2 decode workers, in its own process group: reads 2 batches (one per worker), then,
# for SIGTERM and then SIGINT, waits until the workers have filled every buffer, signals the whole group (as
# `timeout`, a scheduler or a terminal's Ctrl-C do), and reads 12 more batches (more than the buffers hold). It
# handles the signals itself, as the trainer does, closes the iterator and saves the batches to OUT.
GROUP_SIGNALS_RUN = r"""
import multiprocessing, os, signal, sys, time
import numpy as np
from t2i_flax import data
from t2i_flax.config import DataConfig
from t2i_flax.tokenizer import load_tokenizer

folder, hf_cache, tokenizer_dir, resolution, out = sys.argv[1:6]
config = DataConfig(train_data_dir=folder, resolution=int(resolution), dataloader_num_workers=2)
loader = data.build_train_loader(config, load_tokenizer(tokenizer_dir), cache_dir=hf_cache, host_batch_size=2, seed=0,
                                 process_index=0, process_count=1)
received = []
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda signum, frame: received.append(signum))
batches = loader.iterator()
taken = [next(batches), next(batches)]
for signum in (signal.SIGTERM, signal.SIGINT):
    time.sleep(2)
    os.killpg(0, signum)
    taken += [next(batches) for _ in range(12)]
workers = multiprocessing.active_children()
batches.close()
np.savez(out, received=np.array(received), worker_exit_codes=np.array([worker.exitcode for worker in workers]),
         **{f"{key}_{i}": batch[key] for i, batch in enumerate(taken) for key in batch})
"""


def test_workers_survive_signals_to_the_process_group_and_leak_nothing(tmp_path, tokenizer):
    """SIGTERM and SIGINT sent to the training process's group reach its decode workers too. The workers ignore
    them (their owner stops them): the batches go on exactly as in one process, and at exit no shared memory is
    left for Python's resource tracker to warn about. Without that, the SIGTERM kills the workers, and a SIGINT
    kills them with a traceback each, and the batches they had made but not delivered leak.
    When the iterator closes, the workers stop on their own (exit code 0): a batch travels in shared memory, its
    queue message is a few hundred bytes. Until the pixels were made C-contiguous, grain pickled them whole
    through the queue's pipe (393 KB a batch here, more than a pipe's 64 KiB): a worker stopped with a batch
    half written waited for the pipe until grain killed it after 25 s (exit code -9), leaking that batch, in 2 to
    3 of 6 runs; the trainer's --dataloader_num_workers runs ended 25 s late as often."""
    write_folder(tmp_path / "imgs", 8)
    resolution = 128  # a host batch of 2 x 3 x 128 x 128 float32: 393 KB
    run = subprocess.Popen(
        [sys.executable, "-c", GROUP_SIGNALS_RUN, str(tmp_path / "imgs"), str(tmp_path / "c"),
         tokenizer.name_or_path, str(resolution), str(tmp_path / "batches.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        run.kill()  # its workers follow within a second, then its resource tracker frees what they left
        run.communicate()
        raise
    assert run.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = np.load(tmp_path / "batches.npz")
    assert saved["worker_exit_codes"].tolist() == [0, 0]  # stopped on their own, not killed by grain's close()
    assert "leaked shared_memory" not in err, err[-3000:]
    assert saved["received"].tolist() == [signal.SIGTERM, signal.SIGINT]  # the run got both signals itself
    expected = take(iter(build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=resolution),
                                            tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=2, seed=0,
                                            process_index=0, process_count=1)), 26)
    assert_batches_equal([{key: saved[f"{key}_{i}"] for key in ("input_ids", "pixel_values")} for i in range(26)],
                         expected)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def test_imagefolder_with_metadata_csv(tmp_path, tokenizer):
    write_folder(tmp_path / "imgs", 4, metadata="csv")
    train = build_train_loader(DataConfig(train_data_dir=str(tmp_path / "imgs"), resolution=8, center_crop=True),
                               tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=4, seed=0, process_index=0,
                               process_count=1)
    batch = next(iter(train))
    for j in range(4):
        assert tokenizer.decode(batch["input_ids"][j], skip_special_tokens=True) == f"number {record_of(batch, j)}"


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_local_dataset_by_name_works_offline(tmp_path, tokenizer, layout):
    dataset = solid_dataset(4)
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "ds")
    else:
        (tmp_path / "ds").mkdir()
        dataset.to_parquet(tmp_path / "ds" / "train.parquet")
    train = build_train_loader(DataConfig(dataset_name=str(tmp_path / "ds"), resolution=8, center_crop=True),
                               tokenizer, cache_dir=str(tmp_path / "c"), host_batch_size=4, seed=0, process_index=0,
                               process_count=1)
    batch = next(iter(train))
    assert sorted(record_of(batch, j) for j in range(4)) == [0, 1, 2, 3]


def test_synthetic_dataset(tmp_path, tokenizer):
    captions = synthetic.write_synthetic_dataset(tmp_path / "shapes", 6, resolution=32, seed=1)
    assert captions == synthetic.write_synthetic_dataset(tmp_path / "again", 6, resolution=32, seed=1)
    lines = [json.loads(line) for line in (tmp_path / "shapes" / "metadata.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == captions
    for line in lines:
        words = line["text"].split()
        assert words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background"
        color, shape, background = words[1], words[2], words[5]
        assert shape in synthetic.SHAPES and color != background
        image = Image.open(tmp_path / "shapes" / line["file_name"])
        assert image.size == (32, 32) and image.mode == "RGB"
        colors = {c for _, c in image.getcolors()}
        assert colors == {synthetic.COLORS[color], synthetic.COLORS[background]}
    # every word of a synthetic caption is one token of the tiny tokenizer
    ids = tokenizer(captions[0])["input_ids"]
    assert len(ids) == 2 + 7
    train = build_train_loader(DataConfig(train_data_dir=str(tmp_path / "shapes"), resolution=16), tokenizer,
                               cache_dir=str(tmp_path / "c"), host_batch_size=2, seed=0, process_index=0,
                               process_count=1)
    assert len(train) == 6 and train.steps_per_epoch == 3


# ---------------------------------------------------------------------------------------------
# SDXL: time ids, the flip before the crop, empty prompts
# ---------------------------------------------------------------------------------------------


def gradient_dataset(sizes) -> datasets.Dataset:
    """Images of the given (width, height) sizes whose pixels differ everywhere (so any shift shows)."""
    images = [{"bytes": png_bytes(Image.fromarray(gradient(h, w))), "path": None} for w, h in sizes]
    return datasets.Dataset.from_dict({"image": images, "text": [f"number {i}" for i in range(len(sizes))]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "text": datasets.Value("string")}))


@pytest.mark.parametrize("center_crop", [False, True])
def test_sdxl_examples_are_the_sdxl_scripts_crop_flip_and_time_ids(tokenizer, center_crop):
    """train_text_to_image_sdxl.py's preprocess_train: original (h, w) before the resize; resize; flip; then the
    crop of the (flipped) image, whose top-left are the time ids' crop; target (R, R). Same pixels, same ids."""
    sizes = [(13, 9), (9, 14), (8, 8), (17, 10), (11, 11), (10, 19), (12, 9), (9, 12)]
    resolution = 8
    train = loader(tokenizer, gradient_dataset(sizes), host_batch_size=8, resolution=resolution,
                   center_crop=center_crop, random_flip=True, validate_images=False, tokenizer_2=tokenizer,
                   size_conditioning=True, seed=3)
    example = train.example_fn
    flips = 0
    for position in range(16):  # two epochs
        epoch, slot = example.slots.slot(position)
        record = int(example.records[example._order(epoch)[slot]])
        got = example(position)
        image = Image.fromarray(gradient(sizes[record][1], sizes[record][0]))
        rng = sample_rng(3, epoch, record)
        rng.integers(0, 1)  # the caption pick (one caption)
        width, height = resized_size(*image.size, resolution)
        resized = image.resize((width, height), Image.LANCZOS)  # the default mode, as diffusers' SDXL script's
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
        flip = rng.random() < 0.5
        flips += flip
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if center_crop:
            top, left = round((height - resolution) / 2.0), round((width - resolution) / 2.0)
        want = np.asarray(resized.crop((left, top, left + resolution, top + resolution)))
        np.testing.assert_array_equal(got["pixel_values"], normalize(want), err_msg=str(position))
        assert got["time_ids"].tolist() == [image.size[1], image.size[0], top, left, resolution, resolution]
        np.testing.assert_array_equal(got["input_ids_2"], got["input_ids"])
    assert 0 < flips < 16


def test_proportion_empty_prompts_is_drawn_per_sample_and_repeats(tokenizer):
    """--proportion_empty_prompts: about that fraction of the captions become "", the same ones on every read of
    the same (epoch, record); 0 (the default) empties none, 1 all."""
    dataset = solid_dataset(64)
    empty_ids = tokenizer("", max_length=77, padding="max_length", truncation=True)["input_ids"]

    def empties(example, positions):
        return [bool((example(p)["input_ids"] == empty_ids).all()) for p in positions]

    half = loader(tokenizer, dataset, host_batch_size=8, proportion_empty_prompts=0.5, validate_images=False)
    drawn = empties(half.example_fn, range(128))
    assert 0.3 < np.mean(drawn) < 0.7 and drawn == empties(half.example_fn, range(128))
    assert not any(empties(loader(tokenizer, dataset, host_batch_size=8, validate_images=False).example_fn,
                           range(128)))
    everything = loader(tokenizer, dataset, host_batch_size=8, proportion_empty_prompts=1.0, validate_images=False)
    assert all(empties(everything.example_fn, range(16)))


def test_sdxl_cached_examples_are_the_online_examples(tokenizer, tmp_path):
    """--cache_latents with SDXL's order (flip, then centre crop): the cache stores the centre crop of the mirror
    image (not the mirror of the centre crop: they differ by a pixel where the margin is odd), and the cached
    examples carry the online examples' time ids and token ids. The "encoder" here keeps the pixels (moments =
    the pixels, std 1), so the cached mean must be exactly the online pixel values."""
    import jax

    from t2i_flax import sharding
    from t2i_flax.data import latent_cache

    sizes = [(13, 8), (8, 13), (11, 8), (8, 8), (15, 8), (8, 9), (12, 8), (9, 8)]  # odd and even margins
    dataset = gradient_dataset(sizes)
    online = loader(tokenizer, dataset, host_batch_size=8, resolution=8, center_crop=True, random_flip=True,
                    validate_images=False, tokenizer_2=tokenizer, size_conditioning=True, seed=5)
    mesh = sharding.make_mesh(1)
    where = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda pixels: (pixels, pixels * 0 + 1), out_shardings=(where, where))
    cache = latent_cache.LatentCache(str(tmp_path), {"test": 1}, online.example_fn.records, True, (3, 8, 8), 0, 1,
                                     per_host=8, flip_first=True)
    cache.build(dataset, "image", 8, encode, mesh, show_progress=False)
    cached = latent_cache.CachedExampleAt(online.example_fn, {(8, 8): cache})
    for position in range(16):
        want, got = online.example_fn(position), cached(position)
        np.testing.assert_array_equal(got["latent_mean"], want["pixel_values"], err_msg=str(position))
        for key in ("input_ids", "input_ids_2", "time_ids"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{position} {key}")
