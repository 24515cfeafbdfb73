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


def test_sigterm_to_one_host_stops_both_at_the_same_step_and_they_resume(pipeline_dir, dataset_dir, tmp_path):
    """A preemption notice reaches one process of two: JAX's preemption service tells the other, both finish
    the same step, write one checkpoint together (each its own shards) and exit with code 75; started
    again with `latest`, both continue from that step to the end."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    output_dir = tmp_path / "run"
    common = argv(pipeline_dir, dataset_dir, str(output_dir), 4) + ["--multihost", "--checkpointing_steps", "100"]
    common[common.index("--max_train_steps") + 1] = "8"

    def start(extra):
        port = free_port()
        return [subprocess.Popen(common + extra, env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in range(2)]

    workers = start([])
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
    assert 2 <= stopped_at < 8 and sorted(os.listdir(output_dir / "checkpoints")) == [str(stopped_at)]

    workers = start(["--resume_from_checkpoint", "latest"])
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert f"resumed from {output_dir / 'checkpoints' / str(stopped_at)} (step {stopped_at} of 8)" in outputs[0][0]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9))
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
