"""Discrete targets made from the data: a k-means codebook fitted on unlabelled vectors.

BEiT predicts the visual token of each masked patch and HuBERT the cluster id of each masked frame;
both need a tokenizer fitted on the user's own data, since no pretrained one can be downloaded here
(BEiT's DALL-E dVAE). `KMeansTokenizer` is that tokenizer: `fit` on vectors (patch pixels, MFCCs,
a model's own features), `assign` to ids, `save`/`load` with the run.

Fitting is mini-batch k-means (Sculley 2010, "Web-scale k-means clustering"): k-means++ seeding on
a subsample (Arthur & Vassilvitskii 2007), then passes of mini-batches where each centroid moves
towards its assigned points with a per-centroid rate 1/count, then a final full Lloyd step over
all vectors so every centroid is the mean of its cluster. A centroid that no vector chose is
re-seeded at the point farthest from its centroid. Everything runs on the vectors' device in
float32 with distances from one matmul (||x||² - 2 x·c + ||c||²): 200k 48-d vectors into 512
clusters take 5-10 s on one CPU thread (tested), so a million take well under a minute. All draws come from the given generator: the same data and
seed give the same codebook.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.files import write_with


def _sq_distances(x: Tensor, centroids: Tensor, centroid_norms: Tensor) -> Tensor:
    """Squared distances [M, K] up to the per-row constant ||x||² (argmin does not need it)."""
    return centroid_norms.unsqueeze(0) - 2.0 * (x @ centroids.T)


class KMeansTokenizer(nn.Module):
    """A codebook of `num_tokens` centroids in `dim` dimensions; a buffer, so it is checkpointed."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        if num_tokens < 2 or dim < 1:
            raise SelfsupError(f"a k-means tokenizer needs at least 2 tokens and 1 dimension, got {num_tokens}, {dim}")
        self.num_tokens, self.dim = num_tokens, dim
        self.register_buffer("centroids", torch.zeros(num_tokens, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, vectors: Tensor, generator: torch.Generator, *, num_passes: int = 5, batch_size: int = 8192,
            seed_sample: int = 20_000) -> dict[str, float]:
        """Fit the codebook to `vectors` [M, dim]; returns {"inertia": mean squared distance to the centroids
        before the final Lloyd step (an upper bound for the saved codebook's), "used": tokens in use}."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise SelfsupError(f"k-means expects vectors [M, {self.dim}], got shape {tuple(vectors.shape)}")
        M = vectors.shape[0]
        if M < self.num_tokens:
            raise SelfsupError(f"k-means with {self.num_tokens} tokens needs at least as many vectors, got {M}; "
                               "use fewer tokens or more data")
        x = vectors.float()
        device = x.device
        sample = x[torch.randperm(M, generator=generator, device=generator.device)[:seed_sample].to(device)]
        centroids = self._kmeans_pp(sample, generator)
        counts = torch.zeros(self.num_tokens, device=device)
        for _ in range(num_passes):
            order = torch.randperm(M, generator=generator, device=generator.device).to(device)
            for start in range(0, M, batch_size):
                batch = x[order[start : start + batch_size]]  # [b, dim]
                ids = _sq_distances(batch, centroids, centroids.square().sum(1)).argmin(dim=1)  # [b]
                batch_counts = torch.bincount(ids, minlength=self.num_tokens).float()  # [K]
                sums = torch.zeros_like(centroids).index_add_(0, ids, batch)  # [K, dim]
                counts += batch_counts
                # Per-centroid rate 1/count: each centroid is the running mean of the points it was given.
                seen = batch_counts > 0
                rate = (batch_counts[seen] / counts[seen]).unsqueeze(1)
                centroids[seen] += rate * (sums[seen] / batch_counts[seen].unsqueeze(1) - centroids[seen])
        centroids, inertia, used = self._lloyd_step(x, centroids, batch_size)
        self.centroids.copy_(centroids)
        self.fitted.fill_(True)
        return {"inertia": inertia, "used": float(used)}

    def _kmeans_pp(self, sample: Tensor, generator: torch.Generator) -> Tensor:
        """k-means++ seeds [K, dim]: each next seed drawn with probability ∝ squared distance to the nearest seed."""
        n = sample.shape[0]
        first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        seeds = [first]
        nearest = (sample - sample[first]).square().sum(1)  # [n]
        for _ in range(self.num_tokens - 1):
            weights = nearest.clamp_min(0)
            if float(weights.sum()) <= 0:  # fewer distinct points than tokens: any point will do
                weights = torch.ones_like(weights)
            pick = int(torch.multinomial(weights.to(generator.device), 1, generator=generator))
            seeds.append(pick)
            nearest = torch.minimum(nearest, (sample - sample[pick]).square().sum(1))
        return sample[torch.tensor(seeds, device=sample.device)].clone()

    def _lloyd_step(self, x: Tensor, centroids: Tensor, batch_size: int) -> tuple[Tensor, float, int]:
        """One exact step over all vectors: centroids become their clusters' means; empty ones are
        re-seeded at the worst-fitted points. Returns (centroids, mean squared distance, tokens used)."""
        K = self.num_tokens
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(K, device=x.device)
        worst = torch.empty(0, device=x.device, dtype=torch.long)
        worst_dist = torch.empty(0, device=x.device)
        total = 0.0
        norms = centroids.square().sum(1)
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size]
            dist = _sq_distances(batch, centroids, norms)  # [b, K]
            best, ids = dist.min(dim=1)
            best = best + batch.square().sum(1)  # the full squared distance
            total += float(best.sum())
            counts += torch.bincount(ids, minlength=K).float()
            sums.index_add_(0, ids, batch)
            # Keep the K farthest points seen so far, to re-seed empty clusters.
            pool_dist = torch.cat([worst_dist, best])
            pool_idx = torch.cat([worst, torch.arange(start, start + len(batch), device=x.device)])
            keep = pool_dist.topk(min(K, len(pool_dist))).indices
            worst_dist, worst = pool_dist[keep], pool_idx[keep]
        used = counts > 0
        centroids = centroids.clone()
        centroids[used] = sums[used] / counts[used].unsqueeze(1)
        empty = torch.nonzero(~used).flatten()
        if len(empty):
            centroids[empty] = x[worst[: len(empty)]]
        return centroids, total / x.shape[0], int(used.sum())

    @torch.no_grad()
    def assign(self, vectors: Tensor, batch_size: int = 65_536) -> Tensor:
        """Token ids (int64) of `vectors` [..., dim]: the nearest centroid of each."""
        if not bool(self.fitted):
            raise SelfsupError("the k-means tokenizer is not fitted yet: call fit() (or load a fitted one) first")
        if vectors.shape[-1] != self.dim:
            raise SelfsupError(f"vectors of dimension {vectors.shape[-1]} given to a {self.dim}-d tokenizer")
        flat = vectors.reshape(-1, self.dim).float()
        norms = self.centroids.square().sum(1)
        ids = [_sq_distances(flat[s : s + batch_size], self.centroids, norms).argmin(dim=1)
               for s in range(0, flat.shape[0], batch_size)]
        return torch.cat(ids).reshape(vectors.shape[:-1])

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Writes the codebook as safetensors (no pickle), atomically; `metadata` (strings) is stored
        beside the file's own keys, e.g. what the vectors were (HuBERT: MFCC or a run's layer)."""
        path = Path(path)
        header = {**(metadata or {}), "kind": "kmeans", "num_tokens": str(self.num_tokens), "dim": str(self.dim)}
        write_with(path, lambda tmp: save_file(
            {"centroids": self.centroids.detach().cpu().contiguous()}, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: Path) -> KMeansTokenizer:
        try:
            centroids = load_file(str(path))["centroids"]
        except Exception as err:  # safetensors raises its own types for truncated or foreign files
            raise SelfsupError(f"{path}: not a k-means tokenizer file ({err})") from None
        tokenizer = cls(centroids.shape[0], centroids.shape[1])
        tokenizer.centroids.copy_(centroids)
        tokenizer.fitted.fill_(True)
        return tokenizer
