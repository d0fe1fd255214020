"""metrics.jsonl after a crash: a torn last line is dropped with a warning, corruption elsewhere is an error."""

import json
import logging
from pathlib import Path

import pytest

from selfsup.errors import SelfsupError
from selfsup.train.progress import MetricsLog, read_metrics


def _write_rows(path: Path, steps: list[int], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1, 2, 3], tail='{"step": 4, "lo')  # power lost mid-write: no newline, not JSON
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")
    assert any(str(path) in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)


def test_resume_refuses_a_corrupt_line_in_the_middle_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1, 2, 3])
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "lo\n'
    path.write_text("".join(lines))
    with pytest.raises(SelfsupError, match=rf"^{path}:2: "):
        MetricsLog(path, resume_step=3)


def test_resume_refuses_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1])
    path.write_text(path.read_text() + "[1, 2]\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(SelfsupError, match=rf"^{path}:2: "):
        MetricsLog(path, resume_step=3)


def test_read_metrics_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1, 2], tail="\x00\x00\x00")  # what some file systems leave after a power cut
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2]
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_read_metrics_names_file_and_line_of_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": 3}\n')
    with pytest.raises(SelfsupError, match=rf"^{path}:2: "):
        read_metrics(path)
