"""SIGTERM (a scheduler's stop, a `kill`) outside the training steps: during start-up and during
the final export and report. The run stops with exit 75 and `--resume` completes it bit-identically."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.helpers import (EXIT_INTERRUPTED, FULL, TINY, Reference, assert_same_as_reference, catches_sigterm,
                                  finish, listing, metric_steps, run_cli, start_cli, stop_process, wait_for)

STARTUP_MOMENTS = ["imports", "after_config"] if FULL else ["imports"]


@pytest.mark.parametrize("moment", STARTUP_MOMENTS)
def test_sigterm_during_start_up_exits_75_and_resume_completes(tmp_path: Path, reference: Reference,
                                                               moment: str) -> None:
    """`imports`: within the first ~0.5 s, while Python imports torch — as soon as selfsup has its
    handler in (it installs it before anything slow) and at least 0.3 s in. `after_config`: the
    moment config.yaml appears, while the data are loaded and the model built."""
    out = tmp_path / "run"
    tic = time.monotonic()
    proc = start_cli(out, *TINY)
    try:
        if moment == "imports":
            installed = wait_for(lambda: catches_sigterm(proc.pid), timeout=30, poll=0.002, proc=proc)
            assert installed, f"selfsup never installed a SIGTERM handler: {finish(proc).describe()}"
            time.sleep(max(0.0, 0.3 - (time.monotonic() - tic)))
        else:
            appeared = wait_for(lambda: (out / "config.yaml").is_file(), timeout=60, poll=0.002, proc=proc)
            assert appeared, f"config.yaml never appeared: {finish(proc).describe()}"
        sent_at = time.monotonic() - tic
        proc.send_signal(signal.SIGTERM)
        stopped = finish(proc)
    finally:
        stop_process(proc)
    context = f"SIGTERM at {sent_at:.2f} s ({moment})"
    assert stopped.returncode == EXIT_INTERRUPTED, (
        f"{context}: a SIGTERM during start-up must stop the run with exit 75 (rerun with --resume), "
        f"not the default death by signal (-15): {stopped.describe()}")
    trained = metric_steps(out) if (out / "metrics.jsonl").is_file() else []
    assert not trained, f"{context}: the SIGTERM came before training, yet steps {trained} were trained"
    resumed = run_cli(out, "--resume")
    assert resumed.returncode == 0, (
        f"{context}: --resume after a SIGTERM during start-up must complete the run: {resumed.describe()}; "
        f"the stopped start left {listing(out)}")
    assert_same_as_reference(out, reference, context)


# Exact moments from tests/faults/hooked_cli.py: SIGTERM just before encoder.safetensors is written,
# and as the report draws its first figure.
FINAL_MOMENTS = {"encoder#1": "just before the encoder export", "report#1": "while the report draws its figures"}
if not FULL:
    FINAL_MOMENTS.pop("report#1")


@pytest.mark.parametrize("where", list(FINAL_MOMENTS))
def test_sigterm_during_the_final_export_then_resume_completes(tmp_path: Path, reference: Reference,
                                                               where: str) -> None:
    out = tmp_path / "run"
    stopped = run_cli(out, *TINY, hook=f"term@{where}")
    context = f"SIGTERM {FINAL_MOMENTS[where]}"
    assert "hooked_cli: term" in stopped.stderr, f"{context}: the planted SIGTERM never fired: {stopped.describe()}"
    assert stopped.returncode in (EXIT_INTERRUPTED, 0), (
        f"{context}: the run must stop with exit 75 (or finish, exit 0), not die of the signal: {stopped.describe()}")
    resumed = run_cli(out, "--resume")
    assert resumed.returncode == 0, (
        f"{context} (exit {stopped.returncode}): --resume must complete the missing outputs: {resumed.describe()}; "
        f"the stopped run left {listing(out)}")
    assert_same_as_reference(out, reference, f"{context}, exit {stopped.returncode}, then --resume")
