"""Sharded streaming data: one rank's stream of collated micro-batches read from a folder of shards.

A corpus too large to hold in memory is read as a stream of shards (tar files, `data/shards.py`).
This module owns the order — which reader reads which shard, the shuffle, where an epoch ends, the
resumable position — and knows nothing of tar, decoding or modalities: it is handed `read`
(a shard's path -> raw samples), `to_items` (raw samples -> items: decoding, bad samples skipped,
text packed into blocks), `items_in` (how many items a reader's shards give) and `collate`.

An epoch e, computed alike on every rank from the shard list and the seed (no communication):

- **order**: the shards in a permutation drawn from (seed, e);
- **assignment**: there are G = ranks x W readers ("global workers"), reader g = rank * W + w, where
  W = max(`data.workers`, 1). Taking the shards in that order, each goes to the reader with the fewest
  units so far (the shard list's counts; ties to the lowest g). With equal shards this is exactly
  "position p -> reader p % G"; with unequal ones (a writer's short last shard, text files of any size)
  it keeps every reader within one shard of the others, where p % G can leave a reader — and with it
  every rank's epoch, which ends at the smallest rank — a whole shard short;
- **a reader** reads its shards in that order (raw bytes, never decoded here), shuffles them through a
  buffer of `shuffle_buffer` samples (seeded from (seed, e, g)), runs `to_items` on them, and collates
  micro-batches of `micro_batch` items; its ragged tail (< micro_batch items) is dropped this epoch;
- **a rank** runs its W readers in `data.workers` DataLoader processes (or all in this process when
  `data.workers=0`) and takes their micro-batches round-robin: reader `first`, `first + 1`, ... ; a
  reader that has ended drops out of the cycle. The DataLoader delivers an IterableDataset's batches
  in exactly that order (`in_order`: task i goes to the next live worker in the cycle and results
  are returned in task order; a worker that ends forfeits its outstanding tasks), so process and
  in-process readers give the same stream (tested);
- **steps**: every rank ends epoch e after S_e x accum_steps micro-batches, with
  S_e = min over ranks of (sum over its readers of items_in(counts) // micro_batch) // accum_steps —
  the same number on every rank, so no rank ever waits for another in a collective. Items past it
  are not seen in e: every item is seen at most once per epoch, exactly once when the counts divide.
  S_e can differ between epochs when shards are unequal (the assignment changes with the order).

**Shortfall.** `items_in` is a promise made from counts; `to_items` may keep it short (samples skipped
as bad under `data.on_bad_file=skip`). A rank whose readers end before S_e x accum_steps micro-batches
does not stop (the others would hang in the next all-reduce): it starts the same epoch over (a
"pass"; same order, same shuffle) and takes the missing micro-batches from its beginning — repeats of
items it already trained on this epoch — counted (`repeated`) and logged as a warning. A pass that
gives no micro-batch at all is an error.

**Position and resume.** The position is (epoch, micro-batches consumed this epoch, pass, the next
reader in the cycle, and per reader (micro-batches it gave, raw samples it had pulled through
`to_items` when it gave its last one)). A resumed reader replays its shuffle (re-reading tar bytes)
and restarts where it stopped:
- `to_items.per_sample = True` (images, image–text pairs, audio: each item comes from one sample and
  nothing is kept from one sample to the next): the reader skips the samples it had pulled, without decoding them,
  and runs `to_items` on the rest. This needs `to_items` to be lazy — to pull a sample only when it
  needs one for its next item — as a plain generator is;
- otherwise (text packing carries a partial block from one document into the next): the reader runs
  `to_items` from its start of the epoch again and discards the items it had given (decoding them
  again, once, without collating them); exact for any `to_items`.
The cycle then starts at the saved next reader (DataLoader worker i plays reader (first + i) % W), so
a resumed stream gives exactly the micro-batches an uninterrupted one would (tested). Ranks, W
(`data.workers`; 0 and 1 are the same), micro-batch, accum_steps, shuffle buffer, seed and the shard
list (names and counts) must be those of the checkpoint: a resume with any of them changed is refused.

`read`, `to_items` and `collate` draw no random numbers (augmentation belongs to the step's generator,
in the batches' `__call__`); the stream draws none from the global RNG either, so the training's
random state does not depend on where workers start.

**Workers** start with one torch thread and ignore SIGINT/SIGTERM (the training process owns the stop:
it finishes the step, checkpoints and shuts them down). They are not persistent: each epoch, pass or
resume starts fresh ones (an epoch's settings reach them when they start), and they are shut down as
soon as the rank has taken its epoch's last micro-batch, on `close()`, and with the stream on errors.
A reader's `SelfsupError` (a corrupt shard) reaches the training process with its message intact.

Nothing corpus-sized is held: the shard list, each reader's shuffle buffer and the position.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import logging
import random
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: raw bytes}), as data/shards.py reads them


class StreamSource(Protocol):
    """The data side of the loop for a shard source (the in-memory one is `Batches`):
    `stream_parts` (a mapping or an object) holds shards, read, to_items, items_in, collate, workers and
    shuffle_buffer; `batches(collated, generator)` turns one collated micro-batch into a batch dict on
    the device."""

    stream_parts: Any

    def __call__(self, collated: Any, generator: torch.Generator) -> dict[str, Any]: ...


def assign_shards(counts: list[int], readers: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per reader for `epoch`: the shards in a permutation drawn from (seed, epoch), each
    to the reader with the fewest units so far (ties: the lowest reader); equal shards go p -> p % readers."""
    order = list(range(len(counts)))
    random.Random(f"selfsup-shards:{seed}:{epoch}").shuffle(order)
    heap = [(0, g) for g in range(readers)]  # (units so far, reader); sorted, hence a heap
    out: list[list[int]] = [[] for _ in range(readers)]
    for i in order:
        load, g = heapq.heappop(heap)
        out[g].append(i)
        heapq.heappush(heap, (load + counts[i], g))
    return out


