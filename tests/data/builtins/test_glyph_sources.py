"""The inputs of the "glyphs" built-in: the Unicode script table and which fonts are used (no fonts needed).

Rendering and the rest are tested, with real fonts, in test_glyphs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.data.builtins.glyph_sources import font_family, parse_scripts
from selfsup.errors import SelfsupError


SCRIPTS_SAMPLE = """\
# Scripts-15.0.0.txt (a hand-written excerpt)

0041..005A    ; Latin # L&  [26] LATIN CAPITAL LETTER A..LATIN CAPITAL LETTER Z
00AA          ; Latin # Lo       FEMININE ORDINAL INDICATOR
0020          ; Common # Zs       SPACE
0531..0556    ; Armenian # L&  [38] ARMENIAN CAPITAL LETTER AYB..ARMENIAN CAPITAL LETTER FEH
0300..036F    ; Inherited # Mn [112] COMBINING GRAVE ACCENT..COMBINING LATIN SMALL LETTER X
"""


def test_scripts_table_reads_ranges_and_single_code_points(tmp_path: Path) -> None:
    path = tmp_path / "Scripts.txt"
    path.write_text(SCRIPTS_SAMPLE)
    table = parse_scripts(path)
    assert [table.script_of(cp) for cp in (0x41, 0x4D, 0x5A)] == ["Latin"] * 3  # both ends of a range
    assert table.script_of(0x5B) == "Unknown" and table.script_of(0x40) == "Unknown"  # just outside
    assert table.script_of(0xAA) == "Latin" and table.script_of(0xA9) == "Unknown" and table.script_of(0xAB) == "Unknown"
    assert table.script_of(0x20) == "Common" and table.script_of(0x301) == "Inherited"
    assert table.script_of(0x531) == "Armenian" and table.script_of(0x556) == "Armenian"
    assert table.script_of(0x0) == "Unknown" and table.script_of(0x10FFFF) == "Unknown"
    assert table.starts == tuple(sorted(table.starts))  # file order does not matter


def test_scripts_table_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "Scripts.txt"
    path.write_text("0041..005A ; Latin\nnot a range ; Latin\n")
    with pytest.raises(SelfsupError, match=r"Scripts.txt:2: expected"):
        parse_scripts(path)
    path.write_text("0041..005A ; Latin\n\n0050 ; Greek\n")
    with pytest.raises(SelfsupError, match=r"Scripts.txt:3: range starting at 0050 overlaps"):
        parse_scripts(path)
    path.write_text("# only comments\n")
    with pytest.raises(SelfsupError, match="no script ranges"):
        parse_scripts(path)


@pytest.mark.parametrize("name, family", [
    ("NotoSans-Regular.ttf", "Sans"), ("NotoSansArmenian-Regular.ttf", "Sans"),
    ("NotoSerif-Regular.ttf", "Serif"), ("NotoSerifTangut-Regular.ttf", "Serif"),
    ("NotoSans-Bold.ttf", None), ("NotoSerif-Italic.ttf", None), ("NotoSansDisplay-Regular.ttf", None),
    ("NotoSerifDisplay-Regular.ttf", None), ("NotoSansMono-Regular.ttf", None), ("NotoSansLaoUI-Regular.ttf", None),
    ("NotoSerifTamilSlanted-Regular.ttf", None), ("NotoNaskhArabic-Regular.ttf", None),
    ("NotoTraditionalNushu-Regular.ttf", None), ("DejaVuSans.ttf", None),
])
def test_font_family_from_the_file_name(name: str, family: str | None) -> None:
    found, why = font_family(name)
    assert found == family
    assert (why == "") == (family is not None)
