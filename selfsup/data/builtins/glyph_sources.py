"""The inputs of the "glyphs" built-in: the Unicode script table, the Noto fonts, and drawing a glyph.

Each glyph is labelled with its script from Unicode's `Scripts.txt` (Debian package `unicode-data`)
and drawn from a font of `fonts-noto-core`; both are found through dpkg, or in Debian's folders
where there is no dpkg to ask. `glyphs.py` builds the dataset from what this module finds.

Which fonts: the Regular weight of every NotoSans* (family "Sans") and NotoSerif* (family "Serif")
font. Bold and Italic are the same designs again, which would add near-duplicates rather than
variety. Skipped, by file name: Display (the Latin/Greek/Cyrillic of NotoSans/NotoSerif again, at
display optical size), UI and Mono variants (not in fonts-noto-core, but other Noto packages put
them in the same folder), Slanted (the italic of Serif Tamil), and the fonts that are neither sans
nor serif (Kufi, Naskh and Nastaliq Arabic, Rashi Hebrew, Looped Thai and Lao, Traditional Nushu,
Music): sorting them into Sans or Serif would make the family subgroup mean nothing.

How a glyph is drawn: with FreeType through Pillow's basic layout (no shaping: the cmap's own
glyph, identical with or without libraqm), cropped to its ink, scaled to fit a (size - 2 * pad)
square keeping its aspect, and centred: dark ink on white.
"""

from __future__ import annotations

import bisect
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from selfsup.data.builtins.prepared import debian_package_versions
from selfsup.errors import SelfsupError

FONT_PACKAGE = "fonts-noto-core"
UNICODE_PACKAGE = "unicode-data"
INSTALL_COMMAND = f"apt-get install {FONT_PACKAGE} {UNICODE_PACKAGE}"
# Where Debian puts them; used when dpkg is not there to ask (another distribution, a container).
DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/noto")
DEFAULT_SCRIPTS_FILE = Path("/usr/share/unicode/Scripts.txt")
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
    return debian_package_versions((FONT_PACKAGE, UNICODE_PACKAGE))


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
