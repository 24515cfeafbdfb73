"""The data scan: each host decodes only its share, the hosts' merged result equals one process scanning
everything, the scan file is read instead of scanning when (and only when) its key matches, and batches
are bit-identical with and without it. Also two real jax processes (jax.distributed on 127.0.0.1)."""
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import process_environment
from t2i_flax import data
from t2i_flax.config import DataConfig
from t2i_flax.data import scan, scan_cache
from t2i_flax.data.images import decode_image
from t2i_flax.data.order import selected_records
from t2i_flax.data.scan import HostGroup, merge_host_scans, scan_host_share
from t2i_flax.errors import DataError
from t2i_flax.tokenizer import load_tokenizer, write_tiny_clip_tokenizer

from test_data import DATA_CONFIG_FIELDS, assert_batches_equal, bad_files, color_of, png_bytes, take, write_folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tiny_clip_tokenizer(directory)
    return load_tokenizer(directory)


BAD = (3, 10, 11, 17)  # records whose image does not decode
LONG = (5, 10, 20)  # records whose caption is longer than 77 tokens
NUM_RECORDS = 23


def image_of(i: int) -> bytes:
    if i == 11:
        png = png_bytes(Image.new("RGB", (12, 10), color_of(i)))
        return png[: len(png) // 2]  # truncated
    if i in BAD:
        return b"broken image %d" % i
    return png_bytes(Image.new("RGB", (12, 10), color_of(i)))


def caption_of(i: int):
    if i in LONG:
        return ["red " * 80]
    if i % 3 == 0:
        return [f"number {i} red", f"number {i} blue"]
    return [f"number {i}"]


def mixed_dataset(captions=None) -> datasets.Dataset:
    """NUM_RECORDS records: unreadable images at BAD, long captions at LONG, two-caption lists at i % 3 == 0."""
    captions = [caption_of(i) for i in range(NUM_RECORDS)] if captions is None else captions
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    images = [{"bytes": image_of(i), "path": None} for i in range(NUM_RECORDS)]
    return datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)


class DecodeLog:
    """Replaces the scan's inspect_image and records which record each call decoded."""

    def __init__(self, monkeypatch, record_of_value):
        self.records = []
        self._record_of_value = record_of_value
        original = scan.inspect_image

        def counting_check_image(value):
            self.records.append(record_of_value(value))
            return original(value)

        monkeypatch.setattr(scan, "inspect_image", counting_check_image)

    def take(self) -> list:
        taken, self.records = sorted(self.records), []
        return taken


def record_by_bytes():
    table = {image_of(i): i for i in range(NUM_RECORDS)}
    return lambda value: table[value["bytes"]]


def file_name_of(value) -> str:
    return os.path.basename(value["path"])


class ThreadedAllgather:
    """An allgather between threads that stand in for hosts: every call is a barrier of all of them."""

    def __init__(self, count: int):
        self._barrier = threading.Barrier(count, timeout=60)
        self._deposited = [None] * count

    def for_host(self, index: int):
        def allgather(tree):
            self._deposited[index] = tree
            self._barrier.wait()
            if isinstance(tree, dict):
                stacked = {key: np.stack([np.asarray(t[key]) for t in self._deposited]) for key in tree}
            else:
                stacked = np.stack([np.asarray(t) for t in self._deposited])
            self._barrier.wait()
            return stacked
        return allgather


def on_threads(count: int, function):
    """function(host_index, allgather) on `count` threads; their results (or the exception raised) in order."""
    allgather = ThreadedAllgather(count)
    results = [None] * count

    def run(index):
        try:
            results[index] = function(index, allgather.for_host(index))
        except DataError as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def prepared(dataset):
    from t2i_flax.data.sources import prepare_columns

    return prepare_columns(dataset, "image", "text")


def share(dataset, records, tokenizer, index, count):
    return scan_host_share(dataset, records, image_column="image", caption_column="text", tokenizer=tokenizer,
                           validate_images=True, process_index=index, process_count=count, num_threads=2)


def assert_same_scan(a, b):
    np.testing.assert_array_equal(a.usable, b.usable)
    assert a.usable.dtype == b.usable.dtype == np.int64
    assert a.stats == b.stats


