"""kill -9 at any moment of a run — start-up, a training step, a checkpoint write, the final export or
the report — then `--resume`: the run ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.helpers import (EXIT_BAD_INPUT, FULL, TINY, Reference, assert_same_as_reference, listing, run_cli,
                                  start_cli, stop_process)

KILL_SEEDS = list(range(12)) if FULL else list(range(3))


def complete_after_kill(out: Path, context: str) -> None:
    """Reruns the killed run to its end: `--resume`, or — where the start died before writing the
    run's config, so that there is nothing to resume — the same command again without it, which
    must accept the folder the dead start left."""
    result = run_cli(out, "--resume")
    if result.returncode == 0:
        return
    if result.returncode == EXIT_BAD_INPUT and not (out / "config.yaml").is_file():
        fresh = run_cli(out, *TINY)
        assert fresh.returncode == 0, (
            f"{context}: the start died before writing config.yaml, so --resume had nothing to resume (fine), "
            f"but starting the run again in that folder failed; a folder left by a start that never trained "
            f"must be replaceable.\n--resume said: {result.describe()}\nthe fresh start said: {fresh.describe()}")
        return
    raise AssertionError(f"{context}: `--resume` after the kill did not complete the run: {result.describe()}")


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_kill_9_at_a_random_moment_then_resume(tmp_path: Path, reference: Reference, seed: int) -> None:
    # Stratified over the process's life: seed k of n dies in the k-th n-th of the time the
    # uninterrupted run took, at a random point within it, so the seeds together cover start-up,
    # training, checkpoint writes and the final export and report.
    at = reference.seconds * (seed + random.Random(seed).random()) / len(KILL_SEEDS)
    out = tmp_path / "run"
    proc = start_cli(out, *TINY)
    try:
        proc.wait(timeout=at)
        outcome = f"finished (exit {proc.returncode}) before the kill at {at:.2f} s"
        assert proc.returncode == 0, f"seed {seed}: the unkilled run failed: exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        outcome = f"SIGKILL at {at:.2f} s (the uninterrupted run took {reference.seconds:.2f} s)"
    finally:
        stop_process(proc)
    context = f"seed {seed}, {outcome}; the kill left: {listing(out)}"
    complete_after_kill(out, context)
    assert_same_as_reference(out, reference, context)


# The same, at exact moments: tests/faults/hooked_cli.py lets the call write its file, cuts the file
# to half (a torn write) and SIGKILLs the process. A checkpoint is 3 files (weights, optimizer,
# state), one every 3 steps: #5 is the optimizer of step 6's, #12 the last file of the final one.
HOOKED_KILLS = {
    "checkpoint#5": "inside the step-6 checkpoint write (optimizer.pt torn)",
}
if FULL:
    HOOKED_KILLS.update({
        "checkpoint#1": "inside the first checkpoint write (model.safetensors torn)",
        "checkpoint#12": "inside the final checkpoint write (state.pt of step 12 torn)",
        "encoder#1": "inside the final export (encoder.safetensors torn)",
        "report#1": "while the report draws its figures",
    })


@pytest.mark.parametrize("where", list(HOOKED_KILLS))
def test_kill_9_inside_a_write_then_resume(tmp_path: Path, reference: Reference, where: str) -> None:
    out = tmp_path / "run"
    killed = run_cli(out, *TINY, hook=f"kill@{where}")
    assert killed.returncode == -signal.SIGKILL, (
        f"the planted kill ({HOOKED_KILLS[where]}) never fired — does selfsup still write these files with "
        f"safetensors/torch.save/matplotlib? {killed.describe()}")
    context = f"SIGKILL {HOOKED_KILLS[where]}; the kill left: {listing(out)}"
    complete_after_kill(out, context)
    assert_same_as_reference(out, reference, context)
