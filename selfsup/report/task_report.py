"""`selfsup report TASK`: one self-contained HTML page (and a model card) for an adapted model.

It reads what the other commands wrote and computes nothing of its own: `task.json` and
`metrics.json` (`selfsup adapt`), `evaluation/` (`selfsup evaluate`), the base run's `metrics.jsonl`,
`config.yaml` and `previews.png` (`selfsup pretrain`), and a `leverage.json` + `leverage.png`
(`selfsup leverage`) when pointed at one. Sections: summary, subgroup audit (table and bars with
confidence intervals), slices (with thumbnails for images), embedding map coloured by label and by
group, representation diagnostics, label leverage, adaptation and pretraining curves,
reconstructions, and the model card, which is also written beside the report as `MODEL_CARD.md`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from selfsup.adapt.task import METRICS, TASK_META
from selfsup.errors import SelfsupError
from selfsup.evaluate.audit import EMBEDDINGS, EVAL_DIR, EVAL_JSON
from selfsup.report.html import curves, figure_html, figure_uri, png_uri, write_page
from selfsup.report.model_card import model_card, write_model_card
from selfsup.train.progress import read_metrics

REPORT, MODEL_CARD = "report.html", "MODEL_CARD.md"
_MAX_BARS = 30  # a column with more groups shows its worst ones (the table has them all)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _read_json(path: Path, made_by: str) -> dict[str, Any]:
    if not path.is_file():
        raise SelfsupError(f"{path}: not found; run `{made_by}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SelfsupError(f"{path}: not valid JSON ({err}); run `{made_by}` again") from None


# ---------------------------------------------------------------------------------------------
# Sections


def _ci(m: dict[str, float], percent: bool = True) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    return f"{m['value'] * scale:.1f}{unit} [{m['low'] * scale:.1f}, {m['high'] * scale:.1f}]"


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.2g}"


def _majority(group: dict[str, Any]) -> str:
    """The group's majority-class baseline (evaluations written before it have none)."""
    baseline = group.get("majority_baseline")
    return "-" if baseline is None else f"{baseline['accuracy'] * 100:.1f} % ({html.escape(str(baseline['class']))})"


def _wilson(group: dict[str, Any]) -> str:
    """Wilson's interval under a small group's bootstrap one, which can collapse to a point."""
    interval = group["accuracy"].get("wilson")
    if not group["small"] or interval is None:
        return ""
    return f"<br><small>Wilson [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]</small>"


def _subgroup_section(sub: dict[str, Any]) -> list[str]:
    s, o = sub["settings"], sub["overall"]
    level = f"{100 * s['confidence_level']:g}%"
    parts = ["<h2>Subgroup audit</h2>",
             f"<p>{sub['n']} labelled rows. Overall accuracy {_ci(o['accuracy'])}, macro-F1 "
             f"{_ci(o['macro_f1'])}, expected calibration error {_ci(o['ece'])} ({level} {html.escape(s['interval'])}, "
             f"{s['num_bootstrap']} resamples).</p>",
             f"<p class=\"note\">p: {html.escape(s['test'])}; {html.escape(s['correction'])}. "
             f"<span class=\"flag\">*</span> significant at {s['alpha']:g}; groups under {s['min_n']} rows are "
             "flagged <em>small</em> and kept. A small group's bootstrap interval collapses to a point when every row "
             "is right (or wrong), so small groups also get Wilson's score interval, which the bars show.</p>"]
    if not sub["columns"]:
        parts.append("<p>The data have no group columns, so there is nothing to break down.</p>")
    for name, col in sub["columns"].items():
        w = col["worst_vs_rest"]
        verdict = ("" if w["p_value"] is None else
                   f"; vs the rest p (Holm) = {w['p_holm']:.2g}, " + ("significant" if w["significant"] else "not significant"))
        parts.append(f"<h3>{html.escape(name)}</h3><p>Worst: <b>{html.escape(str(col['worst']))}</b> "
                     f"({col['gap_worst_to_overall'] * 100:+.1f} points vs overall, {col['gap_worst_to_best'] * 100:+.1f} "
                     f"vs the best, {html.escape(str(col['best']))}){verdict}.</p>")
        parts.append(figure_html(_bars(name, col, o["accuracy"]["value"], level), f"accuracy by {name}"))
        rows = "".join(
            f"<tr><td>{html.escape(g['group'])}</td><td>{g['n']}</td><td>{_ci(g['accuracy'])}{_wilson(g)}</td>"
            f"<td>{_majority(g)}</td><td>{g['macro_f1']['value']:.3f}</td><td>{g['ece']['value']:.3f}</td>"
            f"<td>{g['gap_to_overall'] * 100:+.1f}</td>"
            f"<td>{_p(g['p_holm'])}</td>"
            f"<td>{'<span class=flag>*</span> ' if g['significant'] else ''}{'small' if g['small'] else ''}</td></tr>"
            for g in col["groups"])
        parts.append(f"<table><tr><th>{html.escape(name)}</th><th>n</th><th>accuracy [{level} CI]</th>"
                     f"<th title=\"accuracy of always answering the group's most common label\">majority</th><th>macro-F1</th>"
                     f"<th>ECE</th><th>gap (points)</th><th>p (Holm)</th><th>flags</th></tr>{rows}</table>")
    return parts


