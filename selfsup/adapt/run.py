"""The task run directory: `adapt` writes it, `predict` reads it (see `adapt/task.py` for the training)."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

from selfsup.adapt.bases import base_splits, load_base, rebuild_encoder
from selfsup.adapt.sampling import require_two_classes
from selfsup.adapt.task import (ADAPTER_WEIGHTS, METRICS, TASK_META, TASK_WEIGHTS, AdaptConfig, TaskModel,
                                budget_rows, build_task_model, fit_linear_head, label_budget, predict_logits,
                                test_metrics, train_task)
from selfsup.data.split import labelled_rows
from selfsup.errors import SelfsupError
from selfsup.files import build_dir, claim_output, names_in, write_atomic, write_with
from selfsup.modalities import Reader, load_reader, run_modality
from selfsup.modalities.base import TaskInputs
from selfsup.modalities.text import TOKENIZER_FILE
from selfsup.train.runtime import Runtime, init_runtime

log = logging.getLogger("selfsup")

# Everything a task folder may hold: adapt's files, then predict's, evaluate's and report's.
TASK_FILES = names_in(TASK_WEIGHTS, ADAPTER_WEIGHTS, TASK_META, METRICS, TOKENIZER_FILE, "predictions.csv", "evaluation",
                      "report.html", "report.png", "MODEL_CARD.md")


def adapt(base: str, out: Path, cfg: AdaptConfig, *, data: str | None = None, runtime: Runtime | None = None,
          overwrite: bool = False, tower: str | None = None) -> dict[str, Any]:
    """Trains a classifier from `base` on the labelled training rows of the base run's data (or `data`),
    scores it on the held-out rows, and writes the task run directory `out`. Returns the metrics."""
    out = Path(out)
    claim_output(out, "task", TASK_FILES, overwrite=overwrite)  # checked now, replaced whole once trained
    runtime = runtime or init_runtime("auto", "auto")
    run_cfg, train, holdout = base_splits(base, data)
    encoder, meta, reader = load_base(base, tower)
    train_rows, test_rows = labelled_rows(train, "training"), labelled_rows(holdout, "held-out")
    require_two_classes(train.labels[train_rows], train.classes, train.source)
    if cfg.fits_probe():  # the linear probe's fit on every budget label: C by cross-validation, no validation tenth
        fit_idx, val_idx = budget_rows(train.labels[train_rows], cfg), None
    else:
        fit_idx, val_idx = label_budget(train.labels[train_rows], cfg)
        if len(val_idx) == 0:
            raise SelfsupError("the label budget leaves no validation example; raise --label-fraction or --k-shot")
    num_classes = len(train.classes or []) or int(train.labels.max()) + 1
    model = build_task_model(encoder, num_classes, cfg)
    splits = [("train", train, train_rows[fit_idx]), ("test", holdout, test_rows)]
    if val_idx is not None:
        splits.append(("val", train, train_rows[val_idx]))
    parts = {name: reader.task_inputs(split, rows, cfg.text_chunks) for name, split, rows in splits}
    num_val = len(parts["val"]) if "val" in parts else 0
    log.info("adapt %s from %s: %d training labels, %d validation, %d test rows, %d classes",
             cfg.mode, base, len(parts["train"]), num_val, len(parts["test"]), num_classes)
    if val_idx is None:
        history = fit_linear_head(model, parts["train"], parts["train"].labels, cfg, runtime)
        best, validation = history[0], ("3-fold cross-validation on the training labels" if history[0]["val_acc"]
                                         is not None else "none: a class has fewer than 3 labels to cross-validate C")
    else:
        history = train_task(model, parts["train"], parts["train"].labels, parts["val"], parts["val"].labels, cfg,
                             runtime)
        best, validation = min(history, key=lambda h: h["val_loss"]), f"early stopping on {num_val} labels"
    test_logits = predict_logits(model, parts["test"], runtime)
    metrics = {**test_metrics(test_logits.argmax(1), parts["test"].labels),
               "val_acc": best["val_acc"], "validation": validation, "epochs": len(history),
               "num_train_labels": len(parts["train"]), "num_val": num_val, "num_test": len(parts["test"]),
               "history": history}
    _save(out, model, cfg, base, tower, meta, reader, train.classes, run_cfg.data.source, metrics)
    return metrics


def _save(out: Path, model: TaskModel, cfg: AdaptConfig, base: str, tower: str | None, meta: dict, reader: Reader,
          classes: list[str] | None, source: str, metrics: dict) -> None:
    """Builds the task folder beside `out` and swaps it in: `out` is one whole task, old or new."""
    build_dir(out, "task", lambda built: _write_task(built, model, cfg, base, tower, meta, reader, classes, source,
                                                     metrics), "task")


def _write_task(out: Path, model: TaskModel, cfg: AdaptConfig, base: str, tower: str | None, meta: dict,
                reader: Reader, classes: list[str] | None, source: str, metrics: dict) -> None:
    if cfg.mode == "lora":
        from selfsup.adapt.lora import lora_state_dict, merge_lora

        adapter = {**lora_state_dict(model.encoder), **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
        write_with(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
        merge_lora(model.encoder)  # the task model itself needs no adapter code
    write_with(out / TASK_WEIGHTS, lambda tmp: save_model(model.cpu(), str(tmp)))
    preprocess = reader.save(out)  # the files the encoder reads with (a tokenizer), beside the task
    task = {"base": base, "tower": tower, "encoder": meta["encoder"], "preprocess": preprocess, "adapt": asdict(cfg),
            "classes": classes, "data": source, "num_params": sum(p.numel() for p in model.encoder.parameters())}
    write_atomic(out / TASK_META, json.dumps(task, indent=1))
    write_atomic(out / METRICS, json.dumps(metrics, indent=1))


def load_task(task_dir: Path) -> tuple[TaskModel, dict[str, Any], Reader]:
    task_dir = Path(task_dir)
    for name in (TASK_META, TASK_WEIGHTS):
        if not (task_dir / name).is_file():
            raise SelfsupError(f"{task_dir / name}: not found; is {task_dir} a `selfsup adapt` output?")
    try:
        task = json.loads((task_dir / TASK_META).read_text())
        encoder = rebuild_encoder(task["encoder"])
        model = TaskModel(encoder, len(task["classes"]), task["adapt"]["head"])
    except (ValueError, KeyError, TypeError) as err:
        raise SelfsupError(f"{task_dir / TASK_META}: not a valid task description ({err})") from None
    try:
        load_model(model, str(task_dir / TASK_WEIGHTS))
    except Exception as err:  # safetensors' own error types for truncated or mismatched files
        raise SelfsupError(f"{task_dir / TASK_WEIGHTS}: cannot load the task weights ({err})") from None
    return model.eval(), task, load_reader(task, task_dir, str(task_dir / TASK_META))


def task_split(task: dict[str, Any], reader: Reader, data: str | None = None) -> tuple[Any, TaskInputs]:
    """The rows a task model is scored on: its base's held-out rows, or every row of `data`."""
    run_cfg, train, holdout = base_splits(task["base"], data or task["data"])
    split = holdout if data is None else run_modality(run_cfg).join(train, holdout)
    return split, reader.task_inputs(split, torch.arange(len(split)), task["adapt"].get("text_chunks", 1))


