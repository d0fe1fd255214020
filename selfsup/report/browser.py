"""Checks a self-contained HTML report in a real browser: headless Chromium renders it, takes a
screenshot and tells us whether every figure decoded.

Why a browser and not an HTML parser: a report can be well-formed and still show broken figures (a
truncated base64 PNG, a path that only exists on the machine that wrote it). Only a browser's
decoder says whether `<img>` really loaded.

How: Chromium's command line has no API for page state, so the page reports it itself. We render an
instrumented temporary copy whose injected script, after the window's load event, writes a hidden
marker into the DOM (number of images, how many decoded, their alt texts, the document height);
`chromium --dump-dom` prints the DOM and we parse the marker. A second run takes the screenshot with
the window as tall as the measured document, so the picture shows the whole report.

No network: the copy carries a Content-Security-Policy that allows only inline and `data:` content,
so any remote (or local-file) resource is refused by the page itself and an image that depends on
one counts as failed; DNS is mapped to nowhere and a dead proxy catches the rest, and Chromium's own
background traffic (component updates, sync, field trials) is switched off.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from selfsup.errors import SelfsupError

CHROMIUM_ENV = "SELFSUP_CHROMIUM"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_INSTALL_HINT = "install the Debian package `chromium` (apt-get install chromium), or set $SELFSUP_CHROMIUM to a Chromium/Chrome binary"
_MARKER_ID = "selfsup-browser-check"
# Chromium cannot rasterise arbitrarily tall windows in one piece; past this the screenshot is cut.
MAX_HEIGHT = 16384
_MEASURE_HEIGHT = 200
_VIRTUAL_TIME_MS = 10_000  # virtual, not wall, time: the page's load and image decoding finish well within it

# Only inline content and data: URIs: a self-contained report needs nothing else, and anything else
# would be a request (network or file) made while checking.
_CSP = ("default-src 'none'; img-src data: blob:; media-src data: blob:; font-src data:; "
        "style-src 'unsafe-inline' data:; script-src 'unsafe-inline'")

_PROBE = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var failed = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var root = document.documentElement, body = document.body || root;
  var out = document.createElement("div");
  out.id = "%s";
  out.style.display = "none";
  out.textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.length - failed.length,
    failed: failed.map(function (i) { return i.alt || (i.getAttribute("src") || "").slice(0, 80) || "(no src)"; }),
    height: Math.max(root.scrollHeight, body.scrollHeight)
  });
  body.appendChild(out);
});
""" % _MARKER_ID

# Flags that work as root in a container with no display, GPU or D-Bus, and keep Chromium offline.
_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container: the setuid/namespace sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm, too small for the renderer
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    f"--virtual-time-budget={_VIRTUAL_TIME_MS}",
)


def find_chromium() -> str | None:
    """The Chromium to use: $SELFSUP_CHROMIUM (a path or a name on PATH) when set, else the first of
    chromium, chromium-browser, google-chrome on PATH; None when there is none."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return shutil.which(override)
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _UrlCollector(HTMLParser):
    """Collects URL-valued attributes and CSS `url(...)`/`@import` targets, entity-decoded."""

    _URL_ATTRS = {"src", "href", "poster", "action", "formaction", "data", "background", "xlink:href", "cite", "manifest"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in self._URL_ATTRS:
                self.urls.append(value)
            elif name in ("srcset", "imagesrcset"):
                self.urls += [part.strip().split()[0] for part in value.split(",") if part.strip()]
            elif name == "style":
                self.urls += _css_urls(value)
        self._in_style = tag == "style"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self._in_style = False

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += _css_urls(data)


_CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)\s]*))\s*\)|@import\s+(?:"([^"]*)"|'([^']*)')""", re.I)
_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.I)


def _css_urls(css: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _CSS_URL.finditer(css)]


def external_urls(html_text: str) -> list[str]:
    """Every http(s) or protocol-relative (`//host/...`) URL the page would fetch or link to, in
    document order, each once: in src/href-like attributes, srcset, and CSS `url(...)`/`@import`
    inside <style> and style attributes. `data:` URIs and in-page anchors are not external. Text
    that merely mentions a URL (a config shown in <pre>) is not an attribute and is ignored.

    A self-contained report must give an empty list."""
    collector = _UrlCollector()
    collector.feed(html_text)
    collector.close()
    found: list[str] = []
    for url in collector.urls:
        url = url.strip()
        if _EXTERNAL.match(url) and url not in found:
            found.append(url)
    return found


def _instrument(page: str) -> str:
    """The page with the CSP and the probe script first in <head>, so both apply to everything after."""
    inject = (f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
              f"<script>{_PROBE}</script>")
    for pattern in (r"<head\b[^>]*>", r"<html\b[^>]*>", r"<!doctype[^>]*>"):
        m = re.search(pattern, page, re.I)
        if m:
            return page[:m.end()] + inject + page[m.end():]
    return inject + page


