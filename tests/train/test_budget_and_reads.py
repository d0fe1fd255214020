"""`train.minutes` (steps fixed from a timed start, resume repeats them) and the loop's deferred
host reads (the CUDA path's once-per-interval reads and device-side non-finite guard, run on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.config import load_config
from selfsup.errors import NonFiniteError, SelfsupError
from selfsup.pretrain import pretrain
from selfsup.train.loop import _Stepper, fit, steps_for_budget
from selfsup.data.sampler import BatchOrder
from tests.conftest import TINY_RUN, tiny_train_config
from tests.train.test_loop import CPU, ToyBatches, ToyRegression, _rows, _simclr_run


# ------------------------------------------------------------------------- deferred reads


def test_deferred_reads_log_every_step_and_train_like_the_synchronous_loop(tmp_path):
    cfg = tiny_train_config(steps=8, log_every=4, eval_every=3)
    _, sync = _simclr_run(tmp_path / "sync", cfg)
    result, deferred = _simclr_run_deferred(tmp_path / "deferred", cfg)
    rows_sync, rows_deferred = _rows(tmp_path / "sync"), _rows(tmp_path / "deferred")
    assert [r["step"] for r in rows_deferred] == list(range(1, 9)), "every step gets its metrics row"
    assert [("knn_acc" in r) for r in rows_deferred] == [("knn_acc" in r) for r in rows_sync]
    for a, b in zip(rows_sync, rows_deferred):  # fused AdamW vs foreach: equal up to rounding
        assert a.keys() == b.keys()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    for a, b in zip(sync.parameters(), deferred.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert result.steps == 8


def _simclr_run_deferred(run_dir: Path, cfg, **kwargs):
    import tests.train.test_loop as t

    original = t.fit
    t.fit = lambda *a, **k: original(*a, **k, defer_reads=True)
    try:
        return _simclr_run(run_dir, cfg, **kwargs)
    finally:
        t.fit = original


def test_deferred_resume_is_bit_identical(tmp_path):
    cfg = tiny_train_config(steps=6, log_every=3)
    _, reference = _simclr_run_deferred(tmp_path / "whole", cfg)
    _simclr_run_deferred(tmp_path / "crash", cfg, stop_after=4)
    _, resumed = _simclr_run_deferred(tmp_path / "crash", cfg, resume=True)
    assert _rows(tmp_path / "crash") == _rows(tmp_path / "whole")
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_the_device_side_guard_skips_a_non_finite_step_entirely():
    """The fused AdamW step with `found_inf` set leaves weights, moments and the step count as they were."""
    poison = {3}
    model = ToyRegression(lambda call, m, loss: loss * float("nan") if call in poison else loss)
    cfg = tiny_train_config(steps=6)
    stepper = _Stepper(model, model, ToyBatches(), cfg, CPU, 0, BatchOrder(32, cfg.batch_size, 0), defer=True)
    for step in (1, 2):
        stepper(step)
    weights = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for k, v in stepper.optimizer.state[model.encoder.weight].items()}
    done = stepper(3)
    assert done.packed[-2].item() > 0 and done.ids, "the step is flagged with its samples"
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for key, value in stepper.optimizer.state[model.encoder.weight].items():
        assert torch.equal(value, moments[key]), key
    stepper(4)
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "the next step trains again"


def test_deferred_reads_raise_at_the_next_read_naming_the_skipped_step(tmp_path):
    model = ToyRegression(lambda call, m, loss: loss * float("nan") if call == 3 else loss)
    with pytest.raises(NonFiniteError, match=r"step 3 \(rank 0; read at step 4\).*skipped.*row\d+"):
        fit(model, ToyBatches(), tiny_train_config(steps=8, log_every=4, checkpoint_every=100), tmp_path, CPU,
            seed=0, defer_reads=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], "rows up to the bad step are written; nothing after it"


# ------------------------------------------------------------------------- train.minutes


def test_steps_for_budget_follows_the_measured_step_time(tmp_path):
    model = ToyRegression()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = tiny_train_config(minutes=0.05, checkpoint_every=1000)
    budget = steps_for_budget(model, ToyBatches(), cfg, tmp_path, CPU, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the method itself is untouched"
    assert not (tmp_path / ".budget-checkpoint").exists()
    expected = (3.0 - budget.calibration_seconds - budget.seconds_per_checkpoint) / (
        budget.seconds_per_step + budget.seconds_per_checkpoint / 1000)
    assert budget.steps == int(expected) and budget.steps > 10
    assert budget.timed_steps >= 3
    assert "train.steps=" in budget.describe(0.05)


def test_a_budget_too_small_for_one_step_is_a_clear_error(tmp_path):
    def slow(call, model, loss):
        import time

        time.sleep(0.05)
        return loss

    with pytest.raises(SelfsupError, match=r"train.minutes=0.001.*leaves no time.*Raise `train.minutes`"):
        steps_for_budget(ToyRegression(slow), ToyBatches(), tiny_train_config(minutes=0.001), tmp_path, CPU, seed=0)


def test_pretrain_fixes_steps_from_minutes_in_its_config_and_resumes_bit_identically(tmp_path, caplog):
    caplog.set_level("INFO", logger="selfsup")
    cfg = load_config(None, TINY_RUN + ["train.minutes=0.05", "train.checkpoint_every=4"])
    interrupted = tmp_path / "interrupted"
    pretrain(cfg, interrupted, stop_after=5, show_progress=False, report=False)
    saved = load_config(interrupted / "config.yaml")
    steps = saved.train.steps
    assert saved.train.minutes == 0.05
    assert steps > 5, "the budget fits more than the first checkpoint"
    assert any("train.minutes=0.05" in r.message and f"train.steps={steps}" in r.message for r in caplog.records)

    caplog.clear()
    pretrain(None, interrupted, resume=True, show_progress=False, report=False)
    assert not any("timing a few steps" in r.message for r in caplog.records), "a resume never re-measures"
    assert load_config(interrupted / "config.yaml").train.steps == steps

    fixed = load_config(None, TINY_RUN + [f"train.steps={steps}", "train.checkpoint_every=4"])
    pretrain(fixed, tmp_path / "fixed", show_progress=False, report=False)
    assert (interrupted / "encoder.safetensors").read_bytes() == (tmp_path / "fixed" / "encoder.safetensors").read_bytes()


def test_resume_accepts_the_same_minutes_override(tmp_path):
    cfg = load_config(None, TINY_RUN + ["train.minutes=0.1"])
    pretrain(cfg, tmp_path / "run", stop_after=2, show_progress=False, report=False)
    again = load_config(None, TINY_RUN + ["train.minutes=0.1"])
    pretrain(again, tmp_path / "run", resume=True, show_progress=False, report=False)
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_minutes_must_be_positive():
    with pytest.raises(SelfsupError, match="train.minutes"):
        load_config(None, TINY_RUN + ["train.minutes=0"])


# ------------------------------------------------------------------------- the time estimate


def _slow(call, model, loss):
    import time

    time.sleep(0.02)
    return loss


def test_the_loop_estimates_the_remaining_time_once(tmp_path, caplog):
    caplog.set_level("INFO", logger="selfsup")
    fit(ToyRegression(_slow), ToyBatches(), tiny_train_config(steps=30, checkpoint_every=100), tmp_path, CPU, seed=0)
    lines = [r.message for r in caplog.records if r.message.startswith("estimated time")]
    assert len(lines) == 1 and "for the remaining 26 steps" in lines[0], lines
    seconds = float(lines[0].split("estimated time: ")[1].split(" s ")[0])
    assert 26 * 0.02 <= seconds < 26 * 0.2
    assert not any("that is long" in r.message for r in caplog.records)


def test_a_long_estimate_names_the_knobs_that_shorten_it(tmp_path, caplog, monkeypatch):
    import selfsup.train.loop as loop

    monkeypatch.setattr(loop._Estimate, "LONG_S", 0.01)
    caplog.set_level("INFO", logger="selfsup")
    fit(ToyRegression(_slow), ToyBatches(), tiny_train_config(steps=10, checkpoint_every=100), tmp_path, CPU, seed=0)
    hint = [r.message for r in caplog.records if "that is long" in r.message]
    assert hint and "train.minutes=M" in hint[0] and "encoder.width=16" in hint[0]
