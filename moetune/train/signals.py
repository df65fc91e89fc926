"""Stopping a training run at a step boundary on Ctrl-C (SIGINT) or SIGTERM, with a checkpoint.

Schedulers (Slurm, Kubernetes, torchrun's agent) send SIGTERM and wait a grace period before SIGKILL;
a user presses Ctrl-C. While the loop runs, `StopRequest` turns the first of either signal into a
request: the current optimizer step finishes, the loop writes a checkpoint at that step and raises
`Interrupted` (moetune.core.errors), which says where the checkpoint is; the CLI prints it and exits
130 (SIGINT) or 143 (SIGTERM). A second signal stops at once (KeyboardInterrupt / Terminated), keeping
the checkpoints written before. Several processes (torchrun, accelerate launch) each get the signal
from their launcher; they agree on it after every step (`Strategy.agree`: a max over the processes), so
all stop after the same step and the main process writes the one checkpoint.

Handlers can only be set in the main thread; elsewhere (a notebook's worker thread) nothing changes.
"""
from __future__ import annotations

import signal
import threading

from moetune.core.errors import Terminated

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def signal_name(signum: int) -> str:
    """How moetune names a stop signal in what it prints."""
    return NAMES.get(signum, f"signal {signum}")


def raise_terminated(signum, frame) -> None:
    """SIGTERM handler outside a training loop: stop as Ctrl-C does (an exception, so that what was written is
    reported), for the CLI and compare's worker processes."""
    raise Terminated(signum)


class StopRequest:
    """Context manager: while active, SIGINT and SIGTERM set `signum` (the first one) instead of stopping."""

    def __init__(self, log=None) -> None:
        self.log = log
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in NAMES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:            # the second signal: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(signum)
        self.signum = signum
        # a second signal of either kind now stops at once (SIGTERM through the CLI's handler, or Terminated)
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        if self.log is not None:
            self.log(f"{NAMES.get(signum, signum)}: training stops after the current step and saves a checkpoint "
                     "there; the same signal again stops at once, keeping the checkpoints written before.")
