"""Representation diagnostics: label-free and label-aware statistics of any encoder's embeddings.

They describe the geometry of a set of embeddings [N, D] of any encoder on any dataset, without
training anything (except the group probe):

- **alignment** and **uniformity** (Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", arXiv:2005.10242), on
  L2-normalised embeddings: alignment E ||f(x) - f(y)||^alpha over positive pairs (0 when the
  two views map to the same point), uniformity log E exp(-t ||f(x) - f(y)||^2) over distinct
  pairs (0 when every embedding is the same point, about -4 for t = 2 when spread uniformly over
  a high-dimensional sphere). Lower is better for both; they trade off.
- **effective rank** of the embedding covariance (Roy & Vetterli 2007; RankMe, Garrido et al.
  2023), the training-time collapse statistic of `selfsup.nn.diagnostics`: how many directions
  the embeddings really use. With the normalised std, it decides whether the representation is
  called **collapsed** (the training-time thresholds, `collapse_warning`), which the summary says
  first, as the other statistics of a collapsed representation mean little.
- **kNN label agreement**: the fraction of each point's k nearest (cosine) neighbours sharing its
  label; it says whether labels are local in the space, which is what kNN and linear probes need.
- **group predictability**: cross-validated balanced accuracy of a logistic regression predicting
  a group attribute (site, device, sex, ...) from the embedding, next to chance. High means the
  attribute is linearly readable, so a head trained on top can pick it up: a bias indicator,
  not proof of a biased prediction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import SelfsupError
from selfsup.nn.diagnostics import collapse_warning, embedding_diagnostics

# Pairwise distances over this many rows take ~100 MB in float64 (N(N-1)/2 values); the
# uniformity estimate over 5000 random rows (12.5 M pairs) has a standard error far below the
# differences between encoders.
UNIFORMITY_MAX_ROWS = 5000
# Rows of the cosine-similarity matrix computed at once by the kNN agreement: bounds memory to
# CHUNK x N floats however large N is.
KNN_CHUNK = 1024
# The name small groups are merged under by `group_predictability`.
OTHER = "(other)"


def _as_matrix(z: object, name: str = "embeddings", min_rows: int = 2) -> Tensor:
    """A validated float64 [N, D] tensor from numpy or torch input."""
    if isinstance(z, Tensor):  # bf16/fp16 have no numpy dtype: widen first
        z = z.detach().cpu()
        a = (z.double() if z.is_floating_point() else z).numpy()
    else:
        a = np.asarray(z)
    if a.ndim != 2:
        raise SelfsupError(f"{name} must be a [N, D] matrix (one pooled vector per example), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise SelfsupError(f"{name} must be real numbers, got dtype {a.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    N, D = t.shape
    if D == 0:
        raise SelfsupError(f"{name} have no columns (D=0): the encoder produced empty embeddings")
    if N < min_rows:
        raise SelfsupError(f"{name} have {N} row(s); this statistic needs at least {min_rows}")
    if not torch.isfinite(t).all():
        num_bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise SelfsupError(
            f"{name} hold NaN or infinite values in {num_bad} of {N} rows: the encoder diverged; re-extract them"
        )
    return t


def _as_labels(labels: object, num_rows: int, name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(class values, [N] integer codes) of a per-row label sequence of any hashable type."""
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise SelfsupError(f"{name} must be one value per example (1-D), got shape {y.shape}")
    if len(y) != num_rows:
        raise SelfsupError(f"{name} has {len(y)} values for {num_rows} embedding rows: give one per example")
    values, codes = np.unique(y, return_inverse=True)
    return values, codes


