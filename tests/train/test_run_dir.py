"""The run directory: ownership before --overwrite, failed starts, one writer, stops outside the loop,
modes under the umask, and the gradient-accumulation warning (issue 13, items 1, 6, 7, 8, 9, 10)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.files import LOCK, MARKER, DirLock, read_marker
from selfsup.train.stop import EXIT_INTERRUPTED
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[2]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _user_folder(root: Path) -> Path:
    """The reproduction of the data-loss report: a project folder that happens to hold a config.yaml."""
    root.mkdir()
    (root / "config.yaml").write_text("database:\n  host: localhost\n  port: 5432\n")
    (root / "important.txt").write_text("do not lose me")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hello')\n")
    return root


def test_overwrite_never_deletes_a_folder_that_only_holds_a_config_yaml(tmp_path, capsys):
    out = _user_folder(tmp_path / "project")
    before = _snapshot(out)
    assert main(["pretrain", *TINY_RUN, "--out", str(out), "--overwrite"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "not a folder selfsup made" in err and "important.txt" in err
    assert _snapshot(out) == before
    assert not (out / MARKER).exists() and not (out / LOCK).exists(), "nothing is written into a folder that is not ours"


def test_overwrite_refuses_a_run_holding_files_selfsup_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    assert read_marker(out)["kind"] == "run"
    (out / "my-notes.txt").write_text("mine")
    assert main(["pretrain", *TINY_RUN, "--out", str(out), "--overwrite"]) == EXIT_BAD_INPUT
    assert "my-notes.txt" in capsys.readouterr().err
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "encoder.safetensors").is_file()
    (out / "my-notes.txt").unlink()
    assert main(["pretrain", *TINY_RUN, "train.steps=2", "--out", str(out), "--overwrite"]) == 0
    assert (out / "encoder.safetensors").is_file() and "steps: 2" in (out / "config.yaml").read_text()


def test_a_start_that_fails_on_its_data_leaves_nothing_and_the_corrected_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    bad = [a for a in TINY_RUN if not a.startswith("data.source")] + [f"data.source={tmp_path / 'missing'}"]
    assert main(["pretrain", *bad, "--out", str(out)]) == EXIT_BAD_INPUT
    assert not out.exists(), f"a failed start left {sorted(p.name for p in out.iterdir())}"
    # A folder the user made beforehand stays, empty.
    out.mkdir()
    assert main(["pretrain", *bad, "--out", str(out)]) == EXIT_BAD_INPUT
    assert out.is_dir() and not any(out.iterdir())
    capsys.readouterr()
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0


def test_a_start_killed_before_training_is_replaced_without_overwrite(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    # What kill -9 during start-up leaves: the config and a marker still saying "starting".
    for name in ("checkpoints", "metrics.jsonl", "encoder.safetensors", "encoder.json", "report.html", "previews.png"):
        path = out / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (out / MARKER).write_text('{"kind": "run", "state": "starting"}')
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    assert read_marker(out)["state"] == "training" and (out / "encoder.safetensors").is_file()


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    capsys.readouterr()
    # Another process holds the lock: a child that takes it and waits.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from selfsup.files import DirLock; "
                               f"DirLock(__import__('pathlib').Path({str(out)!r})); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["pretrain", "--out", str(out), "--resume"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert "another selfsup process" in err and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # A lock whose holder died is no lock at all.
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0


def test_dir_lock_is_exclusive_and_released(tmp_path):
    first = DirLock(tmp_path)
    with pytest.raises(Exception, match="another selfsup process"):
        DirLock(tmp_path)
    first.release()
    DirLock(tmp_path).release()


def _wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfsup.cli", "pretrain", *TINY_RUN, *extra, "--out", str(out)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_during_start_up_exits_75_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    proc = _cli(out)
    _wait_for(lambda: (out / "config.yaml").exists())  # start-up has begun: the data and model are loading
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "start-up" in err and "--resume" in err
    assert not (out / "checkpoints").exists()
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert (out / "encoder.safetensors").is_file() and (out / "report.html").is_file()


def test_sigterm_right_at_launch_is_not_a_silent_143(tmp_path):
    out = tmp_path / "run"
    proc = _cli(out)
    time.sleep(0.3)  # inside Python's start-up and imports
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # Before the handler is installed (the interpreter's first milliseconds) the default action may still
    # win; once selfsup's main runs, the stop is clean and said.
    assert proc.returncode in (EXIT_INTERRUPTED, -signal.SIGTERM), err[-2000:]
    if proc.returncode == EXIT_INTERRUPTED:
        assert "--resume" in err


def test_resume_of_a_run_stopped_before_its_report_writes_the_missing_outputs(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    encoder = (out / "encoder.safetensors").read_bytes()
    for name in ("encoder.safetensors", "encoder.json", "report.html"):
        (out / name).unlink()
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert (out / "encoder.safetensors").read_bytes() == encoder and (out / "report.html").is_file()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), f"{path.relative_to(tmp_path)}: {oct(mode)}"


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "WARNING" in line and "accum_steps" in line]


def test_accumulation_warns_what_spans_one_micro_batch(tmp_path, capsys):
    assert main(["pretrain", *TINY_RUN, "train.steps=1", "train.accum_steps=2", "--out", str(tmp_path / "a")]) == 0
    warned = " ".join(_warnings(capsys.readouterr().err))
    assert "SimCLR's negatives" in warned and "BatchNorm" in warned and "16 samples" in warned
    assert main(["pretrain", *TINY_RUN, "train.steps=1", "--out", str(tmp_path / "b")]) == 0
    assert not _warnings(capsys.readouterr().err)


def test_accumulation_is_silent_for_a_method_whose_samples_are_independent(tmp_path, capsys):
    mae = [a for a in TINY_RUN if not a.startswith("encoder.")] + [
        "method.name=mae", "encoder.name=vit_tiny", "encoder.patch_size=4", "encoder.depth=1", "encoder.dim=32",
        "encoder.heads=2", "train.steps=1", "train.accum_steps=2"]
    assert main(["pretrain", *mae, "--out", str(tmp_path / "mae")]) == 0
    assert not _warnings(capsys.readouterr().err)


def test_text_run_and_task_files_follow_the_umask(tmp_path):
    """The tokenizer (written through mkstemp) and the task folder (built with mkdtemp) included."""
    from selfsup.adapt.run import adapt
    from selfsup.adapt.task import AdaptConfig
    from selfsup.train.runtime import init_runtime
    from tests.train.test_pretrain_text import tiny_text_run

    previous = os.umask(0o022)
    try:
        run, _ = tiny_text_run(tmp_path)
        adapt(str(run), tmp_path / "task", AdaptConfig(mode="head", epochs=1, label_fraction=1.0),
              runtime=init_runtime("cpu", "fp32"))
    finally:
        os.umask(previous)
    for path in [run, *run.rglob("*"), tmp_path / "task", *(tmp_path / "task").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path.relative_to(tmp_path)}: {oct(mode)}"
