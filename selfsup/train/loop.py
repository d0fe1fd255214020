"""The one training loop. It knows the method contract, never which method runs.

Per optimizer step: draw the next global batch, split it into accumulation micro-steps and rank
shards, let the data side turn indices into a batch on the device (views are made there), call
`method(batch, progress)`, backpropagate, refuse non-finite losses/gradients before the optimizer
moves, clip, step, and let the method update its EMA/centre state.

Reproducibility: the randomness of step t on rank r (views, masks, dropout) comes from a generator
seeded with (seed, rank, t), and the data order is a pure function of (seed, epoch). A checkpoint's
step and data position therefore pin every random draw that follows, and a resumed run repeats an
uninterrupted one bit for bit (tested with `torch.equal`). A shard source (`batches.stream_parts`) is
read instead as each rank's stream of micro-batches (data/stream.py): the same number of steps per
epoch on every rank, and every rank's stream position gathered into the checkpoint.

Host reads. On the CPU every step's logged values are read at once (a read costs nothing there)
and a non-finite loss or gradient stops the run before the optimizer moves. On CUDA reading a value
stalls the stream, so the loop reads them once per `log_every` steps (and at checkpoints,
evaluations and the end): the non-finite guard then runs on the device — the fused AdamW skips a
step whose `found_inf` flag is set, leaving weights, moments and step counts untouched — and the
error is raised at the next read, naming the step that was skipped. A stop signal is honoured at
the next read too (all ranks read at the same steps). `defer_reads` forces either behaviour (tests).

Time budget (`train.minutes`): `steps_for_budget` times a few steps of a throwaway copy of the
method (and one evaluation and one checkpoint) and returns the step count that fits; the caller
fixes it in the run's config before step 1, so the schedule — and a resume — never depends on a clock.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from selfsup.config import TrainConfig
from selfsup.data.sampler import BatchOrder, shard
from selfsup.data.stream import ShardStream, StreamSource, stream_from_parts
from selfsup.errors import NonFiniteError, SelfsupError
from selfsup.nn.diagnostics import collapse_warning
from selfsup.nn.distributed import sync_batchnorm
from selfsup.nn.gemm import choose_cpu_gemm, route_linears
from selfsup.train import checkpoint, sharded
from selfsup.train.optim import build_optimizer, lr_at
from selfsup.train.progress import MetricsLog, Progress, TensorBoard, format_duration
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


@dataclass
class _Done:
    """One optimizer step, as the loop logs it once its values are read from the device."""

    step: int
    epoch: int
    lr: float
    keys: list[str]
    packed: Tensor  # the logged means, then the non-finite count, then the stop flag; summed over ranks
    grad_norm: Tensor
    num_tokens: int
    ids: list[Any] = field(default_factory=list)  # deferred reads: this rank's samples of the step


class _Stepper:
    """Runs optimizer steps of one method: the body the loop and the budget calibration share."""

    def __init__(self, model: nn.Module, method: nn.Module, batches: Batches | StreamSource, cfg: TrainConfig,
                 runtime: Runtime, seed: int, order: BatchOrder | ShardStream, defer: bool):
        self.model, self.method, self.batches, self.cfg, self.runtime = model, method, batches, cfg, runtime
        self.seed, self.order, self.defer = seed, order, defer
        # fused: its kernel takes the device-side `found_inf` flag that the deferred guard needs
        self.optimizer = build_optimizer(method, cfg.lr, cfg.weight_decay, cfg.betas, fused=defer)
        self.params = [p for p in method.parameters() if p.requires_grad]

    def __call__(self, step: int, stop_requested: Callable[[], bool] = lambda: False) -> _Done:
        """Step `step`; `stop_requested()` is asked after the backward pass (a signal during it counts)."""
        cfg, runtime, optimizer = self.cfg, self.runtime, self.optimizer
        device, rank, world_size = runtime.device, runtime.rank, runtime.world_size
        lr = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_fraction, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(device, self.seed, rank, step)
        torch.manual_seed(generator.initial_seed())  # stray global-RNG users (dropout) stay reproducible too
        stream = self.order if isinstance(self.order, ShardStream) else None  # a shard source: this rank's stream
        global_indices = self.order.next() if stream is None else None

        sums: dict[str, Tensor] = {}
        bad = torch.zeros((), device=device)  # micro-batches with a non-finite loss
        bad_ids: list[Any] = []
        num_tokens = 0  # text batches: real tokens this step on this rank
        for micro in range(cfg.accum_steps):
            if stream is None:
                indices = shard(shard(global_indices, micro, cfg.accum_steps), rank, world_size)
                batch, rows = self.batches(indices, generator), indices.tolist()
            else:  # the rank's next micro-batch, collated by a reader (data/stream.py)
                batch, rows = self.batches(stream.next(), generator), []
            num_tokens += batch.get("num_tokens", 0)
            batch["diagnose"] = bool(cfg.diagnostics_every) and (step == 1 or step % cfg.diagnostics_every == 0)
            sync = micro == cfg.accum_steps - 1 or world_size == 1
            with (nullcontext() if sync else self.model.no_sync()), runtime.autocast():
                out = self.model(batch, (step - 1) / cfg.steps)
            loss = out["loss"]
            if self.defer:
                bad = bad + (~torch.isfinite(loss.detach())).float()
                bad_ids.extend(batch.get("id", rows))
            elif not torch.isfinite(loss):
                bad_ids.extend(batch.get("id", rows))
            (loss / cfg.accum_steps).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.accum_steps

        total_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # FSDP: a DTensor, the norm over every rank's shards (replicated); clipping takes it as it is
        grad_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
        if not self.defer:
            bad = torch.tensor(float(len(bad_ids) > 0), device=device)
        # One collective per step carries the logged values, the finite check and the stop flag.
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [
            bad + (~torch.isfinite(grad_norm)).float(), torch.tensor(float(stop_requested()), device=device)])
        if world_size > 1:
            dist.all_reduce(packed)
            packed[: len(keys)] /= world_size
        done = _Done(step, self.order.epoch, lr, keys, packed, grad_norm, num_tokens)
        if self.defer:
            optimizer.found_inf = (packed[len(keys)] > 0).float()  # read by the fused kernel, on the device
            done.ids = bad_ids
        elif packed[len(keys)].item() > 0:
            optimizer.zero_grad(set_to_none=True)
            what = "loss" if bad_ids else "gradient"
            shown = ", ".join(map(str, bad_ids[:20])) if bad_ids else "(the loss was finite on this rank)"
            raise NonFiniteError(
                f"non-finite {what} at step {step} (rank {rank}); the weights were not updated. "
                f"Samples in this batch: {shown}. Try a lower `train.lr`, `train.precision=fp32`, "
                f"or check these inputs."
            )
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, total_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = getattr(self.method, "after_optimizer_step", None)
        if after is not None:
            after(step / cfg.steps)
        return done


def _read(pending: list[_Done]) -> list[list[float]]:
    """Every pending step's packed values and gradient norm, read from the device at once."""
    parts = [torch.cat([d.packed, d.grad_norm.reshape(1).float()]) for d in pending]  # lengths differ (diagnostics)
    flat = torch.cat(parts).tolist()
    out, at = [], 0
    for part in parts:
        out.append(flat[at: at + len(part)])
        at += len(part)
    return out


