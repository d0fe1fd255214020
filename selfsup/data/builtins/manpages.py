"""The "manpages" built-in: ~1,100 English Debian man pages as text, labelled by section.

Text pretraining needs a real corpus that arrives without a download, and a few-label task to probe
with: the pages of `manpages` and `manpages-dev` are on a standard Debian system, and a page's section
(1 commands, 2 system calls, 3 library functions, 4 devices, 5 file formats, 7 overviews, 8 admin) is
a natural label. `prepare_manpages` renders each page as a terminal shows it (`man -l FILE | col -bx`
at 80 columns, in the C.UTF-8 locale so the user's language and man options do not change the
corpus), a few subprocesses at a time, and writes one JSON line per page (id = page name such as
"open.2", label = section, subgroup `package`) to the cache, which `load_manpages` reads back.

What is left out, and why: symlinks and ".so" stubs (aliases of a page that is rendered anyway, so
they would only duplicate it); section 6 (its one page is the games section's intro, a class of one);
and each page's header and footer lines, which spell out the label ("open(2)  System Calls Manual"),
so that predicting the section means reading the page rather than its title.

The corpus is written under a temporary name and renamed into place, after the old stamp is removed
and before the new one is written, so a stamp always describes the corpus beside it. The stamp records
the settings and the versions of the packages that shape the text; preparing again with the same
ones does nothing.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from selfsup.data.builtins import cache_dir
from selfsup.data.text import TextSet, iter_text_source, texts_from_records
from selfsup.data.builtins.prepared import debian_package_versions, is_fresh, read_stamp
from selfsup.errors import SelfsupError
from selfsup.files import follow_umask

logger = logging.getLogger("selfsup")

PACKAGES = ("manpages", "manpages-dev")
# Their versions change the rendered text too: man-db (man), groff-base (the formatter), bsdextrautils (col).
RENDERER_PACKAGES = ("man-db", "groff-base", "bsdextrautils")
INSTALL_COMMAND = "apt-get install manpages manpages-dev man-db bsdextrautils"
PREPARE_COMMAND = "selfsup data prepare manpages"
CORPUS = "manpages.jsonl"
STAMP = "manpages.json"
RENDER_VERSION = 1  # bump when the rendering or the filtering here changes
SECTIONS = ("1", "2", "3", "4", "5", "7", "8")
WIDTH = 80
_MAX_WORKERS = 4  # each page is two short subprocesses; a few overlap their start-up and I/O
_RENDER_TIMEOUT_S = 120
_STUB_PROBE_BYTES = 4096


@dataclass(frozen=True)
class ManPage:
    """One installed page: its file, name ("open.2"), section directory ("2") and package."""

    path: Path
    name: str
    section: str
    package: str


@dataclass
class ManpagesSummary:
    """What a prepare did (or found already done)."""

    out: Path
    num_pages: int
    section_counts: dict[str, int]
    num_bytes: int
    num_words: int
    seconds: float
    reused: bool = False
    num_aliases: int = 0
    failed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A few lines for the terminal."""
        sections = ", ".join(f"{section}: {count}" for section, count in self.section_counts.items())
        size = f"{self.num_pages} pages, {self.num_bytes / 1e6:.1f} MB, {self.num_words / 1e6:.2f} M words"
        if self.reused:
            return (f"manpages already prepared with these settings and packages in {self.out}: {size} "
                    f"(nothing to do; --force rebuilds)\n  pages per section: {sections}")
        lines = [f"prepared {size} in {self.out / CORPUS} in {self.seconds:.1f} s "
                 f"({self.num_aliases} aliases skipped)", f"  pages per section: {sections}"]
        if self.failed:
            lines.append(f"  {len(self.failed)} page(s) failed to render and were left out: "
                         f"{', '.join(self.failed[:5])}")
        return "\n".join(lines)


def manpages_dir() -> Path:
    """The default output folder, which `load_manpages` reads."""
    return cache_dir() / "manpages"


# ---------------------------------------------------------------------------------------------
# Finding and rendering the pages


def _is_alias(path: Path) -> bool:
    """A ".so other-page" stub: the whole source is one include line (besides comments)."""
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(_STUB_PROBE_BYTES)
    except (OSError, EOFError):  # unreadable: not an alias; rendering it will report the problem
        return False
    lines = [line for line in head.decode("utf-8", "replace").splitlines()
             if line.strip() and not line.startswith(('.\\"', "'\\\""))]
    return len(head) < _STUB_PROBE_BYTES and len(lines) == 1 and lines[0].startswith(".so ")


