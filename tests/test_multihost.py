"""Two processes (4 CPU devices each, coordinator on 127.0.0.1) train exactly like one process with 8
devices: each host reads its own part of every global batch, and only process 0 writes the export."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from conftest import RESOLUTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_text_to_image_flax.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def argv(pipeline_dir, dataset_dir, output_dir, devices):
    # --adam_epsilon 1: updates linear in the gradients, so the all-reduce order cannot be amplified by
    # Adam's division for parameters whose true gradient is 0.
    return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1",
            "--max_train_steps", "3", "--learning_rate", "0.05", "--adam_epsilon", "1.0", "--log_every", "1",
            "--report_to", "none", "--random_flip", "--seed", "5", "--cpu_devices", str(devices)]


def test_two_processes_train_like_one(pipeline_dir, dataset_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run(argv(pipeline_dir, dataset_dir, str(tmp_path / "one"), 8), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    workers = [subprocess.Popen(argv(pipeline_dir, dataset_dir, str(tmp_path / "two"), 4) + ["--multihost"],
                                env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(rank)),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(2)]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert "devices: 8 x cpu" in outputs[0][0]
    assert "saved the fine-tuned pipeline" in outputs[0][0] and "saved" not in outputs[1][0]

    def losses(folder):
        return [json.loads(line)["loss"] for line in open(tmp_path / folder / "metrics.jsonl")]

    assert len(losses("two")) == 3
    np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-5)
    one = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    source = load_file(os.path.join(pipeline_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(np.abs(one[key] - source[key]).max() for key in one) > 1e-4  # the runs did train