def _raise_skipped(done: _Done, rank: int, now: int) -> None:
    shown = ", ".join(map(str, done.ids[:20]))
    raise NonFiniteError(
        f"non-finite loss or gradient at step {done.step} (rank {rank}; read at step {now}): that step's "
        f"update was skipped, the steps after it trained, and nothing after the last checkpoint was saved. "
        f"Samples in that step's batch on this rank: {shown}. Try a lower `train.lr`, `train.precision=fp32`, "
        f"or check these inputs."
    )


def fit(method: nn.Module, batches: Batches | StreamSource, cfg: TrainConfig, run_dir: Path, runtime: Runtime, *,
        seed: int,
        resume: bool = False, monitor: Callable[[nn.Module], dict[str, float]] | None = None,
        stop_after: int | None = None, stop: StopSignal | None = None,
        defer_reads: bool | None = None) -> FitResult:
    """Trains `method` for `cfg.steps` optimizer steps, writing metrics and checkpoints under `run_dir`.

    `monitor(method)` (rank 0, eval mode, no grad) returns extra metrics every `cfg.eval_every` steps
    and at the end. `stop_after` ends the call after that many total steps as if the process had
    died there (tests use it to simulate a crash). `stop` is the caller's signal record (pretrain
    covers start-up and export too); without one the loop installs its own for the loop's duration.
    `defer_reads` (default: on CUDA only) reads logged values once per logging interval (module doc).
    A shard source (`batches.stream_parts`) is read as this rank's ShardStream (data/stream.py) instead
    of the seeded batch order; its workers are shut down when the call ends, however it ends.
    """
    device, rank, world_size = runtime.device, runtime.rank, runtime.world_size
    _check_split(cfg, world_size)
    defer = device.type == "cuda" if defer_reads is None else defer_reads
    method.to(device)
    if cfg.sync_batchnorm:
        method = sync_batchnorm(method, device)  # in place (the root is never a BatchNorm)
    model = _wrap(method, cfg, runtime)
    order = _data_order(batches, cfg, runtime, seed)
    stepper = _Stepper(model, method, batches, cfg, runtime, seed, order, defer)
    optimizer = stepper.optimizer
    ckpt_root = run_dir / "checkpoints"

    start = 0
    saved: dict[str, Any] = {}
    if resume:
        resumed = (sharded.resume_latest(ckpt_root, method, optimizer, runtime) if cfg.parallel == "fsdp"
                   else checkpoint.resume_latest(ckpt_root, method, optimizer))  # logs why when it is None
        if resumed is not None:
            path, saved = resumed
            _restore_position(order, saved, runtime)
            start = int(saved["step"])
            log.info("resumed from %s (step %d)", path, start)
    # Where fp32 CPU products run (nn/gemm.py): chosen once, then kept in the checkpoints, so a resume
    # computes with the same library as the run it continues (bit-identical).
    gemm = _choose_gemm(cfg, runtime, saved.get("cpu_gemm"))
    route_linears(method, gemm)

    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    board = TensorBoard(run_dir / "tensorboard") if cfg.tensorboard and runtime.is_main else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start) if runtime.is_main else None
    progress = Progress(cfg.steps, start, cfg.log_every, enabled=runtime.is_main)
    row: dict[str, Any] = {}
    last_ckpt: Path | None = None

    def save(step: int) -> Path | None:
        path = None
        position = _position(order, runtime)  # every rank: a stream's positions are gathered
        state = {**position, "seed": seed, "cpu_gemm": gemm}
        if cfg.parallel == "fsdp":  # every rank writes its shards
            return sharded.save_checkpoint(ckpt_root, step, method, optimizer, state, cfg.keep_last, runtime)
        if runtime.is_main:
            path = checkpoint.save_checkpoint(ckpt_root, step, method, optimizer, state, cfg.keep_last)
        runtime.barrier()
        return path

    pending: list[_Done] = []
    estimate = _Estimate(cfg, start, enabled=runtime.is_main)
    tic = time.perf_counter()
    try:
        with stop or StopSignal() as stop:
            for step in range(start + 1, cfg.steps + 1):  # `step` = optimizer steps done after this one
                pending.append(stepper(step, lambda: stop.received is not None))
                evaluate = monitor is not None and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                checkpointing = step % cfg.checkpoint_every == 0 or step == cfg.steps
                last = step == cfg.steps or (stop_after is not None and step >= stop_after)
                if defer and not (step % cfg.log_every == 0 or evaluate or checkpointing or last):
                    continue
                # Read what the device holds: one stall per logging interval on CUDA, every step on the CPU.
                values = _read(pending)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = (time.perf_counter() - tic) / len(pending)
                stopping = False
                for done, vals in zip(pending, values):
                    nk = len(done.keys)
                    if vals[nk] > 0:  # only deferred reads get here: a synchronous step raised already
                        _raise_skipped(done, rank, step)
                    stopping = stopping or vals[nk + 1] > 0
                    row = {"step": done.step, "epoch": done.epoch, **dict(zip(done.keys, vals[:nk])),
                           "lr": done.lr, "grad_norm": vals[nk + 2], "samples_per_s": cfg.batch_size / seconds}
                    if done.num_tokens:  # this rank's tokens; ranks see equal shares of full blocks
                        row["tokens_per_s"] = done.num_tokens * world_size / seconds
                    if done is pending[-1] and evaluate:
                        evaluated = sharded.whole(method, runtime)  # rank 0's; under FSDP gathered from every rank
                        if evaluated is not None:
                            row.update(_run_monitor(monitor, evaluated))
                        del evaluated
                    if metrics is not None:
                        metrics.write(row)
                    if board is not None:
                        board.write(done.step, row)
                    progress.update(done.step, row, collapse_warning(row))
                pending.clear()
                estimate.after(step)

                if checkpointing or stopping:
                    last_ckpt = save(step)
                if stopping:
                    where = f"checkpoint {last_ckpt}" if last_ckpt is not None else "rank 0 wrote its checkpoint"
                    raise Interrupted(f"interrupted after step {step}; {where}; continue with --resume",
                                      step, last_ckpt)
                if stop_after is not None and step >= stop_after:
                    break
                tic = time.perf_counter()
    finally:
        _close(order)
        progress.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
    return FitResult(steps=int(row.get("step", start)), last_row=row, checkpoint=last_ckpt)


