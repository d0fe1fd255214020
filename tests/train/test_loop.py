"""The loop: exact resume, the non-finite guard, signals, accumulation, schedule."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from selfsup.data.pipeline import ImageBatches, channel_stats
from selfsup.data.views import ImageViews, ViewsConfig
from selfsup.encoders import build_encoder
from selfsup.errors import NonFiniteError, SelfsupError
from selfsup.methods import build_method
from selfsup.train import checkpoint
from selfsup.train.loop import Interrupted, fit
from selfsup.train.optim import lr_at
from selfsup.modalities.image import knn_monitor
from selfsup.train.runtime import Runtime
from tests.conftest import make_image_set, tiny_train_config

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)


SMALL_HEADS = {"simclr": {}, "byol": {"proj_hidden": 32, "proj_dim": 16},
               "dino": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "momentum_start": 0.9}}
VIEWS = {"simclr": ViewsConfig(blur_p=0.5, solarize_p=0.2),
         "byol": ViewsConfig(view_blur_p=[1.0, 0.1], view_solarize_p=[0.0, 0.2]),
         "dino": ViewsConfig(num_local=2, local_size=8)}


def _simclr_run(run_dir: Path, cfg, *, resume=False, stop_after=None, runtime=CPU, method_name="simclr"):
    data = make_image_set(num_items=28)  # batch 8 -> 3 batches per epoch, 4 items dropped each epoch
    mean, std = channel_stats(data.images)
    torch.manual_seed(0)
    encoder = build_encoder("resnet10", in_channels=3, image_size=16, width=8)
    method = build_method({"name": method_name, **SMALL_HEADS[method_name]}, encoder)
    batches = ImageBatches(data, ImageViews(VIEWS[method_name], 16, mean, std), runtime.device)
    preprocess = {"image_size": 16, "channels": 3, "mean": mean, "std": std}
    monitor = knn_monitor(data, make_image_set(num_items=12, seed=1), preprocess, runtime, max_bank=20, k=3, seed=0)
    result = fit(method, batches, cfg, run_dir, runtime, seed=0, resume=resume, stop_after=stop_after, monitor=monitor)
    return result, method


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("samples_per_s")  # wall-clock, not state
    return rows


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical(tmp_path, precision):
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    cfg = tiny_train_config(steps=8, eval_every=2)
    _, reference = _simclr_run(tmp_path / "whole", cfg, runtime=runtime)
    expected = _rows(tmp_path / "whole")
    assert len(expected) == 8 and "knn_acc" in expected[1]
    # Crashes after steps 3, 5, 6 resume from checkpoints 2 (mid-epoch), 4 (mid-epoch) and 6 (epoch end).
    crash_points = [3, 5, 6] if precision == "fp32" else [5]
    for crash in crash_points:
        run_dir = tmp_path / f"crash{crash}"
        _simclr_run(run_dir, cfg, stop_after=crash, runtime=runtime)
        _, resumed = _simclr_run(run_dir, cfg, resume=True, runtime=runtime)
        assert _rows(run_dir) == expected, f"metrics differ after a crash at step {crash}"
        for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), f"{name} differs after a crash at step {crash}"


@pytest.mark.parametrize("method_name", ["byol", "dino"])
def test_resume_is_bit_identical_with_a_teacher(tmp_path, method_name):
    """EMA teachers and DINO's centre are state too: a resumed run must carry them exactly."""
    cfg = tiny_train_config(steps=6, diagnostics_every=2)
    _, reference = _simclr_run(tmp_path / "whole", cfg, method_name=method_name)
    expected = _rows(tmp_path / "whole")
    assert "embed_std" in expected[1]
    _simclr_run(tmp_path / "crash", cfg, stop_after=3, method_name=method_name)
    _, resumed = _simclr_run(tmp_path / "crash", cfg, resume=True, method_name=method_name)
    assert _rows(tmp_path / "crash") == expected
    state = resumed.state_dict()
    assert any(k.startswith(("target.", "teacher.")) for k in state)
    if method_name == "dino":
        assert state["center"].abs().sum() > 0
    for (name, a), b in zip(reference.state_dict().items(), state.values()):
        assert torch.equal(a, b), name


class ToyRegression(nn.Module):
    """Least squares on fixed data; `hook(step, self)` can misbehave at a chosen call."""

    def __init__(self, hook=None):
        super().__init__()
        self.encoder = nn.Linear(3, 1)
        self.hook, self.calls = hook, 0

    def forward(self, batch, progress):
        self.calls += 1
        loss = ((self.encoder(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()
        if self.hook is not None:
            loss = self.hook(self.calls, self, loss)
        return {"loss": loss}


class ToyBatches:
    def __init__(self, num_items: int = 32):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(num_items, 3, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(num_items, generator=gen)
        self.num_items = num_items

    def __call__(self, indices, generator):
        return {"x": self.x[indices], "y": self.y[indices], "id": [f"row{i}" for i in indices.tolist()]}


def test_nan_loss_stops_before_the_optimizer(tmp_path):
    seen = {}

    def hook(call, model, loss):
        if call == 3:
            seen["weights"] = [p.detach().clone() for p in model.parameters()]
            return loss * float("nan")
        return loss

    model = ToyRegression(hook)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3.*row\d+"):
        fit(model, ToyBatches(), tiny_train_config(), tmp_path, CPU, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], model.parameters()))


def test_nan_gradient_with_finite_loss_is_caught(tmp_path):
    def hook(call, model, loss):
        # sqrt at 0 has an infinite derivative: a finite loss with a non-finite gradient.
        return loss + torch.sqrt(model.encoder.weight.sum() * 0) if call == 2 else loss

    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        fit(ToyRegression(hook), ToyBatches(), tiny_train_config(), tmp_path, CPU, seed=0)


def test_sigterm_checkpoints_at_the_step_boundary(tmp_path):
    def hook(call, model, loss):
        if call == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        fit(ToyRegression(hook), ToyBatches(), tiny_train_config(checkpoint_every=100), tmp_path, CPU, seed=0)
    assert info.value.step == 3
    assert checkpoint.latest_valid(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-3"
    assert signal.getsignal(signal.SIGTERM) is previous, "the loop restores the caller's handler"


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    whole, split = ToyRegression(), ToyRegression()
    split.load_state_dict(whole.state_dict())
    fit(whole, ToyBatches(), tiny_train_config(), tmp_path / "a", CPU, seed=0)
    fit(split, ToyBatches(), tiny_train_config(accum_steps=4), tmp_path / "b", CPU, seed=0)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "monotone decay after warm-up"


def test_metrics_are_truncated_to_the_resumed_checkpoint(tmp_path):
    cfg = tiny_train_config(steps=6, checkpoint_every=2)
    fit(ToyRegression(), ToyBatches(), cfg, tmp_path, CPU, seed=0, stop_after=5)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    fit(ToyRegression(), ToyBatches(), cfg, tmp_path, CPU, seed=0, resume=True)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_is_optional_with_a_clear_error(tmp_path):
    cfg = tiny_train_config(steps=2, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SelfsupError, match="pip install tensorboard"):
            fit(ToyRegression(), ToyBatches(), cfg, tmp_path, CPU, seed=0)
        return
    fit(ToyRegression(), ToyBatches(), cfg, tmp_path, CPU, seed=0)
    assert list((tmp_path / "tensorboard").iterdir()), "event files written"