# ---------------------------------------------------------------------------------------------
# Shares, merge, exchange
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_train_samples", [None, 15])
def test_host_shares_merge_to_exactly_the_one_process_scan(tokenizer, monkeypatch, max_train_samples):
    dataset = prepared(mixed_dataset())
    records = selected_records(NUM_RECORDS, max_train_samples, seed=3)
    decoded = DecodeLog(monkeypatch, record_by_bytes())
    one = merge_host_scans(records, [share(dataset, records, tokenizer, 0, 1)])
    assert decoded.take() == sorted(records.tolist())
    expected_usable = [r for r in records.tolist() if r not in BAD]
    assert one.usable.tolist() == expected_usable
    stats = one.stats
    bad_in_order = [r for r in records.tolist() if r in BAD]
    assert [r for r, _ in stats.skipped] == bad_in_order
    assert [reason.split(":")[0] for _, reason in stats.skipped] == ["UnidentifiedImageError"] * len(bad_in_order)
    assert (stats.num_records, stats.num_examples, stats.num_skipped_images) == (
        len(records), len(expected_usable), len(bad_in_order))
    assert stats.num_captions == sum(len(caption_of(r)) for r in records.tolist())
    assert stats.num_truncated_captions == sum(r in LONG for r in records.tolist())
    for count in (2, 3):
        shares = []
        for index in range(count):
            shares.append(share(dataset, records, tokenizer, index, count))
            # this host decoded exactly its share: positions index, index + count, ...
            assert decoded.take() == sorted(records[index::count].tolist())
        assert_same_scan(merge_host_scans(records, shares), one)
        # the same shares through the real exchange (bitmap + JSON text), hosts on threads
        exchanged = on_threads(count, lambda index, allgather: merge_host_scans(
            records, scan.exchange_host_scans(shares[index], allgather)))
        for result in exchanged:
            assert_same_scan(result, one)


def test_more_skipped_images_than_reasons_kept_merge_like_one_process(tokenizer, monkeypatch):
    captions = [["x"]] * NUM_RECORDS
    images = [{"bytes": b"broken %d" % i if i % 4 else image_of(0), "path": None} for i in range(NUM_RECORDS)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    dataset = prepared(datasets.Dataset.from_dict({"image": images, "text": captions}, features=features))
    records = np.arange(NUM_RECORDS, dtype=np.int64)
    monkeypatch.setattr(scan, "MAX_SKIPPED_REASONS", 5)
    one = merge_host_scans(records, [share(dataset, records, tokenizer, 0, 1)])
    two = merge_host_scans(records, [share(dataset, records, tokenizer, p, 2) for p in range(2)])
    assert [r for r, _ in one.stats.skipped] == [1, 2, 3, 5, 6]
    assert one.stats.num_skipped_images == 17 and one.usable.tolist() == [0, 4, 8, 12, 16, 20]
    assert_same_scan(two, one)


def test_a_data_error_in_one_share_is_raised_identically_by_every_host(tokenizer):
    captions = [caption_of(i) for i in range(NUM_RECORDS)]
    captions[12], captions[7] = [], []  # record 7 is in host 1's share of 2, record 12 in host 0's
    dataset = prepared(mixed_dataset(captions))
    records = np.arange(NUM_RECORDS, dtype=np.int64)
    for count in (1, 2, 3):
        def host(index, allgather):
            group = HostGroup(index, count, allgather)
            return scan.scan_records(dataset, records, image_column="image", caption_column="text",
                                     tokenizer=tokenizer, validate_images=True, group=group, show_progress=False)
        errors = on_threads(count, host)
        assert [str(e) for e in errors] == [
            "caption column 'text' should contain strings or lists of strings; record 7 has an empty list"] * count


# ---------------------------------------------------------------------------------------------
# The scan file
# ---------------------------------------------------------------------------------------------


def folder_loader(tokenizer, folder, cache, **kwargs):
    """kwargs: DataConfig fields and build_train_loader keywords."""
    options = dict(host_batch_size=2, resolution=8, center_crop=False, random_flip=True, seed=0, process_index=0,
                   process_count=1, scan_cache_path=None if cache is None else str(cache))
    options.update(kwargs)
    config = DataConfig(train_data_dir=str(folder), **{k: v for k, v in options.items() if k in DATA_CONFIG_FIELDS})
    return data.build_train_loader(config, tokenizer, cache_dir=str(folder.parent / "hf"),
                                   **{k: v for k, v in options.items() if k not in DATA_CONFIG_FIELDS})


GOOD_FILES = [f"good{i:02d}.png" for i in range(8)]
BAD_FILES = ["corrupt.png", "truncated.png", "truncated.jpg", "notes.jpg"]


def test_the_scan_file_replaces_the_scan_and_gives_bit_identical_batches(tmp_path, tokenizer, monkeypatch, caplog):
    folder, cache = tmp_path / "imgs", tmp_path / "run" / "data_scan.json"
    write_folder(folder, 8, bad_files())
    decoded = DecodeLog(monkeypatch, file_name_of)
    first = folder_loader(tokenizer, folder, cache)
    assert decoded.take() == sorted(GOOD_FILES + BAD_FILES) and not first.scan_from_cache
    document = json.loads(cache.read_text())
    assert sorted(document) == ["format", "key", "num_captions", "num_examples", "num_records",
                                "num_skipped_images", "num_truncated_captions", "sizes", "skipped", "usable_bitmap"]
    bitmap = np.unpackbits(np.frombuffer(base64.b64decode(document["usable_bitmap"]), np.uint8), count=12)
    assert bitmap.tolist() == [True] * 8 + [False] * 4  # the bad files come after the good ones
    # each usable image's (width, height), as the decode gives it (what a bucket is chosen from)
    sizes = np.frombuffer(base64.b64decode(document["sizes"]), "<i4").reshape(-1, 2)
    expected_sizes = [decode_image(str(folder / name)).size for name in sorted(GOOD_FILES)]
    assert sizes.tolist() == [list(size) for size in expected_sizes]
    assert [record for record, _ in document["skipped"]] == [8, 9, 10, 11]
    assert document["key"]["dataset"]["local_folders"]["train_data_dir"]["files"] == 13  # + metadata.jsonl

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i_flax.data"):
        second = folder_loader(tokenizer, folder, cache)
    assert decoded.take() == [] and second.scan_from_cache
    assert second.stats == first.stats
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("t2i_flax.data")]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 4 of 12 images")  # reported again
    uncached = folder_loader(tokenizer, folder, None)
    assert decoded.take() == sorted(GOOD_FILES + BAD_FILES)
    expected = take(uncached.iterator(), 8)  # 2 epochs of 4 batches, random crops and flips
    assert_batches_equal(take(second.iterator(), 8), expected)
    assert_batches_equal(take(first.iterator(), 8), expected)
    # a state saved by the scanning run resumes exactly in the run that read the file
    iterator = first.iterator()
    take(iterator, 3)
    assert_batches_equal(take(second.restore(iterator.get_state()), 5), expected[3:])


