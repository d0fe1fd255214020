"""Where and how a run executes: device, precision, and the torchrun process group.

One process by default. Under `torchrun` (WORLD_SIZE > 1 in the environment) the process group is
initialised here — NCCL on CUDA, gloo on the CPU — and each rank trains on its share of every
global batch. selfsup never launches processes itself.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from selfsup.errors import SelfsupError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = full fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16 units, where bf16 matmuls run several times faster than fp32.

    Measured here (shared/MACHINE.md): ~1,125 vs ~150 GFLOP/s on an AMX CPU, and training steps
    1.4-2.4x faster under bf16 autocast. Without these units bf16 is emulated and slower.
    """
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SelfsupError(f"`train.device`: unknown device `{name}` (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SelfsupError("`train.device` asks for CUDA but none is available here; use `train.device=auto` or cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def init_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The runtime for this process; joins the torchrun process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            _init_process_group(backend, world_size)
        rank = dist.get_rank()
    else:
        rank = 0
    return Runtime(device=dev, autocast_dtype=resolve_precision(precision, dev), rank=rank, world_size=world_size)


def _init_process_group(backend: str, world_size: int) -> None:
    """torchrun's process group; after a `--max-restarts` restart, under a key prefix of its own.

    torchrun's agent keeps one TCP store across restarts, and the restarted workers would read the
    dead attempt's rendezvous keys (gloo: "Connection refused", or a hang; pytorch/pytorch#135712).
    Each attempt therefore rendezvous under `selfsup/attempt-N/`.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(backend=backend)
        return
    rank = int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, wait_for_workers=False)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"selfsup/attempt-{restart}", store),
                            rank=rank, world_size=world_size)


def shutdown(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
