"""Orbax checkpoints: the whole train state, the data position and the run's record, one folder per step.

    <checkpoints_dir>/<step>/params      the UNet parameters being trained
    <checkpoints_dir>/<step>/ema_params  their EMA (with --use_ema)
    <checkpoints_dir>/<step>/optimizer   step count, Adam state, seed key
    <checkpoints_dir>/<step>/data        the data iterator's position, JSON ({"next_batch": k, ...})
    <checkpoints_dir>/<step>/run         the run's configuration (no secrets) and what it resolved to
                                         (global batch, learning rate, base model folder and commit), JSON

The arrays are written by every process for its own shards (no gather onto one host); separate items let
an export read the weights alone. Saves are asynchronous: `save` returns after the device-to-host copy,
Orbax writes in a background thread and renames the step folder into place when it is complete, so an
interrupted save leaves no step folder (its temporary folder is removed when a manager next opens the
directory). In a bucket (gs://) Orbax writes the step folder in place instead and marks it complete with a
`commit_success.txt`; a step folder without one is ignored, and removed likewise. Old steps are deleted only
after a newer one is complete (`checkpoints_total_limit`).

A read that fails is damage (DamagedCheckpoint: resume falls back to an older step) only where the files prove it
(`classify_read_error`); any other failure is tried again and then stops the run (CheckpointReadFailed)."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings

import jax
import orbax.checkpoint as ocp
from etils import epath

from t2i_flax.errors import CheckpointError, TrainingFailed

ITEM_PARAMS, ITEM_EMA, ITEM_OPTIMIZER, ITEM_DATA, ITEM_RUN = "params", "ema_params", "optimizer", "data", "run"
ARRAY_ITEMS = (ITEM_PARAMS, ITEM_EMA, ITEM_OPTIMIZER)

# Reading a step folder that fails for a reason that does not prove its files bad (a bucket's 503, a dropped
# connection, a host out of memory) is tried again this many times in all, waiting READ_RETRY_DELAYS_S[i] seconds
# before attempt i + 2 (tests lower them); then the run stops (CheckpointReadFailed), nothing set aside.
READ_ATTEMPTS = 4
READ_RETRY_DELAYS_S = (2.0, 4.0, 8.0)


class DamagedCheckpoint(CheckpointError):
    """A complete step folder whose files cannot be read (truncated, missing, garbage)."""


class CheckpointReadFailed(TrainingFailed):
    """Reading a checkpoint failed READ_ATTEMPTS times for a reason that does not show its files are damaged
    (storage unavailable, out of memory): one line, exit code 1; nothing renamed or deleted."""


class CheckpointWriteFailed(TrainingFailed):
    """Writing a checkpoint failed (disk full, permissions, bucket): one line, exit code 1."""


def is_remote(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


class Checkpoints:
    """One checkpoint directory: its steps, asynchronous saves and restores."""

    def __init__(self, directory: str, keep: int | None = None, read_only: bool = False):
        self.directory = absolute(directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None,
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only, create=not read_only,
            read_only=read_only,
            # A reader restores on its own, without Orbax's barrier after each restore (a device collective on every
            # process): a host whose read fails would leave the others waiting there. resume.py makes the hosts
            # agree on what they read instead.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()}) if read_only
            else ocp.options.MultiprocessingOptions())
        try:
            self.manager = ocp.CheckpointManager(epath.Path(self.directory), item_names=ARRAY_ITEMS + (ITEM_DATA, ITEM_RUN),
                                                 options=options)
        except OSError as error:
            raise CheckpointError(f"cannot use the checkpoint folder {self.directory}: {error}") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, data_state: dict, run_record: dict) -> None:
        """Starts an asynchronous save of a TrainState (every process must call it). Waits for the previous
        save first and reports its failure, if any."""
        self.wait()
        items = {name: ocp.args.StandardSave(tree) for name, tree in state_items(state).items()}
        items.update({ITEM_DATA: ocp.args.JsonSave(data_state), ITEM_RUN: ocp.args.JsonSave(run_record)})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items))
        except OSError as error:
            raise CheckpointWriteFailed(f"writing the checkpoint of step {step} in {self.directory} failed: "
                                        f"{_first_line(error)}; the previous checkpoints are kept") from None

    def wait(self) -> None:
        """Blocks until the save in flight is complete; a failed write is a CheckpointWriteFailed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except (OSError, ValueError, RuntimeError) as error:  # the background writer's failure, re-raised here
            raise CheckpointWriteFailed(f"writing a checkpoint in {self.directory} failed: {_first_line(error)}; "
                                        f"the previous checkpoints are kept") from None

    def read_run_record(self, step: int) -> dict:
        """The run record and the data position of `step`. DamagedCheckpoint where its files are bad;
        CheckpointReadFailed where reading failed READ_ATTEMPTS times for another reason."""
        restored = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(**{
            ITEM_RUN: ocp.args.JsonRestore(), ITEM_DATA: ocp.args.JsonRestore()})))
        return {"run": dict(restored[ITEM_RUN]), "data": dict(restored[ITEM_DATA])}

    def restore(self, step: int, abstract_items: dict) -> dict:
        """The array items named in `abstract_items` ({item: tree of ShapeDtypeStructs with shardings}),
        placed as those say: any layout, also another device count. Every array must come back and match
        its shape and dtype. Errors as `read_run_record`."""
        restored = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(**{
            name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()})))
        restored = {name: restored[name] for name in abstract_items}
        problems = [f"{name}{jax.tree_util.keystr(path)}"
                    for name, tree in restored.items()
                    for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if not isinstance(leaf, jax.Array)]
        if problems:
            raise CheckpointError(f"checkpoint {self.step_path(step)} lacks arrays of the train state: "
                                  f"{', '.join(problems[:5])}")
        return restored

    def restore_state(self, step: int, abstract_state):
        """The whole TrainState of `step`, placed as `abstract_state` (ShapeDtypeStructs with shardings)."""
        restored = self.restore(step, state_items(abstract_state))
        return state_from_items(abstract_state, restored)

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _read(self, step: int, read):
        """read() (an Orbax restore of `step`), tried again after failures that do not show damage."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return read()
            except Exception as error:  # Orbax's restore only; what is neither damage nor storage is re-raised
                kind, cause = classify_read_error(error)
                if kind is None:
                    raise
                if kind == DAMAGE:
                    raise DamagedCheckpoint(f"checkpoint {self.step_path(step)} cannot be restored: "
                                            f"{_first_line(cause)}") from None
                reason = _first_line(cause)
                if not isinstance(cause, (OSError, ValueError, MemoryError)):  # a storage client's own error class
                    reason = f"{type(cause).__name__}: {reason}"
            if attempt == READ_ATTEMPTS:
                raise CheckpointReadFailed(f"reading checkpoint {self.step_path(step)} failed {READ_ATTEMPTS} times "
                                           f"({reason}); nothing was renamed or deleted: run again when the storage "
                                           f"answers")
            delay = READ_RETRY_DELAYS_S[min(attempt, len(READ_RETRY_DELAYS_S)) - 1]
            host = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
            print(f"{host}reading checkpoint {self.step_path(step)} failed ({reason}); attempt {attempt + 1} of "
                  f"{READ_ATTEMPTS} in {delay:g} s", file=sys.stderr, flush=True)
            time.sleep(delay)


# Orbax splits every replicated array into one slice per replica (one eager slice op each) to spread the
# device-to-host copy; for the hundreds of small arrays of a UNet that costs more than it saves (a tiny model
# on 8 CPU devices: 9.6 s of blocking per save, 0.36 s without). Only arrays of at least this many bytes
# per replica are split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 32 << 20
_process_set_up = False


def setup_process() -> None:
    """Process-wide settings for checkpoints; a command calls it once where it starts (idempotent):

    - Orbax's array handler with MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL (faster saves of many small arrays);
    - one line for a failed write: a failed write fails many of Orbax's background tasks at once, and asyncio and
      absl (Orbax's logger) would print a traceback for each (hundreds); gcsfs logs a traceback when it gives up
      on a request. The failure reaches the user as one line (`Checkpoints.wait`, `CheckpointReadFailed`);
    - after a failed write, tensorstore still calls back into the asyncio loops Orbax has already closed; each
      call is an 'unraisable' RuntimeError('Event loop is closed') that Python prints as a traceback. Those (and
      only those) are dropped, as are the warnings about the coroutines those loops never ran."""
    global _process_set_up
    if _process_set_up:
        return
    for name in ("asyncio", "absl", "gcsfs"):  # first: registering the handler below logs an absl warning
        logging.getLogger(name).setLevel(logging.CRITICAL)
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    _process_set_up = True


# ---- what a failed read means -------------------------------------------------------------------------------
DAMAGE, STORAGE = "damage", "storage"
# tensorstore's status codes (its errors are ValueErrors "CODE: text") that prove a step folder's files bad: a file
# shorter than its index says, missing, or corrupt (its checksum or its compressed stream broken).
_TENSORSTORE_STATUS = re.compile(r"^([A-Z_]+): ")
_DAMAGE_CODES = {"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND"}
_STORAGE_CLIENTS = {"gcsfs", "aiohttp", "google", "requests", "urllib3"}  # their errors are the storage's answer


def classify_read_error(error: BaseException) -> tuple[str | None, BaseException]:
    """(DAMAGE | STORAGE | None, the error in the chain that says so) for an exception of an Orbax restore.

    DAMAGE: the files are bad (missing, truncated, corrupt, unreadable metadata, an item or shape that the step
    folder does not hold). STORAGE: the read failed for a reason that may pass (a bucket's 503, a dropped
    connection, out of memory; tensorstore's other status codes). None: neither (a bug: keep the traceback).
    Orbax wraps every failed array read in a bare Exception ("Encountered error while reading array index"), so
    the causes are looked at: the first that says damage or storage decides."""
    link, seen = error, set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = str(link)
        if isinstance(link, MemoryError):
            return STORAGE, link  # never damage: another host, or a later try, may have the memory
        if isinstance(link, (FileNotFoundError, json.JSONDecodeError)):
            return DAMAGE, link
        if isinstance(link, KeyError) and "was not found in the checkpoint" in text:  # an item the step lacks
            return DAMAGE, link
        if isinstance(link, ValueError) and text.startswith("Requested shape:"):  # not the shape stored
            return DAMAGE, link
        status = _TENSORSTORE_STATUS.match(text) if isinstance(link, ValueError) else None
        if status:
            code = status.group(1)
            corrupt = code == "FAILED_PRECONDITION" and ("compress" in text or "decod" in text)
            return (DAMAGE if code in _DAMAGE_CODES or corrupt else STORAGE), link
        if isinstance(link, OSError) or type(link).__module__.split(".")[0] in _STORAGE_CLIENTS:
            return STORAGE, link
        link = link.__cause__ or link.__context__
    return None, error


_OS_ERROR = re.compile(r": ([^:\[]+) \[os_error_code='?(\d+)'?\]")


def _first_line(error: BaseException) -> str:
    """One readable line of an Orbax/tensorstore error: the operating system's reason when it names one
    ("File too large (errno 27)"), else the first line, without tensorstore's spec dump."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)  # KeyError quotes
    text = re.split(r" See full TensorStore details| \[tensorstore_spec=| \[source locations=", text.strip())[0]
    os_error = _OS_ERROR.search(text)
    if os_error:
        return f"{os_error.group(1).strip()} (errno {os_error.group(2)})"
    return text.splitlines()[0][:300] if text else type(error).__name__


def state_items(state) -> dict:
    """A TrainState (arrays or ShapeDtypeStructs) as the checkpoint's array items."""
    items = {ITEM_PARAMS: state.params, ITEM_OPTIMIZER: {"step": state.step, "opt_state": state.opt_state,
                                                         "rng": state.rng}}
    if state.ema_params is not None:
        items[ITEM_EMA] = state.ema_params
    return items


def state_from_items(template, items: dict):
    optimizer = items[ITEM_OPTIMIZER]
    return template.replace(params=items[ITEM_PARAMS], ema_params=items.get(ITEM_EMA), step=optimizer["step"],
                            opt_state=optimizer["opt_state"], rng=optimizer["rng"])
