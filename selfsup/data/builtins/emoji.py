"""The "emoji" built-in: the 3,655 fully-qualified emoji of Unicode's emoji-test.txt in colour.

Glyphs and digits are greyscale; colourisation pretraining needs colour, and a subgroup audit needs
a subgroup that means something. `prepare_emoji` draws every fully-qualified emoji listed in
`emoji-test.txt` (Debian package `unicode-data`) with the Noto Color Emoji font
(`fonts-noto-color-emoji`), and labels it with its CLDR group ("Smileys & Emotion", "People & Body",
... 9 of them). Two subgroup columns come with it: `subgroup` (CLDR's 99 subgroups, e.g.
"face-smiling", "hand-fingers-open") and `skin_tone` ("none", "light", "medium-light", "medium",
"medium-dark", "dark" from the Fitzpatrick modifiers U+1F3FB..U+1F3FF; "mixed" when one emoji
carries two or more different tones, such as a couple of different skin tones; the same tone twice
is that tone). The manifest keeps each emoji's code points (`id`, e.g. "1F44B-1F3FD"), CLDR name
and the Emoji version that introduced it.

How an emoji is drawn: Noto Color Emoji is a bitmap (CBDT) font with one strike at 109 pixels per
em, so Pillow renders it only at that size (`ImageFont.truetype(path, 109)`) with
`embedded_color=True`; a glyph is a 136x128 RGBA bitmap, drawn at the origin of a canvas that size,
composited on white, padded (white) to a centred square and shrunk to `size` x `size` RGB with a
Lanczos filter. About 100 emoji (3 %) are grey by design (black and white hearts, the family
silhouettes, the wolf, the geometric squares); the rest are in colour. Sequences (skin tones, ZWJ
families, flags, keycaps) are one glyph only after shaping, so libraqm (Pillow's RAQM layout) is
required; without it they would come out as a row of separate glyphs.

What is skipped, and counted in the summary: an emoji the font has no single glyph for (its
shaped advance spans more than one glyph: the sequence did not ligate), one that leaves no ink or
draws the font's missing-glyph box (a code point the font lacks), and one Pillow fails to draw
(an error, with the first few named). Preparing fails when nothing renders at all.

The output is the standard manifest format that `load_image_source` reads (RGB PNGs under
<group>/, `manifest.csv` with path,label,subgroup,skin_tone,id,name,version), plus `emoji.json`,
the stamp (settings, package versions, fingerprints of the font and emoji-test.txt; preparing again
with the same ones is a no-op), and `pixels.npz`, the same pixels in manifest order for a fast load.
The folder is built beside `out` and renamed into place, as for the glyphs built-in.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont, features

from selfsup.data.builtins import cache_dir
from selfsup.data.builtins.glyph_sources import _dpkg_files
# The glyphs built-in's progress bar and atomic folder swap, shared rather than copied.
from selfsup.data.images import ImageSet
from selfsup.data.builtins.prepared import (ProgressBar, build_into_place, debian_package_versions, is_fresh,
                                            load_prepared, previous_stamp, read_stamp)
from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")

FONT_PACKAGE = "fonts-noto-color-emoji"
UNICODE_PACKAGE = "unicode-data"
INSTALL_COMMAND = f"apt-get install {FONT_PACKAGE} {UNICODE_PACKAGE}"
PREPARE_COMMAND = "selfsup data prepare emoji"
# Where Debian puts them; used when dpkg is not there to ask.
DEFAULT_FONT_FILE = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_EMOJI_TEST_FILE = Path("/usr/share/unicode/emoji/emoji-test.txt")

MANIFEST = "manifest.csv"
STAMP = "emoji.json"
PIXELS = "pixels.npz"
MANIFEST_COLUMNS = ("path", "label", "subgroup", "skin_tone", "id", "name", "version")
GROUP_COLUMNS = ("subgroup", "skin_tone")
# Bumped whenever the drawing changes, so an old cache is rebuilt rather than mixed with new code.
RENDERER_VERSION = 1
# The font's only bitmap strike; CBDT fonts refuse other sizes.
FONT_PX = 109
CANVAS = (136, 128)  # width, height of a glyph bitmap at FONT_PX
SKIN_TONES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark",
              0x1F3FF: "dark"}
SKIN_TONE_ORDER = ("none", "light", "medium-light", "medium", "medium-dark", "dark", "mixed")
# A code point no emoji font maps (plane 16 private use): what it draws is the font's missing glyph.
_NOT_IN_FONT = 0x10FFFD
_NUM_EXAMPLES = 5  # skipped emoji named in the summary, per reason
# "1F44B 1F3FD ; fully-qualified # 👋🏽 E1.0 waving hand: medium skin tone"
_LINE = re.compile(r"^(?P<codes>[0-9A-Fa-f]{4,6}(?: [0-9A-Fa-f]{4,6})*)\s*;\s*(?P<status>[a-z-]+)\s*"
                   r"#\s*\S+\s+E(?P<version>\d+\.\d+)\s+(?P<name>.+?)\s*$")


# ---------------------------------------------------------------------------------------------
# emoji-test.txt


@dataclass(frozen=True)
class EmojiEntry:
    """One line of emoji-test.txt with the group and subgroup headings above it."""

    codepoints: tuple[int, ...]
    status: str  # fully-qualified | minimally-qualified | unqualified | component
    group: str
    subgroup: str
    name: str
    version: str  # the Emoji version that introduced it, e.g. "13.1"
    line_number: int

    @property
    def id(self) -> str:
        return "-".join(f"{codepoint:04X}" for codepoint in self.codepoints)

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def skin_tone(self) -> str:
        return skin_tone_of(self.codepoints)


def skin_tone_of(codepoints: tuple[int, ...] | list[int]) -> str:
    """"none" without a Fitzpatrick modifier, its tone with one tone (once or repeated), else "mixed"."""
    tones = {SKIN_TONES[codepoint] for codepoint in codepoints if codepoint in SKIN_TONES}
    if not tones:
        return "none"
    return tones.pop() if len(tones) == 1 else "mixed"


def parse_emoji_test(path: Path) -> list[EmojiEntry]:
    """Every emoji line of emoji-test.txt, in file (CLDR) order, with its group and subgroup."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SelfsupError(f"{path}: cannot read the emoji list ({err})") from None
    group = subgroup = ""
    entries: list[EmojiEntry] = []
    for line_number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("# group:"):
            group, subgroup = stripped.removeprefix("# group:").strip(), ""
            continue
        if stripped.startswith("# subgroup:"):
            subgroup = stripped.removeprefix("# subgroup:").strip()
            continue
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise SelfsupError(f"{path}:{line_number}: expected 'CODE [CODE ...] ; status # emoji E<version> "
                               f"name', got {stripped!r}")
        if not group or not subgroup:
            raise SelfsupError(f"{path}:{line_number}: an emoji before any '# group:' / '# subgroup:' heading")
        entries.append(EmojiEntry(codepoints=tuple(int(code, 16) for code in match["codes"].split()),
                                  status=match["status"], group=group, subgroup=subgroup, name=match["name"],
                                  version=match["version"], line_number=line_number))
    if not entries:
        raise SelfsupError(f"{path}: no emoji lines found; is this Unicode's emoji-test.txt?")
    return entries


