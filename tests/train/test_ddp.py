"""The distributed path on CPU: 2 processes, gloo, through torchrun (as users launch it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from selfsup.methods.simclr import nt_xent
from selfsup.train import checkpoint
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[2]


def _failure(proc: subprocess.CompletedProcess) -> str:
    """The workers' own error lines first: torchrun's summary alone hides them."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join([l for l in lines if "Error" in l or "rror:" in l][:20] + lines[-40:])


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_gathered_negatives_match_one_process(tmp_path):
    proc = _torchrun(str(REPO / "tests/train/ddp_worker.py"), str(tmp_path / "out"))
    assert proc.returncode == 0, _failure(proc)
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]

    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=gen).requires_grad_(), torch.randn(8, 5, generator=gen).requires_grad_()
    loss, _ = nt_xent(z1, z2, 0.3)
    loss.backward()
    # DDP averages over ranks: the mean of the rank losses is the global loss, and each rank's
    # gradient (which includes its rows' role as negatives elsewhere) is world x the global one.
    assert abs(sum(r["loss"] for r in ranks) / 2 - loss.item()) < 1e-5
    grad1 = torch.tensor([row for r in ranks for row in r["grad1"]]) / 2
    grad2 = torch.tensor([row for r in ranks for row in r["grad2"]]) / 2
    torch.testing.assert_close(grad1, z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad2, z2.grad, rtol=1e-4, atol=1e-6)


def test_pretrain_under_torchrun(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun("-m", "selfsup.cli", "pretrain", *TINY_RUN, "--out", str(out))
    assert proc.returncode == 0, _failure(proc)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "rank 0 alone writes one row per step"
    assert checkpoint.latest_valid(out / "checkpoints") == out / "checkpoints" / "step-4"
    assert (out / "encoder.safetensors").is_file() and (out / "encoder.json").is_file()


def test_dino_centre_is_all_reduced(tmp_path):
    proc = _torchrun(str(REPO / "tests/train/ddp_dino_worker.py"), str(tmp_path / "out"))
    assert proc.returncode == 0, _failure(proc)
    centres = [torch.tensor(json.loads((tmp_path / f"out.{r}").read_text())["center"]) for r in range(2)]
    assert torch.equal(centres[0], centres[1]), "both ranks must hold the same centre"
    # ... and it is the update from the whole global batch, as one process would compute it.
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method

    torch.manual_seed(0)
    method = build_method({"name": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
                          build_encoder("resnet10", in_channels=3, image_size=16, width=8)).eval()
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)]
    with torch.no_grad():
        method({"views": views}, 0.5)
    method.after_optimizer_step(0.5)
    torch.testing.assert_close(centres[0], method.center, rtol=1e-5, atol=1e-6)


def test_text_pretrain_under_torchrun(tmp_path):
    """Rank 0 trains and saves the tokenizer, rank 1 reads it; both train on their shard of the blocks."""
    from tests.train.test_pretrain_text import text_overrides, write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    proc = _torchrun("-m", "selfsup.cli", "pretrain", *text_overrides(corpus, "mlm", **{"train.steps": 3}),
                     "--out", str(out))
    assert proc.returncode == 0, _failure(proc)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "heldout_loss" in rows[-1]
    # Two ranks of 4 blocks of 16 tokens each: the logged rate counts both ranks' tokens.
    assert all(r["tokens_per_s"] > r["samples_per_s"] for r in rows)
    assert (out / "tokenizer.json").is_file() and (out / "encoder.safetensors").is_file()