def alignment(z_a: np.ndarray, z_b: np.ndarray, alpha: float = 2.0) -> float:
    """E ||f(x) - f(y)||_2^alpha over positive pairs (row i of z_a with row i of z_b), L2-normalised.

    Wang & Isola 2020, eq. 2 (their default alpha = 2). Between 0 (pairs coincide) and 2^alpha.
    """
    a = _as_matrix(z_a, "z_a", min_rows=1)
    b = _as_matrix(z_b, "z_b", min_rows=1)
    if a.shape != b.shape:
        raise SelfsupError(
            f"positive pairs need embeddings of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}: "
            "row i of one view must pair with row i of the other"
        )
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise SelfsupError(f"alignment alpha must be a positive number, got {alpha!r}")
    distance = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1)  # [N]
    return float(distance.pow(alpha).mean())


def uniformity(z: np.ndarray, t: float = 2.0, max_rows: int = UNIFORMITY_MAX_ROWS, seed: int = 0) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs of L2-normalised embeddings.

    Wang & Isola 2020, eq. 3 (their default t = 2). 0 (its maximum) when all embeddings coincide,
    negative otherwise. Above `max_rows` rows a seeded random subset of that many rows is used
    (the pair count, and memory, grows as N^2). Computed as a log-sum-exp for stability.
    """
    x = _as_matrix(z, "embeddings")
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
        raise SelfsupError(f"uniformity t must be a positive number, got {t!r}")
    if isinstance(max_rows, bool) or max_rows < 2:
        raise SelfsupError(f"uniformity max_rows must be an integer >= 2, got {max_rows!r}")
    N = x.shape[0]
    if N > max_rows:
        rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:max_rows]
        x = x[rows]
    sq = torch.pdist(F.normalize(x, dim=1)).pow(2)  # [M (M - 1) / 2], each unordered pair once
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(len(sq)))


def effective_rank(z: np.ndarray) -> float:
    """exp(entropy of the normalised covariance spectrum) of the L2-normalised embeddings.

    The same statistic as the training-time `embed_erank` (`selfsup.nn.diagnostics`), so a value
    here compares with the training log: between 1 (one direction) and min(N, D).
    """
    x = _as_matrix(z, "embeddings")
    return float(embedding_diagnostics(x)["embed_erank"])


def knn_label_agreement(z: np.ndarray, labels: Sequence, k: int = 10) -> float:
    """Mean over points of the fraction of its k nearest cosine neighbours (itself excluded) sharing its label.

    1 when every neighbourhood is pure; about sum_c p_c^2 (1/num_classes for balanced classes)
    when labels are unrelated to the embedding (`knn_chance_agreement`). Ties in similarity are
    broken by torch.topk.
    """
    x = _as_matrix(z, "embeddings")
    N = x.shape[0]
    _, y = _as_labels(labels, N)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SelfsupError(f"k (neighbours) must be a positive integer, got {k!r}")
    if k >= N:
        raise SelfsupError(f"k = {k} neighbours needs more than {k} examples, got {N}: lower k")
    x = F.normalize(x, dim=1)
    codes = torch.from_numpy(y)
    total = 0.0
    for start in range(0, N, KNN_CHUNK):
        stop = min(start + KNN_CHUNK, N)
        sim = x[start:stop] @ x.T  # [chunk, N]
        sim[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # never its own neighbour
        neighbours = sim.topk(k, dim=1).indices  # [chunk, k]
        total += float((codes[neighbours] == codes[start:stop, None]).double().mean(dim=1).sum())
    return total / N


def knn_chance_agreement(labels: Sequence) -> float:
    """Expected kNN label agreement when neighbours are random other points: sum_c n_c (n_c - 1) / (N (N - 1))."""
    _, y = _as_labels(labels, len(labels))
    counts = np.bincount(y).astype(np.float64)
    N = counts.sum()
    if N < 2:
        raise SelfsupError(f"chance agreement needs at least 2 labelled examples, got {int(N)}")
    return float((counts * (counts - 1)).sum() / (N * (N - 1)))


def _prepare_groups(
    groups: object, num_rows: int, folds: int
) -> tuple[np.ndarray, list[str], list[str], np.ndarray, str | None]:
    """(kept row mask, group names, merged names, [kept] codes, reason it cannot be probed or None).

    Each fold must hold every group in its training part, so a group with fewer than `folds`
    members cannot be probed on its own: all such groups are merged into "(other)". If that merged
    group is itself smaller than `folds`, its rows are dropped. The probe needs two groups left.
    """
    values, codes = _as_labels(groups, num_rows, name="groups")
    names = [str(v) for v in values]
    counts = np.bincount(codes, minlength=len(values))
    small = counts < folds
    merged = [names[i] for i in np.flatnonzero(small)]
    keep_names = [names[i] for i in np.flatnonzero(~small)]
    remap = np.full(len(values), -1)
    remap[~small] = np.arange(int((~small).sum()))
    if merged and counts[small].sum() >= folds:
        remap[small] = len(keep_names)
        keep_names.append(OTHER)
    new = remap[codes]
    kept = new >= 0
    reason = None
    if len(keep_names) < 2:
        reason = (
            f"fewer than 2 groups with at least {folds} members ({len(values)} group(s) in all): "
            "nothing to tell apart; collect more examples of the rare groups or lower folds"
        )
    return kept, keep_names, merged, new[kept], reason


def group_predictability(z: np.ndarray, groups: Sequence, folds: int = 5, seed: int = 0) -> dict:
    """How well a group attribute is predicted from the embedding: a bias indicator.

    A standardised, L2-regularised (C = 1) logistic regression is fitted in stratified k-fold
    cross-validation (shuffled with `seed`); the held-out predictions of all folds are pooled and
    scored by balanced accuracy (mean per-group recall), whose chance level is 1 / num_groups
    whatever the group sizes. Groups with fewer than `folds` members are merged into "(other)";
    if "(other)" would still be smaller than `folds`, those rows are left out (both listed in
    "note").

    Returns ``{"balanced_accuracy", "chance", "num_groups", "folds", "num_rows", "merged",
    "num_dropped", "note"}``; raises SelfsupError when fewer than two groups can be probed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _as_matrix(z, "embeddings")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise SelfsupError(f"folds must be an integer >= 2, got {folds!r}")
    kept, names, merged, y, reason = _prepare_groups(groups, x.shape[0], folds)
    if reason is not None:
        raise SelfsupError(f"group predictability: {reason}")
    features = x[torch.from_numpy(kept)].numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, features, y, cv=splitter)
    num_dropped = int((~kept).sum())
    notes = []
    if merged:
        notes.append(f"groups with fewer than {folds} members {'dropped' if num_dropped else 'merged into ' + OTHER}: "
                     + ", ".join(merged))
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "chance": 1.0 / len(names),
        "num_groups": len(names),
        "folds": int(folds),
        "num_rows": int(kept.sum()),
        "merged": merged,
        "num_dropped": num_dropped,
        "note": "; ".join(notes) or None,
    }


