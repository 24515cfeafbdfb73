"""Aspect-ratio buckets (--aspect_ratio_buckets, t2i_flax/data/buckets.py): the bucket set and assignment against
the rule, an epoch's batches on a folder of mixed sizes read by two simulated hosts, exact resume of the iterator,
the pixels and SDXL time ids of a bucketed sample, the one-line errors; then training runs with buckets: exact
resume after SIGKILL in the middle of an epoch (2 workers, --cache_latents), 2 processes equal to 1, lr 0 exporting
the base model bit for bit."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from t2i_flax import cli, data
from t2i_flax.config import DataConfig, bucket_sizes
from t2i_flax.data import buckets
from t2i_flax.errors import DataError, FlagError

from conftest import process_environment
from test_checkpoint import ROOT, SCRIPT
from test_data import DATA_CONFIG_FIELDS, take
from test_multihost import free_port

# (width, height, how many): squares, landscapes, portraits, extreme ratios and tiny images (upscaled into a bucket)
FOLDER_SIZES = [(40, 40, 8), (60, 30, 10), (30, 60, 8), (100, 20, 3), (12, 9, 2), (7, 5, 1)]


def colour_of(index: int) -> tuple[int, int, int]:
    return (index * 37 % 256, index * 91 % 256, 255 - index * 53 % 256)


def write_mixed_folder(folder, sizes=FOLDER_SIZES, rotated_jpeg=True) -> list[tuple[int, int]]:
    """An imagefolder of solid-colour images of the given sizes (one colour per image, so a sample tells its
    record); with `rotated_jpeg` one more: a 50x20 JPEG whose EXIF orientation (6) turns it into a 20x50 portrait.
    Returns each record's (width, height) as decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, decoded = [], []
    for width, height, count in sizes:
        for _ in range(count):
            index = len(rows)
            name = f"{index:03d}.png"
            Image.new("RGB", (width, height), colour_of(index)).save(folder / name)
            rows.append({"file_name": name, "text": f"image {index}"})
            decoded.append((width, height))
    if rotated_jpeg:
        index = len(rows)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (50, 20), colour_of(index)).save(folder / f"{index:03d}.jpg", exif=exif.tobytes(), quality=95)
        rows.append({"file_name": f"{index:03d}.jpg", "text": f"image {index}"})
        decoded.append((20, 50))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return decoded


BUCKET_FLAGS = dict(aspect_ratio_buckets=True, resolution=32, bucket_step=8, min_bucket_resolution=16,
                    max_bucket_resolution=64)


def folder_loader(tokenizer, folder, **kwargs):
    options = dict(host_batch_size=2, center_crop=False, random_flip=True, seed=3, process_index=0, process_count=1,
                   **BUCKET_FLAGS)
    options.update(kwargs)
    config = DataConfig(train_data_dir=str(folder), **{k: v for k, v in options.items() if k in DATA_CONFIG_FIELDS})
    return data.build_train_loader(config, tokenizer, cache_dir=str(folder.parent / "hf"),
                                   **{k: v for k, v in options.items() if k not in DATA_CONFIG_FIELDS})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from t2i_flax.tokenizer import load_tokenizer, write_tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_clip_tokenizer(str(folder), 8)
    return load_tokenizer(str(folder))


# ---- the bucket set and the assignment -----------------------------------------------------------------

@pytest.mark.parametrize("resolution, step, low, high", [(512, 64, 256, 1024), (1024, 64, 256, 2048),
                                                         (768, 64, 320, 1024), (32, 8, 16, 64), (100, 24, 24, 150)])
def test_the_bucket_set_is_the_rule(resolution, step, low, high):
    """Every size the rule allows (multiples of the step, sides in [low, high], area <= resolution^2), for each width
    the tallest, and the transposes: by brute force."""
    allowed = [(w, h) for w in range(step, high + 1, step) for h in range(step, high + 1, step)
               if low <= w and low <= h and w * h <= resolution ** 2]
    tallest = {(w, max(h for ww, h in allowed if ww == w)) for w in {w for w, _ in allowed}}
    expected = tallest | {(h, w) for w, h in tallest}
    sizes = bucket_sizes(resolution, step, low, high)
    assert sorted(sizes) == sorted(expected) and len(set(sizes)) == len(sizes)
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios)  # the table reads from the tallest to the widest
    if (resolution, step) == (512, 64):  # SD 1.5's defaults (--min 256, --max 2 x 512): the table in the README
        assert len(sizes) == 17 and (512, 512) in sizes and (256, 1024) in sizes


