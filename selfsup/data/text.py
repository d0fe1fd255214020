"""Text sources: documents from a folder of .txt files, one .txt file, a .jsonl or a .csv, streamed.

A corpus may be larger than memory, so `iter_text_source` yields one `TextRecord` at a time and holds
at most about two pieces of `max_line_chars` characters at once. Files are read as bytes with a
bounded `readline` and decoded incrementally, for two reasons: a 50 MB line (a minified dump, a
binary blob renamed .txt) is never held whole — it is cut into pieces or refused — and an invalid
byte is reported at its true line, which text-mode reading cannot do (it decodes 8 KB ahead).

Small corpora (the built-in man pages, probe sets) are held in memory as a `TextSet`, the text twin of
`images.ImageSet`: ids, labels indexing `classes` (-1 = an unlabelled row), subgroup columns.
Blank documents (empty or whitespace only) are skipped everywhere: they carry nothing to learn.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from selfsup.data.sources import _cell, _sorted_classes, check_label_column, report_empty_groups, walk_files
from selfsup.errors import SelfsupError

TEXT_EXTENSIONS = (".txt",)
# Built-in corpora that `load_text_source` accepts by name (each also in builtins.BUILTIN).
TEXT_BUILTINS = ("manpages",)
_ACCEPTED = ("a built-in corpus (manpages), a folder of .txt files, a .txt file (one document per line), "
             "a .jsonl file with a text field, or a .csv file with a text column")


@dataclass
class TextRecord:
    """One document: its text, a stable id (path, path:line or the row's `id`), label and subgroups."""

    text: str
    id: str
    label: str | None = None
    groups: dict[str, str] = field(default_factory=dict)


@dataclass
class TextSet:
    """A corpus held in memory: `labels` is int64 [N] indexing `classes` (-1 = unlabelled) or None;
    `groups` maps a subgroup column to one string per document."""

    texts: list[str]
    ids: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        N = len(self.texts)
        assert len(self.ids) == N
        assert self.labels is None or (self.labels.shape == (N,) and self.labels.dtype == torch.long)
        assert all(len(values) == N for values in self.groups.values())

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: torch.Tensor | list[int]) -> TextSet:
        """The documents at `index`, in the order given (a boolean mask selects them in order)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        rows = index.tolist()
        return TextSet(texts=[self.texts[i] for i in rows], ids=[self.ids[i] for i in rows],
                       labels=None if self.labels is None else self.labels[index], classes=self.classes,
                       groups={name: [values[i] for i in rows] for name, values in self.groups.items()},
                       source=self.source)


# ---------------------------------------------------------------------------------------------
# Bounded, line-numbered reading


@dataclass(frozen=True)
class _LineReader:
    """Reads a file's lines as pieces of at most `max_chars` characters, with their line numbers."""

    max_chars: int
    errors: str
    long_lines: str

    def _pieces(self, path: Path) -> Iterator[tuple[int, str, bool]]:
        """(line number, text, ends the line) without line terminators; a line of <= max_chars
        characters is one piece, a longer one several, only the last of which ends the line."""
        cap = self.max_chars
        decoder = codecs.getincrementaldecoder("utf-8")(errors=self.errors)
        line_number, line_bytes, pending, is_start = 1, 0, "", True
        try:
            fh = open(path, "rb")
        except OSError as err:
            raise SelfsupError(f"{path}: cannot read ({err.strerror or err})") from None
        with fh:
            while True:
                # bytes, not characters: +2 fits "\r\n" after a line of exactly `cap` ASCII characters
                raw = fh.readline(cap + 2)
                at_end = not raw
                num_buffered = len(decoder.getstate()[0])  # an incomplete character from the last read
                try:
                    text = decoder.decode(raw, final=at_end)
                except UnicodeDecodeError as err:
                    bad = err.object[err.start:err.end].hex(" ")
                    where = line_bytes - num_buffered + err.start + 1
                    raise SelfsupError(f"{path}:{line_number}: invalid UTF-8 (byte {bad} at byte {where} of the "
                                       f"line); convert the file to UTF-8, or pass errors='replace' (in a run config: "
                                       f"data.text_errors=replace) to read such bytes as U+FFFD") from None
                line_bytes += len(raw)
                if is_start and text:
                    text, is_start = text.removeprefix("\ufeff"), False  # a byte-order mark is not content
                pending += text
                ends = at_end or raw.endswith(b"\n")
                if ends:
                    pending = pending.removesuffix("\n").removesuffix("\r")
                # a trailing "\r" may be the first half of a "\r\n" still unread, so it is not counted yet
                while len(pending) - (not ends and pending.endswith("\r")) > cap:
                    yield line_number, pending[:cap], False
                    pending = pending[cap:]
                if ends and (not at_end or line_bytes > 0):
                    yield line_number, pending, True
                    line_number, line_bytes, pending = line_number + 1, 0, ""
                if at_end:
                    return

    def line_pieces(self, path: Path) -> Iterator[tuple[int, int, str]]:
        """(line number, piece number, text): an over-long line is split, or refused naming it."""
        piece = 0
        for line_number, text, ends in self._pieces(path):
            if not ends and self.long_lines == "refuse":
                raise SelfsupError(f"{path}:{line_number}: line longer than {self.max_chars:,} characters "
                                   f"(max_line_chars); raise max_line_chars, or pass long_lines='split' to cut "
                                   f"it into pieces")
            yield line_number, piece, text
            piece = 0 if ends else piece + 1

    def whole_lines(self, path: Path, kind: str) -> Iterator[tuple[int, str]]:
        """(line number, line) of a structured file, whose lines cannot be cut: over-long is an error."""
        for line_number, text, ends in self._pieces(path):
            if not ends:
                raise SelfsupError(f"{path}:{line_number}: line longer than {self.max_chars:,} characters "
                                   f"(max_line_chars); a {kind} line cannot be cut into pieces, so raise "
                                   f"max_line_chars if the line is meant to be this long")
            yield line_number, text


