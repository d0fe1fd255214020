"""`selfsup evaluate`: where an adapted model fails — subgroups, unlabelled slices, and its representation.

One pass of the task model over the rows it is scored on (its base's held-out rows, or every row of
`--data`) gives the predictions and the pooled encoder features (the adapted encoder's, for lora and
finetune). From them:
- the subgroup audit (`evaluate/subgroups.py`): accuracy, macro-F1 and ECE overall and per value of
  each group column (and pairs of columns), with bootstrap intervals and Holm-corrected tests;
- slice discovery (`evaluate/slices.py`): k-means clusters of the features whose error rate is
  significantly above the rest's — failures nobody labelled a group for;
- representation diagnostics (`evaluate/representation.py`): alignment (positive pairs: two random
  crops of one image, scale 0.5-1; for text, a document's first two blocks), uniformity, effective
  rank, kNN label agreement, and how well each group column can be predicted from the features;
- a 2-D map of the features (UMAP when `umap-learn` is installed, else t-SNE, on at most
  `MAP_MAX_ROWS` rows) for the report.

Everything lands in `TASK/evaluation/`: `evaluation.json`, `predictions.csv`, `embeddings.safetensors`
(features, map coordinates and row indices) and, for images, `slice-<k>.png` thumbnails of each slice.
An existing predictions CSV can be audited alone (`evaluate_predictions`): slices and diagnostics
need the features, so they are skipped with a note.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from selfsup.adapt.run import load_task, task_split, write_predictions
from selfsup.adapt.sampling import require_two_classes
from selfsup.adapt.task import TASK_META
from selfsup.adapt.task import features_and_logits
from selfsup.errors import SelfsupError
from selfsup.files import check_owned, mark, names_in, swap_dir, temp_dir, write_atomic, write_with
from selfsup.evaluate.representation import format_diagnostics, representation_diagnostics
from selfsup.evaluate.slices import discover_slices, format_slices
from selfsup.evaluate.predictions import read_predictions
from selfsup.evaluate.subgroups import MISSING, format_subgroups, subgroup_report
from selfsup.train.runtime import Runtime, init_runtime

log = logging.getLogger("selfsup")

EVAL_DIR, EVAL_JSON, EMBEDDINGS, PREDICTIONS = "evaluation", "evaluation.json", "embeddings.safetensors", "predictions.csv"


def EVAL_FILES(name: str) -> bool:  # noqa: N802 (a predicate standing for a list of names)
    """What an evaluation folder holds: its files and the slice thumbnails."""
    return names_in(EVAL_JSON, EMBEDDINGS, PREDICTIONS)(name) or (name.startswith("slice-") and name.endswith(".png"))
MAP_MAX_ROWS = 2000  # t-SNE is quadratic; a map of 2,000 points shows the structure
PAIRS_MAX_ROWS = 1000
_THUMBNAILS = 8


def evaluate_predictions(predictions: Path, *, group_columns: Sequence[str] | None = None,
                         pairs: Sequence[tuple[str, str]] = (), min_n: int = 30, num_bootstrap: int = 1000,
                         alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """The subgroup audit of a predictions CSV (`selfsup predict`'s format) on its labelled rows."""
    pred = read_predictions(Path(predictions))  # every group column: a pair may name one outside --groups
    if pred.probs is not None:  # the p_ columns are the classes the model was trained on
        require_two_classes(np.arange(len(pred.classes)), pred.classes, f"{predictions} (its p_ columns)")
    if not pred.groups:
        log.warning("%s: no group columns (columns between `confidence` and the p_ columns), so only overall "
                    "figures; sources with groups: emoji (skin_tone, subgroup), glyphs (family), manpages (package), "
                    "or a manifest's group columns", predictions)
    return subgroup_report(pred, group_columns, pairs=pairs, min_n=min_n, num_bootstrap=num_bootstrap,
                           alpha=alpha, seed=seed)


def evaluate_task(task_dir: Path, *, data: str | None = None, group_columns: Sequence[str] | None = None,
                  pairs: Sequence[tuple[str, str]] = (), min_n: int = 30, num_bootstrap: int = 1000,
                  alpha: float = 0.05, slices: bool = True, num_clusters: int | None = None,
                  seed: int = 0, runtime: Runtime | None = None) -> dict[str, Any]:
    """Runs the whole audit of a `selfsup adapt` output (module docstring); returns evaluation.json's
    content plus "text" (what to print)."""
    task_dir = Path(task_dir)
    began = time.perf_counter()
    model, task, reader = load_task(task_dir)
    require_two_classes(np.arange(len(task["classes"] or [])), task["classes"], str(task_dir / TASK_META))
    runtime = runtime or init_runtime("auto", "auto")
    model.to(runtime.device)
    split, inputs = task_split(task, reader, data)
    _check_group_columns(split, group_columns, pairs)
    rows_evaluated = "held-out rows" if data is None else f"every row of {data} (training rows included)"
    if split.labels is None or not bool((split.labels >= 0).any()):
        raise SelfsupError(f"{task_dir}: the rows to evaluate ({rows_evaluated}) carry no labels; evaluate on "
                           "labelled data (--data SOURCE with a label column)")
    if data is not None and data == task["data"]:
        log.warning("--data %s is the task's own data: its training and validation rows are scored too", data)
    features, logits = features_and_logits(model, inputs, runtime)
    # The data's label indices follow its own class list; the model's follow the task's: match by name.
    to_task = {name: i for i, name in enumerate(task["classes"])}
    labelled = torch.nonzero(split.labels >= 0).flatten()
    y = torch.tensor([to_task.get(split.classes[int(split.labels[i])], -1) for i in labelled.tolist()], dtype=torch.long)
    z = features[labelled]
    correct = (logits[labelled].argmax(dim=1) == y).numpy()  # a class the task never learnt is always wrong
    ids = [split.ids[i] for i in labelled.tolist()]
    groups = {name: [values[i] or MISSING for i in labelled.tolist()] for name, values in split.groups.items()
              if group_columns is None or name in group_columns}
    out = task_dir / EVAL_DIR
    if out.is_dir():  # checked before the work: a previous evaluation is replaced only if it is all ours
        check_owned(out, "evaluation", EVAL_FILES, flag="a new evaluation", require_marker=False)
    tmp = temp_dir(task_dir, f".{EVAL_DIR}-")
    try:
        write_predictions(tmp / PREDICTIONS, split, logits.softmax(dim=1), task["classes"])
        subgroups = evaluate_predictions(tmp / PREDICTIONS, group_columns=group_columns, pairs=pairs, min_n=min_n,
                                         num_bootstrap=num_bootstrap, alpha=alpha, seed=seed)
        subgroups["source"] = str(out / PREDICTIONS)  # where it will be once the folder is moved into place
        subgroups["rows"] = rows_evaluated
        result: dict[str, Any] = {"task": str(task_dir), "base": task["base"], "data": data or task["data"],
                                  "rows": rows_evaluated, "num_rows": len(split), "num_labelled": len(labelled),
                                  "subgroups": subgroups}
        lines = [format_subgroups(subgroups)]
        if slices:
            found = discover_slices(z.numpy(), correct, ids, num_clusters=num_clusters, alpha=alpha, seed=seed)
            _describe_slices(found, reader, split, labelled, tmp)
            result["slices"] = found
            lines.append(format_slices(found))
        # Two views of the same items, as the modality makes them (two crops, a document's first two blocks).
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        pair_rows = labelled[torch.randperm(len(labelled), generator=generator)[:PAIRS_MAX_ROWS]]
        pairs = reader.positive_pairs(model.encoder, split, inputs, pair_rows, runtime, generator)
        k = min(10, len(labelled) - 1)
        diagnostics = representation_diagnostics(z.numpy(), labels=y.numpy() if k >= 1 else None,
                                                 groups=groups or None, k=max(k, 1),
                                                 pairs=None if pairs.first is None else (pairs.first.numpy(),
                                                                                         pairs.second.numpy()),
                                                 seed=seed)
        diagnostics["pairs"] = pairs.description
        result["diagnostics"] = diagnostics
        lines.append(format_diagnostics(diagnostics))
        coords, shown, method = embedding_map(z, seed)
        result["map"] = {"method": method, "num_rows": len(shown)}
        arrays = {"features": z.contiguous(), "labels": y.contiguous(), "rows": labelled.contiguous(),
                  "map": coords.contiguous(), "map_rows": shown.contiguous()}
        write_with(tmp / EMBEDDINGS, lambda path: save_file(arrays, str(path)))  # safetensors alone writes 0600
        result["seconds"] = time.perf_counter() - began
        write_atomic(tmp / EVAL_JSON, json.dumps(result, indent=1))
        mark(tmp, "evaluation")
        swap_dir(tmp, out)  # the old evaluation is moved aside first, so a crash leaves one complete folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("evaluation of %s written to %s in %.1f s", task_dir, out, result["seconds"])
    result["text"] = "\n\n".join(lines)
    return result


def _check_group_columns(split: Any, group_columns: Sequence[str] | None, pairs: Sequence[tuple[str, str]]) -> None:
    """Every column --groups and --pairs name is one of the evaluated data's group columns; checked before the
    model runs, so the error names the data (the predictions file it would name is a temporary one)."""
    asked = [("--groups", name, name) for name in group_columns or ()]
    asked += [("--pairs", ":".join(pair), column) for pair in pairs if len(pair) == 2 for column in pair]
    for flag, shown, column in asked:
        if column not in split.groups:
            raise SelfsupError(f"{flag} {shown}: the evaluated data ({split.source}) has no group column {column!r}; its "
                               f"group columns are: {', '.join(split.groups) or '(none)'} (a manifest's are those "
                               "data.group_columns named when the base was pretrained, else 'group')")


def _describe_slices(found: dict[str, Any], reader: Any, split: Any, labelled: Tensor, out: Path) -> None:
    """Adds what a person needs to recognise each slice, as the modality shows an example: a
    thumbnail grid (written beside the evaluation) or opening words."""
    for s in found["slices"]:
        rows = labelled[torch.tensor(s["member_indices"][:_THUMBNAILS], dtype=torch.long)]
        shown = reader.examples(split, rows)
        if "thumbnail" in shown:
            name = f"slice-{s['cluster']}.png"
            shown.pop("thumbnail").save(out / name)
            s["thumbnails"] = name
        s.update(shown)


def embedding_map(z: Tensor, seed: int) -> tuple[Tensor, Tensor, str]:
    """(2-D coordinates [M, 2], the rows of z they belong to [M], "umap" | "tsne") for at most MAP_MAX_ROWS rows."""
    generator = torch.Generator().manual_seed(seed)
    shown = torch.randperm(len(z), generator=generator)[:MAP_MAX_ROWS].sort().values
    x = torch.nn.functional.normalize(z[shown].float(), dim=1).numpy()
    if len(x) < 5:
        return torch.zeros(len(x), 2), shown, "none"
    try:
        import umap  # optional: `pip install umap-learn`

        coords, method = umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "umap"
    except ImportError:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        if x.shape[1] > 50 and len(x) > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30, (len(x) - 1) / 3))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        method = "tsne"
    return torch.from_numpy(np.asarray(coords, dtype=np.float32)), shown, method
