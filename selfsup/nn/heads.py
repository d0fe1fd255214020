"""MLP heads shared by the joint-embedding methods (SimCLR's projector, BYOL's projector and predictor)."""

from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden: int, out_dim: int, num_layers: int = 2, *, last_norm: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a final Linear; `last_norm` adds a non-affine BN after it (SimCLR's code).

    BYOL's projector/predictor are this with 2 layers and no final BN; SimCLR's projector ends in BN.
    Biases before a BatchNorm would be cancelled by it, so those layers have none.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim, bias=not last_norm))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