def test_each_image_goes_to_the_bucket_of_the_nearest_log_aspect_ratio():
    sizes = bucket_sizes(512, 64, 256, 1024)
    rng = np.random.default_rng(0)
    images = rng.integers(8, 4000, size=(500, 2))
    chosen = buckets.assign(images, sizes)
    for (width, height), bucket in zip(images, chosen):
        distances = [abs(math.log(width / height) - math.log(w / h)) for w, h in sizes]
        assert distances[bucket] == min(distances)
    assert buckets.assign([[512, 512]], sizes)[0] == sizes.index((512, 512))
    assert sizes[buckets.assign([[3000, 10]], sizes)[0]] == (1024, 256)  # beyond the widest: the widest


def test_bucket_settings_that_leave_no_bucket_or_no_full_batch_are_one_line(tmp_path, tokenizer):
    with pytest.raises(FlagError, match=r"no bucket .* --bucket_step 64 within \[--min_bucket_resolution 600, "
                                        r"--max_bucket_resolution 1024\] .* --resolution 512"):
        DataConfig(dataset_name="x", aspect_ratio_buckets=True, resolution=512, min_bucket_resolution=600)
    with pytest.raises(FlagError, match="--bucket_step 12 must be a multiple of 8"):
        DataConfig(dataset_name="x", aspect_ratio_buckets=True, bucket_step=12)
    folder = tmp_path / "few"
    write_mixed_folder(folder, sizes=[(40, 40, 3), (60, 30, 3)], rotated_jpeg=False)
    with pytest.raises(DataError) as error:
        folder_loader(tokenizer, folder, host_batch_size=4)
    message = str(error.value)
    assert "\n" not in message and "no bucket holds a full global batch of 4 images" in message
    assert "holds 3 of 6" in message and "--train_batch_size" in message


# ---- an epoch's batches on a folder of mixed sizes -------------------------------------------------------