# ---------------------------------------------------------------------------------------------
# Finding the inputs


def _missing(what: str) -> SelfsupError:
    return SelfsupError(f"{what}. The emoji dataset renders the Noto Color Emoji font of the Debian package "
                        f"{FONT_PACKAGE} and lists the emoji from emoji-test.txt of {UNICODE_PACKAGE}; "
                        f"install both as root: {INSTALL_COMMAND}")


def _find_owned(package: str, name: str, default: Path, given: Path | None, what: str) -> Path:
    """The given file, else the one dpkg lists for `package`, else Debian's path."""
    if given is not None:
        if not Path(given).is_file():
            raise _missing(f"the {what} {given} does not exist")
        return Path(given)
    owned = _dpkg_files(package)
    if owned == []:
        raise _missing(f"{package} is not installed")
    for path in owned or []:
        if path.name == name and path.is_file():
            return path
    if default.is_file():
        return default
    raise _missing(f"{package} is installed but {name} was not found in it or at {default}")


def find_font(font_file: Path | None = None) -> Path:
    """NotoColorEmoji.ttf: the given file, else the one of fonts-noto-color-emoji."""
    return _find_owned(FONT_PACKAGE, DEFAULT_FONT_FILE.name, DEFAULT_FONT_FILE, font_file, "emoji font")


