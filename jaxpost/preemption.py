"""Stopping on request: SIGTERM or a Cloud TPU maintenance/preemption notice ends a run cleanly.

`StopSignal` is what the training loop asks once per step, `reached(step)`:

* in a multi-process job (`jax.distributed` initialised with JAX's preemption service, the
  default), JAX's preemption sync manager owns SIGTERM: a notice on any host makes every host
  agree on one step (`multihost_utils.reached_preemption_sync_point`), so they all save the same
  step and none waits in a collective for a host that left;
* in a single process, a SIGTERM handler sets a flag that the next step boundary sees.

Before the loop runs (reading data, the reference pass, compiling) a single process stops at
once on SIGTERM: nothing there is lost (the reference pass resumes from its finished chunks) and
there is no step to finish. The loop then saves the step, flushes metrics, writes
`WORKDIR/stop.json` (why and where it stopped) and the command exits with `PREEMPTED_EXIT`, so a
launcher knows to run the same command again.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

from etils import epath

log = logging.getLogger("jaxpost")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped early with a checkpoint; rerun the command to resume
STOP_FILE = "stop.json"


class Preempted(BaseException):
    """The run stopped on a stop request; `step` is the checkpoint it saved (None: before the
    loop). A BaseException, like KeyboardInterrupt: no `except Exception` turns it into an
    error about whatever was running when the signal came."""

    def __init__(self, reason: str, step: int | None = None):
        self.reason, self.step = reason, step
        where = f" after saving step {step}" if step is not None else ""
        super().__init__(f"stopped on {reason}{where}; rerun the same command to resume")


def stop_at_once_on_sigterm() -> None:
    """The command line's first act: until a run installs its `StopSignal`, SIGTERM raises
    `Preempted` wherever the main thread is (imports, setup), which exits with PREEMPTED_EXIT."""

    def handler(signum, frame):
        raise Preempted(signal.Signals(signum).name)  # (in a run: "before training started")

    signal.signal(signal.SIGTERM, handler)


def _jax_sync_manager():
    """JAX's preemption sync manager when this is a multi-process job that has one."""
    from jax._src import distributed

    state = distributed.global_state
    return state.preemption_sync_manager if state.client is not None else None


class StopSignal:
    """Installs the stop handling for a run; `close()` restores the previous SIGTERM handler.

    With JAX's sync manager, `reached` reports the loop's own count of steps (1, 2, ... in this
    run), never a global step number: the manager settles on one more than the largest count
    any process reported, so a notice that came during setup stops every process after the
    first step of the loop (nothing else may report to it: `checkpoint.make_manager`'s manager
    does not)."""

    def __init__(self):
        self.reason: str | None = None
        self.deferred = False  # False: a signal stops at once (Preempted); True: at a step
        self._previous = None
        self._count = 0
        self._sync = _jax_sync_manager()
        if self._sync is None:
            import jax

            if jax.process_count() > 1:
                log.warning(
                    "JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM "
                    "reaching only some processes stops them alone, and the others wait for "
                    "them until the job fails"
                )
            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            log.warning("%s received: stopping at the next step boundary with a checkpoint", name)
        self.reason = name
        if not self.deferred:
            raise Preempted(name)

    def reached(self) -> bool:
        """Whether the loop should save the step it just ran and stop; call once per step, on
        every process (with JAX's sync manager, every process gets the same answer)."""
        self._count += 1
        if self._sync is not None and self._sync.reached_sync_point(self._count):
            self.reason = self.reason or "a preemption notice (all processes at this step)"
        return self.reason is not None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def write_stop(workdir: str, step: int, reason: str) -> None:
    """Record why and where a run stopped early (read and cleared by the next run)."""
    record = {"step": int(step), "reason": reason, "time": time.time()}
    (epath.Path(workdir) / STOP_FILE).write_text(json.dumps(record) + "\n")


def pop_stop(workdir: str) -> dict | None:
    """The previous run's stop record, removed (None when it ended otherwise)."""
    path = epath.Path(workdir) / STOP_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        record = None
    path.unlink()
    return record
