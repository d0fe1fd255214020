"""A damaged newest checkpoint is named and passed over: `--resume` continues from the one before it
and the run still ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import (CORRUPTORS, EXIT_INTERRUPTED, FULL, TINY, Reference, assert_same_as_reference,
                                  checkpoints, copy_run, listing, planted_marker, run_cli)

REDUCED = ["flipped_byte_in_model", "emptied_manifest", "pickled_class_as_state"]
CASES = list(CORRUPTORS) if FULL else REDUCED


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped half-way as a scheduler stops it: SIGTERM arrives as the step-6 checkpoint
    starts to be written; the run finishes that step's checkpoint (and the next step's, if it takes
    one more), and exits 75, leaving two checkpoints."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = run_cli(out, *TINY, hook="term@checkpoint#4")
    assert result.returncode == EXIT_INTERRUPTED, f"SIGTERM during training must exit 75: {result.describe()}"
    found = checkpoints(out)
    assert len(found) >= 2 and found[-1][0] >= 3, f"expected two checkpoints after the SIGTERM, found {listing(out)}"
    return out


def _lines_with(log: str, *words: str) -> list[str]:
    return [line for line in log.splitlines() if all(w.lower() in line.lower() for w in words)]


@pytest.mark.parametrize("corruption", CASES)
def test_a_corrupted_newest_checkpoint_is_named_and_passed_over(tmp_path: Path, reference: Reference,
                                                                 stopped_run: Path, corruption: str) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    (newest, newest_path), (previous, _) = checkpoints(run)[:2]
    name = CORRUPTORS[corruption](newest_path)

    result = run_cli(run, "--resume")
    log = result.stdout + result.stderr
    assert not planted_marker(run).exists(), (
        f"the forged step-{newest}/state.pt was unpickled: a checkpoint ran code in the resuming process")
    assert result.returncode == 0, (
        f"{corruption}: --resume must pass over the damaged step-{newest} checkpoint and continue from "
        f"step-{previous}, not fail: {result.describe()}")
    assert _lines_with(log, f"step-{newest}", name), (
        f"{corruption}: the log must name the damaged file (step-{newest}/{name}); it said:\n{log[-3000:]}")
    resumed = [line for line in _lines_with(log, "resum")
               if f"step-{previous}" in line or f"step {previous}" in line]
    assert resumed and not _lines_with(log, "resum", f"step-{newest} "), (
        f"{corruption}: the run must resume from the previous checkpoint, step-{previous}; the log said:\n{log[-3000:]}")
    assert_same_as_reference(run, reference, f"{corruption} in step-{newest}, resumed from step-{previous}")
