"""Checkpoints: exact resume after SIGTERM, a double Ctrl-C and SIGKILL (real processes on 8 simulated
devices), damaged and unfinished checkpoints, another layout, refusals, write failures, export from any
checkpoint."""
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from t2i_flax import checkpoint, cli, export, optim, resume, sharding, step, weights
from t2i_flax.errors import CheckpointError
from t2i_flax.models import FlaxUNet2DConditionModel

checkpoint.setup_process()  # as the command lines do

from conftest import RESOLUTION, process_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_text_to_image_flax.py")
STEPS = 8  # 2 steps per epoch (16 images, global batch 8): 4 epochs, each reshuffled
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def caption_list_dataset(tmp_path_factory):
    """16 images whose captions are lists of 3 alternatives (one picked per sample, seeded)."""
    folder = tmp_path_factory.mktemp("captions")
    colors = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (240, 220, 40)]
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(16):
            image = Image.new("RGB", (40, 36), colors[i % 4])
            image.paste(colors[(i + 1) % 4], (i, 4, i + 12, 20))
            image.save(folder / f"{i:02d}.png")
            captions = [f"a {word} square" for word in ("red", "green", "blue")]
            handle.write(json.dumps({"file_name": f"{i:02d}.png", "text": captions}) + "\n")
    return str(folder)


def run_argv(pipeline_dir, dataset_dir, output_dir, *extra):
    return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir,
            "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--random_flip",
            "--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "2", "--max_train_steps", str(STEPS), "--checkpointing_steps", "2",
            "--dataloader_num_workers", "2", "--seed", "4", "--log_every", "1", "--report_to", "none",
            "--cpu_devices", "8", *extra]


def environment():
    return process_environment()


def run(argv, **kwargs):
    return subprocess.run(argv, env=environment(), cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs)