def _shuffled(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """The samples through a shuffle buffer of `size` (<= 1: in order): once full, each new sample
    takes the place of a random one, which is yielded; the rest come out shuffled at the end."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


class _Counted:
    """An iterator that counts what was pulled from it (a reader's raw-sample position)."""

    def __init__(self, it: Iterator[Sample]):
        self.it, self.pulled = it, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> Sample:
        sample = next(self.it)
        self.pulled += 1
        return sample


@dataclass(frozen=True)
class _Failed:
    """A reader's SelfsupError, carried out of a worker process as data so its message arrives intact
    (the DataLoader would wrap it in a worker traceback)."""

    message: str


@dataclass(frozen=True)
class _Plan:
    """What every reader needs (handed to the DataLoader workers)."""

    paths: tuple[Path, ...]
    counts: tuple[int, ...]
    read: Callable[[Path], Iterator[Sample]]
    to_items: Callable[[Iterator[Sample]], Iterator[Any]]
    items_in: Callable[[list[int]], int]
    collate: Callable[[list[Any]], Any]
    seed: int
    rank: int
    world_size: int
    readers: int  # W per rank
    micro_batch: int
    shuffle_buffer: int
    accum_steps: int

    def assignment(self, epoch: int) -> list[list[int]]:
        return assign_shards(list(self.counts), self.world_size * self.readers, self.seed, epoch)

    def items_of(self, shard_ids: list[int]) -> int:
        return int(self.items_in([self.counts[i] for i in shard_ids])) if shard_ids else 0


Cursor = tuple[int, int]  # one reader's (micro-batches given, raw samples pulled when it gave its last one)


class _EpochPass(IterableDataset):
    """One pass of one rank over epoch `epoch`, from a position: in DataLoader worker i, reader
    (first + i) % W; outside workers, all W readers round-robin from `first`."""

    def __init__(self, plan: _Plan, epoch: int, first: int, cursors: tuple[Cursor, ...]):
        super().__init__()
        self.plan, self.epoch, self.first, self.cursors = plan, epoch, first, cursors

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None:
            return self._round_robin()
        return self._in_worker((self.first + info.id) % self.plan.readers)

    def _in_worker(self, w: int) -> Iterator[Any]:
        try:
            yield from self._reader(w, self.plan.assignment(self.epoch))
        except SelfsupError as err:
            yield _Failed(str(err))

    def _round_robin(self) -> Iterator[Any]:
        W = self.plan.readers
        assignment = self.plan.assignment(self.epoch)
        readers = [self._reader((self.first + i) % W, assignment) for i in range(W)]
        try:
            i = 0
            while readers:
                try:
                    item = next(readers[i])
                except StopIteration:
                    readers.pop(i)
                    i = i % len(readers) if readers else 0
                    continue
                yield item
                i = (i + 1) % len(readers)
        finally:
            for reader in readers:
                reader.close()  # closes to_items and the open shard

    def _reader(self, w: int, assignment: list[list[int]]) -> Iterator[tuple[int, int, int, Any]]:
        """Reader w's micro-batches from its cursor: (w, its batch number, samples pulled, collated)."""
        plan = self.plan
        g = plan.rank * plan.readers + w
        given, pulled = self.cursors[w]
        rng = random.Random(f"selfsup-buffer:{plan.seed}:{self.epoch}:{g}")
        raw = itertools.chain.from_iterable(plan.read(plan.paths[i]) for i in assignment[g])
        samples = _Counted(_shuffled(raw, plan.shuffle_buffer, rng))
        skip_items = 0
        if getattr(plan.to_items, "per_sample", False):
            collections.deque(itertools.islice(samples, pulled), maxlen=0)  # read past, never decoded
        else:
            skip_items = given * plan.micro_batch  # decoded again, not collated
        items = plan.to_items(samples)
        batch: list[Any] = []
        number = given
        try:
            for item in items:
                if skip_items:
                    skip_items -= 1
                    continue
                batch.append(item)
                if len(batch) == plan.micro_batch:
                    yield w, number, samples.pulled, plan.collate(batch)
                    number += 1
                    batch = []
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


def _identity(x: Any) -> Any:
    return x


def _init_worker(worker_id: int) -> None:
    """A DataLoader worker: one torch thread (the training process has the cores), and SIGINT/SIGTERM
    ignored — the training process stops at a step boundary and shuts the workers down itself."""
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class ShardStream:
    """One rank's stream of collated micro-batches over the shards, epoch after epoch (module doc).

    `shards`: (path, count) in a fixed order, the same on every rank; the count is in whatever unit
    `items_in` takes (samples for images and audio, tokens for text). `workers`: DataLoader processes
    per rank (0 = read in this process); `in_process` runs max(workers, 1) readers in this process
    instead, giving the same stream (tests, debugging). `next()` returns the next collated micro-batch;
    `state_dict()`/`load_state_dict()` save and restore the position; `close()` stops the workers.
    """

    def __init__(self, shards: list[tuple[Path, int]], *, read: Callable[[Path], Iterator[Sample]],
                 to_items: Callable[[Iterator[Sample]], Iterator[Any]], items_in: Callable[[list[int]], int],
                 collate: Callable[[list[Any]], Any], seed: int, rank: int, world_size: int, workers: int,
                 micro_batch: int, shuffle_buffer: int, accum_steps: int = 1, pin_memory: bool = False,
                 in_process: bool = False):
        if not shards:
            raise SelfsupError("the shard source holds no shards: point `data.source` at a folder written by "
                               "`selfsup data shard`")
        for name, value, least in (("data.workers", workers, 0), ("micro-batch", micro_batch, 1),
                                   ("data.shuffle_buffer", shuffle_buffer, 0), ("train.accum_steps", accum_steps, 1)):
            if value < least:
                raise SelfsupError(f"`{name}` must be at least {least}, got {value}")
        if not 0 <= rank < world_size:
            raise SelfsupError(f"rank {rank} is outside the {world_size} ranks")
        self.plan = _Plan(tuple(Path(p) for p, _ in shards), tuple(int(c) for _, c in shards), read, to_items,
                          items_in, collate, seed, rank, world_size, max(workers, 1), micro_batch, shuffle_buffer,
                          accum_steps)
        self.workers, self.pin_memory = workers, pin_memory
        self.in_process = in_process or workers == 0
        self._steps: tuple[int, int] | None = None  # (epoch, steps) of the last epoch asked about
        self._source: Iterator[Any] | None = None
        self.epoch = 0  # the position: the epoch being read ...
        self.consumed = 0  # ... the micro-batches this rank took from it ...
        self.passes = 0  # ... passes started over it because the readers ran short ...
        self.repeated = 0  # ... micro-batches taken from those repeat passes ...
        self.first = 0  # ... the reader the next micro-batch comes from ...
        self.cursors: list[Cursor] = [(0, 0)] * self.plan.readers  # ... and where each reader is in this pass
        self.steps_in(0)  # too few items for one step: say so now

    # -- the epoch's length ----------------------------------------------------------------------

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps in `epoch`, the same on every rank (module doc); raises when it is 0."""
        if self._steps is None or self._steps[0] != epoch:
            plan, W = self.plan, self.plan.readers
            groups = plan.assignment(epoch)
            per_rank = [sum(plan.items_of(groups[r * W + w]) // plan.micro_batch for w in range(W))
                        for r in range(plan.world_size)]
            steps = min(per_rank) // plan.accum_steps
            if steps < 1:
                G = plan.world_size * W
                fix = (f"there are {len(plan.paths)} shards for {G} readers (ranks x data.workers), so some read "
                       f"nothing: lower `data.workers` or write more, smaller shards" if len(plan.paths) < G
                       else "lower `train.batch_size` or `data.workers`, or add data")
                raise SelfsupError(
                    f"the shards give rank {per_rank.index(min(per_rank))} only {min(per_rank)} micro-batches of "
                    f"{plan.micro_batch} in epoch {epoch}, fewer than one optimizer step takes "
                    f"({plan.accum_steps}): {fix}")
            self._steps = (epoch, steps)
        return self._steps[1]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in the current epoch (epochs can differ when shards are unequal)."""
        return self.steps_in(self.epoch)

    # -- drawing ---------------------------------------------------------------------------------

    def next(self) -> Any:
        """The next collated micro-batch of this rank; advances the position."""
        plan = self.plan
        per_epoch = self.steps_in(self.epoch) * plan.accum_steps
        if self.consumed >= per_epoch:
            self._close_source()
            self.epoch, self.consumed, self.passes, self.repeated = self.epoch + 1, 0, 0, 0
            self._new_pass()
            per_epoch = self.steps_in(self.epoch) * plan.accum_steps
        while True:
            if self._source is None:
                self._source = self._open()
            try:
                item = next(self._source)
            except StopIteration:
                self._close_source()
                if not any(given for given, _ in self.cursors):
                    raise SelfsupError(
                        f"rank {plan.rank}: the shards gave no micro-batch at all in epoch {self.epoch}: every "
                        f"sample was skipped as bad, or the shards hold fewer items than their counts say "
                        f"(rewrite them with `selfsup data shard`)") from None
                missing = per_epoch - self.consumed
                log.warning("rank %d, epoch %d: the readers ended %d micro-batches before the %d every rank takes "
                            "this epoch (samples skipped as bad give fewer items than the shard counts promise); "
                            "repeating the epoch's first %d micro-batches so that all ranks take the same steps",
                            plan.rank, self.epoch, missing, per_epoch, missing)
                self.passes += 1
                self._new_pass()
                continue
            if isinstance(item, _Failed):
                self._close_source()
                raise SelfsupError(item.message)
            w, number, pulled, batch = item
            self.cursors[w] = (int(number) + 1, int(pulled))
            self.first = (int(w) + 1) % plan.readers
            self.consumed += 1
            if self.passes:
                self.repeated += 1
            if self.consumed >= per_epoch:
                self._close_source()  # the epoch is over for this rank: free the workers now
            return batch

    def _new_pass(self) -> None:
        self.first = 0
        self.cursors = [(0, 0)] * self.plan.readers

    def _open(self) -> Iterator[Any]:
        source = _EpochPass(self.plan, self.epoch, self.first, tuple(self.cursors))
        if self.in_process:
            return iter(source)
        # Its own generator: the workers' base seed would otherwise be drawn from the global RNG, and a
        # resumed run (which starts its workers at another step) would draw dropout masks from another state.
        generator = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + self.epoch)
        loader = DataLoader(source, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                            worker_init_fn=_init_worker, pin_memory=self.pin_memory, persistent_workers=False,
                            generator=generator)
        return iter(loader)

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is None:
            return
        close = getattr(source, "close", None) or getattr(source, "_shutdown_workers", None)
        if close is not None:
            close()

    def close(self) -> None:
        """Stops the readers (worker processes, open shards); `next()` would start them again."""
        self._close_source()

    def __enter__(self) -> "ShardStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- position --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        plan = self.plan
        listing = "\n".join(f"{p.name}\t{c}" for p, c in zip(plan.paths, plan.counts))
        return {"rank": plan.rank, "world_size": plan.world_size, "readers": plan.readers,
                "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps,
                "shuffle_buffer": plan.shuffle_buffer, "seed": plan.seed, "num_shards": len(plan.paths),
                "shards": hashlib.sha256(listing.encode()).hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "passes": self.passes, "repeated": self.repeated,
                "first": self.first, "cursors": [list(c) for c in self.cursors], "identity": self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved position; refuses one read with other ranks, readers, batch or shards."""
        saved, mine = state["identity"], self._identity()
        what = {"world_size": "ranks", "readers": "readers per rank (`data.workers`; 0 and 1 are both one)",
                "micro_batch": "micro-batch (`train.batch_size` / (accum_steps x ranks))",
                "accum_steps": "`train.accum_steps`", "shuffle_buffer": "`data.shuffle_buffer`", "seed": "`seed`",
                "num_shards": "shards", "rank": "rank"}
        for key, name in what.items():
            if saved[key] != mine[key]:
                raise SelfsupError(
                    f"cannot resume: the checkpoint's stream was read with {name} = {saved[key]}, this run has "
                    f"{mine[key]}. The stream's position is kept per rank and reader: resume with the same ranks, "
                    f"`data.workers`, `train.batch_size`, `train.accum_steps` and `data.shuffle_buffer`, or start "
                    f"a new run")
        if saved["shards"] != mine["shards"]:
            raise SelfsupError("cannot resume: the shard list (names and item counts) differs from the one the "
                               "checkpoint's stream was read from: resume on the same shards, or start a new run")
        if len(state["cursors"]) != self.plan.readers:
            raise SelfsupError(f"cannot resume: the checkpoint's stream position has {len(state['cursors'])} "
                               f"readers, this run has {self.plan.readers}")
        self._close_source()
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.passes, self.repeated, self.first = int(state["passes"]), int(state["repeated"]), int(state["first"])
        self.cursors = [(int(a), int(b)) for a, b in state["cursors"]]
        if any(given for given, _ in self.cursors) and not getattr(self.plan.to_items, "per_sample", False):
            log.info("rank %d: the stream resumes in epoch %d after %d micro-batches; its readers decode the items "
                     "they gave again and discard them (items here can span samples, e.g. packed text)",
                     self.plan.rank, self.epoch, self.consumed)


def stream_from_parts(parts: Any, *, seed: int, rank: int, world_size: int, micro_batch: int, accum_steps: int,
                      pin_memory: bool = False) -> ShardStream:
    """The ShardStream of one rank for a StreamSource's `stream_parts` (a mapping or an object)."""

    def part(name: str) -> Any:
        return parts[name] if isinstance(parts, Mapping) else getattr(parts, name)

    return ShardStream(list(part("shards")), read=part("read"), to_items=part("to_items"),
                       items_in=part("items_in"), collate=part("collate"), seed=seed, rank=rank,
                       world_size=world_size, workers=int(part("workers")), micro_batch=micro_batch,
                       shuffle_buffer=int(part("shuffle_buffer")), accum_steps=accum_steps, pin_memory=pin_memory)