def _data_order(batches: Batches | StreamSource, cfg: TrainConfig, runtime: Runtime, seed: int,
                announce: bool = True) -> BatchOrder | ShardStream:
    """Where the steps' data come from: the seeded batch order over an in-memory source, or this rank's
    stream over a shard source (one with `stream_parts`; micro-batches of batch / (accum x ranks))."""
    parts = getattr(batches, "stream_parts", None)
    if parts is None:
        return BatchOrder(batches.num_items, cfg.batch_size, seed)
    stream = stream_from_parts(parts, seed=seed, rank=runtime.rank, world_size=runtime.world_size,
                               micro_batch=cfg.batch_size // (cfg.accum_steps * runtime.world_size),
                               accum_steps=cfg.accum_steps, pin_memory=runtime.device.type == "cuda")
    if announce and runtime.is_main:
        log.info("streaming %d shards: %d reader(s) per rank, %d steps in the first epoch",
                 len(stream.plan.paths), stream.plan.readers, stream.steps_per_epoch)
    return stream


def _position(order: BatchOrder | ShardStream, runtime: Runtime) -> dict[str, Any]:
    """The data position a checkpoint keeps: the batch order's, or every rank's stream position (a
    stream's position differs per rank, so it is gathered: call on every rank)."""
    if isinstance(order, BatchOrder):
        return {"data_order": order.state_dict()}
    states: list[Any] = [order.state_dict()]
    if runtime.world_size > 1:
        states = [None] * runtime.world_size
        dist.all_gather_object(states, order.state_dict())
    return {"data_order": {}, "data_stream": states}


