"""A toy third modality, written as a user would add one: feature vectors in an .npz (`x` float
[N, D], optional `y` int [N] and string group columns), Gaussian-noise views, and a small MLP
encoder that reads them. One file, registered with one line each in MODALITIES and ENCODERS
(`register()`), touching no package module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selfsup.config import RunConfig
from selfsup.encoders import EncoderSpec
from selfsup.errors import SelfsupError
from selfsup.modalities.base import Assembly, EncoderBatch, Modality, Pairs, Reader, TaskInputs
from selfsup.train.runtime import Runtime

NAME = "vectors"
NOISE = 0.3  # std of the views' Gaussian noise, in units of each feature's std


@dataclass
class VectorSet:
    vectors: Tensor  # float32 [N, D]
    ids: list[str]
    labels: Tensor | None
    classes: list[str] | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Tensor | list[int]) -> VectorSet:
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        rows = index.long().tolist()
        return VectorSet(self.vectors[rows], [self.ids[i] for i in rows],
                         None if self.labels is None else self.labels[rows], self.classes,
                         {g: [v[i] for i in rows] for g, v in self.groups.items()}, self.source)


class VectorBatches:
    def __init__(self, data: VectorSet, mean: Tensor, std: Tensor, device: torch.device):
        self.data, self.device, self.num_items = data, device, len(data)
        self.x = ((data.vectors - mean) / std).to(device)

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        x = self.x[indices.to(self.device)]  # [B, D]
        views = [x + NOISE * torch.randn(x.shape, generator=generator, device=self.device) for _ in range(2)]
        return {"views": views, "id": [self.data.ids[i] for i in indices.tolist()], "index": indices,
                "generator": generator}


class VectorTaskInputs(TaskInputs):
    def __init__(self, data: VectorSet, rows: Tensor, preprocess: dict[str, Any]):
        self.rows, self.labels = rows, None if data.labels is None else data.labels[rows]
        self.x = (data.vectors[rows] - torch.tensor(preprocess["mean"])) / torch.tensor(preprocess["std"])

    def batch(self, index: Tensor, device: torch.device) -> EncoderBatch:
        return EncoderBatch((self.x[index].to(device),), len(index))


class VectorReader(Reader):
    modality = NAME

    def task_inputs(self, data: VectorSet, rows: Tensor, chunks: int = 1) -> VectorTaskInputs:
        return VectorTaskInputs(data, rows, self.preprocess)

    @torch.no_grad()
    def positive_pairs(self, encoder: nn.Module, data: VectorSet, inputs: TaskInputs, rows: Tensor, runtime: Runtime,
                       generator: torch.Generator) -> Pairs:
        x = inputs.x[rows]
        first, second = (encoder.embed(x + NOISE * torch.randn(x.shape, generator=generator)) for _ in range(2))
        return Pairs(first, second, "two noisy copies of each vector")

    def examples(self, data: VectorSet, rows: Tensor) -> dict[str, Any]:
        return {"snippets": [" ".join(f"{v:.2f}" for v in data.vectors[int(i)][:4].tolist()) for i in rows[:3]]}


class VectorModality(Modality):
    name = NAME
    batch_kind = "views"
    default_source = "vectors.npz"
    unit = "vectors"

    def load(self, cfg: RunConfig, progress: bool = True) -> VectorSet:
        path = Path(cfg.data.source)
        try:
            arrays = np.load(path, allow_pickle=False)
            x = torch.from_numpy(np.asarray(arrays["x"], dtype=np.float32))
        except (OSError, KeyError, ValueError) as err:
            raise SelfsupError(f"{path}: not a vectors .npz with an `x` array ({err})") from None
        labels, classes = None, None
        if "y" in arrays:
            labels = torch.from_numpy(arrays["y"].astype(np.int64))
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        groups = {k: [str(v) for v in arrays[k]] for k in arrays.files if k not in ("x", "y")}
        return VectorSet(x, [f"v{i}" for i in range(len(x))], labels, classes, groups, str(path))

    def join(self, first: VectorSet, second: VectorSet) -> VectorSet:
        labels = None if first.labels is None else torch.cat([first.labels, second.labels])
        return VectorSet(torch.cat([first.vectors, second.vectors]), first.ids + second.ids, labels, first.classes,
                         {g: first.groups[g] + second.groups[g] for g in first.groups}, first.source)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: VectorSet, holdout: VectorSet, spec: Any,
                 progress: bool = True) -> Assembly:
        mean, std = train.vectors.mean(dim=0), train.vectors.std(dim=0).clamp_min(1e-6)
        preprocess = {"modality": NAME, "mean": mean.tolist(), "std": std.tolist()}
        return Assembly(VectorBatches(train, mean, std, runtime.device), {NAME: {"in_dim": train.vectors.shape[1]}},
                        {NAME: preprocess}, dict(cfg.method), lambda rt, encoder_of: None)

    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> VectorReader:
        return VectorReader(preprocess)

    def contract_inputs(self) -> dict[str, int]:
        return {"in_dim": 8}

    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        return {"views": [torch.randn(batch_size, 8, generator=gen) for _ in range(2)],
                "id": [str(i) for i in range(batch_size)], "generator": torch.Generator().manual_seed(1)}


@dataclass
class MLPConfig:
    dim: int = 32  # width of the hidden layers and of the embedding
    depth: int = 2  # hidden layers


class MLPEncoder(nn.Module):
    """forward(x [B, in_dim]) -> [B, 1, dim] (one feature token), embed(x) -> [B, dim]."""

    def __init__(self, cfg: MLPConfig, in_dim: int):
        super().__init__()
        layers, width = [], in_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.dim), nn.GELU()]
            width = cfg.dim
        self.net = nn.Sequential(*layers)
        self.dim = cfg.dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x).unsqueeze(1)

    def embed(self, x: Tensor) -> Tensor:
        return self.net(x)


def register(monkeypatch) -> None:
    """The modality's and its encoder's registry lines (for the length of one test)."""
    from selfsup.encoders import ENCODERS
    from selfsup.modalities import MODALITIES

    monkeypatch.setitem(MODALITIES, NAME, VectorModality())
    monkeypatch.setitem(ENCODERS, "mlp_vectors", EncoderSpec(MLPConfig, MLPEncoder, {}, "toy MLP over vectors",
                                                             modality=NAME, inputs=("in_dim",)))


def write_vectors(path: Path, num_items: int = 600, dim: int = 16, seed: int = 0) -> Path:
    """Three labelled Gaussian clusters in `dim` dimensions, with a `site` group column; site "b"
    is noisier, so its vectors are harder to classify."""
    rng = np.random.default_rng(seed)
    y = np.arange(num_items) % 3
    centres = rng.normal(0, 1, size=(3, dim))
    site = np.where(rng.random(num_items) < 0.3, "b", "a")
    scale = np.where(site == "b", 1.5, 0.5)[:, None]
    x = centres[y] * 2 + rng.normal(0, 1, size=(num_items, dim)) * scale
    np.savez(path, x=x.astype(np.float32), y=y, site=site)
    return path