def find_emoji_test(emoji_test_file: Path | None = None) -> Path:
    """emoji-test.txt: the given file, else the one of unicode-data."""
    return _find_owned(UNICODE_PACKAGE, DEFAULT_EMOJI_TEST_FILE.name, DEFAULT_EMOJI_TEST_FILE, emoji_test_file,
                       "emoji list")


# ---------------------------------------------------------------------------------------------
# Drawing


class EmojiRenderer:
    """Draws emoji with a colour bitmap font to uint8 [size, size, 3] RGB on white."""

    def __init__(self, path: Path, size: int):
        if not features.check("raqm"):
            raise SelfsupError("this Pillow has no libraqm (RAQM text layout), so skin tones, families and flags "
                               "would be drawn as rows of separate glyphs; install a Pillow wheel from PyPI "
                               "(it bundles libraqm) or the system's libraqm0")
        self.path, self.size = Path(path), size
        try:
            self.font = ImageFont.truetype(str(path), FONT_PX, layout_engine=ImageFont.Layout.RAQM)
        except OSError as err:
            raise SelfsupError(f"{path}: Pillow cannot open this font at {FONT_PX} px ({err}); it should be the "
                               f"bitmap font NotoColorEmoji.ttf: apt-get install --reinstall {FONT_PACKAGE}") from None
        self._missing_glyph = self._draw(chr(_NOT_IN_FONT))

    def _draw(self, text: str) -> Image.Image:
        canvas = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        return canvas

    def render(self, text: str) -> tuple[np.ndarray | None, str]:
        """(uint8 [size, size, 3], "") or (None, "split" | "blank") when the font cannot draw it as one emoji."""
        # A sequence the font has no ligature for shapes into several glyphs side by side: wider than
        # its first code point alone (which a ligature is as wide as), or than the canvas.
        advance = self.font.getlength(text)
        if advance > 1.5 * CANVAS[0] or (len(text) > 1 and advance > 1.5 * self.font.getlength(text[0])):
            return None, "split"
        canvas = self._draw(text)
        if canvas.getchannel("A").getbbox() is None or canvas.tobytes() == self._missing_glyph.tobytes():
            return None, "blank"
        width, height = CANVAS
        side = max(width, height)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(canvas, ((side - width) // 2, (side - height) // 2))
        rgb = square.convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)
        return np.asarray(rgb), ""


# ---------------------------------------------------------------------------------------------
# Preparing the dataset


@dataclass
class EmojiSummary:
    """What a prepare did (or found already done): where, how many, which groups and skin tones."""

    out: Path
    num_images: int
    group_counts: dict[str, int]
    skin_tone_counts: dict[str, int]
    num_subgroups: int
    seconds: float
    reused: bool = False
    render_seconds: float = 0.0
    num_listed: int = 0  # fully-qualified emoji considered (after max_items)
    # reason ("split", "blank", "error") -> names of the emoji skipped for it
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(len(names) for names in self.skipped.values())

    def describe(self) -> str:
        """A few lines for the terminal: totals, groups, skin tones, and every kind of skipped emoji."""
        if self.reused:
            head = (f"emoji already prepared with these settings in {self.out}: {self.num_images} images, "
                    f"{len(self.group_counts)} groups (nothing to do; --force rebuilds)")
        else:
            rate = self.num_listed / self.render_seconds if self.render_seconds > 0 else float("nan")
            head = (f"prepared {self.num_images} emoji images of {len(self.group_counts)} groups and "
                    f"{self.num_subgroups} subgroups in {self.out} in {self.seconds:.1f} s ({self.num_listed} "
                    f"fully-qualified emoji drawn at {rate:.0f}/s; {self.num_skipped} skipped)")
        lines = [head,
                 "  groups: " + ", ".join(f"{name} {count}" for name, count in self.group_counts.items()),
                 "  skin tones: " + ", ".join(f"{name} {count}" for name, count in self.skin_tone_counts.items())]
        why = {"split": "no single glyph in the font for the sequence", "blank": "blank or missing-glyph render",
               "error": "Pillow failed to draw"}
        for reason, names in self.skipped.items():
            if names:
                shown = ", ".join(names[:_NUM_EXAMPLES]) + (", ..." if len(names) > _NUM_EXAMPLES else "")
                lines.append(f"  skipped {len(names)} ({why.get(reason, reason)}): {shown}")
        return "\n".join(lines)


def emoji_dir() -> Path:
    """The default output folder, which `load_image_source("emoji", ...)` reads."""
    return cache_dir() / "emoji"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _inputs(font: Path, emoji_test: Path) -> dict:
    """Everything besides the settings that decides the output; a change means a rebuild."""
    return {
        "renderer": RENDERER_VERSION,
        "packages": debian_package_versions((FONT_PACKAGE, UNICODE_PACKAGE)),
        "font_sha256": _sha256(font),
        "emoji_test_sha256": _sha256(emoji_test),
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
        "raqm": features.version("raqm"),
    }


def _group_folder(group: str) -> str:
    """"Smileys & Emotion" -> "smileys-emotion": a folder name without spaces or shell characters."""
    return re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-")


def prepare_emoji(out: Path | None = None, size: int = 32, force: bool = False, progress: bool = False, *,
                  max_items: int | None = None, font_file: Path | None = None,
                  emoji_test_file: Path | None = None) -> EmojiSummary:
    """Render the emoji dataset into `out` (default `emoji_dir()`), or find it already there.

    `max_items` keeps that many fully-qualified emoji spaced evenly through the file's order (for
    quick builds and tests); `font_file` and `emoji_test_file` replace the Debian packages' files.
    An existing `out` is only ever replaced when it holds a previous emoji build or nothing at all.
    """
    if not isinstance(size, int) or size < 8:
        raise SelfsupError(f"--size must be an integer >= 8 pixels, got {size!r}")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise SelfsupError(f"max_items must be a positive integer or None, got {max_items!r}")
    out = Path(out).expanduser() if out is not None else emoji_dir()
    font = find_font(font_file)
    emoji_test = find_emoji_test(emoji_test_file)
    settings = {"size": size, "max_items": max_items}
    inputs = _inputs(font, emoji_test)

    stamp = previous_stamp(out, STAMP, "an emoji dataset")
    if is_fresh(stamp, settings, inputs, force, lambda stamp: (out / MANIFEST).is_file()):
        return EmojiSummary(out=out, num_images=stamp["num_images"], group_counts=stamp["groups"],
                            skin_tone_counts=stamp["skin_tones"], num_subgroups=stamp["num_subgroups"],
                            seconds=0.0, reused=True, num_listed=stamp.get("num_listed", 0),
                            skipped=stamp.get("skipped", {}))

    entries = [entry for entry in parse_emoji_test(emoji_test) if entry.status == "fully-qualified"]
    if not entries:
        raise SelfsupError(f"{emoji_test}: lists no fully-qualified emoji")
    if max_items is not None and len(entries) > max_items:
        entries = [entries[(i * len(entries)) // max_items] for i in range(max_items)]
    started = time.perf_counter()
    renderer = EmojiRenderer(font, size)
    images, kept, skipped = _render_all(renderer, entries, progress)
    render_seconds = time.perf_counter() - started
    if not kept:
        raise SelfsupError(f"{font}: none of the {len(entries)} emoji of {emoji_test} could be drawn "
                           f"({', '.join(f'{len(v)} {k}' for k, v in skipped.items() if v)}); is it a colour "
                           f"emoji font, and was Pillow's FreeType built with PNG support?")
    for reason, names in skipped.items():
        if names:
            logger.warning("emoji: skipped %d (%s), e.g. %s", len(names), reason, ", ".join(names[:_NUM_EXAMPLES]))
    group_counts = dict(Counter(entry.group for entry in kept))  # insertion order = CLDR order
    tones = Counter(entry.skin_tone for entry in kept)
    skin_tone_counts = {tone: tones[tone] for tone in SKIN_TONE_ORDER if tones[tone]}
    num_subgroups = len({(entry.group, entry.subgroup) for entry in kept})

    seconds = build_into_place(
        out, STAMP, lambda folder: _write(folder, images, kept, progress), started,
        lambda seconds: {"settings": settings, "inputs": inputs, "num_images": len(kept), "groups": group_counts,
                         "skin_tones": skin_tone_counts, "num_subgroups": num_subgroups,
                         "num_listed": len(entries), "skipped": skipped, "seconds": round(seconds, 2)},
        ensure_ascii=False)
    return EmojiSummary(out=out, num_images=len(kept), group_counts=group_counts, skin_tone_counts=skin_tone_counts,
                        num_subgroups=num_subgroups, seconds=seconds, render_seconds=render_seconds,
                        num_listed=len(entries), skipped=skipped)


def _render_all(renderer: EmojiRenderer, entries: list[EmojiEntry],
                progress: bool) -> tuple[list[np.ndarray], list[EmojiEntry], dict[str, list[str]]]:
    """Images and entries of the emoji drawn, and the names of those skipped, by reason."""
    images: list[np.ndarray] = []
    kept: list[EmojiEntry] = []
    skipped: dict[str, list[str]] = {"split": [], "blank": [], "error": []}
    bar = ProgressBar(progress, "rendering emoji", len(entries))
    try:
        for number, entry in enumerate(entries, start=1):
            try:
                image, reason = renderer.render(entry.text)
            except (OSError, ValueError) as err:  # FreeType/Pillow refusing one glyph must not stop the rest
                logger.debug("emoji %s (%s): cannot draw (%s); skipped", entry.id, entry.name, err)
                image, reason = None, "error"
            if image is None:
                skipped[reason].append(f"{entry.name} ({entry.id})")
            else:
                images.append(image)
                kept.append(entry)
            if number % 128 == 0 or number == len(entries):
                bar.update(completed=number, note=entry.group)
    finally:
        bar.close()
    return images, kept, skipped


def _write(folder: Path, images: list[np.ndarray], entries: list[EmojiEntry], progress: bool) -> None:
    """RGB PNGs under <group>/, manifest.csv (rows in emoji-test.txt order) and pixels.npz."""
    paths = []
    bar = ProgressBar(progress, "writing images", len(entries))
    try:
        with open(folder / MANIFEST, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for number, (image, entry) in enumerate(zip(images, entries), start=1):
                relative = f"{_group_folder(entry.group)}/{entry.id}.png"
                target = folder / relative
                target.parent.mkdir(exist_ok=True)
                Image.fromarray(image, mode="RGB").save(target, format="PNG")
                writer.writerow((relative, entry.group, entry.subgroup, entry.skin_tone, entry.id, entry.name,
                                 entry.version))
                paths.append(relative)
                if number % 256 == 0 or number == len(entries):
                    bar.update(completed=number)
    finally:
        bar.close()
    x = np.stack(images)  # [N, S, S, 3]
    np.savez_compressed(folder / PIXELS, x=x, path=np.array(paths))


# ---------------------------------------------------------------------------------------------
# Loading it back


def emoji_status() -> tuple[bool, str]:
    """Whether `load_emoji` can load here, and why not / what to run."""
    folder = emoji_dir()
    stamp = read_stamp(folder / STAMP)
    if stamp is not None and (folder / MANIFEST).is_file():
        return True, (f"prepared in {folder}: {stamp.get('num_images', '?')} images, "
                      f"{len(stamp.get('groups', {}))} groups")
    try:
        find_font()
        find_emoji_test()
    except SelfsupError:
        return False, f"needs the Debian packages: {INSTALL_COMMAND}; then run: {PREPARE_COMMAND}"
    return False, f"not prepared yet; run: {PREPARE_COMMAND}"


def load_emoji(image_size: int, channels: int = 3) -> ImageSet:
    """The prepared dataset from `emoji_dir()`, labelled by CLDR group, with `subgroup` and `skin_tone`.

    Labels, classes, ids and groups are exactly what `load_image_source` makes of the manifest; the
    pixels come from pixels.npz when it matches the manifest row for row, else from the PNGs.
    """
    _, reason = emoji_status()
    return load_prepared(emoji_dir(), MANIFEST, PIXELS, list(GROUP_COLUMNS), image_size, channels, "emoji", reason)