"""Stopping cleanly on SIGINT/SIGTERM, wherever the signal lands.

A scheduler's SIGTERM (or a Ctrl-C) can arrive during start-up, a training step, a checkpoint
write, the final export or the report. The handler only records it; the run stops at the next
safe point — a step boundary after writing a checkpoint, or between two outputs — and the CLI
exits with `EXIT_INTERRUPTED` (75), after which `--resume` completes the run. A second Ctrl-C
means now (KeyboardInterrupt, exit 130).

`StopSignal` contexts nest: the CLI installs one before anything slow (so a signal during the
imports or the data load is not the default "die with 143"), and `pretrain` and the training loop
each enter their own, which share the same record. The outermost one restores the previous handlers.
This module imports nothing heavy, so that the CLI can install the handler before torch loads.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")

EXIT_INTERRUPTED = 75  # SIGINT/SIGTERM: stopped at a safe point; rerun with --resume (EX_TEMPFAIL)


class Interrupted(SelfsupError):
    """SIGINT/SIGTERM arrived and the run stopped at a safe point; `--resume` continues it.

    `step` is the last finished optimizer step (None when no step had begun) and `path` the
    checkpoint this process wrote for it (None on ranks other than 0, or when none was needed).
    """

    def __init__(self, message: str, step: int | None = None, path: Any = None):
        self.step, self.path = step, path
        super().__init__(message)


_received: int | None = None
_depth = 0
_previous: dict[int, Any] = {}


def _handle(signum: int, frame: Any) -> None:
    global _received
    if _received is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C means now
    _received = signum
    log.warning("received %s: stopping at the next safe point (after this step's checkpoint or the current write)",
                signal.Signals(signum).name)


class StopSignal:
    """Records SIGINT/SIGTERM while entered; `received` is the signal number, or None."""

    def __enter__(self) -> "StopSignal":
        global _depth
        if _depth == 0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    _previous[sig] = signal.signal(sig, _handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        _depth += 1
        return self

    @property
    def received(self) -> int | None:
        return _received

    def __exit__(self, *exc: Any) -> None:
        global _depth, _received
        _depth -= 1
        if _depth == 0:
            for sig, handler in _previous.items():
                signal.signal(sig, handler)
            _previous.clear()
            _received = None
