"""Text sources: each kind of file, labels, bad bytes, long lines (bounded memory), the holdout split."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.data.images import ImageSet
from selfsup.data.split import split_holdout
from selfsup.data.text import TextRecord, TextSet, iter_text_source, load_text_source
from selfsup.errors import SelfsupError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def records(source: Path, **kw) -> list[TextRecord]:
    return list(iter_text_source(source, **kw))


# ---------------------------------------------------------------------------------------------
# Kinds of source


def test_folder_of_files_labels_from_sub_folders(tmp_path: Path) -> None:
    write(tmp_path / "b" / "two.txt", "second\nfile\n")
    write(tmp_path / "a" / "one.txt", "first file")
    write(tmp_path / "b" / "deeper" / "three.txt", "third")
    write(tmp_path / "b" / "notes.md", "not a .txt file")
    write(tmp_path / ".hidden" / "x.txt", "hidden folders are skipped")
    got = records(tmp_path)
    assert [(r.id, r.label, r.text) for r in got] == [
        ("a/one.txt", "a", "first file"), ("b/deeper/three.txt", "b", "third"), ("b/two.txt", "b", "second\nfile")]
    data = load_text_source(tmp_path)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 1, 1] and len(data) == 3


def test_folder_is_unlabelled_unless_every_file_is_in_one_of_two_sub_folders(tmp_path: Path) -> None:
    write(tmp_path / "a" / "one.txt", "one")
    write(tmp_path / "top.txt", "a file outside any class folder")
    assert {r.label for r in records(tmp_path)} == {None}
    only = tmp_path / "only"
    write(only / "sub" / "x.txt", "x")
    write(only / "sub" / "y.txt", "y")
    assert {r.label for r in records(only)} == {None}
    assert load_text_source(only).labels is None


def test_folder_one_document_per_line(tmp_path: Path) -> None:
    write(tmp_path / "x" / "f.txt", "alpha\n\n   \nbeta\r\ngamma")
    write(tmp_path / "y" / "g.txt", "delta\n")
    got = records(tmp_path, unit="line")
    assert [(r.id, r.label, r.text) for r in got] == [
        ("x/f.txt:1", "x", "alpha"), ("x/f.txt:4", "x", "beta"), ("x/f.txt:5", "x", "gamma"),
        ("y/g.txt:1", "y", "delta")]


def test_single_text_file_is_one_document_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.txt", "\ufefffirst line\r\nsecond line\n\nthird")
    assert [(r.id, r.text, r.label) for r in records(path)] == [
        ("corpus.txt:1", "first line", None), ("corpus.txt:2", "second line", None), ("corpus.txt:4", "third", None)]


def test_jsonl_with_labels_groups_and_ids(tmp_path: Path) -> None:
    rows = [{"text": "ten", "label": 10, "lang": "en", "id": "doc-a"}, {"text": "nine", "label": 9, "lang": "fr"},
            {"text": "no label", "lang": "en"}, {"text": "  ", "label": 1, "lang": "en"}]
    path = write(tmp_path / "c.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    got = records(path, group_columns=["lang"])
    assert [(r.id, r.text, r.label, r.groups) for r in got] == [
        ("doc-a", "ten", "10", {"lang": "en"}), ("c.jsonl:2", "nine", "9", {"lang": "fr"}),
        ("c.jsonl:3", "no label", None, {"lang": "en"})]  # the blank document is skipped
    data = load_text_source(path, group_columns=["lang"])
    assert data.classes == ["9", "10"]  # integers sort as numbers
    assert data.labels.tolist() == [1, 0, -1] and data.groups == {"lang": ["en", "fr", "en"]}


def test_jsonl_other_text_field_and_default_group(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", json.dumps({"body": "hello", "group": "g1"}) + "\n")
    assert records(path, text_field="body")[0].groups == {"group": "g1"}
    with pytest.raises(SelfsupError, match=r"c\.jsonl:1: no 'text' field .*fields are: body, group"):
        records(path)
    with pytest.raises(SelfsupError, match="no row has the group field lang"):
        records(path, text_field="body", group_columns=["lang"])


def test_jsonl_malformed_line_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(SelfsupError, match=r"c\.jsonl:2: not valid JSON"):
        records(path)
    path = write(tmp_path / "d.jsonl", '{"text": "fine"}\n["a list"]\n')
    with pytest.raises(SelfsupError, match=r"d\.jsonl:2: expected a JSON object"):
        records(path)
    path = write(tmp_path / "e.jsonl", '{"text": 3}\n')
    with pytest.raises(SelfsupError, match=r"e\.jsonl:1: 'text' must be a string"):
        records(path)


def test_csv_with_multiline_cell_labels_and_groups(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", 'text,label,group\n"one\nspans two lines",pos,g1\nplain,neg,g2\n,neg,g1\n')
    got = records(path)
    assert [(r.id, r.text, r.label, r.groups) for r in got] == [
        ("c.csv:3", "one\nspans two lines", "pos", {"group": "g1"}), ("c.csv:4", "plain", "neg", {"group": "g2"})]
    with pytest.raises(SelfsupError, match=r"c\.csv: no 'body' column .*columns are: text, label, group"):
        records(path, text_field="body")
    with pytest.raises(SelfsupError, match="no group column lang"):
        records(path, group_columns=["lang"])
    bad = write(tmp_path / "bad.csv", "text,label\nfine,a\ntoo,many,cells\n")
    with pytest.raises(SelfsupError, match=r"bad\.csv:3: 3 cells, but the header has 2 columns"):
        records(bad)


def test_a_label_column_asked_for_by_name_must_exist(tmp_path: Path) -> None:
    """A mistyped data.label_column is an error naming it and the columns, not an unlabelled corpus (issue 17)."""
    jsonl = write(tmp_path / "c.jsonl", json.dumps({"text": "a", "label": "x", "lang": "en"}) + "\n"
                  + json.dumps({"text": "b", "label": "y"}) + "\n")
    with pytest.raises(SelfsupError, match=r"c\.jsonl: no label column 'labl' \(data\.label_column\).*label, lang, text"):
        load_text_source(jsonl, label_column="labl")
    table = write(tmp_path / "c.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(SelfsupError, match=r"c\.csv: no label column 'labl' \(data\.label_column\).*text, label"):
        load_text_source(table, label_column="labl")
    # The default column may be absent (unlabelled text); another column present in some rows only is fine.
    assert load_text_source(write(tmp_path / "u.csv", "text\na\n")).labels is None
    assert load_text_source(jsonl, label_column="lang").labels.tolist() == [0, -1]


def test_empty_group_values_are_counted_and_reported(tmp_path: Path, caplog) -> None:
    """A row with an empty group cell is kept (as an empty label is) and audited as "(missing)", and the load
    says how many rows of which column are empty instead of passing over them in silence."""
    import logging

    table = write(tmp_path / "c.csv", "text,site\na,x\nb,\nc,y\nd, \n")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        data = load_text_source(table, group_columns=["site"])
    assert data.groups == {"site": ["x", "", "y", ""]}
    assert "c.csv" in caplog.text and "2 of 4" in caplog.text and "'site'" in caplog.text
    assert "c.csv:3" in caplog.text and "(missing)" in caplog.text
    caplog.clear()
    jsonl = write(tmp_path / "c.jsonl", json.dumps({"text": "a", "site": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        assert load_text_source(jsonl, group_columns=["site"]).groups == {"site": ["x", ""]}
    assert "1 of 2" in caplog.text and "c.jsonl:2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        load_text_source(write(tmp_path / "full.csv", "text,site\na,x\n"), group_columns=["site"])
    assert caplog.text == ""


def test_pretrain_stops_at_start_on_a_mistyped_label_column(tmp_path: Path, capsys) -> None:
    from selfsup.cli import EXIT_BAD_INPUT, main

    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": f"doc {i}", "label": str(i % 2)}) + "\n"
                                                 for i in range(10)))
    code = main(["pretrain", "--out", str(tmp_path / "run"), "method.name=mlm", "encoder.name=text_encoder",
                 f"data.source={corpus}", "data.label_column=lable", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "'lable'" in err and "label, text" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_invalid_utf8_names_file_and_line_unless_replaced(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.txt", b"good line\nbad \xff byte\n")
    with pytest.raises(SelfsupError, match=r"bad\.txt:2: invalid UTF-8 \(byte ff at byte 5 of the line\)"):
        records(path)
    assert [r.text for r in records(path, errors="replace")] == ["good line", "bad \ufffd byte"]
    # a character cut off by the end of the file is invalid too
    truncated = write(tmp_path / "cut.jsonl", '{"text": "a"}\n'.encode() + "\u20ac".encode()[:2])
    with pytest.raises(SelfsupError, match=r"cut\.jsonl:2: invalid UTF-8"):
        records(truncated)


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "blank" / "a.txt", "  \n\n")
    write(tmp_path / "blank" / "b.txt", "")
    with pytest.raises(SelfsupError, match="empty corpus"):
        records(tmp_path / "blank")
    (tmp_path / "none").mkdir()
    with pytest.raises(SelfsupError, match="no text files found"):
        records(tmp_path / "none")
    with pytest.raises(SelfsupError, match="empty corpus"):
        records(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(SelfsupError, match="no 'text' column .*the file is empty"):
        records(write(tmp_path / "empty.csv", ""))


def test_bad_options_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", "x")
    for kw, key in [({"unit": "page"}, "unit"), ({"errors": "ignore"}, "errors"),
                    ({"long_lines": "drop"}, "long_lines"), ({"max_line_chars": 0}, "max_line_chars")]:
        with pytest.raises(SelfsupError, match=key):
            iter_text_source(path, **kw)  # checked at the call, before any reading
    with pytest.raises(SelfsupError, match="unsupported kind of file '.pdf'"):
        iter_text_source(write(tmp_path / "x.pdf", "x"))
    with pytest.raises(SelfsupError, match="did you mean 'manpages'"):
        iter_text_source("manpage")
    with pytest.raises(SelfsupError, match="is a built-in image dataset"):
        load_text_source("mnist")


# ---------------------------------------------------------------------------------------------
# Long lines


def test_split_pieces_reassemble_every_line(tmp_path: Path) -> None:
    """Parity with a naive reader: pieces of at most the cap that join back into each line, with
    multi-byte characters cut by the byte-bounded reads and CRLF endings."""
    rng = random.Random(0)
    alphabet = "ab\u00e9\u20ac\U0001f600"  # 1-, 2-, 3- and 4-byte characters
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(60)]
    path = write(tmp_path / "c.txt", "\r\n".join(lines) + "\r\n")
    for cap in (1, 5, 7, 39, 40):
        got = records(path, max_line_chars=cap)
        assert max(len(r.text) for r in got) <= cap
        joined: dict[str, str] = {}
        for record in got:
            line_id = record.id.split("#")[0]
            joined[line_id] = joined.get(line_id, "") + record.text
        assert joined == {f"c.txt:{number}": line for number, line in enumerate(lines, start=1)}
        # as many pieces as the cap requires, so a line of exactly the cap is one: "\r\n" does not count
        num_pieces = {line_id: sum(r.id.split("#")[0] == line_id for r in got) for line_id in joined}
        assert num_pieces == {f"c.txt:{number}": -(-len(line) // cap) for number, line in enumerate(lines, start=1)}


def test_long_file_document_comes_in_bounded_pieces(tmp_path: Path) -> None:
    lines = [f"line {i} " + "x" * (i % 13) for i in range(200)]
    path = write(tmp_path / "docs" / "big.txt", "\n".join(lines) + "\n")
    got = records(tmp_path / "docs", max_line_chars=100)
    assert [r.id for r in got[:3]] == ["big.txt", "big.txt#1", "big.txt#2"]
    assert max(len(r.text) for r in got) <= 100
    assert "\n".join(r.text for r in got) == path.read_text().rstrip("\n")  # cut only at line ends


FIRST_LINE = b'{"text": "a short first line"}\n'  # valid as text and as JSON


def _write_long_line(path: Path, num_bytes: int) -> None:
    with open(path, "wb") as fh:
        fh.write(FIRST_LINE)
        block = b"abcdefghij " * 100_000  # 1.1 MB, written in blocks so the test holds no 50 MB either
        for _ in range(num_bytes // len(block)):
            fh.write(block)
        fh.write(b"\nlast line\n")


def test_a_50_mb_line_is_split_in_bounded_memory_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    _write_long_line(path, 50_000_000)
    line_bytes = path.stat().st_size - len(FIRST_LINE) - len(b"\nlast line\n")
    cap = 1_000_000
    tracemalloc.start()
    try:
        num_pieces, num_chars, longest = 0, 0, 0
        for record in iter_text_source(path, max_line_chars=cap):
            if record.id.startswith("huge.txt:2"):
                num_pieces += 1
                num_chars += len(record.text)
                longest = max(longest, len(record.text))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert num_chars == line_bytes and longest == cap and num_pieces == -(-line_bytes // cap)
    assert peak < 10_000_000, f"peak {peak / 1e6:.1f} MB while streaming a 50 MB line"

    with pytest.raises(SelfsupError, match=r"huge\.txt:2: line longer than 1,000,000 characters"):
        for _ in iter_text_source(path, max_line_chars=cap, long_lines="refuse"):
            pass
    folder = tmp_path / "folder"
    folder.mkdir()
    path = path.rename(folder / "huge.txt")
    tracemalloc.start()
    try:  # one document per file: the file comes in pieces, bounded the same way
        lengths = [len(record.text) for record in iter_text_source(folder, max_line_chars=cap)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(lengths) == cap and sum(lengths) == path.stat().st_size - 2  # the two "\n" that end pieces
    assert peak < 10_000_000

    as_jsonl = tmp_path / "huge.jsonl"
    path.rename(as_jsonl)
    tracemalloc.start()
    try:
        with pytest.raises(SelfsupError, match=r"huge\.jsonl:2: line longer .*a JSON line cannot be cut"):
            for _ in iter_text_source(as_jsonl, max_line_chars=cap):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


# ---------------------------------------------------------------------------------------------
# In memory


def _text_set(labels: list[int] | None, num_rows: int | None = None) -> TextSet:
    num_rows = len(labels) if labels is not None else num_rows
    return TextSet(texts=[f"doc {i}" for i in range(num_rows)], ids=[f"t:{i}" for i in range(num_rows)],
                   labels=None if labels is None else torch.tensor(labels), classes=None if labels is None else
                   [str(c) for c in range(max(labels) + 1)], groups={"g": [str(i % 2) for i in range(num_rows)]},
                   source="test")


def test_split_is_stratified_seeded_and_matches_the_image_split() -> None:
    labels = [0] * 50 + [1] * 20 + [2] * 3 + [3] * 1 + [-1] * 10
    data = _text_set(labels)
    train, held = split_holdout(data, 0.2, seed=0)
    assert torch.bincount(held.labels + 1, minlength=5).tolist() == [2, 10, 4, 1, 0]
    assert sorted(train.ids + held.ids, key=lambda s: int(s[2:])) == data.ids
    assert train.ids == sorted(train.ids, key=lambda s: int(s[2:]))
    assert held.groups["g"] == [data.groups["g"][int(i[2:])] for i in held.ids]
    assert held.texts == [f"doc {i[2:]}" for i in held.ids]
    images = ImageSet(images=torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), ids=data.ids,
                      labels=torch.tensor(labels), classes=data.classes)
    assert split_holdout(images, 0.2, seed=0)[1].ids == held.ids  # one rule for every modality
    assert split_holdout(data, 0.2, seed=1)[1].ids != held.ids
    assert split_holdout(data, 0.2, seed=0)[1].ids == held.ids


def test_split_unlabelled_and_zero() -> None:
    data = _text_set(None, num_rows=30)
    train, held = split_holdout(data, 0.1, seed=0)
    assert len(held) == 3 and len(train) == 27 and held.labels is None
    train, held = split_holdout(data, 0.0, seed=0)
    assert train is data and len(held) == 0
    with pytest.raises(SelfsupError, match="fraction"):
        split_holdout(data, 1.0, seed=0)


def test_subset_order_and_mask() -> None:
    data = _text_set([0, 1, 2, 0])
    part = data.subset([3, 0])
    assert part.texts == ["doc 3", "doc 0"] and part.labels.tolist() == [0, 0] and part.groups == {"g": ["1", "0"]}
    assert data.subset(torch.tensor(np.array([True, False, True, False]))).ids == ["t:0", "t:2"]