def _pair_embeddings(z: Tensor, pairs: tuple) -> tuple[Tensor, Tensor]:
    """Positive pairs as two [P, D] matrices: from two index arrays into z, or given as embeddings."""
    if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
        raise SelfsupError("pairs must be a tuple (a, b): two index arrays into z, or two [P, D] embedding matrices")
    a, b = (p.detach().cpu().numpy() if isinstance(p, Tensor) else np.asarray(p) for p in pairs)
    if a.ndim == 1 and b.ndim == 1:
        if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
            raise SelfsupError(f"1-D pairs must be integer row indices into z, got dtypes {a.dtype} and {b.dtype}")
        N = z.shape[0]
        if len(a) != len(b) or len(a) == 0:
            raise SelfsupError(f"pair index arrays must be equally long and non-empty, got {len(a)} and {len(b)}")
        if min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= N:
            raise SelfsupError(f"pair indices must be row numbers in [0, {N}), got values outside that range")
        return z[torch.from_numpy(a)], z[torch.from_numpy(b)]
    return _as_matrix(a, "pairs[0]", min_rows=1), _as_matrix(b, "pairs[1]", min_rows=1)


def representation_diagnostics(
    z: np.ndarray,
    labels: Sequence | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    k: int = 10,
    seed: int = 0,
    folds: int = 5,
) -> dict:
    """Every diagnostic the inputs allow, as plain floats (JSON-serialisable).

    Always: uniformity, effective rank and the normalised std (the training-time collapse
    statistics), and "collapse": the training-time warning when they say the embeddings have
    collapsed (normalised std far below 1, or one direction holding the variance), else None. With `pairs` (two index arrays into z, or two [P, D] matrices of the two views'
    embeddings): alignment. With `labels`: kNN label agreement and its chance level. With
    `groups` ({attribute: one value per row}): group predictability per attribute; an attribute
    with fewer than two probe-able groups gets {"skipped": reason} instead of failing the rest.
    """
    x = _as_matrix(z, "embeddings")
    N, D = x.shape
    collapse = embedding_diagnostics(x)
    result: dict = {
        "num_rows": N,
        "dim": D,
        "uniformity": uniformity(x, seed=seed),
        "effective_rank": float(collapse["embed_erank"]),
        "normalised_std": float(collapse["embed_std"]),
    }
    result["collapse"] = collapse_warning({"embed_std": result["normalised_std"],
                                           "embed_erank": result["effective_rank"]})
    if pairs is not None:
        a, b = _pair_embeddings(x, pairs)
        result["alignment"] = alignment(a, b)
        result["num_pairs"] = int(a.shape[0])
    if labels is not None:
        result["knn_label_agreement"] = knn_label_agreement(x, labels, k=k)
        result["knn_chance_agreement"] = knn_chance_agreement(labels)
        result["k"] = int(k)
    if groups is not None:
        result["groups"] = {}
        for attribute, values in groups.items():
            _, _, _, _, reason = _prepare_groups(values, N, folds)
            if reason is not None:
                result["groups"][attribute] = {"skipped": reason}
            else:
                result["groups"][attribute] = group_predictability(x, values, folds=folds, seed=seed)
    return result