def _bars(name: str, col: dict[str, Any], overall: float, level: str) -> str:
    groups = col["groups"][:_MAX_BARS]  # worst first
    fig = _figure(7, 0.8 + 0.28 * len(groups))
    ax = fig.add_subplot()
    y = np.arange(len(groups))[::-1]
    acc = np.array([g["accuracy"]["value"] for g in groups])
    # Small groups' bars carry Wilson's interval: their bootstrap one can be a point (n = 1, all wrong).
    bounds = [g["accuracy"]["wilson"] if g["small"] and "wilson" in g["accuracy"]
              else (g["accuracy"]["low"], g["accuracy"]["high"]) for g in groups]
    low = np.clip(acc - np.array([b[0] for b in bounds]), 0, None)
    high = np.clip(np.array([b[1] for b in bounds]) - acc, 0, None)
    colours = ["#c44" if g["significant"] and g["gap_to_overall"] < 0 else "#9ab" if g["small"] else "#48a" for g in groups]
    ax.barh(y, acc, xerr=[low, high], color=colours, capsize=2)
    ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.1%}")
    ax.set_yticks(y, [f"{g['group'][:28]} (n={g['n']})" for g in groups], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"accuracy with {level} CI (Wilson for small groups)")
    more = len(col["groups"]) - len(groups)
    ax.set_title(f"{name}" + (f" (worst {len(groups)}; {more} more in the table)" if more > 0 else ""), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return figure_uri(fig)


def _slice_section(slices: dict[str, Any] | None, eval_dir: Path) -> list[str]:
    parts = ["<h2>Slices nobody labelled</h2>"]
    if slices is None:
        return parts + ["<p>Slice discovery was not run (<code>selfsup evaluate --no-slices</code>).</p>"]
    st = slices["settings"]
    parts.append(f"<p class=\"note\">{st['num_clusters']} k-means clusters of the features; a slice is a cluster of at "
                 f"least {st['min_size']} rows whose error rate is above the rest's ({html.escape(st['test'])}, "
                 f"{html.escape(st['correction'])}, alpha {st['alpha']:g}). Overall error rate "
                 f"{st['overall_error_rate']:.1%}.</p>")
    if not slices["slices"]:
        return parts + ["<p>No cluster errs significantly more than the rest.</p>"]
    rows = []
    for s in slices["slices"]:
        if s.get("thumbnails") and (eval_dir / s["thumbnails"]).is_file():
            shown = f'<img alt="members of slice {s["cluster"]}" src="{png_uri(eval_dir / s["thumbnails"])}">'
            if s.get("audio"):  # playable clips (data: URIs), under their spectrograms
                shown += "<br>" + " ".join(f'<audio controls preload="none" src="{html.escape(uri)}"></audio>'
                                           for uri in s["audio"] if uri.startswith("data:audio/"))
        else:
            shown = "<br>".join(html.escape(t) for t in s.get("snippets", []))
        rows.append(f"<tr><td>{s['cluster']}</td><td>{s['size']}</td><td>{s['error_rate']:.1%}</td><td>{s['lift']:.2f}x</td>"
                    f"<td>{s['p_holm']:.2g}</td><td>{html.escape(', '.join(s['example_ids']))}</td>"
                    f"<td style=\"text-align:left\">{shown}</td></tr>")
    return parts + ["<table><tr><th>cluster</th><th>size</th><th>error rate</th><th>lift</th><th>p (Holm)</th>"
                    f"<th>misclassified members</th><th>members nearest the centre</th></tr>{''.join(rows)}</table>"]


def _map_section(evaluation: dict[str, Any], eval_dir: Path, classes: list[str], groups: dict[str, list[str]]) -> list[str]:
    tensors = load_file(str(eval_dir / EMBEDDINGS))
    coords = tensors["map"].numpy()
    if len(coords) < 5:
        return []
    shown = tensors["map_rows"].numpy()
    labels = tensors["labels"].numpy()[shown]
    rows = tensors["rows"].numpy()[shown]
    colourings = [("label", [classes[int(i)] if i >= 0 else "(not a task class)" for i in labels])]
    colourings += [(name, [values[int(r)] or "(missing)" for r in rows]) for name, values in groups.items()]
    method = {"umap": "UMAP", "tsne": "t-SNE"}.get(evaluation["map"]["method"], evaluation["map"]["method"])
    rows_evaluated = evaluation.get("rows", "held-out rows")
    parts = [f"<h2>Embedding map</h2><p class=\"note\">{method} of the features of {len(coords)} of the "
             f"{html.escape(rows_evaluated)}.</p>"]
    for name, values in colourings[:3]:
        parts.append(figure_html(_scatter(coords, values, f"{method}, coloured by {name}"), f"embedding map by {name}"))
    return parts


def _scatter(coords: np.ndarray, values: list[str], title: str) -> str:
    fig = _figure(5.2, 4.4)
    ax = fig.add_subplot()
    names, counts = np.unique(values, return_counts=True)
    kept = list(names[np.argsort(-counts)][:12])  # more colours than this are unreadable: the rest are grey
    cmap = __import__("matplotlib").colormaps["tab20"]
    values_arr = np.array(values)
    rest = ~np.isin(values_arr, kept)
    if rest.any():
        ax.scatter(coords[rest, 0], coords[rest, 1], s=4, color="#ccc", label=f"{len(names) - len(kept)} others")
    for i, name in enumerate(kept):
        here = values_arr == name
        ax.scatter(coords[here, 0], coords[here, 1], s=4, color=cmap(i % 20), label=str(name)[:20])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    return figure_uri(fig)


def _diagnostics_section(d: dict[str, Any]) -> list[str]:
    rows = [("uniformity", f"{d['uniformity']:.3f}", "log E exp(-2|f(x)-f(y)|²); 0 = collapsed, lower = more spread"),
            ("effective rank", f"{d['effective_rank']:.1f}", f"of at most {min(d['dim'], d['num_rows'])}"),
            ("normalised std", f"{d['normalised_std']:.3f}", "~1 spread over the sphere, 0 collapsed")]
    if "alignment" in d:
        rows.append(("alignment", f"{d['alignment']:.3f}", f"E|f(x)-f(x')|² over {d['num_pairs']} positive pairs "
                     f"({d.get('pairs', '')}); 0 = views coincide"))
    if "knn_label_agreement" in d:
        rows.append(("kNN label agreement", f"{d['knn_label_agreement']:.3f}",
                     f"k={d['k']}; chance {d['knn_chance_agreement']:.3f}"))
    for name, g in (d.get("groups") or {}).items():
        if "skipped" in g:
            rows.append((f"predicts {name}", "-", g["skipped"]))
        else:
            rows.append((f"predicts {name}", f"{g['balanced_accuracy']:.3f}",
                         f"balanced accuracy of a linear probe for the group ({g['folds']}-fold CV); chance "
                         f"{g['chance']:.3f}. Well above chance: the features encode {name}, a bias risk"))
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td style=\"text-align:left\">{html.escape(c)}</td></tr>"
                   for a, b, c in rows)
    collapsed = ([f"<p><span class=\"flag\">Collapsed representation</span>: {html.escape(d['collapse'])}; the "
                  "statistics below, and any probe or audit of these features, say little.</p>"] if d.get("collapse") else [])
    return ["<h2>Representation diagnostics</h2>", *collapsed,
            f"<table><tr><th>statistic</th><th>value</th><th>meaning</th></tr>{body}</table>"]


