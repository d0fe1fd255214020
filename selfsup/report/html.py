"""A small self-contained HTML report of a pretraining run: training curves, the probe table, the
config; and the page pieces the task report (`report/task_report.py`) shares.

Figures are PNGs embedded as data URIs, so the file opens anywhere with no network.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.train.progress import read_metrics


STYLE = ("body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
         "figure{display:inline-block;margin:.5em;vertical-align:top}td img{max-width:26em}pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}"
         ".flag{color:#a00;font-weight:bold}.note{color:#555;font-size:.9em}")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG data URI (and the figure closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return png_uri(buffer.getvalue())


def png_uri(data: bytes | Path) -> str:
    """PNG bytes (or a PNG file) as a data URI: the page needs no other file and no network."""
    if isinstance(data, Path):
        data = data.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_html(uri: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_page(path: Path, title: str, parts: Sequence[str]) -> Path:
    """Writes a self-contained HTML page atomically (temporary file, then rename) and returns its path."""
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def curves(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, data URI) of each training curve the metrics rows hold."""
    plt = pyplot()

    figures = []
    for key, title in (("loss", "training loss"), ("knn_acc", "kNN accuracy on the held-out split"),
                       ("heldout_loss", "held-out loss"), ("lr", "learning rate")):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        figures.append((title, figure_uri(fig)))
    return figures


def _results_table(results: Sequence[dict[str, Any]]) -> str:
    fractions = sorted({r["label_fraction"] for r in results})
    rows = sorted({(r["features"], r["probe"]) for r in results}, key=lambda fp: [r["features"] for r in results].index(fp[0]))
    acc = {(r["features"], r["probe"], r["label_fraction"]): r["accuracy"] for r in results}
    head = "".join(f"<th>{f:.0%} labels</th>" for f in fractions)
    body = "".join(
        f"<tr><td>{html.escape(feat)}</td><td>{html.escape(probe)}</td>"
        + "".join(f"<td>{acc[(feat, probe, f)]:.1%}</td>" if (feat, probe, f) in acc else "<td></td>" for f in fractions)
        + "</tr>"
        for feat, probe in rows
    )
    return f"<table><tr><th>features</th><th>probe</th>{head}</tr>{body}</table>"


def write_report(run_dir: Path, title: str, results: Sequence[dict[str, Any]] = (), notes: str = "") -> Path:
    """Writes `run_dir/report.html` atomically and returns its path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.exists() else []
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    if results:
        parts += ["<h2>Probe accuracy on the held-out split</h2>", _results_table(results)]
    for caption, uri in curves(rows):
        parts.append(figure_html(uri, caption))
    previews = run_dir / "previews.png"  # written by reconstruction objectives (modalities/image.py)
    if previews.exists():
        parts += ["<h2>What the model makes of held-out images</h2>",
                  figure_html(png_uri(previews), "reconstructions of held-out images")]
    config = run_dir / "config.yaml"
    if config.exists():
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(config.read_text())}</pre>"]
    return write_page(run_dir / "report.html", title, parts)
