"""Run by test_ddp.py under torchrun (2 processes, gloo): NT-Xent over gathered negatives on each rank."""

import json
import sys

import torch
import torch.distributed as dist

from selfsup.methods.simclr import nt_xent


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    z1_all, z2_all = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)  # the global batch
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    z1 = z1_all[rows].clone().requires_grad_()
    z2 = z2_all[rows].clone().requires_grad_()
    loss, _ = nt_xent(z1, z2, 0.3)
    loss.backward()
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"loss": loss.item(), "grad1": z1.grad.tolist(), "grad2": z2.grad.tolist()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
