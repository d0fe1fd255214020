"""`train.device=auto` / `train.precision=auto` and the CUDA path, with CUDA mocked where no GPU is
present (the real GPU check is `bench/gpu.py`); and the loop's reads on the deferred (CUDA) path."""

from __future__ import annotations

import pytest
import torch

import selfsup.train.loop as loop
import selfsup.train.runtime as runtime_mod
from selfsup.errors import SelfsupError
from selfsup.train.runtime import init_runtime, resolve_device, resolve_precision
from tests.conftest import tiny_train_config
from tests.train.test_loop import CPU, ToyBatches, ToyRegression


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that reports a GPU (nothing is ever allocated on it in these tests)."""
    state = {"bf16": True, "set_device": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: state.update(set_device=device))
    return state


def test_auto_device_is_cuda_when_present_and_follows_local_rank(fake_cuda, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1), "torchrun's local rank picks the GPU"


def test_auto_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SelfsupError, match="asks for CUDA but none is available"):
        resolve_device("cuda")
    with pytest.raises(SelfsupError, match="unknown device `gpu0`"):
        resolve_device("gpu0")


def test_auto_precision_on_cuda_is_bf16_where_supported(fake_cuda):
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda) == torch.bfloat16
    fake_cuda["bf16"] = False  # e.g. a V100 / T4: no bf16, full fp32
    assert resolve_precision("auto", cuda) is None
    assert resolve_precision("fp32", cuda) is None and resolve_precision("bf16", cuda) == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_on_the_cpu_follows_its_bf16_units(monkeypatch, fast):
    monkeypatch.setattr(runtime_mod, "cpu_has_fast_bf16", lambda: fast)
    assert resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if fast else None)


def test_cpu_bf16_units_are_read_from_cpuinfo(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)]:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k))
        assert runtime_mod.cpu_has_fast_bf16() is expected, flags
        monkeypatch.setattr(builtins, "open", real_open)


def test_torchrun_on_cuda_joins_with_nccl_on_its_own_gpu(fake_cuda, monkeypatch):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(runtime_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime_mod.dist, "init_process_group", lambda backend, **k: joined.update(backend=backend))
    monkeypatch.setattr(runtime_mod.dist, "get_rank", lambda: 1)
    runtime = init_runtime("auto", "auto")
    assert joined["backend"] == "nccl" and fake_cuda["set_device"] == torch.device("cuda", 1)
    assert runtime.device == torch.device("cuda", 1) and runtime.rank == 1 and runtime.world_size == 2
    assert runtime.precision == "bf16"


def test_torchrun_on_the_cpu_joins_with_gloo(monkeypatch):
    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(runtime_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime_mod.dist, "init_process_group", lambda backend, **k: joined.update(backend=backend))
    monkeypatch.setattr(runtime_mod.dist, "get_rank", lambda: 0)
    assert init_runtime("auto", "fp32").device == torch.device("cpu") and joined["backend"] == "gloo"


@pytest.mark.parametrize("defer, expected_reads", [(False, 8), (True, 3)])
def test_reads_happen_once_per_logging_interval_when_deferred(tmp_path, monkeypatch, defer, expected_reads):
    reads = []
    real_read = loop._read
    monkeypatch.setattr(loop, "_read", lambda pending: reads.append(len(pending)) or real_read(pending))
    cfg = tiny_train_config(steps=8, log_every=4, checkpoint_every=6)
    loop.fit(ToyRegression(), ToyBatches(), cfg, tmp_path, CPU, seed=0, defer_reads=defer)
    assert len(reads) == expected_reads  # deferred: steps 4, 6 (a checkpoint), 8
    assert sum(reads) == 8, "every step's values are read exactly once"


def test_sync_batchnorm_is_refused_on_the_cpu_under_torchrun(tmp_path, monkeypatch):
    import selfsup.nn.distributed as distributed
    from selfsup.errors import SelfsupError

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.raises(SelfsupError, match="sync_batchnorm needs GPUs"):
        loop.fit(ToyRegression(), ToyBatches(), tiny_train_config(sync_batchnorm=True), tmp_path, CPU, seed=0)


def test_sync_batchnorm_does_nothing_in_one_process(tmp_path):
    loop.fit(ToyRegression(), ToyBatches(), tiny_train_config(sync_batchnorm=True, steps=2), tmp_path, CPU, seed=0)