def find_pages() -> tuple[list[ManPage], int]:
    """The pages of PACKAGES in SECTIONS sorted by (section, name), and how many aliases were skipped."""
    pages: list[ManPage] = []
    num_aliases = 0
    for package in PACKAGES:
        try:
            done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            raise SelfsupError(f"cannot list the files of the Debian package {package} ({err}); the manpages corpus "
                               f"is built from Debian's man pages: {INSTALL_COMMAND}") from None
        if done.returncode != 0:
            raise SelfsupError(f"the Debian package {package} is not installed ({done.stderr.strip()}); "
                               f"install as root: {INSTALL_COMMAND}")
        for line in done.stdout.splitlines():
            path = Path(line.strip())
            parts = path.parts  # ("/", "usr", "share", "man", "man2", "open.2.gz")
            if len(parts) != 6 or parts[1:4] != ("usr", "share", "man") or not parts[4].startswith("man"):
                continue
            section = parts[4].removeprefix("man")
            if section not in SECTIONS or not path.name.endswith(".gz"):
                continue
            if path.is_symlink() or _is_alias(path):
                num_aliases += 1
            elif path.is_file():
                pages.append(ManPage(path, path.name.removesuffix(".gz"), section, package))
    pages.sort(key=lambda page: (int(page.section), page.name))
    return pages, num_aliases


def _render_env() -> dict[str, str]:
    """The environment for man and col: the user's MAN*/GROFF* options and locale would change the text."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MAN", "GROFF", "LC_", "LANG"))}
    env.update(MANWIDTH=str(WIDTH), LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    return env


def _render(path: Path, env: dict[str, str]) -> tuple[str | None, str]:
    """The page as plain text without its header and footer lines, or (None, why it failed)."""
    try:
        man = subprocess.run(["man", "-l", str(path)], capture_output=True, env=env, timeout=_RENDER_TIMEOUT_S)
        if man.returncode != 0 or not man.stdout.strip():
            return None, f"man exited with {man.returncode}: {man.stderr.decode(errors='replace').strip()[-200:]}"
        col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, env=env,
                             timeout=_RENDER_TIMEOUT_S)
        if col.returncode != 0:
            return None, f"col exited with {col.returncode}: {col.stderr.decode(errors='replace').strip()[-200:]}"
    except subprocess.TimeoutExpired:
        return None, f"rendering took over {_RENDER_TIMEOUT_S} s"
    lines = [line.rstrip() for line in col.stdout.decode("utf-8", errors="replace").splitlines()]
    content = [number for number, line in enumerate(lines) if line]
    if len(content) < 3:
        return None, "rendered to nothing but a header and footer"
    body = lines[content[0] + 1 : content[-1]]  # the first and last non-blank lines are header and footer
    return "\n".join(body).strip("\n"), ""


def _check_tools() -> None:
    missing = [tool for tool in ("man", "col") if shutil.which(tool) is None]
    if missing:
        raise SelfsupError(f"the manpages corpus is rendered with `man -l FILE | col -bx`, but "
                           f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                           f"install as root: apt-get install man-db bsdextrautils")


# ---------------------------------------------------------------------------------------------
# Preparing


def _read_stamp(folder: Path) -> dict | None:
    return read_stamp(folder / STAMP)


def _write_atomically(target: Path, write: Callable[[TextIO], object]) -> None:
    """Write through a temporary file beside `target` and rename it, so no reader sees half of it."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            write(fh)
        follow_umask(Path(tmp_name))  # mkstemp makes it private; the corpus is as readable as any file
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def prepare_manpages(out: Path | None = None, force: bool = False, progress: bool = False,
                     max_pages: int | None = None) -> ManpagesSummary:
    """Render the corpus into `out` (default `manpages_dir()`), or find it already there.

    `max_pages` renders only that many pages, spread evenly over the sorted list (so several
    sections appear), for quick tests. Pages that fail to render are left out and listed in the
    summary; no page rendering at all is an error.
    """
    if max_pages is not None and (isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1):
        raise SelfsupError(f"--max-pages must be a positive integer, got {max_pages!r}")
    out = Path(out).expanduser() if out is not None else manpages_dir()
    if out.exists() and not out.is_dir():
        raise SelfsupError(f"{out}: exists and is not a folder; choose another --out")
    _check_tools()
    started = time.perf_counter()
    settings = {"max_pages": max_pages, "width": WIDTH}
    inputs = {"render_version": RENDER_VERSION, "packages": debian_package_versions(PACKAGES + RENDERER_PACKAGES)}
    stamp = _read_stamp(out)
    corpus = out / CORPUS
    if is_fresh(stamp, settings, inputs, force,
                lambda stamp: corpus.is_file() and corpus.stat().st_size == stamp.get("num_bytes")):
        return ManpagesSummary(out=out, num_pages=stamp["num_pages"], section_counts=stamp["sections"],
                               num_bytes=stamp["num_bytes"], num_words=stamp["num_words"], seconds=0.0,
                               reused=True, num_aliases=stamp.get("num_aliases", 0))

    pages, num_aliases = find_pages()
    if not pages:
        raise SelfsupError(f"the packages {', '.join(PACKAGES)} list no man pages under /usr/share/man; "
                           f"reinstall them as root: apt-get install --reinstall {' '.join(PACKAGES)}")
    if max_pages is not None and max_pages < len(pages):
        pages = [pages[(i * len(pages)) // max_pages] for i in range(max_pages)]

    texts = _render_all(pages, progress)
    kept = [(page, text) for page, (text, _) in zip(pages, texts) if text is not None]
    failed = [page.name for page, (text, _) in zip(pages, texts) if text is None]
    for page, (text, why) in zip(pages, texts):
        if text is None:
            logger.warning("%s: not rendered (%s); left out", page.path, why)
    if not kept:
        raise SelfsupError(f"none of the {len(pages)} man pages rendered; the first failure, {pages[0].path}: "
                           f"{texts[0][1]}")

    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)  # from here until the new stamp, the folder reads as unprepared

    def write_corpus(fh: TextIO) -> None:
        for page, text in kept:
            row = {"id": page.name, "label": page.section, "package": page.package, "text": text}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomically(corpus, write_corpus)
    seconds = time.perf_counter() - started
    counts = Counter(page.section for page, _ in kept)
    section_counts = {section: counts[section] for section in SECTIONS if counts[section]}
    num_words = sum(len(text.split()) for _, text in kept)
    stamp = {"settings": settings, "inputs": inputs, "num_pages": len(kept), "sections": section_counts,
             "num_bytes": corpus.stat().st_size, "num_words": num_words, "num_aliases": num_aliases,
             "seconds": round(seconds, 2), "failed": failed}
    _write_atomically(out / STAMP, lambda fh: fh.write(json.dumps(stamp, indent=1) + "\n"))
    return ManpagesSummary(out=out, num_pages=len(kept), section_counts=section_counts, num_bytes=stamp["num_bytes"],
                           num_words=num_words, seconds=seconds, num_aliases=num_aliases, failed=failed)


def _render_all(pages: list[ManPage], progress: bool) -> list[tuple[str | None, str]]:
    """(text or None, why it failed) per page, in page order."""
    env = _render_env()
    num_workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=num_workers)
    results: list[tuple[str | None, str]] = []
    try:
        for number, result in enumerate(pool.map(lambda page: _render(page.path, env), pages), start=1):
            results.append(result)
            if progress and (number % 100 == 0 or number == len(pages)):
                logger.info("rendered %d/%d man pages", number, len(pages))
    finally:
        # on Ctrl-C, drop the queued pages instead of rendering all of them before exiting
        pool.shutdown(wait=True, cancel_futures=True)
    return results


