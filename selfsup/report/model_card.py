"""A Markdown model card for an adapted classifier, in the Hugging Face ModelCard layout.

The card is what travels with a model when the run directory does not: what it was pretrained and
adapted on, how well it does overall and per subgroup (with confidence intervals, so a reader can
tell a real gap from noise), and where it is known to fail. YAML front matter (library_name, tags,
datasets, metrics and a `model-index` with the held-out results) lets the Hugging Face Hub index it;
the body has the sections of the Hub's template that we can fill from our own measurements.

Inputs are the plain dicts our commands write (task.json, metrics.json, the evaluation's subgroup
and slice results, representation diagnostics, the pretraining run's config.yaml). Every key is
optional beyond the task's base: a missing measurement is written as "not measured" rather than
guessed, since the evaluation producers grow independently of this writer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import SelfsupError

Estimate = tuple[float, float | None, float | None]  # value, CI low, CI high

_TASK_TYPES = {"text": "text-classification", "image": "image-classification", "audio": "audio-classification",
               "speech": "audio-classification", "image_text": "image-classification"}
_NOT_MEASURED = "not measured"


def model_card(task: Mapping[str, Any], metrics: Mapping[str, Any], subgroups: Mapping[str, Any] | None = None,
               slices: Mapping[str, Any] | Sequence[Any] | None = None, diagnostics: Mapping[str, Any] | None = None,
               pretraining: Mapping[str, Any] | None = None, *, name: str | None = None,
               task_dir: str | None = None, num_params: int | None = None) -> str:
    """The model card as Markdown with YAML front matter.

    task: the task run's task.json ("base", "encoder", "preprocess", "adapt", "classes", "data").
    metrics: its metrics.json ("test_acc", "num_train_labels", "num_val", "num_test", ...); "accuracy",
      "macro_f1", "ece" may be numbers or {"value", "low", "high"} and are used when `subgroups` has no
      "overall".
    subgroups: the subgroup evaluation ({"n", "settings", "overall", "columns": {column: {"groups",
      "worst" (a group's name or its entry), "best", "gap_worst_to_best", "gap_worst_to_overall"}}}).
    slices: underperforming slices ({"slices": [...]} or the list itself): embedding clusters
      ("cluster", "size", "error_rate", "overall_error_rate", "p_holm", "example_ids") or described
      slices ("description"/"name"/"rule", "n", "accuracy", "gap_to_overall").
    diagnostics: representation diagnostics; "groups" (or "group_predictability") maps a column to how
      well the embeddings predict it ({"balanced_accuracy" or "accuracy", "chance"}, or a number).
    pretraining: the base run's resolved config (config.yaml), optionally with "num_items".
    name: the card's title (default: "<method> <encoder> classifier").
    task_dir: the task run directory the usage example points at (default: a placeholder).
    num_params: the encoder's parameter count (default: task["num_params"] when present).
    """
    if not isinstance(task, Mapping) or not task.get("base"):
        raise SelfsupError("model card: the task description has no 'base'; pass the task run's task.json")
    pretraining = pretraining or {}
    modality = str(_get(task, "preprocess", "modality") or _get(pretraining, "data", "modality") or "image")
    method = _get(pretraining, "method", "name") or _get(task, "method", "name") or task.get("method")
    method = str(method) if isinstance(method, str) else None
    encoder = dict(task.get("encoder") or {})
    encoder_name = str(encoder.get("name") or _get(pretraining, "encoder", "name") or "encoder")
    title = name or f"{method or 'selfsup'} {encoder_name} classifier"
    overall = _overall(metrics, subgroups)
    pretrain_data = _get(pretraining, "data", "source")
    labelled_data = task.get("data") or pretrain_data
    front = _front_matter(title, modality, method, task, [pretrain_data, labelled_data], overall)
    sections = [
        f"# {title}",
        f"{'An' if modality[:1] in tuple('aeiou') else 'A'} {modality} classifier adapted with `selfsup` from an encoder pretrained without labels"
        f"{f' by `{method}`' if method else ''} ({_adapt_phrase(task)}).",
        _details(task, method, encoder, num_params),
        _training_data(task, metrics, pretraining, pretrain_data, labelled_data),
        _evaluation(metrics, subgroups, overall),
        _limitations(subgroups, slices, diagnostics),
        _how_to_use(task, task_dir),
    ]
    return "---\n" + front + "---\n\n" + "\n\n".join(sections) + "\n"


def write_model_card(path: Path, text: str) -> Path:
    """Writes `text` to `path` atomically (a temporary file beside it, then a rename) and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------
# reading the inputs defensively


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _estimate(value: Any) -> Estimate | None:
    """A number or {"value", "low", "high"} as (value, low, high); None when there is no value."""
    if isinstance(value, Mapping):
        point = _number(value.get("value"))
        return None if point is None else (point, _number(value.get("low")), _number(value.get("high")))
    point = _number(value)
    return None if point is None else (point, None, None)


def _overall(metrics: Mapping[str, Any], subgroups: Mapping[str, Any] | None) -> dict[str, Estimate | None]:
    """Accuracy, macro-F1 and ECE on the held-out rows: the subgroup evaluation's (it has CIs) first."""
    from_groups = _get(subgroups, "overall") or {}
    metrics = metrics or {}
    return {
        "accuracy": _estimate(from_groups.get("accuracy")) or _estimate(metrics.get("accuracy"))
        or _estimate(metrics.get("test_acc")),
        "macro_f1": _estimate(from_groups.get("macro_f1")) or _estimate(metrics.get("macro_f1")),
        "ece": _estimate(from_groups.get("ece")) or _estimate(metrics.get("ece")),
    }


# ------------------------------------------------------------------------------------------
# formatting


def _pct(value: float | None) -> str:
    return _NOT_MEASURED if value is None else f"{100 * value:.1f} %"


def _with_ci(est: Estimate | None, percent: bool = True) -> str:
    if est is None:
        return _NOT_MEASURED
    value, low, high = est
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    unit = " %" if percent else ""
    ci = f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else ""
    return f"{fmt(value)}{unit}{ci}"


def _gap(value: Any) -> str:
    gap = _number(value)
    return "" if gap is None else f"{100 * gap:+.1f} pp"


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes and newlines would break the row."""
    return _inline(value).replace("|", "\\|")


def _inline(value: Any) -> str:
    """Text for one line or a code span: a newline would end the list item, a backtick the span."""
    return str(value).replace("\n", " ").replace("`", "'")


def _relative(gap: Any, to: str) -> str:
    """"17.1 pp below overall": a signed number reads ambiguously in prose."""
    number = _number(gap)
    if number is None:
        return ""
    return f"{abs(100 * number):.1f} pp {'below' if number < 0 else 'above'} {to}"


def _count(value: Any) -> str:
    number = _number(value)
    return _NOT_MEASURED if number is None else f"{int(number):,}"


def _params(num: int) -> str:
    return f"{num / 1e6:.2f} M" if num >= 1e5 else f"{num / 1e3:.1f} k" if num >= 1e3 else str(num)


def _adapt_phrase(task: Mapping[str, Any]) -> str:
    adapt = task.get("adapt") or {}
    mode = adapt.get("mode", "head")
    return {"head": f"a {adapt.get('head', 'linear')} head on the frozen encoder",
            "lora": f"LoRA adapters (rank {adapt.get('lora_rank', '?')}) and a {adapt.get('head', 'linear')} head",
            "finetune": "a full fine-tune"}.get(mode, f"mode `{mode}`")


def _label_budget(adapt: Mapping[str, Any]) -> str:
    if adapt.get("k_shot"):
        return f"{adapt['k_shot']} labelled examples per class"
    fraction = _number(adapt.get("label_fraction"))
    return f"{fraction:.0%} of the training labels (stratified)" if fraction is not None else "the training labels"


# ------------------------------------------------------------------------------------------
# the parts


def _front_matter(title: str, modality: str, method: str | None, task: Mapping[str, Any], datasets: list[Any],
                  overall: Mapping[str, Estimate | None]) -> str:
    tags = ["self-supervised"] + [t for t in (method, modality, f"adapt-{_get(task, 'adapt', 'mode') or 'head'}") if t]
    unique_datasets = list(dict.fromkeys(str(d) for d in datasets if d))
    data: dict[str, Any] = {"library_name": "selfsup", "tags": tags}
    if unique_datasets:
        data["datasets"] = unique_datasets
    results = []
    for key, metric_type, metric_name, args in (("accuracy", "accuracy", "Accuracy", None),
                                               ("macro_f1", "f1", "Macro-F1", {"average": "macro"}),
                                               ("ece", "ece", "Expected calibration error", None)):
        est = overall.get(key)
        if est is not None:
            entry: dict[str, Any] = {"type": metric_type, "value": round(est[0], 4), "name": metric_name}
            if args:
                entry["args"] = args
            results.append(entry)
    if results:
        data["metrics"] = [r["type"] for r in results]
        dataset = str(task.get("data") or (unique_datasets[-1] if unique_datasets else "held-out"))
        data["model-index"] = [{"name": title, "results": [{
            "task": {"type": _TASK_TYPES.get(modality, "other"), "name": f"{modality} classification"},
            "dataset": {"name": dataset, "type": dataset, "split": "held-out"},
            "metrics": results}]}]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _details(task: Mapping[str, Any], method: str | None, encoder: dict[str, Any], num_params: int | None) -> str:
    adapt = task.get("adapt") or {}
    num_params = num_params if num_params is not None else task.get("num_params") or encoder.get("num_params")
    knobs = ", ".join(f"{k}={v}" for k, v in encoder.items() if k not in ("name", "num_params"))
    classes = task.get("classes") or []
    shown = ", ".join(f"`{c}`" for c in classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
    lines = [
        "## Model details", "",
        f"- **Base run:** `{task['base']}`",
        f"- **Pretraining method:** {f'`{method}`' if method else _NOT_MEASURED}",
        f"- **Encoder:** `{encoder.get('name', 'unknown')}`" + (f" ({knobs})" if knobs else ""),
        f"- **Encoder parameters:** {_params(int(num_params)) if _number(num_params) is not None else _NOT_MEASURED}",
        f"- **Adaptation:** `{adapt.get('mode', 'head')}` — {_adapt_phrase(task)}, on {_label_budget(adapt)}",
    ]
    if classes:
        lines.append(f"- **Classes ({len(classes)}):** {shown}")
    return "\n".join(lines)


def _training_data(task: Mapping[str, Any], metrics: Mapping[str, Any], pretraining: Mapping[str, Any],
                   pretrain_data: Any, labelled_data: Any) -> str:
    num_items = pretraining.get("num_items") or _get(pretraining, "data", "num_items")
    steps, batch = _get(pretraining, "train", "steps"), _get(pretraining, "train", "batch_size")
    schedule = f", {steps:,} steps of batch {batch}" if isinstance(steps, int) and isinstance(batch, int) else ""
    adapt = task.get("adapt") or {}
    lines = [
        "## Training data", "",
        f"- **Pretraining (unlabelled):** `{pretrain_data or 'the base run data'}`"
        + (f", {_count(num_items)} items" if num_items is not None else "") + schedule
        + " — labels, if any, were not used.",
        f"- **Adaptation (labelled):** `{labelled_data or 'unknown'}`, {_label_budget(adapt)}: "
        f"{_count(metrics.get('num_train_labels'))} labelled training examples, "
        + (f"{_count(metrics.get('num_val'))} for validation (early stopping), " if metrics.get("num_val") or
           "validation" not in metrics else f"no validation rows (the linear head's C: {metrics['validation']}), ")
        + f"{_count(metrics.get('num_test'))} held-out test rows.",
        "- The held-out rows are the pretraining run's held-out split: neither pretraining nor adaptation saw them.",
    ]
    return "\n".join(lines)


def _level(subgroups: Mapping[str, Any] | None) -> str:
    level = _number(_get(subgroups, "settings", "confidence_level"))
    return f"{100 * level:g} %" if level is not None else "95 %"


def _evaluation(metrics: Mapping[str, Any], subgroups: Mapping[str, Any] | None,
                overall: Mapping[str, Estimate | None]) -> str:
    n = _get(subgroups, "n") or (metrics or {}).get("num_test")
    level = _level(subgroups)
    lines = ["## Evaluation", "",
             f"On {_count(n)} {_get(subgroups, 'rows') or 'held-out rows'}; brackets are {level} confidence intervals.", "",
             "| metric | value |", "|---|---|",
             f"| accuracy | {_with_ci(overall.get('accuracy'))} |",
             f"| macro-F1 | {_with_ci(overall.get('macro_f1'))} |",
             f"| expected calibration error (lower is better) | {_with_ci(overall.get('ece'), percent=False)} |"]
    columns = _get(subgroups, "columns") or {}
    if not columns:
        lines += ["", "No subgroup evaluation was run: the per-group accuracy of this model is unknown."]
    for column, result in columns.items():
        groups = _groups(result)
        lines += ["", f"### Per `{_inline(column)}`", "",
                  f"| group | n | accuracy [{level} CI] | gap to overall | p-value | significant | small group |",
                  "|---|---:|---|---:|---:|---|---|"]
        for g in groups:
            # The adjusted p is the one the significance flag was decided on.
            p_value = _number(g["p_holm"]) if "p_holm" in g else _number(g.get("p_value"))
            lines.append("| " + " | ".join([
                _cell(g.get("group", "?")), _count(g.get("n")), _with_ci(_estimate(g.get("accuracy"))),
                _gap(g.get("gap_to_overall")), "" if p_value is None else f"{p_value:.3g}",
                {True: "yes", False: "no"}.get(g.get("significant"), ""), "yes" if g.get("small") else ""]) + " |")
        if not groups:
            lines.append("| (no groups reported) | | | | | | |")
    if columns:
        settings = _get(subgroups, "settings") or {}
        min_n = _number(settings.get("min_n"))
        test = ", ".join(str(settings[k]) for k in ("test", "correction") if settings.get(k))
        lines += ["", "*gap to overall*: group accuracy minus overall accuracy, in percentage points. "
                  "*p-value*, *significant*: the group against the rest of its column"
                  + (f" ({test})" if test else " (adjusted for testing every group)") + ". *small group*: "
                  + (f"fewer than {int(min_n)} rows" if min_n is not None else "too few rows")
                  + ", too few for a reliable estimate; read its interval, not its value."]
    return "\n".join(lines)


def _groups(column: Any) -> list[Mapping[str, Any]]:
    return [g for g in (_get(column, "groups") or []) if isinstance(g, Mapping)]


def _worst(column: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The worst group's full entry: "worst" may be the entry itself or the name of one in "groups"."""
    worst = column.get("worst")
    if isinstance(worst, Mapping):
        return worst
    if worst is not None:
        for g in _groups(column):
            if g.get("group") == worst:
                return g
        details = column.get("worst_vs_rest")
        return details if isinstance(details, Mapping) else {"group": worst}
    return None


def _limitations(subgroups: Mapping[str, Any] | None, slices: Mapping[str, Any] | Sequence[Any] | None,
                 diagnostics: Mapping[str, Any] | None) -> str:
    lines = ["## Limitations and bias", ""]
    columns = _get(subgroups, "columns") or {}
    for column, result in columns.items():
        worst = _worst(result) if isinstance(result, Mapping) else None
        if worst is None:
            continue
        acc = _estimate(worst.get("accuracy"))
        gap = result.get("gap_worst_to_overall", worst.get("gap_to_overall"))
        # The spread is worst minus best in the producer; its magnitude is what a reader needs.
        spread = _number(result.get("gap_worst_to_best"))
        best = result.get("best")
        best_name = f" (`{_inline(best)}`)" if isinstance(best, str) else ""
        flags = [f for f, on in (("significant", worst.get("significant")), ("small group", worst.get("small"))) if on]
        lines.append(f"- **Worst `{_inline(column)}` group:** `{_inline(worst.get('group', '?'))}` "
                     f"(n = {_count(worst.get('n'))}), accuracy {_with_ci(acc)}, "
                     f"{_relative(gap, 'overall') or 'gap to overall unknown'}"
                     + (f", {abs(100 * spread):.1f} pp behind the best group{best_name}" if spread is not None else "")
                     + (f" ({', '.join(flags)})" if flags else "") + ".")
    if subgroups is None:
        lines.append("- Performance per subgroup was **not evaluated**; do not assume it is uniform.")
    found = _slice_list(slices)
    if found:
        lines.append(f"- **Underperforming slices found ({len(found)})** — hypotheses to inspect, not named causes:")
        for s in found[:10]:
            lines.append(f"  - {_slice_line(s)}")
        if len(found) > 10:
            lines.append(f"  - … and {len(found) - 10} more")
    elif slices is not None:
        lines.append("- The slice search found no slice significantly worse than the rest.")
    lines += _predictability(diagnostics)
    lines += ["- The model was evaluated only on held-out rows of its own data source; expect lower accuracy "
              "on data from another distribution, and re-evaluate (`selfsup evaluate`) before relying on it there."]
    return "\n".join(lines)


def _slice_list(slices: Mapping[str, Any] | Sequence[Any] | None) -> list[Mapping[str, Any]]:
    if isinstance(slices, Mapping):
        slices = slices.get("slices") or slices.get("found") or []
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
        return []
    return [s for s in slices if isinstance(s, Mapping)]


def _slice_line(s: Mapping[str, Any]) -> str:
    """One slice: a described rule, or an embedding cluster given by its error rates."""
    what = s.get("description") or s.get("name") or s.get("rule") or s.get("conditions")
    if not what:
        what = f"embedding cluster {s['cluster']}" if "cluster" in s else "unnamed slice"
    acc = _estimate(s.get("accuracy"))
    error_rate, overall_error = _number(s.get("error_rate")), _number(s.get("overall_error_rate"))
    if acc is None and error_rate is not None:
        acc = (1 - error_rate, None, None)
    gap_value = s.get("gap_to_overall", s.get("gap"))
    if _number(gap_value) is None and error_rate is not None and overall_error is not None:
        gap_value = overall_error - error_rate  # accuracy gap = minus the error-rate gap
    gap = _relative(gap_value, "overall")
    p_value = _number(s.get("p_holm", s.get("p_value")))
    examples = [str(e) for e in (s.get("example_ids") or [])[:3]]
    return (f"{_inline(what)}: n = {_count(s.get('n', s.get('size')))}, accuracy {_with_ci(acc)}"
            + (f", {gap}" if gap else "") + (f", p = {p_value:.3g}" if p_value is not None else "")
            + (f"; e.g. {', '.join(f'`{_inline(e)}`' for e in examples)}" if examples else ""))


def _predictability(diagnostics: Mapping[str, Any] | None) -> list[str]:
    """How well the embeddings predict each group attribute (representation diagnostics' "groups")."""
    found = _get(diagnostics, "group_predictability") or _get(diagnostics, "groups") or {}
    lines = []
    for column, value in (found.items() if isinstance(found, Mapping) else []):
        if isinstance(value, Mapping):
            key = next((k for k in ("balanced_accuracy", "accuracy", "value") if k in value), None)
            score, chance = _number(value.get(key)) if key else None, _number(value.get("chance", value.get("baseline")))
        else:
            key, score, chance = "accuracy", _number(value), None
        if score is None:
            continue
        metric = "balanced accuracy" if key == "balanced_accuracy" else "accuracy"
        lines.append(f"- **Group predictability:** a linear probe on the embeddings predicts `{_inline(column)}` with "
                     f"{_pct(score)} {metric}" + (f" (chance {_pct(chance)})" if chance is not None else "")
                     + ": the representation encodes this attribute, so a head trained on it can use it as a shortcut.")
    return lines


def _how_to_use(task: Mapping[str, Any], task_dir: str | None) -> str:
    where = task_dir or "path/to/task-run"
    adapt = task.get("adapt") or {}
    budget = f"--k-shot {adapt['k_shot']}" if adapt.get("k_shot") else f"--label-fraction {adapt.get('label_fraction', 1.0)}"
    head = f" --head {adapt['head']}" if adapt.get("head") not in (None, "linear") else ""
    data = f" --data {task['data']}" if task.get("data") else ""
    return "\n".join([
        "## How to use", "",
        "Predictions (a CSV of id, label when known, prediction, confidence and group columns):", "",
        "```bash",
        f"selfsup predict {where} --data YOUR_DATA --out predictions.csv",
        "```", "",
        "Reproduce the adaptation from the same base run:", "",
        "```bash",
        f"selfsup adapt {task['base']} --out {where} --mode {adapt.get('mode', 'head')}{head} {budget}{data} "
        f"--seed {adapt.get('seed', 0)}",
        "```",
    ])
