"""The loop on a shard source (a fake StreamBatches over fake shards): interrupted + resumed equals
uninterrupted byte for byte, in this process and with worker processes; a stop signal and an error
shut the workers down; train.minutes; refused resumes; 2 gloo ranks through torchrun."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from selfsup.errors import NonFiniteError, SelfsupError
from selfsup.train import checkpoint
from selfsup.train.loop import Interrupted, fit, steps_for_budget
from tests.conftest import tiny_train_config
from tests.train.test_ddp import _failure, _torchrun
from tests.train.test_loop import CPU, ToyBatches, ToyRegression, _rows

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------- fake shards of regression rows
# Shard "rI-N" holds N rows made from I alone; module-level functions so worker processes run them.


def read(path: Path):
    name, n = path.name.rsplit("-", 1)
    gen = torch.Generator().manual_seed(int(name[1:]))
    for j in range(int(n)):
        x = torch.randn(3, generator=gen)
        y = float(x @ torch.tensor([1.0, -2.0, 0.5]))
        yield f"{name}/{j}", {"x": struct.pack("<3f", *x.tolist()), "y": struct.pack("<f", y)}


def decode(samples):
    for key, files in samples:
        yield key, torch.tensor(struct.unpack("<3f", files["x"])), struct.unpack("<f", files["y"])[0]


decode.per_sample = True


def collate(items: list) -> dict[str, Any]:
    return {"id": [k for k, _, _ in items], "x": torch.stack([x for _, x, _ in items]),  # [B, 3]
            "y": torch.tensor([y for _, _, y in items])}  # [B]


@dataclass
class Parts:
    shards: list[tuple[Path, int]]
    workers: int = 0
    shuffle_buffer: int = 5
    read: Any = read
    to_items: Any = decode
    items_in: Any = sum
    collate: Any = collate


@dataclass
class ToyStreamBatches:
    """What a modality's StreamBatches is to the loop: `stream_parts` + `(collated, generator) -> batch`."""

    stream_parts: Parts
    seen: list[list[str]] = field(default_factory=list)  # ids of each micro-batch this process trained on

    def __call__(self, collated: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        self.seen.append(collated["id"])
        return {"x": collated["x"], "y": collated["y"], "id": collated["id"]}


def shard_source(num_shards: int = 4, size: int = 8, workers: int = 0) -> ToyStreamBatches:
    return ToyStreamBatches(Parts([(Path(f"/shards/r{i}-{size}"), size) for i in range(num_shards)], workers))


def _noisy(call: int, model: ToyRegression, loss: torch.Tensor) -> torch.Tensor:
    """A loss that draws from the global RNG, like dropout: a data side that drew from it too would
    change the weights."""
    return loss * (1 + 0.1 * torch.rand(()))


def _run(run_dir: Path, cfg, *, workers: int = 0, **kwargs) -> tuple[ToyRegression, ToyStreamBatches]:
    torch.manual_seed(0)
    model = ToyRegression(kwargs.pop("hook", _noisy))
    source = shard_source(workers=workers)
    fit(model, source, cfg, run_dir, CPU, seed=0, **kwargs)
    return model, source


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("workers,crashes", [(0, [3, 4, 5]), (2, [3])])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, workers, crashes):
    # 4 shards x 8 rows, batch 8: 4 steps per epoch; 10 steps cross two epoch ends (4, 8).
    cfg = tiny_train_config(steps=10, checkpoint_every=2)
    reference, source = _run(tmp_path / "whole", cfg, workers=workers)
    expected = _rows(tmp_path / "whole")
    epochs = [[k for ids in source.seen[e * 4: e * 4 + 4] for k in ids] for e in range(2)]
    assert all(sorted(ids) == sorted(f"r{i}/{j}" for i in range(4) for j in range(8)) for ids in epochs)
    assert epochs[0] != epochs[1] and [r["epoch"] for r in expected] == [0] * 4 + [1] * 4 + [2] * 2
    for crash in crashes:
        run_dir = tmp_path / f"crash{crash}"
        _run(run_dir, cfg, workers=workers, stop_after=crash)
        resumed, again = _run(run_dir, cfg, workers=workers, resume=True)
        assert again.seen == source.seen[(crash // 2) * 2:], "the resumed run draws the rest of the stream"
        assert _rows(run_dir) == expected, f"metrics differ after a crash at step {crash}"
        assert _same_weights(reference, resumed), f"weights differ after a crash at step {crash}"
    assert multiprocessing.active_children() == []


def test_a_stop_signal_and_an_error_shut_the_workers_down(tmp_path):
    def sigterm(call, model, loss):
        if call == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return _noisy(call, model, loss)

    cfg = tiny_train_config(steps=6, checkpoint_every=100)
    with pytest.raises(Interrupted) as info:
        _run(tmp_path / "stopped", cfg, workers=2, hook=sigterm)
    assert info.value.step == 3 and multiprocessing.active_children() == []
    resumed, _ = _run(tmp_path / "stopped", cfg, workers=2, resume=True)
    reference, _ = _run(tmp_path / "whole", cfg, workers=2)
    assert _same_weights(reference, resumed)

    with pytest.raises(NonFiniteError):
        _run(tmp_path / "nan", cfg, workers=2, hook=lambda call, m, loss: loss * float("nan") if call == 2 else loss)
    assert multiprocessing.active_children() == []


def test_a_resume_across_sources_or_workers_is_refused(tmp_path):
    cfg = tiny_train_config(steps=4, checkpoint_every=2)
    fit(ToyRegression(), ToyBatches(), cfg, tmp_path / "memory", CPU, seed=0, stop_after=2)
    with pytest.raises(SelfsupError, match="read its data in memory, and this run streams"):
        fit(ToyRegression(), shard_source(), cfg, tmp_path / "memory", CPU, seed=0, resume=True)

    fit(ToyRegression(), shard_source(workers=2), cfg, tmp_path / "stream", CPU, seed=0, stop_after=2)
    with pytest.raises(SelfsupError, match="streamed a folder of shards"):
        fit(ToyRegression(), ToyBatches(), cfg, tmp_path / "stream", CPU, seed=0, resume=True)
    with pytest.raises(SelfsupError, match=r"`data.workers`.*= 2, this run has 1"):
        fit(ToyRegression(), shard_source(workers=1), cfg, tmp_path / "stream", CPU, seed=0, resume=True)
    state = torch.load(checkpoint.latest_valid(tmp_path / "stream" / "checkpoints") / "state.pt", weights_only=True)
    assert state["data_stream"][0]["consumed"] == 2


def test_steps_for_budget_times_its_own_stream(tmp_path):
    model = ToyRegression()
    before = [p.detach().clone() for p in model.parameters()]
    budget = steps_for_budget(model, shard_source(workers=1), tiny_train_config(minutes=0.05, checkpoint_every=1000),
                              tmp_path, CPU, seed=0)
    assert budget.steps > 10 and budget.timed_steps >= 5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------------- DDP (gloo)


def test_two_gloo_ranks_take_the_same_steps_and_see_each_item_once_per_epoch(tmp_path):
    proc = _torchrun(str(REPO / "tests/train/ddp_stream_worker.py"), str(tmp_path / "out"))
    assert proc.returncode == 0, _failure(proc)
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert [len(r["seen"]) for r in ranks] == [8, 8], "8 steps of one micro-batch each on both ranks"
    everything = sorted(f"r{i}/{j}" for i in range(8) for j in range(4))
    for epoch in range(2):  # 32 rows, batch 8: 4 steps per epoch
        ids = [k for r in ranks for batch in r["seen"][epoch * 4: epoch * 4 + 4] for k in batch]
        assert sorted(ids) == everything, f"epoch {epoch}"
    assert all(r["resumed_equal"] for r in ranks), "interrupted + resumed equals uninterrupted on every rank"
    assert ranks[0]["resumed_seen"] != ranks[1]["resumed_seen"]