# ---------------------------------------------------------------------------------------------
# Loading it back


def manpages_status() -> tuple[bool, str]:
    """Whether `load_manpages` can load here, and why not / what to run."""
    folder = manpages_dir()
    stamp = _read_stamp(folder)
    if stamp is not None and (folder / CORPUS).is_file():
        return True, f"prepared in {folder}: {stamp.get('num_pages', '?')} pages"
    versions = debian_package_versions(PACKAGES)
    missing = [package for package, version in versions.items() if version is None]
    missing += [tool for tool in ("man", "col") if shutil.which(tool) is None]
    if missing:
        return False, f"needs {', '.join(missing)}: {INSTALL_COMMAND}; then run: {PREPARE_COMMAND}"
    return False, f"not prepared yet; run: {PREPARE_COMMAND}"


def load_manpages(folder: Path | None = None) -> TextSet:
    """The prepared corpus (default `manpages_dir()`): label = section, subgroup `package`."""
    folder = Path(folder).expanduser() if folder is not None else manpages_dir()
    corpus = folder / CORPUS
    if _read_stamp(folder) is None or not corpus.is_file():
        _, reason = manpages_status()
        raise SelfsupError(f"the manpages corpus is not prepared ({corpus} is missing or incomplete): {reason}")
    # our own file, so its longest line is whatever the longest page is
    records = iter_text_source(corpus, group_columns=["package"], max_line_chars=1 << 28)
    return texts_from_records(records, source="builtin:manpages")