# ---------------------------------------------------------------------------------------------
# The kinds of source


def _iter_folder(root: Path, unit: str, reader: _LineReader) -> Iterator[TextRecord]:
    """Every .txt file under `root`, sorted; hidden files and folders (".name") are ignored."""
    relative = walk_files(root, TEXT_EXTENSIONS)
    if not relative:
        raise SelfsupError(f"{root}: no text files found (looked for {', '.join(TEXT_EXTENSIONS)}); {_ACCEPTED}")
    # As for image folders: labelled only when every file sits in one of >= 2 class sub-folders.
    tops = [rel.split("/")[0] if "/" in rel else None for rel in relative]
    is_labelled = None not in tops and len(set(tops)) >= 2
    for rel, top in zip(relative, tops):
        label = top if is_labelled else None
        if unit == "line":
            yield from _line_records(root / rel, rel, label, reader)
        else:
            yield from _file_records(root / rel, rel, label, reader)


def _line_records(path: Path, name: str, label: str | None, reader: _LineReader) -> Iterator[TextRecord]:
    """One record per non-blank line, id "name:line" ("name:line#k" for the k-th piece of a long one)."""
    for line_number, piece, text in reader.line_pieces(path):
        if text.strip():
            yield TextRecord(text, f"{name}:{line_number}" + (f"#{piece}" if piece else ""), label)


def _file_records(path: Path, name: str, label: str | None, reader: _LineReader) -> Iterator[TextRecord]:
    """The file as one record; past `max_chars` characters it is emitted in consecutive pieces
    (cut at line ends where it can be; ids "name", "name#1", ...) so memory stays bounded."""
    cap = reader.max_chars
    parts: list[str] = []
    size, num_emitted = 0, 0
    for _, _, text in reader.line_pieces(path):
        if parts and size + len(text) > cap:
            document = "".join(parts)[:-1]  # without the last line's "\n"
            if document.strip():
                yield TextRecord(document, name + (f"#{num_emitted}" if num_emitted else ""), label)
                num_emitted += 1
            parts, size = [], 0
        parts.append(text + "\n")
        size += len(text) + 1
    document = "".join(parts)[:-1]
    if document.strip():
        yield TextRecord(document, name + (f"#{num_emitted}" if num_emitted else ""), label)


