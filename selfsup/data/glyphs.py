"""The "glyphs" built-in: ~33,000 glyphs of ~100 writing systems, rendered from Debian's Noto fonts.

Digits are too easy to tell a good encoder from a mediocre one; glyphs are harder (many classes,
some of them look alike across scripts, two type styles) and still arrive with the system's
packages rather than a download. `prepare_glyphs` renders each code point of each font's cmap
(fontTools reads the cmap, Pillow renders) from `fonts-noto-core`, and labels it with its Unicode
script from `Scripts.txt` in `unicode-data`. The result is the standard manifest format that
`load_image_source` reads (PNG files plus `manifest.csv` with path,label,family,codepoint,font),
so nothing downstream knows it is special; `load_glyphs` reads it back from the cache.

Which fonts: the Regular weight of every NotoSans* (family "Sans") and NotoSerif* (family "Serif")
font. Bold and Italic are the same designs again, which would add near-duplicates rather than
variety. Skipped, by file name: Display (the Latin/Greek/Cyrillic of NotoSans/NotoSerif again, at
display optical size), UI and Mono variants (not in fonts-noto-core, but other Noto packages put
them in the same folder), Slanted (the italic of Serif Tamil), and the fonts that are neither sans
nor serif (Kufi, Naskh and Nastaliq Arabic, Rashi Hebrew, Looped Thai and Lao, Traditional Nushu,
Music): sorting them into Sans or Serif would make the family subgroup mean nothing.

What is rendered: each code point whose script is not Common, Inherited or Unknown (those are
shared by many scripts, so they have no script to predict), that is not whitespace or a control
or format character, and whose glyph leaves ink. The glyph is drawn with FreeType through Pillow's
basic layout (no shaping: the cmap's own glyph, identical with or without libraqm), cropped to its
ink, scaled to fit a (size - 2 * pad) square keeping its aspect, and centred: dark ink on white.
Scripts with fewer than `min_per_script` glyphs are dropped; `max_per_script` keeps that many of a
script's glyphs spaced evenly through its (font, code point) order, so both families and the whole
code-point range stay represented. Fonts and code points are processed in sorted order, so the same
inputs give byte-identical files.

The output folder also carries `glyphs.json`, recording the settings, the package versions and a
fingerprint of the fonts and script table (preparing again with the same ones is a no-op), and
`pixels.npz`, the same pixels in manifest order, so that the built-in loads in under a second
instead of decoding ~32,000 PNGs (~9 s on two cores).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont, features

from selfsup.data.builtin import cache_dir
from selfsup.data.decode import _BadFilePolicy
from selfsup.data.images import ImageSet, images_from_array
from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")

FONT_PACKAGE = "fonts-noto-core"
UNICODE_PACKAGE = "unicode-data"
INSTALL_COMMAND = f"apt-get install {FONT_PACKAGE} {UNICODE_PACKAGE}"
PREPARE_COMMAND = "selfsup data prepare glyphs"
# Where Debian puts them; used when dpkg is not there to ask (another distribution, a container).
DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/noto")
DEFAULT_SCRIPTS_FILE = Path("/usr/share/unicode/Scripts.txt")

MANIFEST = "manifest.csv"
STAMP = "glyphs.json"
# The PNGs + manifest are the portable form; this is the fast one (see the module docstring).
PIXELS = "pixels.npz"
MANIFEST_COLUMNS = ("path", "label", "family", "codepoint", "font")
DROPPED_SCRIPTS = frozenset({"Common", "Inherited", "Unknown"})
# Z*: whitespace; Cc/Cf/Cs/Co: controls, format characters, surrogates, private use. Cn is kept:
# it only means "unassigned in this Python's Unicode tables", which may be older than Scripts.txt.
_SKIPPED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co"})
_FONT_SUFFIXES = (".ttf", ".otf")
# Noto fonts that are neither sans nor serif; see the module docstring.
_OTHER_STYLES = ("NotoKufi", "NotoNaskh", "NotoNastaliq", "NotoRashi", "NotoLooped", "NotoTraditional",
                 "NotoMusic")
# Bumped whenever the rendering changes, so an old cache is rebuilt rather than mixed with new code.
RENDERER_VERSION = 1
# Glyphs are rasterised at >= this many pixels per em and then shrunk: shrinking an outline
# rendered large antialiases edges far better than rendering at 32 px directly.
_RENDER_PX = 64
# A glyph whose ink is smaller than the target box is rendered again this much larger, up to this
# size, so that tiny marks are shrunk too rather than blown up into blurred blobs.
_MAX_RENDER_PX = 1024


# ---------------------------------------------------------------------------------------------
# The Unicode script table


@dataclass(frozen=True)
class ScriptTable:
    """Scripts.txt as sorted, non-overlapping ranges; code points in no range are "Unknown"."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    names: tuple[str, ...]

    def script_of(self, codepoint: int) -> str:
        i = bisect.bisect_right(self.starts, codepoint) - 1
        if i >= 0 and codepoint <= self.ends[i]:
            return self.names[i]
        return "Unknown"