def _restore_position(order: BatchOrder | ShardStream, saved: dict[str, Any], runtime: Runtime) -> None:
    streams = saved.get("data_stream")
    if isinstance(order, BatchOrder):
        if streams is not None:
            raise SelfsupError("cannot resume: the checkpoint was written by a run that streamed a folder of shards, "
                               "and this run reads its data in memory: resume with that run's `data.source`, or "
                               "start a new run")
        order.load_state_dict(saved["data_order"])
        return
    if streams is None:
        raise SelfsupError("cannot resume: the checkpoint was written by a run that read its data in memory, and "
                           "this run streams a folder of shards: resume with that run's `data.source`, or start a "
                           "new run")
    if len(streams) != runtime.world_size:
        raise SelfsupError(f"cannot resume: the checkpoint's stream was read by {len(streams)} ranks, this run has "
                           f"{runtime.world_size}: resume with as many ranks (torchrun --nproc_per_node), or start "
                           f"a new run")
    order.load_state_dict(streams[runtime.rank])


def _close(order: BatchOrder | ShardStream) -> None:
    if isinstance(order, ShardStream):
        order.close()  # its reader processes


class _Estimate:
    """Logs, once, the time the rest of the run will take, from the steps after the first (which pays
    one-time costs); where that is long, which knobs shorten it."""

    LONG_S = 15 * 60

    def __init__(self, cfg: TrainConfig, start: int, enabled: bool, after_steps: int = 3):
        self.cfg, self.start, self.after_steps = cfg, start, after_steps
        self.origin: tuple[int, float] | None = None
        self.done = not enabled

    def after(self, step: int) -> None:
        if self.done:
            return
        now = time.perf_counter()
        if self.origin is None:
            self.origin = (step, now)
            return
        first, then = self.origin
        if step - first < self.after_steps:
            return
        self.done = True
        per_step = (now - then) / (step - first)
        left = self.cfg.steps - step
        total = per_step * left
        log.info("estimated time: %s for the remaining %d steps (%.2f s/step measured over steps %d-%d)%s",
                 format_duration(total), left, per_step, first + 1, step,
                 "" if left == 0 or not self.cfg.eval_every else ", plus the held-out evaluations")
        if total > self.LONG_S and self.cfg.minutes is None:
            log.info("that is long for this machine: `train.minutes=M` trains for M minutes instead (the step count "
                     "is fixed to fit), or make steps cheaper: a smaller encoder (e.g. `encoder.name=resnet10 "
                     "encoder.width=16`, `vit_tiny`), `train.batch_size`, `data.image_size` or `data.seq_len`")