def write_predictions(path: Path, split: Any, probs: torch.Tensor, classes: list[str]) -> Path:
    """The predictions CSV: id, label ("" when unknown), prediction, confidence, group columns, p_<class>."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        groups = list(split.groups)
        writer.writerow(["id", "label", "prediction", "confidence", *groups, *(f"p_{c}" for c in classes)])
        for i in range(len(split)):
            label = "" if split.labels is None or split.labels[i] < 0 else split.classes[int(split.labels[i])]
            best = int(probs[i].argmax())
            writer.writerow([split.ids[i], label, classes[best], f"{float(probs[i, best]):.6f}",
                             *(split.groups[g][i] for g in groups), *(f"{float(p):.6f}" for p in probs[i])])
    os.replace(tmp, path)
    return path


def predict(task_dir: Path, out: Path, *, data: str | None = None, runtime: Runtime | None = None) -> Path:
    """Writes predictions (id, label when known, prediction, confidence, per-class probabilities, group
    columns) for the held-out rows of the task's data, or every row of `data`, as CSV."""
    model, task, reader = load_task(task_dir)
    runtime = runtime or init_runtime("auto", "auto")
    split, inputs = task_split(task, reader, data)
    probs = predict_logits(model.to(runtime.device), inputs, runtime).softmax(dim=1)
    write_predictions(out, split, probs, task["classes"])
    log.info("wrote %d predictions to %s", len(split), out)
    return Path(out)
