"""Every objective under DDP against one process on the same global batch: 2 gloo ranks through
torchrun, each running the method's forward on its half (tests/train/ddp_methods_worker.py). The
mean of the rank losses (and of every logged value) must be the one process's, and the gradients
averaged over the ranks (what DDP applies) its gradients.

The masks are uneven across ranks on purpose: a per-rank mean over masked tokens, patches or frames,
averaged over ranks, is not the global mean, and wav2vec 2.0's codebook diversity over one rank's
frames is not the global batch's. SimCLR, BYOL and DINO are in test_ddp.py, CLIP in
tests/methods/test_clip.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train import ddp_methods_worker as worker

REPO = Path(__file__).resolve().parents[2]
VARIABLE_COUNTS = {"beit", "mlm", "next_token", "wav2vec2", "hubert"}  # ranks average over different numbers


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results for every family, from one torchrun launch (the start-up is most of it)."""
    out = tmp_path_factory.mktemp("ddp_methods") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/train/ddp_methods_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join([l for l in lines if "rror" in l][:20] + lines[-40:])
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.mark.parametrize("name", worker.FAMILIES)
def test_two_ranks_match_one_process(ranks, name):
    torch.set_num_threads(1)
    one = worker.run_family(name, 0, 1)
    two = [r[name] for r in ranks]
    if name in VARIABLE_COUNTS:
        assert two[0]["count"] != two[1]["count"], "the test needs ranks with different numbers of items"
    assert not torch.allclose(two[0]["out"]["loss"], two[1]["out"]["loss"]), "the ranks saw different rows"
    assert set(two[0]["out"]) == set(one["out"])
    for key, value in one["out"].items():
        mean = (two[0]["out"][key] + two[1]["out"][key]) / 2
        torch.testing.assert_close(mean, value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
    assert set(two[0]["grads"]) == set(one["grads"])
    for param, grad in one["grads"].items():
        torch.testing.assert_close(two[0]["grads"][param], two[1]["grads"][param], rtol=0, atol=0)  # all-reduced
        torch.testing.assert_close(two[0]["grads"][param], grad, rtol=1e-4, atol=1e-5, msg=f"{name}: {param}")


def test_one_process_and_eval_mode_need_no_collective(monkeypatch):
    from selfsup.nn import distributed

    counts = torch.tensor([3.0, 0.0])
    assert torch.equal(distributed.global_mean_scale(counts), torch.ones(2))
    # Rank 0 alone runs the held-out monitor (eval mode): a collective there would hang.
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    assert torch.equal(distributed.global_mean_scale(counts, enabled=False), torch.ones(2))


def test_sync_batchnorm_is_a_no_op_in_one_process_and_refused_on_the_cpu(monkeypatch):
    from selfsup.errors import SelfsupError
    from selfsup.nn import distributed

    head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert distributed.sync_batchnorm(head, torch.device("cpu")) is head
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.raises(SelfsupError, match="GPU"):
        distributed.sync_batchnorm(head, torch.device("cpu"))
    converted = distributed.sync_batchnorm(head, torch.device("cuda"))  # conversion only; no forward here
    assert isinstance(converted[1], torch.nn.SyncBatchNorm) and converted[1].weight is head[1].weight
