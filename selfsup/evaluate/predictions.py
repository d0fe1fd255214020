"""The predictions CSV that `selfsup predict` writes and `selfsup evaluate` audits, read back with
errors that name the file and line: `id,label,prediction,confidence,<group columns...>,p_<class>...`."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from selfsup.errors import SelfsupError

REQUIRED = ("id", "label", "prediction", "confidence")


@dataclass
class Predictions:
    """Rows of a predictions CSV. `labels` holds "" for rows whose label is unknown; `probs` is
    [N, C] over `classes` when the file has p_ columns, else None."""

    ids: list[str]
    labels: list[str]
    predictions: list[str]
    confidence: np.ndarray
    probs: np.ndarray | None
    classes: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = "<predictions>"

    def __post_init__(self) -> None:
        self.confidence = np.asarray(self.confidence, dtype=np.float64)
        n = len(self.ids)
        sizes = {"labels": len(self.labels), "predictions": len(self.predictions),
                 "confidence": len(self.confidence), **{f"group {g!r}": len(v) for g, v in self.groups.items()}}
        if self.probs is not None:
            sizes["probs"] = len(self.probs)
            if self.probs.ndim != 2 or self.probs.shape[1] != len(self.classes):
                raise SelfsupError(f"{self.source}: probs of shape {self.probs.shape} for {len(self.classes)} classes")
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise SelfsupError(f"{self.source}: {n} ids but {wrong}; every field needs one entry per row")

    def __len__(self) -> int:
        return len(self.ids)

    def labelled(self) -> Predictions:
        """Only the rows with a known label: accuracy and calibration need the truth."""
        keep = [i for i, label in enumerate(self.labels) if label != ""]
        if not keep:
            raise SelfsupError(f"{self.source}: none of its {len(self)} rows has a label, so there is nothing to "
                               "evaluate; predict on held-out data with labels (selfsup predict without --data)")
        return replace(self, ids=[self.ids[i] for i in keep], labels=[self.labels[i] for i in keep],
                       predictions=[self.predictions[i] for i in keep], confidence=self.confidence[keep],
                       probs=None if self.probs is None else self.probs[keep],
                       groups={g: [v[i] for i in keep] for g, v in self.groups.items()})


def read_predictions(path: Path, group_columns: list[str] | None = None) -> Predictions:
    """Reads a CSV in the layout `selfsup predict` writes: id,label,prediction,confidence, the
    group columns, then p_<class> columns. `group_columns` keeps only the named group columns
    (e.g. from --groups); by default every column between confidence and the first p_ column."""
    path = Path(path)
    if not path.is_file():
        raise SelfsupError(f"{path}: no such predictions file; write one with `selfsup predict`")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise SelfsupError(f"{path}: the file is empty; expected a header line {','.join(REQUIRED)},...")
            group_cols, prob_cols = _parse_header(path, header)
            chosen = choose_group_columns(path, group_cols, group_columns)
            col = {name: i for i, name in enumerate(header)}
            ids, labels, preds, conf, probs = [], [], [], [], []
            groups: dict[str, list[str]] = {g: [] for g in chosen}
            for cells in reader:
                line = reader.line_num
                if not cells:
                    continue  # a trailing blank line is not a row
                if len(cells) != len(header):
                    raise SelfsupError(f"{path}:{line}: {len(cells)} cells, but the header has {len(header)}; "
                                       "the row is cut short or has an unquoted comma")
                if cells[col["prediction"]] == "":
                    raise SelfsupError(f"{path}:{line}: the prediction is empty")
                ids.append(cells[col["id"]])
                labels.append(cells[col["label"]])
                preds.append(cells[col["prediction"]])
                conf.append(_number(path, line, "confidence", cells[col["confidence"]], unit=True))
                probs.append([_number(path, line, header[j], cells[j], unit=True) for j in prob_cols])
                for g in chosen:
                    groups[g].append(cells[col[g]])
    except UnicodeDecodeError as err:
        raise SelfsupError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from err
    if not ids:
        raise SelfsupError(f"{path}: the header has no rows under it")
    if prob_cols:
        classes = [header[j][2:] for j in prob_cols]
        prob_array = np.asarray(probs, dtype=np.float64)
    else:
        classes = sorted({c for c in labels + preds if c != ""})
        prob_array = None
    return Predictions(ids, labels, preds, np.asarray(conf), prob_array, classes, groups, str(path))


def _parse_header(path: Path, header: list[str]) -> tuple[list[str], list[int]]:
    """Group column names and the indices of the p_ columns."""
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise SelfsupError(f"{path}:1: the header lacks {missing}; `selfsup predict` writes "
                           f"{','.join(REQUIRED)},<group columns>,p_<class>,... (got {header})")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise SelfsupError(f"{path}:1: columns {dup} appear more than once in the header")
    prob_cols = [j for j, c in enumerate(header) if c.startswith("p_")]
    if prob_cols and prob_cols != list(range(prob_cols[0], len(header))):
        raise SelfsupError(f"{path}:1: the p_<class> columns must come last, after the group columns (got {header})")
    end = prob_cols[0] if prob_cols else len(header)
    start = header.index("confidence") + 1
    if any(c in REQUIRED for c in header[start:end]):
        raise SelfsupError(f"{path}:1: id,label,prediction,confidence must come first, in that order (got {header})")
    return header[start:end], prob_cols


def choose_group_columns(where: str | Path, available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The requested group columns, or all of them; an unknown name lists the ones there are."""
    if wanted is None:
        return list(available)
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise SelfsupError(f"{where}: no group column {', '.join(map(repr, unknown))}; "
                           f"the group columns are {list(available) or 'none'}")
    return list(dict.fromkeys(wanted))


def _number(path: Path, line: int, name: str, text: str, unit: bool) -> float:
    """A finite float from a cell, in [0, 1] when `unit` (confidences and probabilities)."""
    try:
        value = float(text)
    except ValueError:
        raise SelfsupError(f"{path}:{line}: {name} is {text!r}, not a number") from None
    if not math.isfinite(value) or (unit and not 0.0 <= value <= 1.0):
        raise SelfsupError(f"{path}:{line}: {name} is {text}, outside [0, 1]")
    return value
