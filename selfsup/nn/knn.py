"""The temperature-weighted cosine kNN classifier: the pretraining monitor's accuracy, one of the
probes (`adapt/probes.py`) and a transferability score (`evaluate/transferability.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import SelfsupError


def check_split(name: str, x: Tensor, y: Tensor) -> None:
    """Reject features/labels that cannot be one feature row and one class index per example."""
    if x.ndim != 2:
        raise SelfsupError(f"{name}_x must be features [N, D], got shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise SelfsupError(
            f"{name}_y must hold one class index per row of {name}_x ({len(x)} rows), got shape {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise SelfsupError(f"the {name} split is empty: a probe needs at least one {name} example")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise SelfsupError(f"{name}_y must hold integer class indices, got dtype {y.dtype}")


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Accuracy of a temperature-weighted cosine kNN classifier (Wu et al. 2018 / DINO).

    Each test row's k most cosine-similar training rows vote for their class with weight
    exp(similarity / temperature). Test rows are processed `chunk` at a time so memory stays at
    chunk x len(train) similarities. k is clipped to the number of training rows; as the
    temperature goes to 0 the vote becomes 1-nearest-neighbour.
    """
    check_split("train", train_x, train_y)
    check_split("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise SelfsupError(
            f"train and test features differ in width ({train_x.shape[1]} vs {test_x.shape[1]}): "
            "were they extracted by the same encoder?"
        )
    if isinstance(k, bool) or k < 1:
        raise SelfsupError(f"k (neighbours) must be a positive integer, got {k!r}")
    if not temperature > 0:
        raise SelfsupError(f"kNN temperature must be > 0, got {temperature!r}")
    if chunk < 1:
        raise SelfsupError(f"chunk (test rows per step) must be a positive integer, got {chunk!r}")
    min_label = int(min(train_y.min(), test_y.min()))
    max_label = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = max_label + 1
    if min_label < 0 or max_label >= num_classes:
        raise SelfsupError(
            f"labels must be class indices in [0, num_classes={num_classes}), found values in [{min_label}, {max_label}]"
        )

    N_train, _ = train_x.shape
    N_test, _ = test_x.shape
    num_neighbours = min(k, N_train)
    train_feats = F.normalize(train_x.float(), dim=1)
    test_feats = F.normalize(test_x.to(train_feats.device).float(), dim=1)
    train_labels = train_y.to(train_feats.device).long()
    test_labels = test_y.to(train_feats.device).long()
    num_correct = 0
    for start in range(0, N_test, chunk):
        sims = test_feats[start : start + chunk] @ train_feats.T  # [Q, N_train], Q queries in this chunk
        top_sims, top_idx = sims.topk(num_neighbours, dim=1)  # [Q, K], most similar first
        # Shifting by each row's best similarity multiplies that row's weights by one constant, so
        # the vote is exp(sim / T)'s, but it cannot overflow when T is tiny (exp(1 / 1e-4) = inf).
        weights = torch.exp((top_sims - top_sims[:, :1]) / temperature)
        votes = torch.zeros(len(sims), num_classes, device=sims.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # [Q, num_classes]
        num_correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk]).sum())
    return num_correct / N_test