class _Chromium:
    def __init__(self, binary: str, workdir: Path, timeout_s: float) -> None:
        self.binary, self.workdir, self.timeout_s = binary, workdir, timeout_s
        self.runs = 0
        self.last_stderr = ""

    def __call__(self, *args: str) -> str:
        """Chromium's stdout; SelfsupError with its stderr tail when it fails or hangs."""
        self.runs += 1
        # A fresh profile per run: no state from an earlier check, nothing written to $HOME.
        profile = self.workdir / f"profile-{self.runs}"
        env = {**os.environ, "HOME": str(self.workdir), "XDG_CONFIG_HOME": str(self.workdir / "config"),
               "XDG_CACHE_HOME": str(self.workdir / "cache")}
        cmd = [self.binary, *_FLAGS, f"--user-data-dir={profile}", *args]
        # Its own session, so a timeout can end the renderer and GPU helper processes too.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise SelfsupError(f"{self.binary} did not finish within {self.timeout_s:g} s; "
                               f"raise timeout_s or check the page. stderr tail:\n{_tail(err)}") from None
        if proc.returncode != 0:
            raise SelfsupError(f"{self.binary} failed (exit code {proc.returncode}). stderr tail:\n{_tail(err)}")
        self.last_stderr = err
        return out


def _tail(text: str, num_lines: int = 15) -> str:
    # D-Bus complaints are always there in a container and never the cause.
    lines = [ln for ln in text.strip().splitlines() if "dbus" not in ln.lower()]
    return "\n".join(lines[-num_lines:]) or "(empty)"


def chromium_version(binary: str) -> str:
    """E.g. "Chromium 156.0.8078.108 built on Debian GNU/Linux 12 (bookworm)"."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SelfsupError(f"{binary} --version failed ({err}); {_INSTALL_HINT}") from None
    return done.stdout.strip() or "unknown"


def check_in_browser(html_path: Path, screenshot: Path, width: int = 1280, height: int | None = None,
                     timeout_s: float = 60) -> dict[str, Any]:
    """Renders `html_path` in headless Chromium, writes a PNG screenshot to `screenshot` and checks
    that every <img> decoded.

    `height` None makes the window as tall as the document (measured at this width, at most
    MAX_HEIGHT px), so the screenshot shows the whole page. `timeout_s` bounds each Chromium run.

    Returns {"screenshot", "images", "loaded", "failed" (alt texts), "height" (the document's, px),
    "browser" (version), "external" (external_urls of the page, for information), "seconds"}.
    Raises SelfsupError when Chromium is missing or fails, or when any image did not load.
    """
    start = time.monotonic()
    html_path, screenshot = Path(html_path), Path(screenshot)
    if not html_path.is_file():
        raise SelfsupError(f"{html_path}: no such file to check")
    binary = find_chromium()
    if binary is None:
        where = f"${CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]!r} is not an executable; " if os.environ.get(CHROMIUM_ENV) else ""
        raise SelfsupError(f"no Chromium found to check {html_path} in a browser: {where}{_INSTALL_HINT}")
    if width < 100 or (height is not None and height < 100):
        raise SelfsupError(f"window {width}x{height} is too small to render a report; use at least 100x100")
    page = html_path.read_text(encoding="utf-8", errors="replace")
    with tempfile.TemporaryDirectory(prefix="selfsup-browser-") as tmp:
        workdir = Path(tmp)
        copy = workdir / "page.html"
        copy.write_text(_instrument(page), encoding="utf-8")
        chromium = _Chromium(binary, workdir, timeout_s)
        # A short window while measuring: scrollHeight is never less than the viewport, so a tall
        # one would report its own height for a short page.
        dom = chromium(f"--window-size={width},{_MEASURE_HEIGHT}", "--dump-dom", copy.as_uri())
        state = _parse_marker(dom, chromium.last_stderr, html_path)
        shot_height = height or max(100, min(int(state["height"]), MAX_HEIGHT))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target, then renamed: a reader never sees half a PNG.
        shot_tmp = screenshot.parent / f".{screenshot.name}.tmp.png"
        try:
            chromium(f"--window-size={width},{shot_height}", f"--screenshot={shot_tmp}", copy.as_uri())
            if not shot_tmp.is_file() or shot_tmp.stat().st_size == 0:
                raise SelfsupError(f"{binary} wrote no screenshot of {html_path}. stderr tail:\n{_tail(chromium.last_stderr)}")
            os.replace(shot_tmp, screenshot)
        finally:
            shot_tmp.unlink(missing_ok=True)
    result = {"screenshot": str(screenshot), "images": int(state["images"]), "loaded": int(state["loaded"]),
              "failed": list(state["failed"]), "height": int(state["height"]), "browser": chromium_version(binary),
              "external": external_urls(page), "seconds": round(time.monotonic() - start, 2)}
    if result["failed"]:
        names = ", ".join(repr(name) for name in result["failed"])
        raise SelfsupError(f"{html_path}: {len(result['failed'])} of {result['images']} images did not load in "
                           f"{result['browser']}: {names}. A report's figures must be complete data: URIs "
                           f"(remote and local-file images are refused); screenshot in {screenshot}")
    return result


def _parse_marker(dom: str, stderr: str, html_path: Path) -> dict[str, Any]:
    m = re.search(rf'<div id="{_MARKER_ID}"[^>]*>(.*?)</div>', dom, re.S)
    if m is None:
        raise SelfsupError(f"{html_path}: the page never finished loading in Chromium (no load event within "
                           f"{_VIRTUAL_TIME_MS / 1000:g} s of virtual time, or a script replaced the document). "
                           f"stderr tail:\n{_tail(stderr)}")
    return json.loads(html.unescape(m.group(1)))