def format_diagnostics(d: dict) -> str:
    """Plain-text summary of `representation_diagnostics`, one statistic a line with how to read it."""
    lines = [f"{d['num_rows']} embeddings of dimension {d['dim']}"]
    if d.get("collapse"):
        lines.append(f"COLLAPSED: {d['collapse']}; the statistics below, and any probe or audit of these "
                     "features, say little")
    lines += [
        f"uniformity      {d['uniformity']:.3f}  (0 = collapsed, lower = more spread)",
        f"effective rank  {d['effective_rank']:.1f}  (of at most {min(d['num_rows'], d['dim'])})",
        f"normalised std  {d['normalised_std']:.3f}  (~1 spread over the sphere, 0 collapsed)",
    ]
    if "alignment" in d:
        lines.append(f"alignment       {d['alignment']:.3f}  over {d['num_pairs']} positive pairs (0 = views coincide)")
    if "knn_label_agreement" in d:
        lines.append(
            f"kNN agreement   {d['knn_label_agreement']:.3f}  (k={d['k']}; chance "
            f"{d['knn_chance_agreement']:.3f}, 1 = pure neighbourhoods)"
        )
    for attribute, g in d.get("groups", {}).items():
        if "skipped" in g:
            lines.append(f"group '{attribute}': skipped, {g['skipped']}")
            continue
        lines.append(
            f"group '{attribute}': balanced accuracy {g['balanced_accuracy']:.3f} vs chance {g['chance']:.3f} "
            f"({g['num_groups']} groups, {g['folds']}-fold) — high means the embedding encodes it"
        )
        if g["note"]:
            lines.append(f"  note: {g['note']}")
    return "\n".join(lines)
