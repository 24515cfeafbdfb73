"""Which checkpoint a run continues: --resume_from_checkpoint's value, the record check (same computation
settings, same global batch), and the restore that falls back from a damaged newest step.

    source, check_record, step = resume.open_source(config, checkpoints_dir)   # None: a new run
    record = resume.peek_record(source, step, check_record)                    # before the models load
    step, state, data_state, record, damaged = resume.restore(source, step, value, check_record, abstract_state)
    resume.set_aside(source.directory, damaged)                                # <step>.damaged

A failed read is damage (fall back to an older step) only where the files prove it; otherwise the run stops
(checkpoint.CheckpointReadFailed) and nothing is set aside. Several processes read the same step and agree."""
from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from t2i_flax.checkpoint import CheckpointReadFailed, Checkpoints, DamagedCheckpoint
from t2i_flax.config import RunConfig, may_change_on_resume
from t2i_flax.errors import CheckpointError
from t2i_flax.metrics import log

logger = logging.getLogger(__name__)

RECORD_VERSION = 1  # of the run record saved with every checkpoint
_STEP_NAME = re.compile(r"^(?:checkpoint-)?(\d+)$")


def parse_resume(value: str, checkpoints_dir: str) -> tuple[str, int | None]:
    """--resume_from_checkpoint -> (checkpoint directory, step or None for "latest").

    latest | <step> | checkpoint-<step> (the PyTorch script's folder name) look in `checkpoints_dir`; any
    other value is the path of one step folder (e.g. <output_dir>/checkpoints/500)."""
    if value == "latest":
        return checkpoints_dir, None
    named = _STEP_NAME.match(value)
    if named and not os.path.sep in value:
        return checkpoints_dir, int(named.group(1))
    path = value.rstrip("/")
    step = _STEP_NAME.match(os.path.basename(path))
    if not step:
        raise CheckpointError(f"--resume_from_checkpoint {value}: not 'latest', a step number, checkpoint-<step>, "
                              f"or the path of a step folder (<checkpoints_dir>/<step>)")
    return os.path.dirname(path) or ".", int(step.group(1))


class ResumeCheck:
    """Whether a checkpoint's record fits this run: same computation settings, same global batch."""

    def __init__(self, config: RunConfig, source: str):
        self.config, self.source = config, source

    def __call__(self, record: dict) -> None:
        if record.get("version") != RECORD_VERSION:
            raise CheckpointError(f"{self.source} was written by another t2i_flax checkpoint format "
                                  f"(version {record.get('version')}, this one reads {RECORD_VERSION})")
        differences = self.config.resume_differences(record["config"])
        global_batch = self.config.train.train_batch_size * jax.device_count()
        if record["resolved"]["global_batch_size"] != global_batch:
            differences.append(f"global batch (--train_batch_size x devices): {record['resolved']['global_batch_size']} "
                               f"in the checkpoint, {global_batch} now")
        if differences:
            raise CheckpointError(f"cannot resume from {self.source}: {'; '.join(differences)} (these may change "
                                  f"on resume: {', '.join(may_change_on_resume())})")


def open_source(config: RunConfig, checkpoints_dir: str):
    """(checkpoints to resume from or None, the record check, the step or None for the newest).

    Without --resume_from_checkpoint, a checkpoint folder that already holds steps is refused: it is an
    earlier run's, and this run would mix its checkpoints in or delete them."""
    value = config.checkpoint.resume_from_checkpoint
    if value is None:
        if _has_steps(checkpoints_dir):
            raise CheckpointError(f"{checkpoints_dir} already holds checkpoints of an earlier run: continue it with "
                                  f"--resume_from_checkpoint latest, or choose another --output_dir "
                                  f"(or --checkpoints_dir)")
        return None, None, None
    source_dir, step_number = parse_resume(value, checkpoints_dir)
    if not _has_steps(source_dir):
        if step_number is None:
            log(f"--resume_from_checkpoint latest: no checkpoint in {source_dir} yet, starting a new run")
            return None, None, None
        raise CheckpointError(f"--resume_from_checkpoint {value}: {source_dir} holds no checkpoints")
    source = Checkpoints(source_dir, read_only=True)
    return source, ResumeCheck(config, source.directory), step_number


def _has_steps(directory: str) -> bool:
    """Whether `directory` holds step folders. In a bucket (gs://) Orbax writes a step folder in place and marks
    it complete with a commit file, so there a folder without one (a save cut short) is not a step: it is removed
    when the run opens the directory, as the temporary folder of an unfinished local save is."""
    from etils import epath
    import orbax.checkpoint as ocp

    path = epath.Path(directory)
    if not path.exists():
        return False
    steps = (child for child in path.iterdir() if child.name.isdigit())
    if directory.startswith("gs://"):  # Orbax's test for a bucket path (its commit-file layout)
        steps = (child for child in steps if ocp.path.step.is_path_finalized(child))
    return any(steps)


