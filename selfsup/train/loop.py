"""The one training loop. It knows the method contract, never which method runs.

Per optimizer step: draw the next global batch, split it into accumulation micro-steps and rank
shards, let the data side turn indices into a batch on the device (views are made there), call
`method(batch, progress)`, backpropagate, refuse non-finite losses/gradients before the optimizer
moves, clip, step, and let the method update its EMA/centre state.

Reproducibility: the randomness of step t on rank r (views, masks, dropout) comes from a generator
seeded with (seed, rank, t), and the data order is a pure function of (seed, epoch). A checkpoint's
step and data position therefore pin every random draw that follows, and a resumed run repeats an
uninterrupted one bit for bit (tested with `torch.equal`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from selfsup.config import TrainConfig
from selfsup.data.sampler import BatchOrder, shard
from selfsup.errors import NonFiniteError, SelfsupError
from selfsup.nn.diagnostics import collapse_warning
from selfsup.train import checkpoint
from selfsup.train.optim import build_optimizer, lr_at
from selfsup.train.progress import MetricsLog, Progress, TensorBoard
from selfsup.train.runtime import Runtime
from selfsup.train.stop import EXIT_INTERRUPTED, Interrupted, StopSignal  # noqa: F401 (EXIT_INTERRUPTED: re-exported)

log = logging.getLogger("selfsup")


class Batches(Protocol):
    """The data side of the loop: turns dataset indices into a batch dict on the device."""

    num_items: int

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]: ...


@dataclass
class FitResult:
    steps: int  # optimizer steps done in total
    last_row: dict[str, Any]  # the final metrics row
    checkpoint: Path | None


def step_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    # Large odd multipliers keep (seed, rank, step) triples from colliding.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63)


def fit(method: nn.Module, batches: Batches, cfg: TrainConfig, run_dir: Path, runtime: Runtime, *, seed: int,
        resume: bool = False, monitor: Callable[[nn.Module], dict[str, float]] | None = None,
        stop_after: int | None = None, stop: StopSignal | None = None) -> FitResult:
    """Trains `method` for `cfg.steps` optimizer steps, writing metrics and checkpoints under `run_dir`.

    `monitor(method)` (rank 0, eval mode, no grad) returns extra metrics every `cfg.eval_every` steps
    and at the end. `stop_after` ends the call after that many total steps as if the process had
    died there (tests use it to simulate a crash). `stop` is the caller's signal record (pretrain
    covers start-up and export too); without one the loop installs its own for the loop's duration.
    """
    device, rank, world_size = runtime.device, runtime.rank, runtime.world_size
    micro_batch, rem = divmod(cfg.batch_size, cfg.accum_steps * world_size)
    if rem or micro_batch < 1:
        raise SelfsupError(
            f"`train.batch_size` ({cfg.batch_size}) must split evenly into accum_steps ({cfg.accum_steps}) "
            f"x ranks ({world_size}) micro-batches"
        )
    method.to(device)
    model: nn.Module = DistributedDataParallel(method) if world_size > 1 else method
    optimizer = build_optimizer(method, cfg.lr, cfg.weight_decay, cfg.betas)
    order = BatchOrder(batches.num_items, cfg.batch_size, seed)
    ckpt_root = run_dir / "checkpoints"

    start = 0
    if resume:
        resumed = checkpoint.resume_latest(ckpt_root, method, optimizer)  # logs why when it is None
        if resumed is not None:
            path, state = resumed
            order.load_state_dict(state["data_order"])
            start = int(state["step"])
            log.info("resumed from %s (step %d)", path, start)
    params = [p for p in method.parameters() if p.requires_grad]

    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    board = TensorBoard(run_dir / "tensorboard") if cfg.tensorboard and runtime.is_main else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start) if runtime.is_main else None
    progress = Progress(cfg.steps, start, cfg.log_every, enabled=runtime.is_main)
    row: dict[str, Any] = {}
    last_ckpt: Path | None = None

    def save(step: int) -> Path | None:
        path = None
        if runtime.is_main:
            path = checkpoint.save_checkpoint(ckpt_root, step, method, optimizer,
                                              {"data_order": order.state_dict(), "seed": seed}, cfg.keep_last)
        runtime.barrier()
        return path

    try:
        with stop or StopSignal() as stop:
            for step in range(start + 1, cfg.steps + 1):  # `step` = optimizer steps done after this one
                tic = time.perf_counter()
                progress_frac = (step - 1) / cfg.steps
                lr = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_fraction, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                generator = step_generator(device, seed, rank, step)
                torch.manual_seed(generator.initial_seed())  # stray global-RNG users (dropout) stay reproducible too
                global_indices = order.next()

                sums: dict[str, Tensor] = {}
                nonfinite_ids: list[Any] = []
                num_tokens = 0  # text batches: real tokens this step on this rank
                for micro in range(cfg.accum_steps):
                    indices = shard(shard(global_indices, micro, cfg.accum_steps), rank, world_size)
                    batch = batches(indices, generator)
                    num_tokens += batch.get("num_tokens", 0)
                    batch["diagnose"] = bool(cfg.diagnostics_every) and (step == 1 or step % cfg.diagnostics_every == 0)
                    sync = micro == cfg.accum_steps - 1 or world_size == 1
                    with (nullcontext() if sync else model.no_sync()), runtime.autocast():
                        out = model(batch, progress_frac)
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        nonfinite_ids.extend(batch.get("id", indices.tolist()))
                    (loss / cfg.accum_steps).backward()
                    for key, value in out.items():
                        sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.accum_steps

                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                # One collective per step carries the logged values, the finite check and the stop flag.
                keys = sorted(sums)
                packed = torch.stack([sums[k] for k in keys] + [
                    torch.tensor(float(bool(nonfinite_ids)) + float(not torch.isfinite(grad_norm)), device=device),
                    torch.tensor(float(stop.received is not None), device=device),
                ])
                if world_size > 1:
                    dist.all_reduce(packed)
                    packed[: len(keys)] /= world_size
                values = packed.tolist()
                if values[len(keys)] > 0:
                    optimizer.zero_grad(set_to_none=True)
                    what = "loss" if nonfinite_ids else "gradient"
                    shown = ", ".join(map(str, nonfinite_ids[:20])) if nonfinite_ids else "(the loss was finite on this rank)"
                    raise NonFiniteError(
                        f"non-finite {what} at step {step} (rank {rank}); the weights were not updated. "
                        f"Samples in this batch: {shown}. Try a lower `train.lr`, `train.precision=fp32`, "
                        f"or check these inputs."
                    )
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                after = getattr(method, "after_optimizer_step", None)
                if after is not None:
                    after(step / cfg.steps)

                row = {"step": step, "epoch": order.epoch, **dict(zip(keys, values[: len(keys)])),
                       "lr": lr, "grad_norm": float(grad_norm)}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - tic
                row["samples_per_s"] = cfg.batch_size / seconds
                if num_tokens:  # this rank's tokens; ranks see equal shares of full blocks
                    row["tokens_per_s"] = num_tokens * world_size / seconds
                if monitor is not None and runtime.is_main and (
                    step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
                ):
                    row.update(_run_monitor(monitor, method))
                if metrics is not None:
                    metrics.write(row)
                if board is not None:
                    board.write(step, row)
                progress.update(step, row, collapse_warning(row))

                stopping = values[len(keys) + 1] > 0
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                    last_ckpt = save(step)
                if stopping:
                    where = f"checkpoint {last_ckpt}" if last_ckpt is not None else "rank 0 wrote its checkpoint"
                    raise Interrupted(f"interrupted after step {step}; {where}; continue with --resume",
                                      step, last_ckpt)
                if stop_after is not None and step >= stop_after:
                    break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
    return FitResult(steps=int(row.get("step", start)), last_row=row, checkpoint=last_ckpt)


@torch.no_grad()
def _run_monitor(monitor: Callable[[nn.Module], dict[str, float]], method: nn.Module) -> dict[str, float]:
    was_training = method.training
    method.eval()
    try:
        return monitor(method)
    finally:
        method.train(was_training)
