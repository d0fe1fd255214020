"""Orchestration of `selfsup leverage` and `selfsup select`: many `adapt` runs and frozen-feature scores.

The measurements live elsewhere (`evaluate/leverage.py`: the leverage table and plot;
`evaluate/transferability.py`: LogME, kNN and linear scores, Kendall tau); this module decides
which runs to make, makes them, and writes what they found.

**Leverage.** For each label count N on a ladder and each seed, `adapt` runs twice: from the
pretrained base (in the requested mode) and from scratch (`random:BASE`: the same architecture
freshly initialised). The from-scratch side always fine-tunes every weight (`finetune`, with no
layer-wise decay, since there is nothing pretrained to protect, and its own learning rate): a
frozen random encoder with a trained head is a random-features baseline, not "supervised from
scratch", and would overstate the leverage. Both sides of one seed see the same labels, and for
one seed the label sets are nested across the ladder (`adapt/sampling.py`), so the curves measure
the effect of adding labels. N counts every label a side is given, the validation tenth included.
A rung is a total label count, drawn stratified (fraction N / labelled training rows), or with
`k_shot` a number per class; a rung beyond the data is clipped to all of it, with a note.

**Select.** Every candidate base embeds the same stratified sample of the labelled training rows
with its frozen encoder (`select_sample`: at least two rows of every class that has them, since the
cross-validated scores need one to fit and one to score; a class with fewer is left out, and how
many is said); `score_bases` ranks them within a time budget. With `validate`, every base is also
adapted on the same data and, given three bases or more, each score's Kendall tau against the
accuracy reached says whether the score ordered the bases the way adaptation does.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from selfsup.adapt.run import adapt
from selfsup.adapt.sampling import require_two_classes, stratified_fraction
from selfsup.adapt.bases import RANDOM_PREFIX, base_splits, load_base
from selfsup.adapt.task import AdaptConfig
from selfsup.data.split import labelled_rows
from selfsup.train.progress import format_duration
from selfsup.errors import SelfsupError
from selfsup.files import claim_output, mark, names_in, remove_owned, write_atomic
from selfsup.evaluate.leverage import format_leverage, leverage_table, plot_leverage
from selfsup.evaluate.transferability import MIN_TAU_BASES, SCORES, format_ranking, score_accuracy_tau, score_bases
from selfsup.train.runtime import Runtime, init_runtime

log = logging.getLogger("selfsup")

LEVERAGE_JSON, LEVERAGE_PNG, SELECT_JSON = "leverage.json", "leverage.png", "select.json"
LEVERAGE_FILES, SELECT_FILES = names_in(LEVERAGE_JSON, LEVERAGE_PNG, "runs"), names_in(SELECT_JSON, "adapt")


def _fresh_output(out: Path, kind: str, known: Callable[[str], bool]) -> None:
    """Empties an output folder `claim_output` accepted (its old kept runs would mix with the new) and marks it."""
    if out.is_dir() and any(out.iterdir()):
        remove_owned(out, kind, known)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, kind)
SIDES = ("pretrained", "scratch")
# What leverage and select compare, and the adapt metric each reads. Balanced accuracy (or macro-F1)
# is the one to use on imbalanced tasks: on the man-page sections, a model that answers "section 3"
# to everything scores 56 % accuracy, so a degenerate from-scratch model would "match" a pretrained one.
METRICS = {"accuracy": "test_acc", "balanced_accuracy": "test_balanced_acc", "macro_f1": "test_macro_f1"}
DEFAULT_NUM_RUNGS = 6
# The smallest budget `adapt` can use: per class one label to train on and one to validate with.
MIN_PER_CLASS = 2
TWO_BASES = ("two bases cannot be ranked meaningfully (their Kendall tau is +1 or -1 by which of the two came "
             f"first); give {MIN_TAU_BASES} or more to check whether a score orders bases as adaptation does")
SCRATCH_NOTE = ("from scratch = random:BASE fine-tuned end to end (mode finetune, no layer decay): a frozen random "
                "encoder is a random-features baseline, not supervised training from scratch")


def _labelled_training(base: str, data: str | None) -> tuple[Any, Any, torch.Tensor]:
    """(run config, training split, indices of its labelled rows) of the data `base` is judged on."""
    cfg, train, _ = base_splits(base, data)
    rows = labelled_rows(train, "training")
    require_two_classes(train.labels[rows], train.classes, train.source)
    return cfg, train, rows


# ---------------------------------------------------------------------------------------------
# Leverage


def default_ladder(num_rows: int, num_classes: int, k_shot: bool = False, num_rungs: int = DEFAULT_NUM_RUNGS,
                   largest_class: int | None = None) -> list[int]:
    """A geometric ladder from 2 labels per class up to every labelled training row (or, per class with
    `k_shot`, from 2 up to the largest class); fewer rungs when the range is too short for distinct ones."""
    low, high = (MIN_PER_CLASS, largest_class or 0) if k_shot else (MIN_PER_CLASS * num_classes, num_rows)
    if high < low:
        raise SelfsupError(f"the data hold {num_rows} labelled training rows in {num_classes} classes: too few for a "
                           f"label ladder, which starts at {MIN_PER_CLASS} per class")
    rungs = np.geomspace(low, high, num_rungs)
    return sorted({int(round(float(n))) for n in rungs})


def resolve_ladder(ladder: Sequence[int] | None, labels: torch.Tensor, k_shot: bool) -> tuple[list[dict], list[str]]:
    """The rungs to run, each ``{"requested", "num_labels", "label_fraction" | "k_shot"}``, and notes.

    `num_labels` is the number of labels the stratified draw really gives (per-class rounding moves
    it a little off the request), which is what the leverage table compares. A rung beyond the data
    is clipped to all of it; a rung that then duplicates another is dropped; both are noted.
    """
    num_rows = len(labels)
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    num_classes, largest = len(counts), int(counts.max())
    if ladder is None:
        ladder = default_ladder(num_rows, num_classes, k_shot, largest_class=largest)
    requested = sorted(set(int(n) for n in ladder))
    notes: list[str] = []
    rungs: list[dict] = []
    unit = "per class" if k_shot else "labels"
    for n in requested:
        if n < 1:
            raise SelfsupError(f"--ladder: label counts must be positive, got {n}")
        if k_shot:
            if n < MIN_PER_CLASS:
                raise SelfsupError(f"--ladder: k={n} per class is too few; adapt needs at least {MIN_PER_CLASS} "
                                   "(one to train on, one to validate)")
            k = min(n, largest)
            if k < n:
                notes.append(f"rung {n} per class is more than the largest class holds ({largest}); clipped to {k}")
            budget: dict[str, Any] = {"k_shot": k}
            num_labels = int(torch.clamp(counts, max=k).sum())
        else:
            if n < MIN_PER_CLASS * num_classes:
                raise SelfsupError(f"--ladder: {n} labels is fewer than {MIN_PER_CLASS} per class for {num_classes} "
                                   f"classes; start the ladder at {MIN_PER_CLASS * num_classes} or more")
            clipped = min(n, num_rows)
            if clipped < n:
                notes.append(f"rung {n} labels is more than the {num_rows} labelled training rows; clipped to {num_rows}")
            fraction = clipped / num_rows
            budget = {"label_fraction": fraction}
            num_labels = len(stratified_fraction(labels, fraction, seed=0))  # the count does not depend on the seed
        if rungs and num_labels <= rungs[-1]["num_labels"]:
            notes.append(f"rung {n} {unit} draws the same {num_labels} labels as rung {rungs[-1]['requested']}; dropped")
            continue
        rungs.append({"requested": n, "num_labels": num_labels, **budget})
    return rungs, notes


def run_leverage(base: str, out: Path, *, mode: Literal["head", "lora", "finetune"] = "head",
                 ladder: Sequence[int] | None = None, k_shot: bool = False, num_seeds: int = 3,
                 data: str | None = None, epochs: int = 50, patience: int = 5, scratch_lr: float = 1e-3,
                 text_chunks: int = 4, metric: str = "accuracy", keep: bool = False, overwrite: bool = False,
                 runtime: Runtime | None = None, tower: str | None = None) -> dict[str, Any]:
    """Adapts `base` and `random:base` at every rung and seed; writes leverage.json and leverage.png in
    `out` and returns what leverage.json holds (plus `text`, the printed table with its notes). The
    curves compare `metric` (one of METRICS); every run's three test metrics are kept in "runs"."""
    _check_metric(metric)
    if base.startswith("random:"):
        raise SelfsupError(f"{base}: leverage compares a pretrained base with its random twin; give the run itself")
    if num_seeds < 1:
        raise SelfsupError(f"--seeds must be at least 1, got {num_seeds}")
    out = Path(out)
    claim_output(out, "leverage", LEVERAGE_FILES, overwrite=overwrite)
    configs = {"pretrained": AdaptConfig(mode=mode, epochs=epochs, patience=patience, text_chunks=text_chunks),
               "scratch": AdaptConfig(mode="finetune", epochs=epochs, patience=patience, lr=scratch_lr, layer_decay=1.0,
                                      text_chunks=text_chunks)}
    for cfg in configs.values():
        cfg.validate()
    run_cfg, train, rows = _labelled_training(base, data)
    rungs, notes = resolve_ladder(ladder, train.labels[rows], k_shot)
    for note in notes:
        log.warning("leverage: %s", note)
    runtime = runtime or init_runtime("auto", "auto")
    bases = {"pretrained": base, "scratch": f"random:{base}"}
    accuracy: dict[str, list[list[float]]] = {side: [] for side in SIDES}
    runs: list[dict] = []
    _fresh_output(out, "leverage", LEVERAGE_FILES)
    scratch_dir = None if keep else tempfile.TemporaryDirectory(prefix="selfsup-leverage-")
    root = out / "runs" if keep else Path(scratch_dir.name)
    log.info("leverage of %s on %s: %d rungs x %d seeds x 2 sides; %s", base, run_cfg.data.source, len(rungs),
             num_seeds, SCRATCH_NOTE)
    began = time.perf_counter()
    try:
        for i, rung in enumerate(rungs, 1):
            budget = {k: rung[k] for k in ("label_fraction", "k_shot") if k in rung}
            for side in SIDES:
                accuracy[side].append([])
            for seed in range(num_seeds):
                for side in SIDES:
                    cfg = AdaptConfig(**{**asdict(configs[side]), **budget, "seed": seed})
                    task_dir = root / f"{side}-n{rung['num_labels']}-s{seed}"
                    metrics = adapt(bases[side], task_dir, cfg, data=data, runtime=runtime, overwrite=overwrite,
                                    tower=tower)
                    if not keep:
                        shutil.rmtree(task_dir, ignore_errors=True)
                    accuracy[side][-1].append(metrics[METRICS[metric]])
                    runs.append({"side": side, "num_labels": rung["num_labels"], "seed": seed,
                                 **{k: metrics[k] for k in (*METRICS.values(), "val_acc", "epochs", "num_train_labels",
                                                            "num_val", "num_test")},
                                 "dir": str(task_dir) if keep else None})
            shown = "; ".join(f"{side} " + " ".join(f"{a * 100:.1f}" for a in accuracy[side][-1]) + " %" for side in SIDES)
            log.info("leverage rung %d/%d, %d labels: %s", i, len(rungs), rung["num_labels"], shown)
            if i == 1 and len(rungs) > 1:
                took = time.perf_counter() - began
                log.info("leverage: rung 1 took %s; the %d larger rungs will take at least %s more", format_duration(took),
                         len(rungs) - 1, format_duration(took * (len(rungs) - 1)))
    finally:
        if scratch_dir is not None:
            scratch_dir.cleanup()
    counts = [r["num_labels"] for r in rungs]
    if counts[-1] >= len(rows):
        notes.append(f"the ladder's top is every labelled training row ({len(rows)}): "
                     "'more than the ladder holds' means more than the data holds")
    table = leverage_table(counts, accuracy["pretrained"], accuracy["scratch"])
    plot_leverage(table, out / LEVERAGE_PNG, metric)
    header = (f"label leverage of {base} ({mode}) in test {metric.replace('_', ' ')} (%) over "
              f"{'k per class' if k_shot else 'total labels'}, "
              f"{num_seeds} seed(s) per rung, {run_cfg.data.source}\n{SCRATCH_NOTE}")
    result = {
        "base": base, "tower": tower, "data": run_cfg.data.source, "ladder": counts, "rungs": rungs, "notes": notes,
        "metric": metric, "settings": {"mode": mode, "k_shot_ladder": k_shot, "num_seeds": num_seeds, "epochs": epochs,
                     "patience": patience, "scratch_lr": scratch_lr, "scratch_base": bases["scratch"],
                     "scratch_mode": "finetune", "scratch_layer_decay": 1.0, "scratch_note": SCRATCH_NOTE,
                     "pretrained_adapt": asdict(configs["pretrained"]), "scratch_adapt": asdict(configs["scratch"])},
        "table": table, "accuracies": accuracy, "runs": runs,
    }
    write_atomic(out / LEVERAGE_JSON, json.dumps(result, indent=1))
    result["text"] = "\n".join([header, *(f"note: {n}" for n in notes), format_leverage(table)])
    return result


