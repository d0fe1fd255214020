"""What a run tells the user while it trains: metrics.jsonl, a progress bar or log lines, TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from selfsup.errors import SelfsupError
from selfsup.files import write_atomic

log = logging.getLogger("selfsup")


class MetricsLog:
    """Appends one JSON object per line; on resume, drops the lines of steps after the checkpoint.

    Those steps are about to be trained again, and keeping both copies would make the curve lie.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line, row in _parse_lines(path) if row.get("step", 0) <= resume_step]
            # Rewritten whole (and with a final newline, which a torn last line lacked) before appending.
            write_atomic(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) for every JSON-object line of a metrics.jsonl.

    A crash (power loss, a full disk) can leave the last line half-written: that row is dropped with
    a warning, since it is the only one the crash can have damaged. Anything unreadable before it is
    not a crash but a corrupt or foreign file, and is refused with its line number.
    """
    # Bytes a crash leaves (NULs, a cut multi-byte character) must not stop decoding of the rest.
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    parsed = []
    for index, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            parsed.append((line, row))
        elif index == len(numbered) - 1:
            log.warning("%s:%d: dropping an incomplete last line (the run was cut off while writing it)", path, number)
        else:
            raise SelfsupError(f"{path}:{number}: not a JSON object line; the file is corrupt "
                               "(fix or delete that line to continue)")
    return parsed


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line is dropped with a warning (see `_parse_lines`)."""
    return [row for _, row in _parse_lines(path)]


def format_duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `2.1 h`: a wall time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """A rich progress bar on a terminal; otherwise one plain log line every `every` steps."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True, title: str = "pretrain"):
        self.total, self.every, self.enabled = total, every, enabled
        self.start_time, self.start_step = time.perf_counter(), start
        self._last_warning: str | None = None
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task(title, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any], warning: str | None = None) -> None:
        if not self.enabled:
            return
        shown = {k: row[k] for k in ("loss", "lr", "samples_per_s", "tokens_per_s", "knn_acc", "heldout_ppl") if k in row}
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if warning:
            info += f"  [red]{warning}"
        # A warning is said when it starts (and in every regular line while it lasts), not at every
        # step: the codebook alarm is computed each step, and a line per step would bury the log.
        new_warning = bool(warning) and warning.split(":")[0] != (self._last_warning or "").split(":")[0]
        self._last_warning = warning
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            if new_warning:
                self._bar.console.print(f"[red]step {step}: {warning}")
        elif step % self.every == 0 or step == self.total or new_warning:
            elapsed = time.perf_counter() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else math.nan
            log.info("step %d/%d  %s  eta %.0fs%s", step, self.total, info.replace("[red]", ""), eta,
                     f"  WARNING: {warning}" if warning else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class TensorBoard:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SelfsupError("`train.tensorboard=true` needs TensorBoard: pip install tensorboard") from None
        self.writer = SummaryWriter(str(log_dir))

    def write(self, step: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()