def peek_record(source: Checkpoints, step_number: int | None, check_record) -> dict | None:
    """The record of the step to resume from (the newest readable one for "latest"), checked before the
    data and models are loaded. None when there is none to read: `restore` then says why. A read that fails for
    another reason than damage stops the run (CheckpointReadFailed), as in `restore`."""
    steps = source.steps()
    if step_number is not None and step_number not in steps:
        return None
    for candidate in _candidates(steps, step_number):
        try:
            record = agree(lambda: source.read_run_record(candidate)["run"])
        except DamagedCheckpoint:
            continue
        check_record(record)
        return record
    return None


def restore(checkpoints: Checkpoints, step: int | None, value: str, check_record, abstract_state):
    """Restores the checkpoint to resume from: `step`, or for "latest" the newest one that reads; a
    damaged newer one is skipped with a warning (never silently a new run). Returns (step, state,
    data_state, record, damaged steps skipped).

    Only damage (DamagedCheckpoint: files missing, truncated or corrupt) is a reason to fall back. Any other
    failure, after Checkpoints' retries, stops the run (CheckpointReadFailed, exit code 1) with nothing set aside:
    a bucket that does not answer for a while must not cost the newest checkpoint. With several processes every
    one reads the same step, and they go on only where all of them could read it (`agree`).

    check_record(record) raises a CheckpointError when the checkpoint is of another run's settings: that
    is never a reason to fall back to an older one."""
    steps = checkpoints.steps()
    if step is not None and step not in steps:
        shown = ", ".join(map(str, steps[-5:])) or "none"
        raise CheckpointError(f"--resume_from_checkpoint {value}: there is no checkpoint of step {step} in "
                              f"{checkpoints.directory} (steps there: {shown})")
    damaged = []
    for candidate in _candidates(steps, step):
        try:
            record = agree(lambda: checkpoints.read_run_record(candidate))
            check_record(record["run"])
            state = agree(lambda: checkpoints.restore_state(candidate, abstract_state))
        except DamagedCheckpoint as damage:
            if step is not None:
                raise
            logger.warning("%s; falling back to an older checkpoint", damage)
            damaged.append(candidate)
            continue
        return candidate, state, record["data"], record["run"], damaged
    raise CheckpointError(f"no checkpoint in {checkpoints.directory} can be restored (steps {steps})")


def _candidates(steps: list[int], step: int | None):
    """The steps to try, newest first (only `step` where one is named): process 0's list, which every process
    follows, so that all of them try the same step even where their listings of a bucket differ."""
    below = None
    while True:
        if step is not None:
            mine = step if below is None else -1
        else:
            mine = max((s for s in steps if below is None or s < below), default=-1)
        agreed = int(multihost_utils.broadcast_one_to_all(np.int64(mine)))
        if agreed < 0:
            return
        yield agreed
        below = agreed


_OK, _DAMAGED, _FAILED = 0, 1, 2  # worst last: one process's failure is everyone's
_MESSAGE_BYTES = 1024  # of the error line each process contributes


def agree(read):
    """read() on every process, and the same outcome on all: its value where every process read it, else the
    worst process's error raised on all of them (CheckpointReadFailed before DamagedCheckpoint), naming that
    process. Orbax's restore has no barrier of its own here (Checkpoints(read_only=True)), so a process whose read
    fails meets the others here, after its retries, and none goes on alone. One process: read()."""
    if jax.process_count() == 1:
        return read()
    status, message, value = _OK, "", None
    try:
        value = read()
    except DamagedCheckpoint as error:
        status, message = _DAMAGED, str(error)
    except CheckpointReadFailed as error:
        status, message = _FAILED, str(error)
    encoded = np.zeros(_MESSAGE_BYTES, np.uint8)
    text = message.encode()[:_MESSAGE_BYTES]
    encoded[:len(text)] = np.frombuffer(text, np.uint8)
    statuses, messages = multihost_utils.process_allgather((np.int32(status), encoded))
    worst = int(np.max(statuses))
    if worst == _OK:
        return value
    who = int(np.argmax(statuses))  # the first process with the worst outcome
    said = bytes(messages[who]).rstrip(b"\0").decode(errors="replace")
    if who != jax.process_index():
        said = f"{said} (on process {who})"
    raise (CheckpointReadFailed if worst == _FAILED else DamagedCheckpoint)(said)


def set_aside(directory: str, steps: list[int]) -> list[str]:
    """Renames damaged step folders to <step>.damaged, so that the run can write those steps again and a
    later "latest" does not trip over them; their files stay for inspection. Process 0 only. In a bucket (gs://)
    gcsfs moves each object (or copies and deletes it), which is not atomic: a move cut short leaves the step
    either without its commit file (no step) or still damaged (set aside again by the next resume)."""
    moved = []
    if jax.process_index() == 0:
        for step in steps:
            path = epath.Path(directory) / str(step)
            target = epath.Path(directory) / f"{step}.damaged"
            if not path.exists():  # gone meanwhile (what made it unreadable)
                continue
            if target.exists():
                target.rmtree()
            path.rename(target)
            moved.append(str(target))
    return moved