def parse_scripts(path: Path) -> ScriptTable:
    """Read Scripts.txt: lines `0041..005A ; Latin # ...` or `00AA ; Latin # ...`, comments with '#'."""
    ranges: list[tuple[int, int, str, int]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SelfsupError(f"{path}: cannot read the Unicode script table ({err})") from None
    for line_number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            span, name = (part.strip() for part in text.split(";"))
            first, _, last = span.partition("..")
            start, end = int(first, 16), int(last or first, 16)
        except ValueError:
            raise SelfsupError(f"{path}:{line_number}: expected 'XXXX[..YYYY] ; Script', got {line.strip()!r}") from None
        if not name or end < start:
            raise SelfsupError(f"{path}:{line_number}: bad range or empty script name in {line.strip()!r}")
        ranges.append((start, end, name, line_number))
    if not ranges:
        raise SelfsupError(f"{path}: no script ranges found; is this Unicode's Scripts.txt?")
    ranges.sort()
    for (_, end, _, _), (start, _, _, line_number) in zip(ranges, ranges[1:]):
        if start <= end:
            raise SelfsupError(f"{path}:{line_number}: range starting at {start:04X} overlaps an earlier one")
    return ScriptTable(starts=tuple(r[0] for r in ranges), ends=tuple(r[1] for r in ranges),
                       names=tuple(r[2] for r in ranges))


# ---------------------------------------------------------------------------------------------
# Finding the inputs


def font_family(filename: str) -> tuple[str | None, str]:
    """("Sans" | "Serif", "") for a font that is rendered, else (None, why it is skipped)."""
    stem = Path(filename).stem
    name, _, style = stem.partition("-")
    if style != "Regular":
        return None, f"weight/style {style or '(none)'}: only Regular is rendered"
    for variant in ("Display", "UI", "Mono", "Slanted"):
        if variant in name:
            return None, f"{variant} variant"
    if name.startswith("NotoSerif"):
        return "Serif", ""
    if name.startswith("NotoSans"):
        return "Sans", ""
    if name.startswith(_OTHER_STYLES):
        return None, "neither sans nor serif"
    return None, "not a Noto Sans/Serif font"


def _dpkg_files(package: str) -> list[Path] | None:
    """The files an installed Debian package owns: [] when it is not installed, None without dpkg."""
    try:
        done = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return []
    return [Path(line) for line in done.stdout.splitlines() if line.strip()]


def package_versions() -> dict[str, str | None]:
    """Installed versions of the two packages (None when missing or when dpkg is unavailable)."""
    versions: dict[str, str | None] = {}
    for package in (FONT_PACKAGE, UNICODE_PACKAGE):
        try:
            done = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
                                  capture_output=True, text=True, timeout=60)
            status, _, version = done.stdout.strip().partition(" ")
            versions[package] = version if done.returncode == 0 and status == "installed" else None
        except (OSError, subprocess.SubprocessError):
            versions[package] = None
    return versions


def _missing(what: str) -> SelfsupError:
    return SelfsupError(f"{what}. The glyphs dataset renders the Noto fonts of the Debian package "
                        f"{FONT_PACKAGE} and labels them with the Unicode script table of {UNICODE_PACKAGE}; "
                        f"install both as root: {INSTALL_COMMAND}  (or name other Noto fonts and a "
                        f"Scripts.txt with --font-dir and --scripts-file)")