def test_a_stale_scan_file_is_never_used(tmp_path, tokenizer, monkeypatch):
    folder, cache = tmp_path / "imgs", tmp_path / "data_scan.json"
    write_folder(folder, 8)
    decoded = DecodeLog(monkeypatch, file_name_of)

    def scanned(**kwargs) -> list | None:
        """None when the build read the scan file; else the files it decoded (the file is then current)."""
        if folder_loader(tokenizer, folder, cache, **kwargs).scan_from_cache:
            assert decoded.take() == []
            return None
        files = decoded.take()
        assert folder_loader(tokenizer, folder, cache, **kwargs).scan_from_cache and decoded.take() == []
        return files

    assert scanned() == GOOD_FILES
    assert scanned(seed=1) is None  # without max_train_samples the seed selects nothing: same records
    # a file added (and listed in the metadata)
    Image.new("RGB", (10, 12), color_of(8)).save(folder / "good08.png")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "good08.png", "text": "number 8"}) + "\n")
    assert scanned() == GOOD_FILES + ["good08.png"]
    # a file rewritten in place (same name and size, new mtime)
    os.utime(folder / "good02.png", ns=(os.stat(folder / "good02.png").st_atime_ns, 10**18))
    assert scanned() == GOOD_FILES + ["good08.png"]
    # the selection: max_train_samples, then its seed
    five = sorted(f"good{r:02d}.png" for r in selected_records(9, 5, seed=0).tolist())
    assert scanned(max_train_samples=5) == five
    assert scanned(max_train_samples=5, seed=1) == sorted(
        f"good{r:02d}.png" for r in selected_records(9, 5, seed=1).tolist())
    assert scanned(validate_images=False) == []  # a scan of captions only: rescanned, nothing decoded
    assert not folder_loader(tokenizer, folder, cache).scan_from_cache and len(decoded.take()) == 9
    # the tokenizer decides the truncation count
    other = load_tokenizer(tokenizer.name_or_path)
    assert scan_cache.tokenizer_identity(other) == scan_cache.tokenizer_identity(tokenizer)
    other("red " * 90, max_length=77, truncation=True, padding="max_length")
    assert scan_cache.tokenizer_identity(other) == scan_cache.tokenizer_identity(tokenizer)  # calls change nothing
    other.model_max_length = 16
    assert not data.build_train_loader(DataConfig(train_data_dir=str(folder), resolution=8), other,
                                       cache_dir=str(tmp_path / "hf"), host_batch_size=2, seed=0, process_index=0,
                                       process_count=1, scan_cache_path=str(cache)).scan_from_cache
    assert len(decoded.take()) == 9
    # a damaged file: a warning, a scan, and a valid file again
    cache.write_text('{"format": 1, "key": ')
    assert len(scanned()) == 9
    document = json.loads(cache.read_text())
    document["usable_bitmap"] = base64.b64encode(b"\xff").decode()  # right key, wrong body
    cache.write_text(json.dumps(document))
    assert len(scanned()) == 9


