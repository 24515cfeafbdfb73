"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402

RESOLUTION = 32  # of the synthetic dataset and the tiny pipeline's training runs


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A tiny random SD pipeline in diffusers format, made with our own classes (as `make demo` does)."""
    from t2i_flax.demo import write_tiny_pipeline

    return write_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")), seed=0)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """16 synthetic captioned images as an imagefolder with metadata.jsonl."""
    from t2i_flax import synthetic

    folder = str(tmp_path_factory.mktemp("shapes"))
    synthetic.write_synthetic_dataset(folder, 16, resolution=RESOLUTION, seed=0)
    return folder
