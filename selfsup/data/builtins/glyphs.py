"""The "glyphs" built-in: ~33,000 glyphs of ~100 writing systems, rendered from Debian's Noto fonts.

Digits are too easy to tell a good encoder from a mediocre one; glyphs are harder (many classes,
some of them look alike across scripts, two type styles) and still arrive with the system's
packages rather than a download. `prepare_glyphs` renders each code point of each font's cmap
(fontTools reads the cmap, Pillow renders) from `fonts-noto-core`, and labels it with its Unicode
script from `Scripts.txt` in `unicode-data`; finding those inputs, which fonts are used, and how a
glyph is drawn are in `glyph_sources.py`. The result is the standard manifest format that
`load_image_source` reads (PNG files plus `manifest.csv` with path,label,family,codepoint,font),
so nothing downstream knows it is special; `load_glyphs` reads it back from the cache.

What is rendered: each code point whose script is not Common, Inherited or Unknown (those are
shared by many scripts, so they have no script to predict), that is not whitespace or a control
or format character, and whose glyph leaves ink. Scripts with fewer than `min_per_script` glyphs
are dropped; `max_per_script` keeps that many of a script's glyphs spaced evenly through its
(font, code point) order, so both families and the whole code-point range stay represented. Fonts
and code points are processed in sorted order, so the same inputs give byte-identical files.

The output folder also carries `glyphs.json`, recording the settings, the package versions and a
fingerprint of the fonts and script table (preparing again with the same ones is a no-op), and
`pixels.npz`, the same pixels in manifest order, so that the built-in loads in under a second
instead of decoding ~32,000 PNGs (~9 s on two cores).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from selfsup.data.builtins import cache_dir
from selfsup.data.builtins.glyph_sources import (FONT_PACKAGE, INSTALL_COMMAND, RENDERER_VERSION, GlyphRenderer, ScriptTable,
                                        find_fonts, find_scripts_file, package_versions, parse_scripts)
from selfsup.data.images import ImageSet
from selfsup.data.builtins.prepared import ProgressBar, build_into_place, is_fresh, load_prepared, previous_stamp, read_stamp
from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")

PREPARE_COMMAND = "selfsup data prepare glyphs"

MANIFEST = "manifest.csv"
STAMP = "glyphs.json"
# The PNGs + manifest are the portable form; this is the fast one (see the module docstring).
PIXELS = "pixels.npz"
MANIFEST_COLUMNS = ("path", "label", "family", "codepoint", "font")
DROPPED_SCRIPTS = frozenset({"Common", "Inherited", "Unknown"})
# Z*: whitespace; Cc/Cf/Cs/Co: controls, format characters, surrogates, private use. Cn is kept:
# it only means "unassigned in this Python's Unicode tables", which may be older than Scripts.txt.
_SKIPPED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co"})


# ---------------------------------------------------------------------------------------------
# Preparing the dataset


@dataclass
class GlyphsSummary:
    """What a prepare did (or found already done): where, how many, which scripts."""

    out: Path
    num_images: int
    script_counts: dict[str, int]
    family_counts: dict[str, int]
    seconds: float
    reused: bool = False
    render_seconds: float = 0.0
    num_fonts: int = 0
    num_rendered: int = 0
    num_blank: int = 0
    dropped_scripts: dict[str, int] = field(default_factory=dict)

    def describe(self, top: int = 8) -> str:
        """A few lines for the terminal: totals, families, the largest and smallest scripts."""
        if self.reused:
            head = (f"glyphs already prepared with these settings in {self.out}: {self.num_images} images, "
                    f"{len(self.script_counts)} scripts (nothing to do; --force rebuilds)")
        else:
            rate = self.num_rendered / self.render_seconds if self.render_seconds > 0 else float("nan")
            head = (f"prepared {self.num_images} glyph images of {len(self.script_counts)} scripts in "
                    f"{self.out} in {self.seconds:.1f} s ({self.num_rendered} glyphs from {self.num_fonts} fonts "
                    f"rendered at {rate:.0f}/s; {self.num_blank} blank glyph{'' if self.num_blank == 1 else 's'} skipped)")
        ranked = sorted(self.script_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines = [head,
                 "  families: " + ", ".join(f"{name} {count}" for name, count in sorted(self.family_counts.items())),
                 "  largest scripts: " + ", ".join(f"{name} {count}" for name, count in ranked[:top])]
        if len(ranked) > top:
            lines.append("  smallest kept: " + ", ".join(f"{name} {count}" for name, count in ranked[-3:]))
        if self.dropped_scripts:
            dropped = sorted(self.dropped_scripts.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"  dropped {len(dropped)} scripts under the minimum, e.g. "
                         + ", ".join(f"{name} {count}" for name, count in dropped[:5]))
        return "\n".join(lines)


def glyphs_dir() -> Path:
    """The default output folder, which `load_image_source("glyphs", ...)` reads."""
    return cache_dir() / "glyphs"


def _inputs(fonts: list[tuple[Path, str]], scripts_file: Path) -> dict:
    """Everything besides the settings that decides the output; a change means a rebuild."""
    listing = "\n".join(f"{path.name} {path.stat().st_size}" for path, _ in fonts)
    return {
        "renderer": RENDERER_VERSION,
        "packages": package_versions(),
        "fonts": {"count": len(fonts), "sha256": hashlib.sha256(listing.encode()).hexdigest()},
        "scripts_file_sha256": hashlib.sha256(scripts_file.read_bytes()).hexdigest(),
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
    }


def _read_stamp(folder: Path) -> dict | None:
    return read_stamp(folder / STAMP)


def prepare_glyphs(out: Path | None = None, size: int = 32, min_per_script: int = 50,
                   max_per_script: int | None = None, *, font_dir: Path | None = None,
                   scripts_file: Path | None = None, force: bool = False,
                   progress: bool = False) -> GlyphsSummary:
    """Render the glyph dataset into `out` (default `glyphs_dir()`), or find it already there.

    The folder is built under a temporary name beside `out` and renamed into place, so a reader
    never sees half a dataset and an interrupted run leaves the previous one intact. An existing
    `out` is only ever replaced when it holds a previous glyphs build (its `glyphs.json`) or
    nothing at all.
    """
    if not isinstance(size, int) or size < 8:
        raise SelfsupError(f"--size must be an integer >= 8 pixels, got {size!r}")
    if not isinstance(min_per_script, int) or min_per_script < 1:
        raise SelfsupError(f"--min-per-script must be an integer >= 1, got {min_per_script!r}")
    if max_per_script is not None and (not isinstance(max_per_script, int) or max_per_script < min_per_script):
        raise SelfsupError(f"--max-per-script must be an integer >= --min-per-script ({min_per_script}), "
                           f"got {max_per_script!r}")
    out = Path(out).expanduser() if out is not None else glyphs_dir()
    fonts = find_fonts(font_dir)
    scripts_path = find_scripts_file(scripts_file)
    settings = {"size": size, "min_per_script": min_per_script, "max_per_script": max_per_script}
    inputs = _inputs(fonts, scripts_path)

    stamp = previous_stamp(out, STAMP, "a glyphs dataset")
    if is_fresh(stamp, settings, inputs, force, lambda stamp: (out / MANIFEST).is_file()):
        return GlyphsSummary(out=out, num_images=stamp["num_images"], script_counts=stamp["scripts"],
                             family_counts=stamp["families"], seconds=0.0, reused=True,
                             num_fonts=len(fonts))

    table = parse_scripts(scripts_path)
    started = time.perf_counter()
    jobs = _plan(fonts, table)
    images, rows, num_blank = _render_all(jobs, size, progress)
    render_seconds = time.perf_counter() - started
    keep, kept_counts, dropped = _select(rows, min_per_script, max_per_script)
    if not keep:
        largest = max(dropped.items(), key=lambda kv: kv[1], default=("none", 0))
        raise SelfsupError(f"no script has >= {min_per_script} glyphs in the {len(fonts)} fonts found "
                           f"(the largest, {largest[0]}, has {largest[1]}); lower --min-per-script")
    family_counts = dict(sorted(Counter(rows[i][2] for i in keep).items()))
    seconds = build_into_place(
        out, STAMP, lambda folder: _write(folder, [(images[i], rows[i]) for i in keep], progress), started,
        lambda seconds: {"settings": settings, "inputs": inputs, "num_images": len(keep),
                         "scripts": kept_counts, "families": family_counts, "seconds": round(seconds, 2)})
    return GlyphsSummary(out=out, num_images=len(keep), script_counts=kept_counts, family_counts=family_counts,
                         seconds=seconds, render_seconds=render_seconds, num_fonts=len(fonts),
                         num_rendered=len(jobs), num_blank=num_blank, dropped_scripts=dropped)


def _plan(fonts: list[tuple[Path, str]], table: ScriptTable) -> list[tuple[Path, str, int, str]]:
    """(font, family, code point, script) for every glyph worth rendering, in sorted order."""
    from fontTools.ttLib import TTFont, TTLibError

    jobs = []
    for path, family in fonts:
        try:
            with TTFont(path, lazy=True) as font:
                cmap = font.getBestCmap() or {}
        except (TTLibError, OSError, AssertionError) as err:  # fontTools asserts on some corrupt tables
            raise SelfsupError(f"{path}: fontTools cannot read this font's cmap ({err}); "
                               f"reinstall it: apt-get install --reinstall {FONT_PACKAGE}") from None
        for codepoint in sorted(cmap):
            if cmap[codepoint] == ".notdef":
                continue
            script = table.script_of(codepoint)
            if script in DROPPED_SCRIPTS or unicodedata.category(chr(codepoint)) in _SKIPPED_CATEGORIES:
                continue
            jobs.append((path, family, codepoint, script))
    return jobs


def _render_all(jobs: list[tuple[Path, str, int, str]], size: int,
                progress: bool) -> tuple[list[np.ndarray], list[tuple[str, str, str, int]], int]:
    """Images and (script, font file name, family, code point) rows of the non-blank glyphs."""
    images: list[np.ndarray] = []
    rows: list[tuple[str, str, str, int]] = []
    num_blank = 0
    bar = ProgressBar(progress, "rendering glyphs", len(jobs))
    try:
        renderer: GlyphRenderer | None = None
        for number, (path, family, codepoint, script) in enumerate(jobs, start=1):
            if renderer is None or renderer.path != path:
                renderer = GlyphRenderer(path, size)
                bar.update(note=path.stem)
            try:
                image = renderer.render(codepoint)
            except (OSError, ValueError) as err:  # FreeType refuses a few broken glyphs; skip those
                logger.debug("%s U+%04X: cannot render (%s); skipped", path.name, codepoint, err)
                image = None
            if image is None:
                num_blank += 1
            else:
                images.append(image)
                rows.append((script, path.name, family, codepoint))
            if number % 256 == 0 or number == len(jobs):
                bar.update(completed=number)
    finally:
        bar.close()
    return images, rows, num_blank


def _select(rows: list[tuple[str, str, str, int]], min_per_script: int,
            max_per_script: int | None) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """Indices of the rows kept (in their original order), kept counts and dropped counts by script."""
    by_script: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_script.setdefault(row[0], []).append(index)
    keep: list[int] = []
    kept: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for script, members in sorted(by_script.items()):
        num_members = len(members)
        if num_members < min_per_script:
            dropped[script] = num_members
            continue
        if max_per_script is not None and num_members > max_per_script:
            # evenly spaced, so a cap keeps both families and the whole code-point range
            members = [members[(i * num_members) // max_per_script] for i in range(max_per_script)]
        keep += members
        kept[script] = len(members)
    return sorted(keep), kept, dropped


def _write(folder: Path, items: list[tuple[np.ndarray, tuple[str, str, str, int]]], progress: bool) -> None:
    """PNGs under <script>/, manifest.csv (rows in font, code point order) and pixels.npz."""
    paths = []
    bar = ProgressBar(progress, "writing images", len(items))
    try:
        with open(folder / MANIFEST, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for number, (image, (script, font_name, family, codepoint)) in enumerate(items, start=1):
                relative = f"{script}/{Path(font_name).stem}_{codepoint:04X}.png"
                target = folder / relative
                target.parent.mkdir(exist_ok=True)
                Image.fromarray(image, mode="L").save(target, format="PNG")
                writer.writerow((relative, script, family, f"U+{codepoint:04X}", font_name))
                paths.append(relative)
                if number % 256 == 0 or number == len(items):
                    bar.update(completed=number)
    finally:
        bar.close()
    x = np.stack([image for image, _ in items])  # [N, S, S]
    np.savez_compressed(folder / PIXELS, x=x, path=np.array(paths))


# ---------------------------------------------------------------------------------------------
# Loading it back


def glyphs_status() -> tuple[bool, str]:
    """Whether `load_glyphs` can load here, and why not / what to run."""
    folder = glyphs_dir()
    stamp = _read_stamp(folder)
    if stamp is not None and (folder / MANIFEST).is_file():
        return True, (f"prepared in {folder}: {stamp.get('num_images', '?')} images, "
                      f"{len(stamp.get('scripts', {}))} scripts")
    try:
        find_fonts()
        find_scripts_file()
    except SelfsupError:
        return False, f"needs the Debian packages: {INSTALL_COMMAND}; then run: {PREPARE_COMMAND}"
    return False, f"not prepared yet; run: {PREPARE_COMMAND}"


def load_glyphs(image_size: int, channels: int = 3) -> ImageSet:
    """The prepared dataset from `glyphs_dir()`, labelled by script, with a `family` subgroup.

    Labels, classes, ids and groups are exactly what `load_image_source` makes of the manifest; the
    pixels come from pixels.npz when it matches the manifest row for row, else from the PNGs.
    """
    _, reason = glyphs_status()
    return load_prepared(glyphs_dir(), MANIFEST, PIXELS, ["family"], image_size, channels, "glyphs", reason)