def _wrap(method: nn.Module, cfg: TrainConfig, runtime: Runtime) -> nn.Module | sharded.ShardedModel:
    """What the steps call: the method sharded by FSDP2 (`train.parallel=fsdp`, train/sharded.py), in
    DDP under torchrun, or itself."""
    if cfg.parallel == "fsdp":
        return sharded.shard(method, runtime)
    return DistributedDataParallel(method) if runtime.world_size > 1 else method


def _choose_gemm(cfg: TrainConfig, runtime: Runtime, saved: str | None = None) -> str:
    """`train.cpu_gemm` resolved on rank 0 (for "auto": by the CPU's vendor) and shared, so every rank
    computes with the same library; `saved`, a checkpoint's choice, when there is one. Sharded over
    ranks, always torch's: FSDP2 frees a layer's gathered weights by resizing their storage, which
    the numpy view OpenBLAS computes through forbids."""
    if cfg.parallel == "fsdp" and runtime.world_size > 1:
        if cfg.cpu_gemm == "openblas" and runtime.device.type == "cpu":
            log.info("train.cpu_gemm=openblas: not under train.parallel=fsdp on several ranks; using torch's GEMM")
        return "torch"
    if saved:
        return saved
    backend = choose_cpu_gemm(cfg.cpu_gemm, runtime.device, runtime.autocast_dtype is not None)
    if runtime.world_size > 1:
        flag = torch.tensor([1 if backend == "openblas" else 0], device=runtime.device)
        dist.broadcast(flag, src=0)
        backend = "openblas" if int(flag) else "torch"
    return backend


def _check_split(cfg: TrainConfig, world_size: int) -> None:
    micro_batch, rem = divmod(cfg.batch_size, cfg.accum_steps * world_size)
    if rem or micro_batch < 1:
        raise SelfsupError(
            f"`train.batch_size` ({cfg.batch_size}) must split evenly into accum_steps ({cfg.accum_steps}) "
            f"x ranks ({world_size}) micro-batches"
        )


@dataclass
class Budget:
    """What `steps_for_budget` measured and chose."""

    steps: int
    seconds_per_step: float
    seconds_per_eval: float
    seconds_per_checkpoint: float
    calibration_seconds: float  # spent measuring, counted in the budget
    timed_steps: int

    def describe(self, minutes: float) -> str:
        evals = f" + {self.seconds_per_eval:.1f} s per evaluation" if self.seconds_per_eval else ""
        return (f"train.minutes={minutes:g}: {self.seconds_per_step:.3f} s/step over {self.timed_steps} timed steps"
                f"{evals} + {self.seconds_per_checkpoint:.1f} s per checkpoint -> train.steps={self.steps}")


