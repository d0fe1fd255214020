"""A small self-contained HTML report of a run: training curves, the probe table and the config.

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


def _figure_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curves(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        figures.append((title, _figure_uri(fig)))
        plt.close(fig)
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
    for caption, uri in _curves(rows):
        parts.append(f'<figure><img alt="{html.escape(caption)}" src="{uri}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    previews = run_dir / "previews.png"  # written by reconstruction objectives (report/previews.py)
    if previews.exists():
        uri = "data:image/png;base64," + base64.b64encode(previews.read_bytes()).decode()
        parts += ["<h2>What the model makes of held-out images</h2>",
                  f'<figure><img alt="reconstructions of held-out images" src="{uri}"></figure>']
    config = run_dir / "config.yaml"
    if config.exists():
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(config.read_text())}</pre>"]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
             "figure{display:inline-block;margin:.5em}pre{background:#f6f6f6;padding:1em}")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
