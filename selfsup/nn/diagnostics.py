"""Collapse diagnostics for joint-embedding methods.

A joint-embedding objective can be minimised by mapping every image to the same point (complete
collapse) or to a low-dimensional subspace (dimensional collapse). Two cheap statistics of a
batch of embeddings show both:
- `embed_std`: the per-dimension standard deviation of the l2-normalised embeddings, times sqrt(D)
  (Grill et al. 2020 / Chen & He 2021 compare it with 1/sqrt(D)): ~1 for embeddings spread over
  the sphere, -> 0 under collapse;
- `embed_erank`: the effective rank of the embedding covariance, exp(entropy of its normalised
  eigenvalues) (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): between 1 and min(B, D).
DINO adds the teacher's output entropy and its KL divergence to the centre's distribution
(`dino.py`): a teacher that only echoes the centre is uniform-collapsed. wav2vec 2.0 logs its
codebook's `code_usage` (`methods/wav2vec2.py`): the perplexity of the codes it picks over the most
it could reach in the batch; a codebook that picks a handful of entries is collapsing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this normalised std the embeddings occupy a vanishing part of the sphere.
STD_COLLAPSE = 0.05
# An effective rank this close to 1 means one direction carries all the variance.
ERANK_COLLAPSE = 1.5
# A DINO teacher whose centred, sharpened output has this fraction of the maximal entropy gives the
# student no target: uniform collapse (at initialisation it sits near 0.5-0.85).
TEACHER_UNIFORM = 0.97
# A quantizer whose picked codes have a perplexity below this fraction of what the batch could reach
# (G groups x min(V entries, frames)) uses few of its entries: its targets carry little information.
CODE_USAGE_COLLAPSE = 0.1


@torch.no_grad()
def embedding_diagnostics(z: Tensor) -> dict[str, Tensor]:
    """{"embed_std", "embed_erank"} of a batch of embeddings [B, D] (computed in float32)."""
    B, D = z.shape
    z = F.normalize(z.detach().float(), dim=1)
    std = z.std(dim=0).mean() * math.sqrt(D)
    centred = z - z.mean(dim=0)
    eigenvalues = torch.linalg.svdvals(centred) ** 2  # covariance eigenvalues up to a 1/(B-1) factor
    total = eigenvalues.sum()
    if total <= 1e-12:  # every embedding identical: no variance in any direction
        erank = torch.tensor(1.0, device=z.device)
    else:
        p = eigenvalues / total
        erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"embed_std": std, "embed_erank": erank}


def collapse_warning(row: dict[str, float]) -> str | None:
    """A one-line warning when the logged diagnostics say the embeddings are collapsing, else None."""
    std, erank = row.get("embed_std"), row.get("embed_erank")
    if std is not None and std < STD_COLLAPSE:
        return f"embeddings collapsing: normalised std {std:.3f} (healthy ~1, collapsed 0)"
    if erank is not None and erank < ERANK_COLLAPSE:
        return f"embeddings collapsing: effective rank {erank:.2f} (one direction holds all variance)"
    entropy = row.get("teacher_entropy")
    if entropy is not None and entropy > TEACHER_UNIFORM:
        return (f"DINO teacher near uniform (entropy {entropy:.3f} of log K): the head is not learning; "
                f"try a lower method.momentum_start or method.teacher_temp, or a lower train.lr")
    usage = row.get("code_usage")
    if usage is not None and usage < CODE_USAGE_COLLAPSE:
        perplexity = row.get("code_perplexity")
        shown = f"code perplexity {perplexity:.1f}, " if perplexity is not None else ""
        return (f"codebook collapsing: {shown}{usage:.1%} of the reachable entries in use (healthy > "
                f"{CODE_USAGE_COLLAPSE:.0%}); try a higher method.diversity_weight or a lower train.lr")
    return None
