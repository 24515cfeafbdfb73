"""Stopping on request: SIGTERM (a TPU VM's preemption notice, a scheduler's stop) or SIGINT (Ctrl-C).

The loop asks `should_stop(step)` after every step; on True it finishes the step in flight, writes a
checkpoint, waits until it is complete and exits (errors.EXIT_STOPPED). A second Ctrl-C aborts at once
(exit code 130).

One process: our own handlers set a flag. Several processes (jax.distributed): every process must stop at
the same step, so the decision comes from JAX's preemption sync manager, which catches SIGTERM itself,
tells every process, and makes `reached_preemption_sync_point(step)` true on all of them at one agreed
step. Ctrl-C there turns into a SIGTERM to this process, so it goes through the same agreement."""
from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

EXIT_ABORTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _say(message: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a write to stderr (tqdm's bar),
    # where a buffered write would raise "reentrant call".
    os.write(2, f"\n{message}\n".encode())


class StopRequest:
    """Context manager installing the handlers for the training loop."""

    def __init__(self):
        self.signal_name: str | None = None  # what asked us to stop
        self._previous = {}
        self._distributed = jax.process_count() > 1

    def __enter__(self) -> "StopRequest":
        self._install(signal.SIGINT, self._on_sigint)
        if not self._distributed:
            self._install(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _install(self, signum, handler) -> None:
        self._previous[signum] = signal.signal(signum, handler)

    def _on_sigterm(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = "SIGTERM"
            _say("SIGTERM: finishing this step, then a checkpoint")

    def _on_sigint(self, signum, frame) -> None:
        if self.signal_name is not None:
            # The second Ctrl-C: abort now, without a checkpoint. Not by raising KeyboardInterrupt: the handler
            # may run inside a callback (XLA's gc callback, say) where Python ignores exceptions. An unfinished
            # save leaves only a temporary folder, which the next run removes.
            _say("interrupted")  # on a line of its own, after the progress bar's
            os._exit(EXIT_ABORTED)
        self.signal_name = "SIGINT"
        _say("SIGINT: finishing this step, then a checkpoint (Ctrl-C again to abort without one)")
        if self._distributed:  # let JAX's preemption notifier agree on the stop step with the other hosts
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step with the number of finished steps."""
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None
