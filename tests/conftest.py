"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import shutil

SIMULATED_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SIMULATED_DEVICES_FLAG).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache (on by default in the command lines), for this session and the training
# processes the tests start, kept from one session to the next in a folder of its own (not the trainer's): most of
# the suite's time is XLA compiling the same tiny programs, which a second `make test` (from any clone) reads back.
# The cache's key is the program, the compiler's version and its flags, so a changed program is compiled again.
# T2I_FLAX_COMPILATION_CACHE: another folder (an empty one times a cold run).
TEST_CACHE_LIMIT_BYTES = 2 << 30  # beyond it, the oldest entries go at the start of the next session


def suite_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "t2i_flax", "test_jax_compilation_cache")


def trim_compilation_cache(folder: str, limit: int = TEST_CACHE_LIMIT_BYTES) -> None:
    """Removes the oldest entries (by when they were written) until the folder holds at most half of `limit`, once
    it holds more than `limit`."""
    entries = [entry for entry in os.scandir(folder) if entry.is_file()] if os.path.isdir(folder) else []
    total = sum(entry.stat().st_size for entry in entries)
    if total <= limit:
        return
    for entry in sorted(entries, key=lambda entry: entry.stat().st_mtime):
        if total <= limit // 2:
            break
        total -= entry.stat().st_size
        os.remove(entry.path)


if "T2I_FLAX_COMPILATION_CACHE" not in os.environ:
    os.environ["T2I_FLAX_COMPILATION_CACHE"] = suite_compilation_cache_dir()
    if "PYTEST_XDIST_WORKER" not in os.environ:  # once, in the process that starts the workers
        trim_compilation_cache(os.environ["T2I_FLAX_COMPILATION_CACHE"])
# Single-file checkpoints are converted into a folder of this session too (t2i_flax/single_file.py), removed at
# its end by the process that made it (the one that starts the workers).
SESSION_SINGLE_FILE_CACHE = None
if "T2I_FLAX_SINGLE_FILE_CACHE" not in os.environ:
    import tempfile

    os.environ["T2I_FLAX_SINGLE_FILE_CACHE"] = tempfile.mkdtemp(prefix="t2i_flax_single_file_")
    SESSION_SINGLE_FILE_CACHE = os.environ["T2I_FLAX_SINGLE_FILE_CACHE"]


def pytest_sessionfinish(session, exitstatus):
    if SESSION_SINGLE_FILE_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(SESSION_SINGLE_FILE_CACHE, ignore_errors=True)


import pytest  # noqa: E402
import torch  # noqa: E402

from t2i_flax import compile_cache  # noqa: E402

# In this process too: a program compiled by one test (the tiny step, a sampler) is read back by the next test
# that compiles the same program, and by the training processes the tests start.
compile_cache.enable(os.environ["T2I_FLAX_COMPILATION_CACHE"])

# On 2 cores, torch's thread pool and XLA's fight after JAX has run (the PyTorch oracle then runs ~30x
# slower); one torch thread keeps both fast.
torch.set_num_threads(1)

def process_environment(**changes) -> dict:
    """os.environ for a process a test starts (a training run, generate): this session's XLA flags without the
    simulated device count, which the process sets itself (--cpu_devices); `changes` set (or, None, remove) more."""
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(SIMULATED_DEVICES_FLAG, "").strip())
    env.update(changes)
    return {name: value for name, value in env.items() if value is not None}


RESOLUTION = 32  # of the synthetic dataset and the tiny pipeline's training runs

# Seconds each file takes (measured, 2-core machine, one worker); `make test` runs the files on 2 workers
# (pytest-xdist, a whole file per worker, in the order collected), so the longest go first: the short ones then
# fill the gaps instead of one long file running alone at the end.
FILE_SECONDS = {"test_demo.py": 200, "test_train.py": 330, "test_checkpoint.py": 265, "test_restore_faults.py": 190,
                "test_aot.py": 220, "test_latent_cache.py": 120, "test_multihost.py": 195, "test_checkpoint_gcs.py": 100,
                "test_train_lora.py": 140, "test_sdxl.py": 150, "test_step_vs_torch.py": 130, "test_sample.py": 85,
                "test_cli.py": 40, "test_lora.py": 40, "test_data.py": 35, "test_generate.py": 35, "test_unet.py": 35,
                "test_clip.py": 30, "test_setup.py": 55,
                "test_single_file.py": 20, "test_single_file_train.py": 70,
                "test_kohya.py": 20, "test_buckets.py": 170, "test_captions.py": 30,
                "test_optimizers_sharded.py": 150, "test_train_options.py": 40, "test_text_encoder_lora.py": 150,
                "test_validation_split.py": 105}


