"""The browser check: a self-containedness scan that needs no browser, and real Chromium renders
(skipped, with the reason, where Chromium is not installed)."""

from __future__ import annotations

import base64
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.errors import SelfsupError
from selfsup.report.browser import check_in_browser, external_urls, find_chromium

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="Chromium not installed: `make report-check` installs the Debian package `chromium`")


def _png_uri(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _page(body: str) -> str:
    return f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>t</title></head><body>{body}</body></html>'


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_external_urls_finds_planted_urls_and_ignores_data_uris():
    uri = _png_uri((255, 0, 0))
    page = _page(
        f'<img alt="ok" src="{uri}">'
        '<img alt="remote" src="https://cdn.example.com/a.png">'
        '<link rel=stylesheet href=//fonts.example.org/css>'  # protocol-relative, unquoted
        '<a href="#results">in-page</a>'
        '<img srcset="data:image/png;base64,AAAA 1x, http://img.example.net/b.png 2x">'
        '<div style="background: url(&quot;https://bg.example.com/c.png&quot;)"></div>'
        "<style>@import 'https://style.example.com/d.css'; .x{background:url( HTTP://UPPER.example.com/e.png )}"
        ".y{background:url(data:image/png;base64,AAAA)}</style>"
        '<pre>src="https://only-text.example.com" url(https://also-text.example.com)</pre>'
        '<img alt="dup" src="https://cdn.example.com/a.png">'
    )
    assert external_urls(page) == [
        "https://cdn.example.com/a.png", "//fonts.example.org/css", "http://img.example.net/b.png",
        "https://bg.example.com/c.png", "https://style.example.com/d.css", "HTTP://UPPER.example.com/e.png"]


def test_external_urls_of_a_self_contained_page_is_empty():
    page = _page(f'<img alt="a" src="{_png_uri((0, 0, 255))}"><a href="report.html#x">x</a><style>p{{color:red}}</style>')
    assert external_urls(page) == []


def test_missing_chromium_is_an_actionable_error(tmp_path, monkeypatch):
    page = tmp_path / "r.html"
    page.write_text(_page("<p>hi</p>"))
    monkeypatch.setenv("SELFSUP_CHROMIUM", str(tmp_path / "no-such-browser"))
    assert find_chromium() is None
    with pytest.raises(SelfsupError, match="Debian package `chromium`"):
        check_in_browser(page, tmp_path / "shot.png")


@needs_chromium
def test_two_embedded_images_load_and_the_screenshot_is_a_png(tmp_path):
    # Tall content: the measured document height must drive the window height.
    body = (f'<img alt="red square" src="{_png_uri((255, 0, 0))}">'
            f'<img alt="green square" src="{_png_uri((0, 255, 0))}">'
            '<div style="height:2500px;background:#eee">tall</div>')
    page = tmp_path / "report.html"
    page.write_text(_page(body))
    shot = tmp_path / "out" / "shot.png"
    result = check_in_browser(page, shot, width=800)
    assert (result["images"], result["loaded"], result["failed"]) == (2, 2, [])
    assert result["height"] >= 2500
    assert result["screenshot"] == str(shot) and shot.stat().st_size > 1000
    assert _png_size(shot) == (800, result["height"])
    assert result["browser"].lower().startswith(("chromium", "google chrome"))
    assert result["external"] == []
    assert not list(shot.parent.glob(".*tmp*")), "the temporary screenshot must be renamed away"


@needs_chromium
def test_broken_and_missing_images_are_reported_by_alt_text(tmp_path):
    body = (f'<img alt="good figure" src="{_png_uri((0, 0, 255))}">'
            '<img alt="garbage base64" src="data:image/png;base64,bm90IGEgcG5nIGF0IGFsbA==">'
            '<img alt="missing file" src="no-such-figure.png">')
    page = tmp_path / "report.html"
    page.write_text(_page(body))
    with pytest.raises(SelfsupError) as err:
        check_in_browser(page, tmp_path / "shot.png", height=600)
    message = str(err.value)
    assert "2 of 3 images did not load" in message
    assert "'garbage base64'" in message and "'missing file'" in message and "good figure" not in message
    assert _png_size(tmp_path / "shot.png") == (1280, 600), "the screenshot is kept to show what broke"


@needs_chromium
def test_a_written_run_report_is_self_contained_and_renders(tmp_path):
    """End to end with the real report writer: every curve figure decodes in the browser."""
    import json

    from selfsup.report.html import write_report

    rows = [{"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text("method: {name: simclr}\n# see https://arxiv.org/abs/2002.05709\n")
    page = write_report(tmp_path, "tiny run")
    assert external_urls(page.read_text()) == []
    result = check_in_browser(page, tmp_path / "report.png")
    assert result["images"] >= 2 and result["loaded"] == result["images"]