def logged_steps(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def wait_for(predicate, process, timeout=600):
    start = time.time()
    while not predicate():
        assert process.poll() is None, (process.communicate()[1] or "")[-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(pipeline_dir, caption_list_dataset, tmp_path_factory):
    """The uninterrupted run."""
    output_dir = str(tmp_path_factory.mktemp("reference"))
    result = run(run_argv(pipeline_dir, caption_list_dataset, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def last_line(stderr: str) -> str:
    """The last line the trainer wrote (grain's resource tracker may warn about shared memory after it)."""
    lines = [line for line in stderr.strip().splitlines()
             if "resource_tracker" not in line and not line.startswith("  warnings.warn(")]
    return lines[-1]


VALIDATION = ["--validation_prompts", "a red square", "a blue square", "--validation_steps", "4",
              "--validation_num_inference_steps", "3", "--validation_scheduler", "euler"]


def test_sigterm_double_ctrl_c_and_sigkill_then_resume_is_bit_identical(reference, pipeline_dir,
                                                                          caption_list_dataset, tmp_path):
    """One run interrupted three ways, resumed with `latest` each time: the export equals the uninterrupted
    run's bit for bit (EMA, random flips, caption choice from lists, data order across epochs, 2 workers).
    This run also draws validation images, which the reference does not: they change nothing."""
    output_dir = str(tmp_path / "out")
    argv = run_argv(pipeline_dir, caption_list_dataset, output_dir, *VALIDATION)
    resume_argv = argv + ["--resume_from_checkpoint", "latest"]
    checkpoints_dir = os.path.join(output_dir, "checkpoints")

    # 1. SIGTERM (a preemption notice) after step 3: the step in flight finishes, its checkpoint is written
    # completely, and the process says how to resume (exit code 75).
    process = subprocess.Popen(argv, env=environment(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(lambda: len(logged_steps(output_dir)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    message = last_line(stderr)
    assert message.startswith("stopped by SIGTERM after step ") and "--resume_from_checkpoint latest" in message
    stopped_at = int(message.split("after step ")[1].split(":")[0])
    assert stopped_at >= 3 and os.path.isdir(os.path.join(checkpoints_dir, str(stopped_at)))
    assert not os.path.exists(os.path.join(output_dir, "model_index.json"))  # no export from a stopped run

    # 2. Ctrl-C twice: the second aborts at once (exit code 130), without waiting for a checkpoint.
    stderr_path = tmp_path / "ctrl_c.stderr"
    with open(stderr_path, "w") as stderr_file:
        process = subprocess.Popen(resume_argv, env=environment(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr_file, text=True)
        wait_for(lambda: logged_steps(output_dir)[-1]["step"] > stopped_at, process)
        process.send_signal(signal.SIGINT)
        # Two signals that arrive while the step runs in XLA count as one: send the second once the first is seen.
        wait_for(lambda: "Ctrl-C again to abort" in stderr_path.read_text(), process)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    stderr = stderr_path.read_text()
    assert process.returncode == 130 and last_line(stderr) == "interrupted", stderr[-3000:]

    # 3. SIGKILL once the checkpoint of step 6 is complete (the kill lands anywhere after it).
    process = subprocess.Popen(resume_argv, env=environment(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.isdir(os.path.join(checkpoints_dir, "6")), process)
    process.kill()
    process.communicate(timeout=300)

    # 4. Resume to the end.
    result = run(resume_argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    with open(os.path.join(reference, UNET_FILE), "rb") as a, open(os.path.join(output_dir, UNET_FILE), "rb") as b:
        assert a.read() == b.read()
    # Steps logged again after a resume carry the same values as the uninterrupted run's.
    losses = {entry["step"]: entry["loss"] for entry in logged_steps(output_dir)}
    assert losses == {entry["step"]: entry["loss"] for entry in logged_steps(reference)}
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == ["4", "6", "8"]  # the newest 3

    # Validation grids every 4 steps and at the end; the model card shows the last one.
    grids = sorted(os.listdir(os.path.join(output_dir, "validation")))
    assert grids == ["step_4.png", "step_8.png"], grids
    grid = np.asarray(Image.open(os.path.join(output_dir, "validation", "step_8.png")))
    assert grid.shape == (2 * (128 + 14), 128, 3) and grid.std() > 1  # 2 prompts x 1 image, enlarged 4x
    card = open(os.path.join(output_dir, "README.md")).read()
    assert card.startswith("---\nbase_model: ") and "license: " in card and "- text-to-image" in card
    assert "![validation images](validation.png)" in card and "`a red square`" in card and "| steps | 8 |" in card
    assert open(os.path.join(output_dir, "validation.png"), "rb").read() == open(
        os.path.join(output_dir, "validation", "step_8.png"), "rb").read()


def test_checkpoint_of_the_output_dir_is_never_overwritten_without_resume(reference, pipeline_dir,
                                                                          caption_list_dataset, capsys):
    before = sorted(os.listdir(os.path.join(reference, "checkpoints")))
    argv = run_argv(pipeline_dir, caption_list_dataset, reference)[2:]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds checkpoints of an earlier run" in err, err
    assert "--resume_from_checkpoint latest" in err and "another --output_dir" in err
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == before


def test_resume_with_other_settings_names_them(reference, pipeline_dir, caption_list_dataset, capsys):
    argv = run_argv(pipeline_dir, caption_list_dataset, reference)[2:]
    changed = argv + ["--resume_from_checkpoint", "latest", "--learning_rate", "2e-3", "--train_batch_size", "2"]
    assert cli.main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--learning_rate: 0.001 in the checkpoint, 0.002 now" in err
    assert "global batch (--train_batch_size x devices): 8 in the checkpoint, 16 now" in err
    assert "--max_train_steps" in err  # the list of what may change


def test_resume_from_a_step_or_path_that_is_not_there(reference, pipeline_dir, caption_list_dataset, capsys):
    argv = run_argv(pipeline_dir, caption_list_dataset, reference)[2:]
    assert cli.main(argv + ["--resume_from_checkpoint", "checkpoint-5"]) == 2
    assert "there is no checkpoint of step 5" in capsys.readouterr().err
    assert cli.main(argv + ["--resume_from_checkpoint", os.path.join(reference, "nowhere", "3")]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err


def test_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(reference, pipeline_dir,
                                                                   caption_list_dataset, tmp_path):
    """The newest checkpoint's array files truncated, and an unfinished save's temporary folder left
    behind: `latest` warns and resumes from the newest good one (6), the damaged one is set aside, the
    leftover is removed, and the steps trained again give the uninterrupted run's step 8 bit for bit."""
    output_dir = str(tmp_path / "copy")
    shutil.copytree(reference, output_dir)
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "8", "params", "ocdbt.process_0", "d", "*")):
        os.truncate(path, os.path.getsize(path) // 2)
    leftover = os.path.join(output_dir, "checkpoints", "10.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(leftover, "params"))
    result = run(run_argv(pipeline_dir, caption_list_dataset, output_dir, "--resume_from_checkpoint", "latest",
                          "--dataloader_num_workers", "0"))  # the data position does not depend on the workers
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints/8 cannot be restored" in result.stderr and "falling back to an older checkpoint" in result.stderr
    assert "resumed from" in result.stdout and "(step 6 of 8)" in result.stdout
    assert not os.path.exists(leftover)
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == ["4", "6", "8", "8.damaged"]
    assert [e["step"] for e in logged_steps(output_dir)][-2:] == [7, 8]
    with open(os.path.join(reference, UNET_FILE), "rb") as a, open(os.path.join(output_dir, UNET_FILE), "rb") as b:
        assert a.read() == b.read()

    unet = FlaxUNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", load_weights=False)[0]
    where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                                      unet.abstract_params())
    def params_at(folder):
        restored = checkpoint.Checkpoints(folder, read_only=True).restore(8, {"params": abstract, "ema_params": abstract})
        return jax.device_get(restored)
    again, original = params_at(os.path.join(output_dir, "checkpoints")), params_at(os.path.join(reference, "checkpoints"))
    for tree in ("params", "ema_params"):
        for path, value in weights.flatten(original[tree]).items():
            assert np.asarray(weights.flatten(again[tree])[path]).tobytes() == np.asarray(value).tobytes(), path


def test_a_failing_write_keeps_the_previous_checkpoints(reference, pipeline_dir, caption_list_dataset, tmp_path):
    """Resumed from step 6 (step 8's folder removed) with files limited to 64 KiB (as a full disk would stop them):
    steps 7 and 8 are trained and the checkpoint of step 8 cannot be written. One line, exit code 1; the
    checkpoints of steps 4 and 6 are still there and readable, although --checkpoints_total_limit 2 would have
    deleted step 4 once step 8 was complete. (The same step as the reference run's: read from the compilation
    cache. Training longer than a finished run is test_checkpoint_gcs.py's.)"""
    output_dir = str(tmp_path / "copy")
    shutil.copytree(reference, output_dir)
    shutil.rmtree(os.path.join(output_dir, "checkpoints", "8"))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    argv = run_argv(pipeline_dir, caption_list_dataset, output_dir, "--resume_from_checkpoint", "latest",
                    "--checkpoints_total_limit", "2", "--dataloader_num_workers", "0")
    result = run(argv, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: writing a checkpoint in "), result.stderr[-3000:]
    assert "File too large" in errors[0] and errors[0].endswith("the previous checkpoints are kept")
    assert "Traceback" not in result.stderr
    assert [e["step"] for e in logged_steps(output_dir)][-2:] == [7, 8]
    manager = checkpoint.Checkpoints(os.path.join(output_dir, "checkpoints"), read_only=True)
    assert manager.steps() == [4, 6]
    for kept in (4, 6):
        assert manager.read_run_record(kept)["data"]["next_batch"] == kept


def test_export_from_a_checkpoint_equals_the_end_of_training(reference, tmp_path):
    assert export.main(["--checkpoint", os.path.join(reference, "checkpoints", "8"), "--output_dir",
                        str(tmp_path / "ema")]) == 0
    with open(os.path.join(reference, UNET_FILE), "rb") as a, open(tmp_path / "ema" / UNET_FILE, "rb") as b:
        assert a.read() == b.read()
    for name in ("vae", "text_encoder"):
        assert load_file(glob.glob(str(tmp_path / "ema" / name / "*.safetensors"))[0]).keys() == load_file(
            glob.glob(os.path.join(reference, name, "*.safetensors"))[0]).keys()
    assert export.main(["--checkpoint", os.path.join(reference, "checkpoints", "8"), "--output_dir",
                        str(tmp_path / "raw"), "--no_ema"]) == 0
    raw, ema = load_file(str(tmp_path / "raw" / UNET_FILE)), load_file(str(tmp_path / "ema" / UNET_FILE))
    assert max(np.abs(raw[k] - ema[k]).max() for k in raw) > 1e-5  # the raw weights, not the EMA


def test_export_of_what_is_not_a_checkpoint(reference, tmp_path, capsys):
    assert export.main(["--checkpoint", os.path.join(reference, "checkpoints", "5"), "--output_dir",
                        str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- in-process: layouts, shapes, the keep limit ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state_config(pipeline_dir):
    unet, params = FlaxUNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    lr = optim.learning_rate_schedule("constant", 1e-3, 0, 10)
    config = step.StepConfig(unet=unet, vae=None, text_encoder=None, noise_schedule=None,
                             optimizer=optim.make_optimizer(lr), learning_rate=lr, use_ema=True)
    return config, params


def randomised(state):
    """Every float leaf of the state made distinct (Adam moments are zeros at init, EMA equals params): random
    numbers added on the host, placed as the leaf was (a jitted fill compiled for minutes on 2 cores)."""
    rng = np.random.default_rng(0)

    def fill(leaf):
        if not np.issubdtype(leaf.dtype, np.floating):
            return leaf
        values = np.asarray(leaf) + rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return jax.device_put(values, leaf.sharding)

    return jax.tree_util.tree_map(fill, state)


@pytest.mark.parametrize("layout", ["fsdp4", "one_device"])
def test_a_checkpoint_from_8_data_parallel_devices_restores_on_another_layout(tiny_state_config, tmp_path, layout):
    config, params = tiny_state_config
    state, _ = step.create_state(config, sharding.make_mesh(1), params, seed=3)
    state = randomised(state)
    assert len({np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(state.opt_state)
                if np.asarray(leaf).size > 1}) > 1  # the Adam moments are no longer all zeros
    saved = checkpoint.Checkpoints(str(tmp_path / "ckpt"))
    saved.save(5, state, {"next_batch": 5}, {"version": 1})
    saved.close()
    mesh = sharding.make_mesh(4) if layout == "fsdp4" else sharding.make_mesh(1, devices=jax.devices()[:1])
    abstract, shardings = step.state_shardings(config, mesh, jax.eval_shape(lambda: params), seed=3)
    placed = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = checkpoint.Checkpoints(str(tmp_path / "ckpt"), read_only=True).restore_state(5, placed)
    for (path, want), got, where in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(restored),
                                        jax.tree_util.tree_leaves(shardings)):
        assert got.sharding == where, jax.tree_util.keystr(path)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), jax.tree_util.keystr(path)
    if layout == "fsdp4":
        kernel = restored.params["conv_in"]["kernel"]
        assert {shard.data.shape[-1] for shard in kernel.addressable_shards} == {kernel.shape[-1] // 4}


def test_a_checkpoint_of_other_shapes_or_without_an_item_is_an_error(tiny_state_config, tmp_path):
    config, params = tiny_state_config
    state, _ = step.create_state(config, sharding.make_mesh(1), params, seed=3)
    saved = checkpoint.Checkpoints(str(tmp_path / "ckpt"))
    saved.save(1, state, {"next_batch": 1}, {"version": 1})
    saved.close()
    reader = checkpoint.Checkpoints(str(tmp_path / "ckpt"), read_only=True)
    where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoint.state_items(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), state))
    wrong = dict(abstract)
    wrong["params"] = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype, sharding=where), abstract["params"])
    with pytest.raises(CheckpointError, match=r"ckpt/1 cannot be restored: Requested shape") as error:
        reader.restore(1, wrong)
    assert "\n" not in str(error.value)
    no_ema = checkpoint.Checkpoints(str(tmp_path / "plain"))
    no_ema.save(1, state.replace(ema_params=None), {"next_batch": 1}, {"version": 1})
    no_ema.close()
    with pytest.raises(CheckpointError, match="cannot be restored"):
        checkpoint.Checkpoints(str(tmp_path / "plain"), read_only=True).restore(1, {"ema_params": abstract["params"]})


def test_the_keep_limit_deletes_an_old_step_only_after_a_newer_one_is_complete(tmp_path, monkeypatch):
    """keep=2, four saves: the deletion of a step starts only when the newer step's folder is on disk (it appears
    only complete: written under a temporary name, then renamed), and it is the oldest step that goes."""
    from orbax.checkpoint._src.path import deleter

    directory = tmp_path / "ckpt"

    def complete_steps():
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit())

    deletions = []  # (the step being deleted, the step folders on disk at that moment)
    original_delete = deleter.StandardCheckpointDeleter.delete

    def delete(self, step_number):
        deletions.append((step_number, complete_steps()))
        original_delete(self, step_number)

    monkeypatch.setattr(deleter.StandardCheckpointDeleter, "delete", delete)
    tree = {"w": jax.numpy.arange(4.0)}
    manager = checkpoint.Checkpoints(str(directory), keep=2)
    state = step.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=tree, opt_state={}, ema_params=None,
                            rng=jax.random.PRNGKey(0))
    after_each = []
    for number in (1, 2, 3, 4):
        manager.save(number, state, {"next_batch": number}, {"version": 1})
        manager.wait()
        after_each.append(complete_steps())
    assert deletions == [(1, [1, 2, 3]), (2, [2, 3, 4])]
    assert after_each == [[1], [1, 2], [2, 3], [3, 4]]
    assert manager.steps() == [3, 4]
    manager.close()


@pytest.mark.parametrize("value,expected", [
    ("latest", ("/c", None)), ("12", ("/c", 12)), ("checkpoint-12", ("/c", 12)),
    ("/runs/a/checkpoints/500", ("/runs/a/checkpoints", 500)), ("/runs/a/checkpoints/checkpoint-7/", ("/runs/a/checkpoints", 7)),
])
def test_resume_values(value, expected):
    assert resume.parse_resume(value, "/c") == expected


def test_a_resume_value_that_names_no_step():
    with pytest.raises(CheckpointError, match="not 'latest', a step number"):
        resume.parse_resume("/runs/a/checkpoints", "/c")
