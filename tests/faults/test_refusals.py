"""What `pretrain` must refuse, leaving every file as it was: a resume with a changed config,
`--overwrite` of a folder selfsup did not make (or holding files it did not write), and a second
process on a run that one is still writing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import (EXIT_BAD_INPUT, FULL, TINY, Reference, assert_same_as_reference, copy_run,
                                  finish, metric_steps, run_cli, snapshot, start_cli, stop_process, wait_for)

CHANGES = {
    "train.lr": ["train.lr=0.002"],
    "train.batch_size": ["train.batch_size=16"],
    "data.source": ["data.source=mnist"],
    "all_three": ["train.lr=0.002", "train.batch_size=16", "data.source=mnist"],
}
CHANGE_CASES = list(CHANGES) if FULL else ["all_three"]


@pytest.mark.parametrize("change", CHANGE_CASES)
def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path: Path, reference: Reference,
                                                                 change: str) -> None:
    run = copy_run(reference.run, tmp_path / "run")
    before = snapshot(run)
    # The user's command again, with --resume and one value changed.
    result = run_cli(run, "--resume", *TINY, *CHANGES[change])
    assert result.returncode == EXIT_BAD_INPUT, f"a resume with a changed config must exit 2: {result.describe()}"
    keys = [arg.split("=", 1)[0] for arg in CHANGES[change]]
    missing = [key for key in keys if key not in result.stderr]
    assert not missing, f"the refusal must list the differing keys {keys}; it lacks {missing}:\n{result.stderr[-2000:]}"
    assert snapshot(run) == before, "a refused resume must not change the run"


def _foreign_folder(root: Path, reference: Reference) -> Path:
    folder = root / "mine"
    (folder / "src").mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\nmethod: {name: simclr}\n")  # any YAML: named like ours, not ours
    (folder / "important.txt").write_text("a week of notes\n")
    (folder / "src" / "main.py").write_text("print('my code')\n")
    return folder


def _run_with_foreign_files(root: Path, reference: Reference) -> Path:
    folder = copy_run(reference.run, root / "run")
    (folder / "important.txt").write_text("notes kept beside the run\n")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('my code')\n")
    return folder


FOLDERS = {"not_selfsup": _foreign_folder, "run_with_foreign_files": _run_with_foreign_files}


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_overwrite_never_deletes_what_selfsup_did_not_write(tmp_path: Path, reference: Reference, kind: str) -> None:
    folder = FOLDERS[kind](tmp_path, reference)
    before = snapshot(folder)
    result = run_cli(folder, "--overwrite", *TINY)
    assert result.returncode == EXIT_BAD_INPUT, f"--overwrite of {kind} must be refused with exit 2: {result.describe()}"
    after = snapshot(folder)
    lost = sorted(set(before) - set(after))
    assert not lost, f"--overwrite deleted files it did not write: {lost}"
    assert after == before, "--overwrite changed files although it refused"


@pytest.mark.faults_full
def test_overwrite_replaces_a_finished_run(tmp_path: Path, reference: Reference) -> None:
    """The control for the refusals above: a folder selfsup wrote, holding only its files, is replaced."""
    run = copy_run(reference.run, tmp_path / "run")
    (run / "encoder.safetensors").write_bytes(b"stale")
    result = run_cli(run, "--overwrite", *TINY)
    assert result.returncode == 0, f"--overwrite of a finished run must replace it: {result.describe()}"
    assert_same_as_reference(run, reference, "--overwrite of a finished run")


LONG = [arg for arg in TINY if not arg.startswith(("train.steps=", "train.checkpoint_every="))] + [
    "train.steps=1000000", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def running_run(tmp_path_factory: pytest.TempPathFactory):
    """A `pretrain` that is training (rows in metrics.jsonl) and keeps training while the tests run."""
    out = tmp_path_factory.mktemp("running") / "run"
    proc = start_cli(out, *LONG)
    try:
        training = wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0,
                            timeout=120, poll=0.05, proc=proc)
        assert training, f"the long run never started training: {finish(proc).describe()}"
        yield proc, out
    finally:
        stop_process(proc)


def _assert_still_writing(proc, out: Path) -> None:
    assert proc.poll() is None, "the first process died while the second one ran"
    rows = len(metric_steps(out))
    assert wait_for(lambda: len(metric_steps(out)) > rows, timeout=30, poll=0.05, proc=proc), (
        "the first process stopped training after the second one ran")


def test_a_second_process_cannot_resume_a_run_being_written(running_run) -> None:
    proc, out = running_run
    config = (out / "config.yaml").read_bytes()
    result = run_cli(out, "--resume")
    assert result.returncode == EXIT_BAD_INPUT, (
        f"`pretrain --resume` on a run another process is writing must exit 2: {result.describe()}")
    assert "another selfsup process" in result.stderr, (
        f"the refusal must say another selfsup process is writing the run:\n{result.stderr[-2000:]}")
    assert (out / "config.yaml").read_bytes() == config
    _assert_still_writing(proc, out)


def test_a_second_process_cannot_overwrite_a_run_being_written(running_run) -> None:
    proc, out = running_run
    result = run_cli(out, "--overwrite", *LONG)
    assert result.returncode == EXIT_BAD_INPUT, (
        f"`pretrain --overwrite` on a run another process is writing must exit 2, deleting nothing: "
        f"{result.describe()}")
    assert "another selfsup process" in result.stderr, (
        f"the refusal must say another selfsup process is writing the run:\n{result.stderr[-2000:]}")
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file(), "the running run's files were deleted"
    _assert_still_writing(proc, out)
