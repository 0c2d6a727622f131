"""Preemption: SIGTERM / SIGUSR1 / SIGINT become a request to stop at the next step boundary.

Slurm sends SIGUSR1 (with `--signal`) or SIGTERM before it preempts or times out a job. The
handler only sets a flag; the loop finishes the optimizer step it is in, agrees with the other
ranks on the step to stop at, writes a checkpoint and the process exits with REQUEUE_EXIT_CODE,
which the sbatch script turns into a requeue. A second SIGINT (Ctrl-C pressed twice) kills the
process at once, without a checkpoint.
"""
from __future__ import annotations

import signal
from typing import Optional

# EX_TEMPFAIL from sysexits.h: "try again later". The sbatch scripts requeue on exactly this status.
REQUEUE_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Installed for the duration of a `with` block; `received` is the first stop signal seen."""

    def __init__(self):
        self.received: Optional[signal.Signals] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum)
        if signum == signal.SIGINT:
            # The default action on the next press: terminate now, even inside a collective.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    @property
    def requested(self) -> bool:
        return self.received is not None
