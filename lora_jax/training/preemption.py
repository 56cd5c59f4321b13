"""SIGTERM as a request to checkpoint and stop, the way cloud schedulers announce preemption.

    with PreemptionNotice() as notice:
        for step in ...:
            ...
            if notice.reached(done):   # no host sync: a Python flag, or JAX's background sync
                save a checkpoint of `done`, then stop

One process: a SIGTERM handler sets a flag, checked once per step. Several processes: JAX's
preemption service (on by default with `jax.distributed.initialize`) already catches SIGTERM and
agrees, in the background, on one step at which every process saves
(`multihost_utils.reached_preemption_sync_point`), so no process saves a step the others do not.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionNotice:
    """While active, SIGTERM asks the loop to checkpoint and stop instead of killing it."""

    def __init__(self):
        self._received = threading.Event()
        self._previous = None
        self._answered = False

    def __enter__(self) -> PreemptionNotice:
        # Signal handlers can be set from the main thread only; elsewhere SIGTERM keeps its
        # default (the resume then starts from the last regular checkpoint).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._received.set()

    def reached(self, step: int) -> bool:
        """Whether to checkpoint `step` and stop (every process of a run agrees on the step)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        self._answered = self._received.is_set()
        return self._answered

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
            if self._received.is_set() and not self._answered:
                # It came after the last step was checked (evaluating, exporting): the loop never
                # answered it, so it goes to whoever handled SIGTERM before us, which for a
                # script (a sweep of runs) means it stops, as it was asked to.
                signal.raise_signal(signal.SIGTERM)
