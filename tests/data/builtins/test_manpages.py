"""The man-pages corpus: finding pages, rendering a few into a private cache, reuse, and loading."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from selfsup import cli
from selfsup.data import builtins
from selfsup.data.builtins import BUILTIN, builtin_available
from selfsup.data.builtins.manpages import (CORPUS, PACKAGES, PREPARE_COMMAND, SECTIONS, STAMP, _is_alias, find_pages,
                                   load_manpages, manpages_dir, prepare_manpages)
from selfsup.data.text import load_text_source
from selfsup.errors import SelfsupError


def _why_not() -> str | None:
    missing = [tool for tool in ("man", "col") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install man-db bsdextrautils)"
    try:
        find_pages()
    except SelfsupError as err:
        return str(err)
    return None


WHY_NOT = _why_not()
needs_man = pytest.mark.skipif(WHY_NOT is not None, reason=f"man pages cannot be rendered here: {WHY_NOT}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache from a test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFSUP_CACHE", str(cache))
    return cache


def test_registered_as_a_preparable_builtin() -> None:
    assert "manpages" in BUILTIN and "prepare manpages" in BUILTIN["manpages"]
    assert "manpages" in builtins.PREPARABLE and cli.PREPARABLE == builtins.PREPARABLE
    with pytest.raises(SelfsupError, match="text corpus"):
        builtins.load_builtin("manpages", image_size=32)


def test_not_prepared_says_what_to_run(private_cache: Path) -> None:
    assert manpages_dir() == private_cache / "manpages"
    with pytest.raises(SelfsupError, match=f"not prepared .*{PREPARE_COMMAND}"):
        load_manpages()
    available, reason = builtin_available("manpages")
    assert not available and ("data prepare manpages" in reason)


def test_alias_stubs_are_recognised(tmp_path: Path) -> None:
    stub, page = tmp_path / "stub.3.gz", tmp_path / "page.3.gz"
    stub.write_bytes(gzip.compress(b'.\\" a comment\n.so man7/other.7\n'))
    page.write_bytes(gzip.compress(b'.TH PAGE 3\n.SH NAME\npage \\- does things\n.so man7/other.7\n'))
    assert _is_alias(stub) and not _is_alias(page)


@needs_man
def test_pages_are_real_files_in_the_labelled_sections() -> None:
    pages, num_aliases = find_pages()
    assert len(pages) > 500 and num_aliases > 0
    assert {page.section for page in pages} <= set(SECTIONS) and {page.package for page in pages} <= set(PACKAGES)
    assert len({page.name for page in pages}) == len(pages)
    assert not any(page.path.is_symlink() for page in pages)
    assert all(page.name.rsplit(".", 1)[1].startswith(page.section) for page in pages)


@needs_man
def test_prepare_three_pages_then_reuse_and_load(private_cache: Path) -> None:
    summary = prepare_manpages(max_pages=3)
    assert not summary.reused and summary.num_pages == 3 and not summary.failed
    assert sum(summary.section_counts.values()) == 3 and len(summary.section_counts) >= 2  # spread over sections
    folder = private_cache / "manpages"
    corpus = folder / CORPUS
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    for row in rows:
        title, section = row["id"].rsplit(".", 1)
        assert section.startswith(row["label"]) and row["label"] in SECTIONS
        assert row["text"].startswith("NAME\n")  # the header line, which names the section, is gone
        assert f"{title}({section})" not in row["text"].splitlines()[-1]  # and so is the footer
        assert "\b" not in row["text"] and "\t" not in row["text"]  # col -bx: no overstrikes, no tabs
    assert summary.num_bytes == corpus.stat().st_size

    modified = corpus.stat().st_mtime_ns
    again = prepare_manpages(max_pages=3)
    assert again.reused and again.num_pages == 3 and "nothing to do" in again.describe()
    assert corpus.stat().st_mtime_ns == modified

    data = load_manpages()
    assert data.ids == [row["id"] for row in rows] and data.texts == [row["text"] for row in rows]
    assert [data.classes[i] for i in data.labels.tolist()] == [row["label"] for row in rows]
    assert data.classes == sorted(data.classes, key=int) and data.groups["package"] == [row["package"] for row in rows]
    assert data.source == "builtin:manpages"
    assert load_text_source("manpages").ids == data.ids
    assert builtin_available("manpages")[0]

    rebuilt = prepare_manpages(max_pages=3, force=True)
    assert not rebuilt.reused  # and renders the same bytes again
    assert corpus.read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert json.loads((folder / STAMP).read_text())["settings"]["max_pages"] == 3
    other = prepare_manpages(max_pages=2)  # other settings: rebuilt, not reused
    assert not other.reused and other.num_pages == 2 and len(load_manpages()) == 2


def test_bad_max_pages() -> None:
    with pytest.raises(SelfsupError, match="max-pages"):
        prepare_manpages(max_pages=0)


@needs_man
def test_cli_prepare_then_list(private_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "manpages", "--max-pages", "2"]) == 0
    assert "prepared 2 pages" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "manpages", "--max-pages", "2"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["data", "list"]) == 0
    assert any(line.split()[:2] == ["manpages", "available"] for line in capsys.readouterr().out.splitlines())