def test_epochs_of_buckets_on_two_hosts(tmp_path, tokenizer):
    """Global batch 4 read by two hosts of 2: every global batch is one bucket's size, every image is used once an
    epoch except the remainders the table says sit out, the epochs together use every image of a bucket that holds
    a batch, and the two hosts together read exactly the epoch's order."""
    folder = tmp_path / "mixed"
    decoded = write_mixed_folder(folder)
    hosts = [folder_loader(tokenizer, folder, process_index=p, process_count=2, num_epochs=3) for p in (0, 1)]
    plan = hosts[0].buckets
    assert plan.global_batch_size == 4 and hosts[0].steps_per_epoch == plan.steps_per_epoch

    # the scan's sizes (EXIF orientation applied) give each record's bucket, and the table is written as the issue says
    expected_buckets = buckets.assign(decoded, list(plan.sizes))
    np.testing.assert_array_equal(plan.bucket_of, expected_buckets)
    table = json.load(open(plan.write(str(tmp_path / "out"))))
    assert table["resolution"] == 32 and table["step"] == 8
    counts = np.bincount(expected_buckets, minlength=len(plan.sizes))
    assert [(b["width"], b["height"], b["images"], b["batches_per_epoch"]) for b in table["buckets"]] == [
        (w, h, int(n), int(n) // 4) for (w, h), n in zip(plan.sizes, counts)]
    assert table["left_out_per_epoch"] == int((counts % 4).sum()) and table["left_out_per_epoch"] > 0
    assert plan.steps_per_epoch == int((counts // 4).sum())

    steps = plan.steps_per_epoch
    batches = [take(host.iterator(), 3 * steps) for host in hosts]
    seen_over_epochs = set()
    for epoch in range(3):
        order, batch_buckets = plan.epoch_order(epoch)
        assert len(order) == steps * 4 and len(set(order.tolist())) == len(order)  # each image at most once
        assert len(order) == len(decoded) - table["left_out_per_epoch"]
        seen_over_epochs |= set(order.tolist())
        for b in range(steps):
            members = order[b * 4:(b + 1) * 4]
            assert (plan.bucket_of[members] == batch_buckets[b]).all()
            width, height = plan.sizes[batch_buckets[b]]
            for p in (0, 1):
                pixels = batches[p][epoch * steps + b]["pixel_values"]
                assert pixels.shape == (2, 3, height, width)
                # each sample is its record's solid colour: the host read its own slots of the global batch
                for j, record in enumerate(members[p * 2:(p + 1) * 2]):
                    colour = np.asarray(colour_of(int(record))) / 127.5 - 1
                    np.testing.assert_allclose(pixels[j].mean(axis=(1, 2)), colour, atol=0.02)
    in_full_buckets = {i for i, bucket in enumerate(expected_buckets) if counts[bucket] >= 4}
    assert seen_over_epochs == in_full_buckets  # the remainders change from epoch to epoch


def test_a_bucketed_iterator_resumes_exactly_and_a_changed_table_is_refused(tmp_path, tokenizer):
    folder = tmp_path / "mixed"
    write_mixed_folder(folder)
    loader = folder_loader(tokenizer, folder, num_epochs=2)
    iterator = loader.iterator()
    take(iterator, 5)  # into the second epoch or the middle of the first
    state = iterator.get_state()
    expected = take(iterator, 6)
    again = folder_loader(tokenizer, folder, num_epochs=2, dataloader_num_workers=2).restore(state)
    resumed = take(again, 6)
    again.close()
    for a, b in zip(expected, resumed):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other_table = folder_loader(tokenizer, folder, num_epochs=2, bucket_step=16)
    with pytest.raises(Exception, match="records_digest"):
        other_table.restore(state)


def test_a_bucketed_sample_is_resized_to_cover_then_cropped_and_sdxl_time_ids_hold_the_bucket(tmp_path, tokenizer):
    """A 90x40 image goes to the 48x16 bucket (log aspect ratio 0.81: 1.10 for 48x16, 0.51 for 40x24): resized
    (Lanczos, the default filter; torchvision's truncation) to 48x21, then cropped to 48x16 where the sample drew
    (top in 0..5);
    SDXL's time ids: the original (40, 90), the crop, the bucket (16, 48)."""
    folder = tmp_path / "one"
    folder.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n"
                                                   for i in range(4)))
    loader = folder_loader(tokenizer, folder, host_batch_size=4, random_flip=False, tokenizer_2=tokenizer,
                           size_conditioning=True)
    assert loader.buckets.sizes[loader.buckets.bucket_of[0]] == (48, 16)
    batch = next(loader.iterator())
    resized = np.asarray(Image.fromarray(pixels).resize((48, 21), Image.LANCZOS))
    tops = set()
    for j in range(4):
        top, left = int(batch["time_ids"][j][2]), int(batch["time_ids"][j][3])
        assert 0 <= top <= 5 and left == 0
        tops.add(top)
        expected = resized[top:top + 16, left:left + 48].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(batch["pixel_values"][j], expected, atol=1e-6)
        assert batch["time_ids"][j].tolist() == [40, 90, top, left, 16, 48]
    assert len(tops) > 1  # random crops


# ---- training runs with buckets ----------------------------------------------------------------------

RUN_STEPS = 6


@pytest.fixture(scope="module")
def bucket_dataset(tmp_path_factory):
    """24 images: 12 landscapes (the 40x24 bucket), 8 portraits (24x40) and 4 squares (32x32; with a global batch of
    8 they sit out every epoch, as do 4 of the landscapes): 2 steps an epoch."""
    folder = tmp_path_factory.mktemp("bucket_data")
    write_mixed_folder(folder, sizes=[(60, 30, 12), (30, 60, 8), (40, 40, 4)], rotated_jpeg=False)
    return str(folder)


def bucket_argv(pipeline_dir, dataset_dir, output_dir, devices=8, *extra):
    return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", "32", "--aspect_ratio_buckets", "--bucket_step", "8",
            "--min_bucket_resolution", "16", "--train_batch_size", "1", "--center_crop",
            "--random_flip", "--cache_latents", "--dataloader_num_workers", "2", "--use_ema", "--ema_decay", "0.9",
            "--learning_rate", "0.05", "--adam_epsilon", "1.0", "--max_train_steps", str(RUN_STEPS),
            "--checkpointing_steps", "1", "--seed", "5", "--log_every", "1", "--report_to", "none",
            "--cpu_devices", str(devices), *extra]


def environment():
    return process_environment()


def losses(output_dir):
    return {entry["step"]: entry["loss"] for entry in map(json.loads, open(os.path.join(output_dir, "metrics.jsonl")))}


UNET = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def bucket_reference(pipeline_dir, bucket_dataset, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("bucket_reference"))
    # A checkpoint only at the end (the runs that resume write theirs): each save is ~1 s on 2 cores.
    result = subprocess.run(bucket_argv(pipeline_dir, bucket_dataset, output_dir, 8, "--checkpointing_steps", "100"),
                            env=environment(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_a_bucketed_run_logs_and_writes_its_table_and_compiles_every_bucket_first(bucket_reference):
    output_dir, stdout = bucket_reference
    table = json.load(open(os.path.join(output_dir, "buckets.json")))
    used = [(b["width"], b["height"], b["images"], b["batches_per_epoch"]) for b in table["buckets"] if b["images"]]
    assert used == [(24, 40, 8, 1), (32, 32, 4, 0), (40, 24, 12, 1)] and table["left_out_per_epoch"] == 8
    assert "aspect-ratio buckets: 2 of" in stdout and "2 steps/epoch" in stdout
    assert "compiled the train step for 2 image sizes" in stdout
    assert stdout.count("latent cache: ") == 2  # one cache per bucket that holds a batch
    assert sorted(losses(output_dir)) == list(range(1, RUN_STEPS + 1))
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "| aspect-ratio buckets | step 8, sides 16-64 (buckets.json) |" in card


def test_sigkill_in_the_middle_of_an_epoch_then_resume_is_bit_identical(bucket_reference, pipeline_dir,
                                                                       bucket_dataset, tmp_path):
    reference, _ = bucket_reference
    output_dir = str(tmp_path / "out")
    argv = bucket_argv(pipeline_dir, bucket_dataset, output_dir, 8, "--checkpointing_steps", "3")
    process = subprocess.Popen(argv, env=environment(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    checkpoint = os.path.join(output_dir, "checkpoints", "3")  # step 3: the middle of the second epoch
    while not os.path.isdir(checkpoint):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)  # not a busy loop: it would take a core from the training it waits for
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=300)
    result = subprocess.run(argv + ["--resume_from_checkpoint", "latest"], env=environment(), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert open(os.path.join(reference, UNET), "rb").read() == open(os.path.join(output_dir, UNET), "rb").read()
    assert losses(output_dir) == losses(reference)


def test_two_processes_with_buckets_train_like_one(bucket_reference, pipeline_dir, bucket_dataset, tmp_path):
    reference, _ = bucket_reference
    output_dir = str(tmp_path / "two")
    port = free_port()
    # No decode workers and one checkpoint (at the end): the reference has them, and neither changes what trains.
    command = bucket_argv(pipeline_dir, bucket_dataset, output_dir, 4, "--multihost", "--checkpointing_steps", "100",
                          "--dataloader_num_workers", "0")
    workers = [subprocess.Popen(command, env=dict(environment(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(2)]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    np.testing.assert_allclose([losses(output_dir)[s] for s in range(1, RUN_STEPS + 1)],
                               [losses(reference)[s] for s in range(1, RUN_STEPS + 1)], rtol=1e-5)
    one, two = load_file(os.path.join(reference, UNET)), load_file(os.path.join(output_dir, UNET))
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_lr0_with_buckets_exports_the_base_model_and_validates_at_its_own_size(pipeline_dir, bucket_dataset,
                                                                              tmp_path):
    from test_train import safetensors_of

    output_dir = str(tmp_path / "lr0")
    argv = ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", bucket_dataset, "--output_dir",
            output_dir, "--resolution", "32", "--aspect_ratio_buckets", "--bucket_step", "8", "--min_bucket_resolution",
            "16", "--train_batch_size", "1", "--center_crop", "--random_flip", "--learning_rate", "0",
            "--max_train_steps", "2", "--validation_prompts", "a red square", "--validation_steps", "2",
            "--validation_height", "16", "--validation_width", "48", "--validation_num_inference_steps", "2",
            "--report_to", "none"]
    assert cli.main(argv) == 0
    before, after = safetensors_of(pipeline_dir), safetensors_of(output_dir)
    assert sorted(before) == sorted(after)
    assert all(after[name].tobytes() == before[name].tobytes() for name in before)
    grid = np.asarray(Image.open(os.path.join(output_dir, "validation", "step_2.png")))
    assert grid.shape == (2 * 16 + 14, 2 * 48, 3) and grid.std() > 1  # 16 x 48, enlarged 2x (128 px min), label
