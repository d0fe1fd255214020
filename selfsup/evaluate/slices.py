"""Slice discovery: find under-performing groups of examples that nobody labelled as a group.

Subgroup evaluation (`subgroups.py`) can only check the groups someone thought to annotate. A
model also fails on coherent slices nobody named (night photos, a rare accent, a scanner's
artefacts). The encoder's own embedding space puts such examples near each other, so, in the
spirit of Domino (Eyuboglu et al. 2022, arXiv:2203.14960) and of the error-slice clustering of
Spotlight (d'Eon et al. 2022), we cluster the evaluation set's embeddings and test each cluster's
error rate:

1. L2-normalise the embeddings (cosine geometry, as the kNN probe uses) and, when D > `max_dim`,
   project them on their first `max_dim` principal components: k-means costs O(N K D) per step
   and the top components of an encoder's embedding keep the cluster structure.
2. k-means (scikit-learn, k-means++ with `N_INIT` restarts, seeded). The clustering never sees
   which rows are wrong, so the clusters are fixed before any error is looked at.
3. For each cluster with at least `min_size` rows, a one-sided Fisher exact test of the 2 x 2
   table (errors / correct) x (in the cluster / all other rows): is the cluster's error rate
   above that of the rest? Fisher's test conditions on the margins, so it stays exact for a
   small cluster or a rare error and accounts for the other rows' rate being estimated too
   (a binomial test against the rest's rate would treat that rate as known).
4. Holm's step-down correction over the tested clusters (controls the probability of reporting
   any false slice at `alpha`, with no assumption on how the tests depend on each other). The
   size filter depends only on the clustering, not on the errors, so leaving small clusters out
   of the family is valid and keeps the correction from being diluted by clusters too small to
   act on.

A reported slice is a hypothesis to look at (its nearest-to-centre misclassified examples and
its members' thumbnails), not a named cause.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from selfsup.errors import SelfsupError
from selfsup.evaluate.stats import holm

# k-means++ restarts: the best of a few seeded runs; one run (scikit-learn's "auto" for k-means++)
# sometimes merges two small blobs, and a merged slice dilutes its error rate.
N_INIT = 4
# Bounds on the default number of clusters: at least two to compare, and past ~50 the clusters
# get too small for a test to reach significance after the correction.
MIN_DEFAULT_CLUSTERS, MAX_DEFAULT_CLUSTERS = 2, 50


def default_num_clusters(num_rows: int) -> int:
    """round(sqrt(N / 2)) clipped to [2, 50] and to N // 2.

    sqrt(N / 2) is the classic rule of thumb for k-means (Mardia, Kent & Bibby 1979): it grows the
    number of clusters with the data while keeping clusters of ~sqrt(2 N) rows (about 45 rows at
    N = 1000), large enough for a test of a 2-3x error rate to pass a Holm correction.
    """
    k = int(round(math.sqrt(num_rows / 2)))
    return max(MIN_DEFAULT_CLUSTERS, min(MAX_DEFAULT_CLUSTERS, k, num_rows // 2))


def _as_numpy(x: object) -> np.ndarray:
    """numpy view of numpy or torch input; bf16/fp16 tensors (no numpy dtype) are widened first."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _check_inputs(
    embeddings: object, correct: object, ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate [N, D] embeddings, N correctness flags and N ids; return float64, bool, list."""
    x = _as_numpy(embeddings)
    ok = _as_numpy(correct)
    if x.ndim != 2:
        raise SelfsupError(
            f"embeddings must be a [N, D] matrix (one pooled vector per evaluated example), got shape {x.shape}"
        )
    N, D = x.shape
    if D == 0:
        raise SelfsupError("embeddings have no columns (D=0): the encoder produced empty embeddings")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise SelfsupError(f"embeddings must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        num_bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise SelfsupError(
            f"embeddings hold NaN or infinite values in {num_bad} of {N} rows: the encoder diverged; re-extract them"
        )
    if ok.ndim != 1 or len(ok) != N:
        raise SelfsupError(
            f"correct must hold one flag per embedding row ({N}), got shape {ok.shape}: "
            "pass prediction == label for every evaluated example"
        )
    if ok.dtype != np.bool_:
        if not np.issubdtype(ok.dtype, np.integer) or not np.isin(ok, (0, 1)).all():
            raise SelfsupError(
                f"correct must be booleans (True where the prediction is right), got dtype {ok.dtype}"
                + ("" if not np.issubdtype(ok.dtype, np.integer) else " with values other than 0/1")
            )
        ok = ok.astype(bool)
    ids = [str(i) for i in ids]
    if len(ids) != N:
        raise SelfsupError(f"got {len(ids)} ids for {N} embedding rows: give one id per evaluated example")
    return x, ok, ids


def discover_slices(
    embeddings: np.ndarray,
    correct: np.ndarray,
    ids: Sequence[str],
    num_clusters: int | None = None,
    alpha: float = 0.05,
    min_size: int = 10,
    num_examples: int = 5,
    seed: int = 0,
    max_dim: int | None = 50,
) -> dict:
    """Clusters of the evaluation set whose error rate is significantly above the rest's.

    embeddings: [N, D] (numpy or torch), correct: [N] booleans (prediction right), ids: N names.
    num_clusters None picks `default_num_clusters(N)`. `max_dim` None skips the PCA step.

    Returns ``{"slices": [...], "clusters": [...], "settings": {...}}``. "slices" holds the
    clusters with size >= min_size and Holm-adjusted p <= alpha, highest error rate first, each
    ``{"cluster", "size", "num_errors", "error_rate", "overall_error_rate", "rest_error_rate",
    "lift", "p_value", "p_holm", "example_ids", "member_indices"}``: lift is error_rate /
    overall_error_rate (the whole set's); the test compares with rest_error_rate (the other
    rows'). example_ids are up to num_examples misclassified members, nearest the centroid first;
    member_indices are all the cluster's rows, nearest the centroid first (for thumbnails).
    "clusters" summarises every cluster (p_value and p_holm None where it was too small to test).
    Everything is plain Python numbers, lists and strings (JSON-serialisable).
    """
    from scipy.stats import fisher_exact
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x, ok, ids = _check_inputs(embeddings, correct, ids)
    N, D = x.shape
    if N < 4:
        raise SelfsupError(f"slice discovery needs at least 4 evaluated examples (2 clusters of 2), got {N}")
    if num_clusters is None:
        num_clusters = default_num_clusters(N)
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 2:
        raise SelfsupError(f"num_clusters must be an integer >= 2 (or None for the default), got {num_clusters!r}")
    num_clusters = int(num_clusters)
    if N < 2 * num_clusters:
        raise SelfsupError(
            f"{N} examples are too few for {num_clusters} clusters (need at least 2 per cluster, N >= "
            f"{2 * num_clusters}): lower num_clusters (--clusters) to at most {N // 2}, evaluate on more examples, "
            "or skip slices (--no-slices)"
        )
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise SelfsupError(f"alpha (the family-wise error level) must be in (0, 1), got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise SelfsupError(f"min_size must be a positive integer, got {min_size!r}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise SelfsupError(f"num_examples must be a non-negative integer, got {num_examples!r}")
    if max_dim is not None and (isinstance(max_dim, bool) or max_dim < 1):
        raise SelfsupError(f"max_dim must be a positive integer or None (no PCA), got {max_dim!r}")

    # Cosine geometry: an all-zero row stays at the origin rather than dividing by zero.
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pca_dim = None
    if max_dim is not None and D > max_dim:
        pca_dim = min(max_dim, N)
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x)  # [N, pca_dim]
    kmeans = KMeans(n_clusters=num_clusters, n_init=N_INIT, random_state=seed).fit(x)
    assignment = kmeans.labels_  # [N]
    distance = kmeans.transform(x)[np.arange(N), assignment]  # [N], to its own centroid

    wrong = ~ok
    num_errors = int(wrong.sum())
    overall = num_errors / N
    clusters = []
    for c in range(num_clusters):
        member = assignment == c
        size = int(member.sum())
        errors_in = int(wrong[member].sum())
        errors_out = num_errors - errors_in
        rest = N - size
        summary = {
            "cluster": c,
            "size": size,
            "num_errors": errors_in,
            "error_rate": errors_in / size if size else 0.0,
            "rest_error_rate": errors_out / rest if rest else 0.0,
            "p_value": None,
            "p_holm": None,
        }
        if size >= min_size and rest > 0:
            table = [[errors_in, size - errors_in], [errors_out, rest - errors_out]]
            summary["p_value"] = float(fisher_exact(table, alternative="greater").pvalue)
        clusters.append(summary)

    tested = [s for s in clusters if s["p_value"] is not None]
    for s, p in zip(tested, holm([s["p_value"] for s in tested])):
        s["p_holm"] = p

    slices = []
    for s in tested:
        if s["p_holm"] > alpha:
            continue
        rows = np.flatnonzero(assignment == s["cluster"])
        rows = rows[np.argsort(distance[rows], kind="stable")]  # nearest the centroid first
        errors = rows[wrong[rows]]
        slices.append({
            "cluster": s["cluster"],
            "size": s["size"],
            "num_errors": s["num_errors"],
            "error_rate": s["error_rate"],
            "overall_error_rate": overall,
            "rest_error_rate": s["rest_error_rate"],
            "lift": s["error_rate"] / overall,  # overall > 0: a significant cluster has errors
            "p_value": s["p_value"],
            "p_holm": s["p_holm"],
            "example_ids": [ids[i] for i in errors[:num_examples]],
            "member_indices": rows.tolist(),
        })
    slices.sort(key=lambda s: (-s["error_rate"], s["p_holm"], s["cluster"]))
    settings = {
        "num_rows": N,
        "dim": D,
        "pca_dim": pca_dim,
        "num_clusters": num_clusters,
        "n_init": N_INIT,
        "alpha": float(alpha),
        "min_size": int(min_size),
        "num_examples": int(num_examples),
        "seed": int(seed),
        "num_errors": num_errors,
        "overall_error_rate": overall,
        "num_tested": len(tested),
        "test": "one-sided Fisher exact, cluster vs all other rows",
        "correction": "Holm over clusters with size >= min_size",
    }
    return {"slices": slices, "clusters": clusters, "settings": settings}


def format_slices(result: dict) -> str:
    """Plain-text summary of `discover_slices`: settings line, one row per slice, its examples."""
    st = result["settings"]
    pca = f", PCA to {st['pca_dim']} dims" if st["pca_dim"] else ""
    lines = [
        f"{st['num_rows']} examples, {st['num_errors']} errors (overall error rate {st['overall_error_rate']:.1%}); "
        f"{st['num_clusters']} k-means clusters{pca}, {st['num_tested']} with >= {st['min_size']} rows tested "
        f"(one-sided Fisher exact, Holm, alpha {st['alpha']:g})"
    ]
    slices = result["slices"]
    if not slices:
        lines.append("no cluster has a significantly higher error rate than the rest")
        return "\n".join(lines)
    header = ["cluster", "size", "errors", "error rate", "lift", "p (Holm)"]
    body = [
        [str(s["cluster"]), str(s["size"]), str(s["num_errors"]), f"{s['error_rate']:.1%}",
         f"{s['lift']:.2f}x", f"{s['p_holm']:.2g}"]
        for s in slices
    ]
    widths = [max(len(row[col]) for row in [header, *body]) for col in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    for s in slices:
        if s["example_ids"]:
            lines.append(f"cluster {s['cluster']} errors nearest its centre: {', '.join(s['example_ids'])}")
    return "\n".join(lines)
