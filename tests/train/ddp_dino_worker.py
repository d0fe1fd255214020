"""Run by test_ddp.py under torchrun: one DINO step on each rank's shard; writes the centre."""

import json
import sys

import torch
import torch.distributed as dist

from selfsup.encoders import build_encoder
from selfsup.methods import build_method


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    encoder = build_encoder("resnet10", in_channels=3, image_size=16, width=8)
    method = build_method({"name": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}, encoder).eval()
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)]  # the global batch
    shard = [v[rank * 4 : (rank + 1) * 4] for v in views]  # different images on each rank
    with torch.no_grad():
        method({"views": shard}, 0.5)
    method.after_optimizer_step(0.5)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"center": method.center.tolist()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