def _iter_jsonl(path: Path, reader: _LineReader, text_field: str, label_column: str,
                group_columns: list[str] | None) -> Iterator[TextRecord]:
    """One record per JSON object; `id` is the row's "id" field when it has one, else "file:line"."""
    seen: set[str] = set()
    for line_number, line in reader.whole_lines(path, "JSON"):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SelfsupError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise SelfsupError(f'{where}: expected a JSON object like {{"{text_field}": "..."}}, '
                               f"got {type(row).__name__}")
        if text_field not in row:
            raise SelfsupError(f"{where}: no '{text_field}' field (text_field); fields are: "
                               f"{', '.join(row) or '(none)'}")
        text = row[text_field]
        if not isinstance(text, str):
            raise SelfsupError(f"{where}: '{text_field}' must be a string, got {type(text).__name__}")
        seen.update(row)
        if not text.strip():
            continue
        columns = group_columns if group_columns is not None else [c for c in ("group",) if c in row]
        yield TextRecord(text, _cell(row, "id") or f"{path.name}:{line_number}",
                         _cell(row, label_column) or None, {column: _cell(row, column) for column in columns})
    if seen:  # an empty file is refused by `_non_empty`, not as a file without the label column
        check_label_column(path, sorted(seen), label_column)
    never = [column for column in group_columns or [] if column not in seen]
    if never:
        raise SelfsupError(f"{path}: no row has the group field {', '.join(never)}; "
                           f"fields seen: {', '.join(sorted(seen))}")


def _iter_csv(path: Path, reader: _LineReader, text_field: str, label_column: str,
              group_columns: list[str] | None) -> Iterator[TextRecord]:
    """One record per row of a CSV with a header; a quoted text cell may span lines."""
    # The csv module holds a multi-line cell whole; its field-size limit (process-wide) is what keeps
    # that bounded, so it is raised to the line cap, never lowered below what others may need.
    if csv.field_size_limit() < reader.max_chars:
        csv.field_size_limit(reader.max_chars)
    rows = csv.reader(line + "\n" for _, line in reader.whole_lines(path, "CSV"))
    try:
        columns = [column.strip() for column in next(rows, [])]
        if text_field not in columns:
            raise SelfsupError(f"{path}: no '{text_field}' column (text_field) in the header; columns are: "
                               f"{', '.join(columns) or '(none: the file is empty)'}")
        check_label_column(path, columns, label_column)
        if group_columns is None:
            group_columns = ["group"] if "group" in columns else []
        missing = [column for column in group_columns if column not in columns]
        if missing:
            raise SelfsupError(f"{path}: no group column {', '.join(missing)}; columns are: {', '.join(columns)}")
        for cells in rows:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise SelfsupError(f"{path}:{rows.line_num}: {len(cells)} cells, but the header has "
                                   f"{len(columns)} columns")
            row = dict(zip(columns, cells))
            if not row[text_field].strip():
                continue
            yield TextRecord(row[text_field], _cell(row, "id") or f"{path.name}:{rows.line_num}",
                             _cell(row, label_column) or None, {column: _cell(row, column) for column in group_columns})
    except csv.Error as err:
        raise SelfsupError(f"{path}:{rows.line_num}: not valid CSV ({err})") from None


def _non_empty(records: Iterable[TextRecord], source: Path) -> Iterator[TextRecord]:
    num_records = 0
    for record in records:
        num_records += 1
        yield record
    if num_records == 0:
        raise SelfsupError(f"{source}: empty corpus: no document with any non-blank text")