SLOW_FILE_SECONDS = 60  # files that take at least this long are marked slow: `make test-fast` leaves them out


def pytest_collection_modifyitems(session, config, items):
    """The longest files first (see FILE_SECONDS); the tests of a file keep their order. Long files are `slow`."""
    def seconds(item):
        return FILE_SECONDS.get(os.path.basename(str(item.fspath)), 0)
    items.sort(key=lambda item: -seconds(item))  # a stable sort
    for item in items:
        if seconds(item) >= SLOW_FILE_SECONDS:
            item.add_marker(pytest.mark.slow)


def made_once(tmp_path_factory, name: str, make) -> str:
    """The folder `make(folder)` fills, made once in a session: with pytest-xdist, by the first worker that needs it,
    in the session's folder the workers share, while the others wait for it (the tiny pipeline's random weights
    alone compile for ~25 s). Tests read these folders and never write them."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(str(folder))
        return str(folder)
    import filelock

    folder = tmp_path_factory.getbasetemp().parent / name
    with filelock.FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            make(str(folder))
            (folder / ".made").touch()
    return str(folder)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A tiny random SD pipeline in diffusers format, made with our own classes (as `make demo` does)."""
    from t2i_flax.demo import write_tiny_pipeline

    return made_once(tmp_path_factory, "tiny-sd", lambda folder: write_tiny_pipeline(folder, seed=0))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """16 synthetic captioned images as an imagefolder with metadata.jsonl."""
    from t2i_flax import synthetic

    folder = str(tmp_path_factory.mktemp("shapes"))
    synthetic.write_synthetic_dataset(folder, 16, resolution=RESOLUTION, seed=0)
    return folder


@pytest.fixture(scope="session")
def torch_pipeline_dir(tmp_path_factory):
    """A tiny SD pipeline made with the PyTorch classes, norms and biases perturbed, several channels per
    GroupNorm group (tests/oracle.py)."""
    from oracle import write_torch_pipeline

    return made_once(tmp_path_factory, "torch-sd", write_torch_pipeline)


@pytest.fixture(scope="session")
def fp16_variant_pipeline_dir(torch_pipeline_dir, tmp_path_factory):
    """The same pipeline with ONLY fp16-variant weight files (`*.fp16.safetensors`, float16), as Hub repos
    ship them: loading it needs --variant fp16."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(tmp_path_factory.mktemp("fp16-sd"))
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(torch_pipeline_dir, name), os.path.join(folder, name))
    shutil.copy(os.path.join(torch_pipeline_dir, "model_index.json"), folder)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(os.path.join(torch_pipeline_dir, name)).half()
        model.save_pretrained(os.path.join(folder, name), variant="fp16")
    return folder


@pytest.fixture(scope="session")
def torch_sdxl_pipeline_dir(tmp_path_factory):
    """A tiny SDXL pipeline made with the PyTorch classes (tests/oracle.py)."""
    from oracle import write_torch_sdxl_pipeline

    return made_once(tmp_path_factory, "torch-sdxl", write_torch_sdxl_pipeline)


@pytest.fixture(scope="session")
def torch_sd2_pipeline_dir(tmp_path_factory):
    """A tiny SD 2.x pipeline made with the PyTorch classes (tests/oracle.py)."""
    from oracle import write_torch_sd2_pipeline

    return made_once(tmp_path_factory, "torch-sd2", write_torch_sd2_pipeline)


# (width, height) of the images of `sized_dataset_dir`: landscape, portrait and square, some needing no resize
SIZES = ((40, 32), (32, 48), (32, 32), (56, 40), (36, 52), (64, 64), (45, 33), (32, 40))


@pytest.fixture(scope="session")
def sized_dataset_dir(tmp_path_factory):
    """16 captioned images of several sizes and aspect ratios (SDXL's size and crop conditioning reads them)."""
    import json

    from PIL import Image

    folder = tmp_path_factory.mktemp("sized")
    colours = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (240, 220, 40)]
    words = ["red", "green", "blue", "yellow"]
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(16):
            width, height = SIZES[i % len(SIZES)]
            image = Image.new("RGB", (width, height), colours[i % 4])
            image.paste(colours[(i + 1) % 4], (i % 7, 3, i % 7 + width // 2, 3 + height // 2))
            image.save(folder / f"{i:02d}.png")
            handle.write(json.dumps({"file_name": f"{i:02d}.png",
                                     "text": f"a {words[(i + 1) % 4]} square on {words[i % 4]}"}) + "\n")
    return str(folder)