def test_only_process_zero_writes_and_every_process_reads(tmp_path, tokenizer, monkeypatch):
    folder, cache = tmp_path / "imgs", tmp_path / "data_scan.json"
    write_folder(folder, 8)
    decoded = DecodeLog(monkeypatch, file_name_of)
    hosts = dict(host_batch_size=2, process_count=2)
    assert not folder_loader(tokenizer, folder, cache, process_index=1, **hosts).scan_from_cache
    assert not cache.exists() and decoded.take() == GOOD_FILES  # simulated hosts in one process scan it all
    assert not folder_loader(tokenizer, folder, cache, process_index=0, **hosts).scan_from_cache
    assert cache.exists() and decoded.take() == GOOD_FILES
    assert folder_loader(tokenizer, folder, cache, process_index=1, **hosts).scan_from_cache
    assert decoded.take() == []


def test_the_scan_file_can_be_written_later(tmp_path, tokenizer):
    """write_scan_file=False: nothing is written until loader.write_scan_file() (the trainer calls it once
    every input is checked), and then only once, by process 0, after a scan."""
    folder, cache = tmp_path / "imgs", tmp_path / "out" / "data_scan.json"
    write_folder(folder, 8)
    later = folder_loader(tokenizer, folder, cache, write_scan_file=False)
    other_host = folder_loader(tokenizer, folder, cache, write_scan_file=False, process_index=1, process_count=2)
    assert not (tmp_path / "out").exists()
    assert other_host.write_scan_file() is False and not (tmp_path / "out").exists()
    assert later.write_scan_file() is True and cache.exists()
    assert later.write_scan_file() is False
    reader = folder_loader(tokenizer, folder, cache, write_scan_file=False)
    assert reader.scan_from_cache and reader.write_scan_file() is False


def test_hosts_use_the_file_only_when_every_one_read_it(tmp_path, tokenizer, monkeypatch):
    """On threads standing in for two hosts: when one cannot read the file, both scan their shares."""
    dataset = prepared(mixed_dataset())
    records = np.arange(NUM_RECORDS, dtype=np.int64)
    decoded = DecodeLog(monkeypatch, record_by_bytes())
    key = scan_cache.scan_key(dataset_identity={"fingerprint": dataset._fingerprint}, image_column="image",
                              caption_column="text", num_rows=NUM_RECORDS, max_train_samples=None, seed=0,
                              validate_images=True, tokenizer=tokenizer)
    one = merge_host_scans(records, [share(dataset, records, tokenizer, 0, 1)])
    decoded.take()

    def hosts(paths):
        def host(index, allgather):
            return scan_cache.load_or_scan(
                dataset, records, image_column="image", caption_column="text", tokenizer=tokenizer,
                validate_images=True, group=HostGroup(index, 2, allgather), key=key, cache_path=str(paths[index]),
                show_progress=False)
        return on_threads(2, host)

    shared = tmp_path / "shared.json"
    results = hosts([shared, shared])
    assert [from_file for _, from_file in results] == [False, False] and decoded.take() == list(range(NUM_RECORDS))
    for result, _ in results:
        assert_same_scan(result, one)
    scan_cache.write_scan_file(str(shared), key, records, results[0][0])  # what process 0's loader does
    results = hosts([shared, shared])
    assert [from_file for _, from_file in results] == [True, True] and decoded.take() == []
    for result, _ in results:
        assert_same_scan(result, one)
    results = hosts([shared, tmp_path / "not_there.json"])  # host 1 does not see the file
    assert [from_file for _, from_file in results] == [False, False] and decoded.take() == list(range(NUM_RECORDS))
    for result, _ in results:
        assert_same_scan(result, one)