def iter_text_source(source: str | Path, *, text_field: str = "text", label_column: str = "label",
                     group_columns: list[str] | None = None, unit: Literal["file", "line"] = "file",
                     errors: Literal["strict", "replace"] = "strict", max_line_chars: int = 1_000_000,
                     long_lines: Literal["split", "refuse"] = "split") -> Iterator[TextRecord]:
    """Stream the documents of a folder of .txt files, a .txt file, a .jsonl or a .csv file.

    A folder gives one document per file (`unit="file"`) or per line (`unit="line"`), sorted, with
    the sub-folder as label when every file sits in one of >= 2 sub-folders; a single .txt file gives
    one document per line. A .jsonl needs `text_field` in every object, a .csv a `text_field`
    column; both take labels from `label_column` and subgroups from `group_columns` (default: "group"
    when present). Invalid UTF-8 is an error naming file and line unless `errors="replace"`. A line
    longer than `max_line_chars` is cut into pieces (`long_lines="split"`) or refused (`"refuse"`);
    .jsonl/.csv lines are always refused, as they cannot be cut. Options are checked now, files as
    they are read; a source with no non-blank document raises at the end of the stream.
    """
    if unit not in ("file", "line"):
        raise SelfsupError(f"unit must be 'file' (one document per file) or 'line', got {unit!r}")
    if errors not in ("strict", "replace"):
        raise SelfsupError(f"errors must be 'strict' (invalid UTF-8 stops) or 'replace', got {errors!r}")
    if long_lines not in ("split", "refuse"):
        raise SelfsupError(f"long_lines must be 'split' or 'refuse', got {long_lines!r}")
    if isinstance(max_line_chars, bool) or not isinstance(max_line_chars, int) or max_line_chars < 1:
        raise SelfsupError(f"max_line_chars must be a positive integer, got {max_line_chars!r}")
    reader = _LineReader(max_line_chars, errors, long_lines)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _iter_folder(path, unit, reader)
    elif path.is_file() and suffix == ".jsonl":
        records = _iter_jsonl(path, reader, text_field, label_column, group_columns)
    elif path.is_file() and suffix == ".csv":
        records = _iter_csv(path, reader, text_field, label_column, group_columns)
    elif path.is_file() and suffix in TEXT_EXTENSIONS:
        records = _line_records(path, path.name, None, reader)
    elif path.is_file():
        raise SelfsupError(f"{source}: unsupported kind of file '{suffix}'; a text source is {_ACCEPTED}")
    elif os.fspath(source) in TEXT_BUILTINS:
        raise SelfsupError(f"'{source}' is a built-in corpus, not a path: load it with load_text_source, "
                           f"or write ./{source} to mean a folder of that name")
    else:
        hint = difflib.get_close_matches(os.fspath(source), list(TEXT_BUILTINS), n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise SelfsupError(f"{source}: no such file or folder{did_you_mean}; a text source is {_ACCEPTED}")
    return _non_empty(records, path)


# ---------------------------------------------------------------------------------------------
# In memory


def load_text_source(source: str | Path, **kw) -> TextSet:
    """A built-in corpus by name, or every document of a path (options as `iter_text_source`).

    A built-in name wins over a folder of the same name in the working directory; write
    "./manpages" to mean the folder.
    """
    from selfsup.data.builtins import BUILTIN  # builtins imports images; only needed here

    name = os.fspath(source)
    if name in TEXT_BUILTINS:
        from selfsup.data.builtins.manpages import load_manpages  # it imports this module

        return load_manpages()
    if name in BUILTIN:
        raise SelfsupError(f"'{name}' is a built-in image dataset; the text built-ins are: {', '.join(TEXT_BUILTINS)} "
                           f"(write ./{name} to mean a folder of that name)")
    return texts_from_records(iter_text_source(source, **kw), source=name)


def texts_from_records(records: Iterable[TextRecord], source: str) -> TextSet:
    """Collect records into a `TextSet`; classes sort numerically when all are integers."""
    texts: list[str] = []
    ids: list[str] = []
    names: list[str | None] = []
    row_groups: list[dict[str, str]] = []
    for record in records:
        texts.append(record.text)
        ids.append(record.id)
        names.append(record.label)
        row_groups.append(record.groups)
    columns = list(dict.fromkeys(column for groups in row_groups for column in groups))
    groups = {column: [row.get(column, "") for row in row_groups] for column in columns}
    report_empty_groups(source, groups, ids)
    present = {name for name in names if name is not None}
    if not present:
        return TextSet(texts, ids, None, None, groups, source)
    classes = _sorted_classes(present)
    class_index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([class_index[name] if name is not None else -1 for name in names], dtype=torch.long)
    return TextSet(texts, ids, labels, classes, groups, source)