# ---------------------------------------------------------------------------------------------
# Select


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SelfsupError(f"--metric {metric}: choose one of {', '.join(METRICS)}")


def select_sample(labels: torch.Tensor, max_samples: int, seed: int, min_per_class: int = MIN_PER_CLASS,
                  classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[int]]:
    """(sorted indices into `labels` of the rows select embeds, the classes left out of them).

    Every class with at least `min_per_class` rows keeps at least that many: the cross-validated scores
    (knn, linear_cv) need two per class, one to fit and one to score. A class with fewer cannot be
    scored and is left out (the caller says how many). The rest of `max_samples` is shared among the
    classes in proportion to the rows each has beyond its minimum (stratified), each class's rows drawn
    in a seeded order. A `max_samples` below the minimums is an error that says what it must be.
    """
    y = labels.detach().cpu().numpy()
    values, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)

    def name(value: int) -> str:
        return repr(str(classes[value]) if classes is not None and 0 <= value < len(classes) else str(value))

    usable = counts >= min_per_class
    dropped = values[~usable].tolist()
    if int(usable.sum()) < 2:
        have = ("only the class " + name(values[usable][0])) if usable.any() else "no class"
        raise SelfsupError(f"{have} has {min_per_class} or more labelled training rows ({len(dropped)} class(es) have "
                           f"fewer, e.g. {', '.join(name(v) for v in dropped[:5])}): the cross-validated scores "
                           f"need {min_per_class} per class, one to fit and one to score, and ranking needs two classes; "
                           "label more rows of the rare classes, or score with --scores logme alone")
    need = min_per_class * int(usable.sum())
    if max_samples < need:
        raise SelfsupError(f"--max-samples {max_samples} cannot hold {min_per_class} row(s) of each of the "
                           f"{int(usable.sum())} classes that have them; raise --max-samples to at least {need}")
    total = int(counts[usable].sum())
    if max_samples >= total:
        take = np.where(usable, counts, 0)
    else:
        spare = np.where(usable, counts - min_per_class, 0)
        take = np.where(usable, min_per_class + (spare * (max_samples - need)) // max(int(spare.sum()), 1), 0)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(inverse == c))[: int(take[c])] for c in range(len(values))]
    return np.sort(np.concatenate(chosen)).astype(np.int64), dropped


def select_bases(bases: Sequence[str], out: Path, *, data: str | None = None, scores: Sequence[str] = SCORES,
                 budget_s: float | None = 60.0, max_samples: int = 2000, validate: bool = False,
                 mode: Literal["head", "lora", "finetune"] = "head", epochs: int = 50, patience: int = 5,
                 text_chunks: int = 4, metric: str = "accuracy", seed: int = 0, keep: bool = False, overwrite: bool = False,
                 runtime: Runtime | None = None, tower: str | None = None) -> dict[str, Any]:
    """Ranks `bases` by frozen-feature scores on a labelled sample of the data; with `validate`, also
    adapts each and measures how well each score predicted the ranking. Writes `out`/select.json and
    returns its content (plus `text`, what to print)."""
    _check_metric(metric)
    bases = list(bases)
    if not bases:
        raise SelfsupError("--bases: give at least one candidate run directory (or random:RUN)")
    if len(set(bases)) != len(bases):
        raise SelfsupError(f"--bases lists a base twice: {bases}")
    if max_samples < 2:
        raise SelfsupError(f"--max-samples must be at least 2, got {max_samples}")
    out = Path(out)
    claim_output(out, "select", SELECT_FILES, overwrite=overwrite)
    adapt_cfg = AdaptConfig(mode=mode, epochs=epochs, patience=patience, text_chunks=text_chunks, seed=seed)
    adapt_cfg.validate()
    loaded = {name: load_base(name, tower) for name in bases}
    first_of: dict[str, str] = {}
    for name, (_, _, reader) in loaded.items():
        first_of.setdefault(reader.modality, name)
    if len(first_of) > 1:
        shown = ", ".join(f"{name} is {modality}" for modality, name in first_of.items())
        raise SelfsupError(f"the bases must share a modality to be compared on one data set: {shown}")
    modality = next(iter(first_of))
    run_cfg, train, rows = _labelled_training(bases[0], data)
    source = run_cfg.data.source
    # LogME scores any class; the cross-validated scores need two rows of each.
    min_per_class = MIN_PER_CLASS if any(score != "logme" for score in scores) else 1
    picked, dropped = select_sample(train.labels[rows], max_samples, seed, min_per_class, train.classes)
    notes = []
    if dropped:
        num_rows = int(torch.isin(train.labels[rows], torch.tensor(dropped)).sum())
        shown = ", ".join(repr(train.classes[c]) if train.classes else str(c) for c in dropped[:5])
        notes.append(f"{len(dropped)} class(es) with fewer than {min_per_class} labelled training rows left out of the "
                     f"sample ({num_rows} rows: {shown}{', ...' if len(dropped) > 5 else ''}): the cross-validated "
                     "scores need one row to fit and one to score")
        log.warning("select: %s", notes[-1])
    rows = rows[torch.from_numpy(picked)]
    labels = train.labels[rows]
    runtime = runtime or init_runtime("auto", "auto")
    features, embed_seconds = {}, {}
    for name, (encoder, meta, reader) in loaded.items():
        began = time.perf_counter()
        # The pieces `adapt` feeds (a document's first text_chunks blocks): the scores should predict what adapt reaches.
        feats = reader.features(encoder, train, rows, runtime, chunks=adapt_cfg.text_chunks)
        features[name] = feats.numpy()
        embed_seconds[name] = time.perf_counter() - began
        log.info("select: embedded %d rows with %s in %.2f s", len(rows), name, embed_seconds[name])
        if len(embed_seconds) == 1 and len(loaded) > 1:
            log.info("select: about %s to embed the other %d base(s) (more for larger encoders)",
                     format_duration(embed_seconds[name] * (len(loaded) - 1)), len(loaded) - 1)
    ranking = score_bases(features, labels.numpy(), scores=scores, budget_s=budget_s, seed=seed)
    _fresh_output(out, "select", SELECT_FILES)
    lines = [f"{len(bases)} base(s) on {len(rows)} labelled training rows of {source}"
             + (f", budget {budget_s:g} s" if budget_s is not None else ""), *(f"note: {n}" for n in notes),
             format_ranking(ranking)]
    result: dict[str, Any] = {"bases": bases, "tower": tower, "data": source, "modality": modality, "num_samples": len(rows),
                              "num_classes": int(torch.unique(labels).numel()), "dropped_classes": len(dropped),
                              "notes": notes, "scores": list(scores),
                              "budget_s": budget_s, "embed_seconds": embed_seconds, "ranking": ranking}
    if validate:
        result["validation"] = _validate(bases, ranking, adapt_cfg, source, out, keep, overwrite, runtime, metric, tower)
        lines += _format_validation(result["validation"])
    write_atomic(out / SELECT_JSON, json.dumps(result, indent=1))
    result["text"] = "\n".join(lines)
    return result


def _validate(bases: list[str], ranking: list[dict], cfg: AdaptConfig, source: str, out: Path, keep: bool,
              overwrite: bool, runtime: Runtime, metric: str = "accuracy", tower: str | None = None) -> dict[str, Any]:
    """Adapts every base on `source` and returns its test `metric` and each score's Kendall tau against it."""
    accuracy: dict[str, float] = {}
    everything: dict[str, dict[str, float]] = {}
    scratch_dir = None if keep else tempfile.TemporaryDirectory(prefix="selfsup-select-")
    root = out / "adapt" if keep else Path(scratch_dir.name)
    began = time.perf_counter()
    try:
        for i, name in enumerate(bases):
            label = ("random-" if name.startswith(RANDOM_PREFIX) else "") + Path(name.split(":")[-1]).name
            # `source` for every base, not each base's own data: the accuracies must be on the same rows.
            metrics = adapt(name, root / f"{i}-{label}", cfg, data=source, runtime=runtime, overwrite=overwrite,
                            tower=tower)
            accuracy[name] = metrics[METRICS[metric]]
            everything[name] = {k: metrics[k] for k in METRICS.values()}
            log.info("select: %s adapted (%s) to test %s %.4f", name, cfg.mode, metric, accuracy[name])
            if i == 0 and len(bases) > 1:
                log.info("select: about %s to adapt the other %d base(s)",
                         format_duration((time.perf_counter() - began) * (len(bases) - 1)), len(bases) - 1)
    finally:
        if scratch_dir is not None:
            scratch_dir.cleanup()
    taus = score_accuracy_tau(ranking, accuracy)
    undefined = {s: "a score or the accuracies are all equal: no order to compare" for s, t in taus.items()
                 if t is not None and math.isnan(t)}
    too_few = (TWO_BASES if len(bases) == 2 else "one base has no order to compare") if len(bases) < MIN_TAU_BASES \
        else f"computed for fewer than {MIN_TAU_BASES} bases (budget)"
    undefined.update({s: too_few for s, t in taus.items() if t is None})
    # Every metric's tau, whichever one was chosen: the scores estimate plain accuracy, and on imbalanced
    # classes their order can agree with accuracy and not with balanced accuracy (man pages: +1.0 vs -0.2).
    tau_by_metric = {}
    for name, key in METRICS.items():
        taus_m = score_accuracy_tau(ranking, {b: m[key] for b, m in everything.items()})
        tau_by_metric[name] = {s: None if t is None or math.isnan(t) else t for s, t in taus_m.items()}
    return {"mode": cfg.mode, "adapt": asdict(cfg), "metric": metric, "accuracy": accuracy, "test_metrics": everything,
            "tau_by_metric": tau_by_metric,
            "tau": {s: None if t is None or math.isnan(t) else t for s, t in taus.items()}, "tau_undefined": undefined}


def _format_validation(validation: dict[str, Any]) -> list[str]:
    width = max(len(name) for name in validation["accuracy"])
    metric = validation.get("metric", "accuracy").replace("_", " ")
    lines = [f"adapted ({validation['mode']}) test {metric}:"]
    lines += [f"  {name.ljust(width)}  {acc * 100:.1f} %" for name, acc in validation["accuracy"].items()]
    if len(validation["accuracy"]) < MIN_TAU_BASES:
        reason = TWO_BASES if len(validation["accuracy"]) == 2 else "one base has no order to compare"
        return lines + [f"Kendall tau: not computed; {reason}"]
    taus = [f"{s} {'n/a' if t is None else f'{t:+.2f}'}" for s, t in validation["tau"].items()]
    lines.append(f"Kendall tau, score vs {metric} (1 = same order as adaptation): " + ", ".join(taus))
    lines += [f"  {s}: {why}" for s, why in validation["tau_undefined"].items()]
    for name, taus_m in validation.get("tau_by_metric", {}).items():
        if name != validation.get("metric", "accuracy"):
            shown = ", ".join(f"{s} {'n/a' if t is None else f'{t:+.2f}'}" for s, t in taus_m.items())
            lines.append(f"  (against test {name.replace('_', ' ')}: {shown})")
    return lines