def find_fonts(font_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(font file, family) for every font rendered, sorted by file name.

    Without `font_dir`, the fonts are those dpkg lists for fonts-noto-core, so fonts other Noto
    packages add to the same folder do not silently change the dataset.
    """
    if font_dir is not None:
        if not Path(font_dir).is_dir():
            raise _missing(f"the font folder {font_dir} does not exist")
        candidates, where = list(Path(font_dir).iterdir()), str(font_dir)
    else:
        owned = _dpkg_files(FONT_PACKAGE)
        if owned == []:
            raise _missing(f"{FONT_PACKAGE} is not installed")
        if owned is not None:
            candidates, where = owned, f"the files of {FONT_PACKAGE}"
        elif DEFAULT_FONT_DIR.is_dir():
            candidates, where = list(DEFAULT_FONT_DIR.iterdir()), str(DEFAULT_FONT_DIR)
        else:
            raise _missing(f"{FONT_PACKAGE} is not installed ({DEFAULT_FONT_DIR} does not exist)")
    fonts = []
    for path in candidates:
        if path.suffix.lower() in _FONT_SUFFIXES and path.is_file():
            family, _ = font_family(path.name)
            if family is not None:
                fonts.append((path, family))
    if not fonts:
        raise _missing(f"no Noto Sans/Serif Regular font (NotoSans*-Regular.ttf, NotoSerif*-Regular.ttf) "
                       f"was found in {where}")
    return sorted(fonts, key=lambda item: item[0].name)


def find_scripts_file(scripts_file: Path | None = None) -> Path:
    """Scripts.txt: the given file, else the one dpkg lists for unicode-data, else Debian's path."""
    if scripts_file is not None:
        if not Path(scripts_file).is_file():
            raise _missing(f"the script table {scripts_file} does not exist")
        return Path(scripts_file)
    owned = _dpkg_files(UNICODE_PACKAGE)
    if owned == []:
        raise _missing(f"{UNICODE_PACKAGE} is not installed")
    for path in owned or []:
        if path.name == "Scripts.txt" and path.is_file():
            return path
    if DEFAULT_SCRIPTS_FILE.is_file():
        return DEFAULT_SCRIPTS_FILE
    raise _missing(f"{UNICODE_PACKAGE} is not installed ({DEFAULT_SCRIPTS_FILE} does not exist)")


# ---------------------------------------------------------------------------------------------
# Rendering


class GlyphRenderer:
    """Renders one font's glyphs to uint8 [size, size] images, dark ink on white."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.pad = max(1, round(size / 16))
        self.box = size - 2 * self.pad
        self._base_px = max(_RENDER_PX, 2 * size)
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}
        try:
            self._font(self._base_px)
        except OSError as err:
            raise SelfsupError(f"{path}: Pillow cannot open this font ({err})") from None

    def _font(self, px: int) -> ImageFont.FreeTypeFont:
        if px not in self._fonts:
            # BASIC layout: no shaping, so the glyph is the cmap's own whether or not libraqm is there
            self._fonts[px] = ImageFont.truetype(str(self.path), px, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[px]

    def _ink(self, char: str, px: int) -> Image.Image | None:
        """The glyph at `px` per em, white ink on black, cropped to its ink; None if it has none."""
        font = self._font(px)
        left, top, right, bottom = font.getbbox(char)
        if right <= left or bottom <= top:
            return None
        canvas = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(canvas).text((-left, -top), char, font=font, fill=255)
        ink = canvas.getbbox()
        return None if ink is None else canvas.crop(ink)

    def render(self, codepoint: int) -> np.ndarray | None:
        """uint8 [size, size], or None when the glyph leaves no ink (a blank glyph)."""
        char = chr(codepoint)
        glyph = self._ink(char, self._base_px)
        if glyph is None:
            return None
        extent = max(glyph.size)
        if extent < self.box:
            px = min(_MAX_RENDER_PX, math.ceil(self._base_px * self.box / extent) + 1)
            glyph = self._ink(char, px) or glyph
            extent = max(glyph.size)
        width, height = glyph.size
        scale = self.box / extent
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        glyph = glyph.resize((new_width, new_height), resample)
        canvas = np.zeros((self.size, self.size), dtype=np.uint8)
        top, left = (self.size - new_height) // 2, (self.size - new_width) // 2
        canvas[top : top + new_height, left : left + new_width] = np.asarray(glyph)
        if not canvas.any():  # ink too faint to survive the shrink
            return None
        return 255 - canvas  # dark ink on white, as printed


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
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


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

    if out.exists():
        stamp = _read_stamp(out)
        if stamp is None and (not out.is_dir() or any(out.iterdir())):
            raise SelfsupError(f"{out}: exists and is not a glyphs dataset (no {STAMP}); choose another "
                               f"--out or remove it yourself")
        if (stamp is not None and not force and stamp.get("settings") == settings
                and stamp.get("inputs") == inputs and (out / MANIFEST).is_file()):
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
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        _chmod_like_mkdir(building)
        _write(building, [(images[i], rows[i]) for i in keep], progress)
        seconds = time.perf_counter() - started
        stamp = {"settings": settings, "inputs": inputs, "num_images": len(keep),
                 "scripts": kept_counts, "families": family_counts, "seconds": round(seconds, 2)}
        (building / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        _swap_into_place(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
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


class _Bar:
    """A rich progress bar on a terminal, else one log line per phase, else nothing."""

    def __init__(self, enabled: bool, title: str, total: int):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[note]}"), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(title, total=total, note="")
            self._bar.start()
        elif enabled:
            logger.info("%s: %d", title, total)

    def update(self, completed: int | None = None, note: str | None = None) -> None:
        if self._bar is not None:
            fields = {} if note is None else {"note": note}
            self._bar.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _render_all(jobs: list[tuple[Path, str, int, str]], size: int,
                progress: bool) -> tuple[list[np.ndarray], list[tuple[str, str, str, int]], int]:
    """Images and (script, font file name, family, code point) rows of the non-blank glyphs."""
    images: list[np.ndarray] = []
    rows: list[tuple[str, str, str, int]] = []
    num_blank = 0
    bar = _Bar(progress, "rendering glyphs", len(jobs))
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
    bar = _Bar(progress, "writing images", len(items))
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


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; the dataset should be as readable as any other folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _swap_into_place(building: Path, out: Path) -> None:
    """Rename the finished folder to `out`, moving a previous build aside first and deleting it after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(building, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    # sources imports images, which imports builtin, which imports this module only lazily
    from selfsup.data.sources import _cell, _load_manifest, _read_manifest_rows, _sorted_classes

    folder = glyphs_dir()
    manifest = folder / MANIFEST
    if not manifest.is_file():
        _, reason = glyphs_status()
        raise SelfsupError(f"the glyphs dataset is not prepared ({manifest} does not exist): {reason}")
    rows, columns = _read_manifest_rows(manifest)
    names = [_cell(row, "label") for _, row in rows]
    pixels = _read_pixels(folder / PIXELS, [_cell(row, "path") for _, row in rows])
    if pixels is None or not all(names) or "family" not in columns:  # edited by hand: read it like any manifest
        data = _load_manifest(manifest, image_size, channels, _BadFilePolicy("error", 0.0), "label", ["family"],
                              progress=False)
        return replace(data, source="builtin:glyphs")
    classes = _sorted_classes(set(names))
    class_index = {name: i for i, name in enumerate(classes)}
    N, S, _ = pixels.shape
    return ImageSet(images=images_from_array(pixels.reshape(N, 1, S, S), image_size, channels),
                    ids=[_cell(row, "path") for _, row in rows],
                    labels=torch.tensor([class_index[name] for name in names], dtype=torch.long),
                    classes=classes, groups={"family": [_cell(row, "family") for _, row in rows]},
                    source="builtin:glyphs")


def _read_pixels(path: Path, manifest_paths: list[str]) -> np.ndarray | None:
    """uint8 [N, S, S] in manifest order, or None when absent, unreadable or out of step with it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, paths = archive["x"], archive["path"]
    except Exception as err:  # missing, truncated, wrong keys: all mean "decode the PNGs instead"
        logger.info("not using %s (%s); decoding the PNGs instead", path, err)
        return None
    if x.dtype != np.uint8 or x.ndim != 3 or paths.tolist() != manifest_paths:
        logger.info("%s does not match %s row for row; decoding the PNGs instead", path, MANIFEST)
        return None
    return x
