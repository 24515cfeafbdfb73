"""Two processes (4 CPU devices each, coordinator on 127.0.0.1) train exactly like one process with 8
devices: each host reads its own part of every global batch (and of the held-out batches: the same val_loss), and
only process 0 writes the export."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import RESOLUTION, process_environment

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
            "--max_train_steps", str(STEPS), "--learning_rate", "0.05", "--adam_epsilon", "1.0", "--log_every", "1",
            "--report_to", "none", "--random_flip", "--seed", "5", "--cpu_devices", str(devices),
            "--validation_split", "4"]  # 12 images train (1 step an epoch); val_loss at steps 0, 5 (5 epochs) and 8


STEPS = 8


def environment():
    return process_environment()


def start_two(command):
    """The two processes of one run (4 devices each), coordinator on a free local port."""
    port = free_port()
    return [subprocess.Popen(command, env=dict(environment(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(2)]


def two_process_argv(pipeline_dir, dataset_dir, output_dir):
    return argv(pipeline_dir, dataset_dir, str(output_dir), 4) + ["--multihost", "--checkpointing_steps", "100"]


def losses(output_dir, name="loss"):
    """{step: the metric} of metrics.jsonl (the last line of a step wins); "val_loss": the held-out loss."""
    return {entry["step"]: entry[name] for entry in map(json.loads, open(os.path.join(output_dir, "metrics.jsonl")))
            if name in entry}


def unet(output_dir):
    return os.path.join(output_dir, "unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def two_process_run(pipeline_dir, dataset_dir, tmp_path_factory):
    """An uninterrupted 2-process run of 8 steps: (output folder, [(stdout, stderr)] of process 0 and 1)."""
    output_dir = tmp_path_factory.mktemp("two")
    workers = start_two(two_process_argv(pipeline_dir, dataset_dir, output_dir))
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    return str(output_dir), outputs


def test_two_processes_train_like_one(two_process_run, pipeline_dir, dataset_dir, tmp_path):
    single = subprocess.run(argv(pipeline_dir, dataset_dir, str(tmp_path / "one"), 8), env=environment(), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    two, outputs = two_process_run
    assert "devices: 8 x cpu" in outputs[0][0]
    assert "saved the fine-tuned pipeline" in outputs[0][0] and "saved" not in outputs[1][0]

    assert sorted(losses(two)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses(two)[s] for s in range(1, STEPS + 1)],
                               [losses(str(tmp_path / "one"))[s] for s in range(1, STEPS + 1)], rtol=1e-5)
    held_out = losses(two, "val_loss")
    assert sorted(held_out) == [0, 5, STEPS]
    assert held_out[0] == losses(str(tmp_path / "one"), "val_loss")[0]  # the same weights: the same number
    np.testing.assert_allclose([held_out[s] for s in (5, STEPS)],
                               [losses(str(tmp_path / "one"), "val_loss")[s] for s in (5, STEPS)], rtol=1e-5)
    one, two = load_file(unet(str(tmp_path / "one"))), load_file(unet(two))
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    source = load_file(os.path.join(pipeline_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(np.abs(one[key] - source[key]).max() for key in one) > 1e-4  # the runs did train


def test_sigterm_to_one_host_stops_both_at_the_same_step_and_they_resume(two_process_run, pipeline_dir, dataset_dir,
                                                                          tmp_path):
    """A preemption notice reaches one process of two: JAX's preemption service tells the other, both finish
    the same step, write one checkpoint together (each its own shards) and exit with code 75; started
    again with `latest`, both continue from that step to the end, and the export and every logged loss equal
    the uninterrupted 2-process run's bit for bit."""
    import signal
    import time

    output_dir = tmp_path / "run"
    common = two_process_argv(pipeline_dir, dataset_dir, output_dir)

    workers = start_two(common)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
        assert time.time() < deadline
        time.sleep(0.1)
    workers[1].send_signal(signal.SIGTERM)
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [75, 75], [err[-2000:] for _, err in outputs]
    stops = {line.split("after step ")[1].split(":")[0] for _, err in outputs for line in err.splitlines()
             if line.startswith("stopped by ")}
    assert len(stops) == 1, [err[-1000:] for _, err in outputs]  # one agreed step, said by process 0 at least
    stopped_at = int(stops.pop())
    assert 2 <= stopped_at < STEPS and sorted(os.listdir(output_dir / "checkpoints")) == [str(stopped_at)]

    workers = start_two(common + ["--resume_from_checkpoint", "latest"])
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert f"resumed from {output_dir / 'checkpoints' / str(stopped_at)} (step {stopped_at} of 8)" in outputs[0][0]
    steps = [entry["step"] for entry in map(json.loads, metrics.read_text().splitlines()) if "loss" in entry]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))
    uninterrupted, _ = two_process_run
    assert losses(str(output_dir)) == losses(uninterrupted)
    assert losses(str(output_dir), "val_loss") == losses(uninterrupted, "val_loss")
    with open(unet(str(output_dir)), "rb") as resumed, open(unet(uninterrupted), "rb") as reference:
        assert resumed.read() == reference.read()