# ---------------------------------------------------------------------------------------------
# Two real processes (jax.distributed, CPU collectives)
# ---------------------------------------------------------------------------------------------


# One of the two jax processes: three builds (scan and write; read; host 1 pointed at a missing file), each
# followed by a barrier (process 0 writes the file after the exchange). Writes the files each build decoded
# and its first 3 batches under OUT. Imports only t2i_flax (no torch), to start fast.
TWO_PROCESS_WORKER = r"""
import json, os, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from t2i_flax import data
from t2i_flax.config import DataConfig
from t2i_flax.data import scan
from t2i_flax.tokenizer import load_tokenizer, write_tiny_clip_tokenizer

folder, hf_cache, scan_file, tokenizer_dir, out = sys.argv[1:6]
jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=2, process_id=int(os.environ["RANK"]))
rank = jax.process_index()
decoded = []
inspect_image = scan.inspect_image
scan.inspect_image = lambda value: (decoded.append(os.path.basename(value["path"])), inspect_image(value))[1]
clip_tokenizer = load_tokenizer(tokenizer_dir)
report, arrays = [], {}
for build, path in enumerate([scan_file, scan_file, scan_file if rank == 0 else scan_file + ".elsewhere"]):
    loader = data.build_train_loader(DataConfig(train_data_dir=folder, resolution=8, random_flip=True), clip_tokenizer,
                                     cache_dir=hf_cache, host_batch_size=2, seed=4, scan_cache_path=path)
    multihost_utils.sync_global_devices(f"build {build}")
    report.append({"decoded": sorted(decoded), "from_file": loader.scan_from_cache,
                   "usable": loader._example_fn.records.tolist(), "stats": loader.stats.__dict__})
    decoded.clear()
    iterator = loader.iterator()
    for step in range(3):
        for name, value in next(iterator).items():
            arrays[f"{build}_{step}_{name}"] = value
    iterator.close()
with open(os.path.join(out, f"report{rank}.json"), "w") as f:
    json.dump(report, f)
np.savez(os.path.join(out, f"batches{rank}.npz"), **arrays)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_jax_processes_scan_half_each_and_agree(tmp_path):
    folder, tokenizer_dir = tmp_path / "imgs", tmp_path / "tokenizer"
    write_folder(folder, 10, bad_files())
    write_tiny_clip_tokenizer(tokenizer_dir)
    clip_tokenizer = load_tokenizer(tokenizer_dir)
    hf_cache, scan_file = tmp_path / "hf", tmp_path / "run" / "data_scan.json"
    single = [data.build_train_loader(DataConfig(train_data_dir=str(folder), resolution=8, random_flip=True),
                                      clip_tokenizer, cache_dir=str(hf_cache), host_batch_size=2, seed=4,
                                      process_index=p, process_count=2) for p in range(2)]
    env = process_environment(JAX_PLATFORMS="cpu", COORDINATOR=f"127.0.0.1:{free_port()}")
    argv = [sys.executable, "-c", TWO_PROCESS_WORKER, str(folder), str(hf_cache), str(scan_file), str(tokenizer_dir),
            str(tmp_path)]
    workers = [subprocess.Popen(argv, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for rank in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
    files = [os.path.basename(value["path"]) for value in single[0]._example_fn.dataset["image"]]
    assert sorted(files) == sorted([f"good{i:02d}.png" for i in range(10)] + BAD_FILES)
    usable = single[0]._example_fn.records.tolist()
    assert sorted(files[r] for r in usable) == [f"good{i:02d}.png" for i in range(10)]
    for rank in range(2):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        half = sorted(files[rank::2])
        assert [build["decoded"] for build in report] == [half, [], half]  # its half, nothing, its half again
        assert [build["from_file"] for build in report] == [False, True, False]
        for build in report:
            assert build["usable"] == usable
            assert build["stats"] == json.loads(json.dumps(single[rank].stats.__dict__))
        batches = np.load(tmp_path / f"batches{rank}.npz")
        expected = take(single[rank].iterator(), 3)
        for build in range(3):
            for step in range(3):
                for name, value in expected[step].items():
                    np.testing.assert_array_equal(batches[f"{build}_{step}_{name}"], value)