def _history_figure(history: list[dict[str, float]]) -> str:
    fig = _figure(7, 2.8)
    left, right = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], marker="o" if len(epochs) < 30 else None)
    left.set_title("training loss", fontsize=10)
    right.plot(epochs, [h["val_acc"] for h in history], marker="o" if len(epochs) < 30 else None, color="C1")
    right.set_title("validation accuracy", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return figure_uri(fig)


def _pm(mean: float, std: float | None) -> str:
    return f"{mean * 100:.1f}" + ("" if not std else f" ± {std * 100:.1f}")


def _leverage_section(leverage_dir: Path) -> list[str]:
    result = _read_json(leverage_dir / "leverage.json", "selfsup leverage BASE --out " + str(leverage_dir))
    metric = result.get("metric", "accuracy").replace("_", " ")
    rows = "".join(
        f"<tr><td>{r['num_labels']}</td><td>{_pm(r['pretrained_acc'], r['pretrained_std'])}</td>"
        f"<td>{_pm(r['scratch_acc'], r['scratch_std'])}</td>"
        f"<td>{'more than the ladder holds' if r['leverage'] is None else format(r['leverage'], '.1f') + 'x'}</td></tr>"
        for r in result["table"])
    parts = ["<h2>Label leverage</h2>",
             f"<p class=\"note\">{html.escape(result['settings']['scratch_note'])}</p>",
             f"<table><tr><th>labels</th><th>pretrained test {metric} % (± std over seeds)</th><th>from scratch %</th>"
             "<th>leverage</th></tr>"
             f"{rows}</table>"]
    png = leverage_dir / "leverage.png"
    if png.is_file():
        parts.append(figure_html(png_uri(png), "accuracy against label count, pretrained and from scratch"))
    return parts


# ---------------------------------------------------------------------------------------------


def write_task_report(task_dir: Path, leverage: Path | None = None) -> Path:
    """Writes TASK/report.html and TASK/MODEL_CARD.md; returns the report's path."""
    task_dir = Path(task_dir)
    task = _read_json(task_dir / TASK_META, f"selfsup adapt BASE --out {task_dir}")
    metrics = _read_json(task_dir / METRICS, f"selfsup adapt BASE --out {task_dir}")
    eval_dir = task_dir / EVAL_DIR
    evaluation = _read_json(eval_dir / EVAL_JSON, f"selfsup evaluate {task_dir}")
    base_run = Path(task["base"].removeprefix("random:"))
    base_is_run = (base_run / "config.yaml").is_file()
    pretraining = None
    if base_is_run:
        import yaml

        pretraining = yaml.safe_load((base_run / "config.yaml").read_text())
    title = f"selfsup report: {task_dir.name}"
    adapt_cfg = task["adapt"]
    sub = evaluation["subgroups"]
    # the linear head has no validation rows: its C was cross-validated on the training labels
    validation = f"+{metrics['num_val']} for validation" if metrics.get("num_val") else metrics.get("validation", "")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>A {adapt_cfg['mode']} adaptation of <code>{html.escape(task['base'])}</code> to {len(task['classes'])} "
             f"classes of <code>{html.escape(str(task['data']))}</code> with {metrics['num_train_labels']} training labels "
             f"({validation}). Accuracy {_ci(sub['overall']['accuracy'])} on {sub['n']} "
             f"{html.escape(evaluation.get('rows', 'held-out rows'))}.</p>"]
    parts += _subgroup_section(sub)
    parts += _slice_section(evaluation.get("slices"), eval_dir)
    from selfsup.evaluate.predictions import read_predictions

    groups = read_predictions(eval_dir / "predictions.csv").groups
    audited = set(sub["columns"])
    groups = {name: values for name, values in groups.items() if name in audited}
    parts += _map_section(evaluation, eval_dir, task["classes"], groups)
    parts += _diagnostics_section(evaluation["diagnostics"])
    if leverage is not None:
        parts += _leverage_section(Path(leverage))
    parts += ["<h2>Adaptation</h2>", figure_html(_history_figure(metrics["history"]), "adaptation curves")]
    if base_is_run:
        rows = read_metrics(base_run / "metrics.jsonl") if (base_run / "metrics.jsonl").is_file() else []
        if rows:
            parts.append("<h2>Pretraining of the base</h2>")
            parts += [figure_html(uri, caption) for caption, uri in curves(rows)]
        if (base_run / "previews.png").is_file():
            parts += ["<h2>What the base makes of held-out images</h2>",
                      figure_html(png_uri(base_run / "previews.png"), "reconstructions of held-out images")]
    card = model_card(task, metrics, sub, evaluation.get("slices"), evaluation["diagnostics"], pretraining,
                      task_dir=str(task_dir), num_params=task.get("num_params"))
    write_model_card(task_dir / MODEL_CARD, card)
    parts += ["<h2>Model card</h2>", f"<p class=\"note\">Also written to {MODEL_CARD}.</p>",
              f"<pre>{html.escape(card)}</pre>"]
    return write_page(task_dir / REPORT, title, parts)