def steps_for_budget(method: nn.Module, batches: Batches | StreamSource, cfg: TrainConfig, run_dir: Path,
                     runtime: Runtime, *,
                     seed: int, monitor: Callable[[nn.Module], dict[str, float]] | None = None,
                     warmup: int = 2, min_timed: int = 5, max_timed: int = 20) -> Budget:
    """The number of optimizer steps that fit `cfg.minutes` of training (steps, evaluations, checkpoints).

    Runs `warmup` untimed and then at least `min_timed` timed steps (more while they take under 1 %
    of the budget, at most `max_timed`) of a deep copy of `method` with its own optimizer and batch
    order (a shard source: its own stream from the start, workers included), one evaluation and one
    checkpoint of the copy (written to a scratch folder in `run_dir` and removed); `method` itself is
    not touched. Every rank measures; the slowest rank's times
    decide, so all ranks return the same count. The time spent measuring counts against the budget.
    """
    assert cfg.minutes is not None
    begin = time.perf_counter()
    budget_s = cfg.minutes * 60.0
    device, world_size = runtime.device, runtime.world_size
    _check_split(cfg, world_size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    probe = copy.deepcopy(method).to(device)
    route_linears(probe, _choose_gemm(cfg, runtime))  # timed as `fit` will run it
    if cfg.sync_batchnorm:
        probe = sync_batchnorm(probe, device)
    model = _wrap(probe, cfg, runtime)
    order = _data_order(batches, cfg, runtime, seed, announce=False)
    stepper = _Stepper(model, probe, batches, cfg, runtime, seed, order, defer=False)
    step_times: list[float] = []
    try:
        for step in range(1, warmup + max_timed + 1):
            tic = time.perf_counter()
            stepper(step)
            sync()
            if step > warmup:
                step_times.append(time.perf_counter() - tic)
                if len(step_times) >= min_timed and sum(step_times) >= 0.01 * budget_s:
                    break
    finally:
        _close(order)
    seconds_per_step = _median(step_times)

    seconds_per_eval = 0.0
    if monitor is not None:
        tic = time.perf_counter()
        evaluated = sharded.whole(probe, runtime)  # rank 0's; under FSDP gathered from every rank (timed too)
        if evaluated is not None:
            _run_monitor(monitor, evaluated)
        seconds_per_eval = time.perf_counter() - tic
        del evaluated
    seconds_per_checkpoint = 0.0
    if cfg.parallel == "fsdp":  # every rank writes its shards
        scratch = run_dir / ".budget-checkpoint"
        tic = time.perf_counter()
        try:
            sharded.save_checkpoint(scratch, 1, probe, stepper.optimizer, {"data_order": {}, "seed": seed}, 1, runtime)
        finally:
            seconds_per_checkpoint = time.perf_counter() - tic
            if runtime.is_main:
                shutil.rmtree(scratch, ignore_errors=True)
    elif runtime.is_main:
        scratch = run_dir / ".budget-checkpoint"
        tic = time.perf_counter()
        try:
            checkpoint.save_checkpoint(scratch, 1, probe, stepper.optimizer, {"data_order": {}, "seed": seed}, 1)
        finally:
            seconds_per_checkpoint = time.perf_counter() - tic
            shutil.rmtree(scratch, ignore_errors=True)
    del stepper, model, probe
    measured = torch.tensor([seconds_per_step, seconds_per_eval, seconds_per_checkpoint], dtype=torch.float64)
    if world_size > 1:
        measured = measured.to(device)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    seconds_per_step, seconds_per_eval, seconds_per_checkpoint = measured.tolist()
    calibration = time.perf_counter() - begin
    if world_size > 1:  # the slowest rank's calibration time, so that every rank computes the same count
        spent = torch.tensor([calibration], dtype=torch.float64, device=device)
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        calibration = float(spent.item())

    # Per step: the step, its share of the periodic evaluations and checkpoints; once: the final ones.
    per_step = seconds_per_step + seconds_per_checkpoint / cfg.checkpoint_every
    if monitor is not None and cfg.eval_every:
        per_step += seconds_per_eval / cfg.eval_every
    fixed = seconds_per_checkpoint + (seconds_per_eval if monitor is not None else 0.0)
    steps = math.floor((budget_s - calibration - fixed) / per_step)
    if steps < 1:
        raise SelfsupError(
            f"`train.minutes={cfg.minutes:g}` leaves no time to train: measuring took {calibration:.0f} s, a step takes "
            f"{seconds_per_step:.2f} s and the final evaluation and checkpoint {fixed:.1f} s. Raise `train.minutes`, "
            f"or make steps cheaper (a smaller `train.batch_size`, encoder or `data.image_size`/`data.seq_len`)."
        )
    return Budget(steps, seconds_per_step, seconds_per_eval, seconds_per_checkpoint, calibration, len(step_times))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


@torch.no_grad()
def _run_monitor(monitor: Callable[[nn.Module], dict[str, float]], method: nn.Module) -> dict[str, float]:
    was_training = method.training
    method.eval()
    try:
        return monitor(method)
    finally:
        method.train(was_training)
