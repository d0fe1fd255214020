"""BlasLinear (selfsup/nn/gemm.py): the same maths as nn.Linear on OpenBLAS, the run-time choice, and a
training run that chose it resumes with it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.errors import SelfsupError
from selfsup.nn import gemm
from selfsup.nn.gemm import BlasLinear, choose_cpu_gemm, restore_linears, route_linears


def test_forward_and_gradients_match_nn_linear():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7, bias=False))
    blas = copy.deepcopy(ref)
    assert route_linears(blas, "openblas") == 2
    assert all(type(m) is BlasLinear for m in blas if isinstance(m, nn.Linear))
    x = torch.randn(3, 5, 12, requires_grad=True)  # leading dims are flattened and restored
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), blas(x2)
    assert y.shape == (3, 5, 7)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(blas.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    # The state dict is the Linear's own: a routed model saves and loads as before.
    assert blas.state_dict().keys() == ref.state_dict().keys()


def test_non_contiguous_input_and_frozen_weight():
    lin = nn.Linear(6, 4)
    lin.weight.requires_grad_(False)
    route_linears(lin, "openblas")
    x = torch.randn(6, 8).t().requires_grad_()  # [8, 6], not contiguous
    y = lin(x)
    torch.testing.assert_close(y, x @ lin.weight.t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(8, 6), rtol=1e-5, atol=1e-5)


def test_falls_back_outside_cpu_float32():
    lin = nn.Linear(4, 3).double()
    route_linears(lin, "openblas")
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)  # float64: F.linear
    lin32 = nn.Linear(4, 3)
    route_linears(lin32, "openblas")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin32(torch.randn(2, 4)).dtype == torch.bfloat16  # autocast: F.linear under autocast


def test_second_order_gradients_are_refused():
    lin = nn.Linear(3, 3)
    route_linears(lin, "openblas")
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(SelfsupError, match="cpu_gemm=torch"):
        torch.autograd.grad(lin(x).pow(2).sum(), x, create_graph=True)


def test_restore_and_torch_backend():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    route_linears(model, "openblas")
    assert restore_linears(model) == 2
    assert all(type(m) is nn.Linear for m in model)
    assert route_linears(model, "torch") == 0
    with pytest.raises(SelfsupError):
        route_linears(model, "blas")


def test_the_text_lm_head_follows_its_model_and_nothing_else():
    """The LM head multiplies by the tied embedding directly: routed with its model, and only its model
    (no process-wide state: another model built afterwards still uses torch's kernels)."""
    from selfsup.encoders import build_encoder

    torch.manual_seed(0)
    routed = build_encoder("text_encoder", vocab_size=50, max_len=16, dim=16, depth=1, heads=2)
    plain = copy.deepcopy(routed)
    route_linears(routed, "openblas")
    assert routed.cpu_gemm == "openblas" and plain.cpu_gemm == "torch"
    hidden = torch.randn(3, 16, requires_grad=True)
    calls = []
    original = gemm._BlasLinear.apply
    gemm._BlasLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        torch.testing.assert_close(routed.lm_head(hidden), plain.lm_head(hidden), rtol=1e-5, atol=1e-5)
        assert len(calls) >= 1
        calls.clear()
        plain.lm_head(hidden)
        assert not calls
    finally:
        gemm._BlasLinear.apply = original


def test_choice_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_cpu_gemm("openblas", cuda, False) == "torch"
    assert choose_cpu_gemm("openblas", cpu, True) == "torch"  # bf16 autocast: MKL/oneDNN's bf16 path
    assert choose_cpu_gemm("openblas", cpu, False) == "openblas"
    assert choose_cpu_gemm("torch", cpu, False) == "torch"
    with pytest.raises(SelfsupError, match="cpu_gemm"):
        choose_cpu_gemm("mkl", cpu, False)
    # auto follows the vendor, never a timing, so every launch of a config computes the same numbers
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(gemm, "measure_gemm", lambda: pytest.fail("auto must not time"))
    assert choose_cpu_gemm("auto", cpu, False) == "openblas"
    assert choose_cpu_gemm("auto", cuda, False) == "torch"
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert choose_cpu_gemm("auto", cpu, False) == "torch"
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "")
    assert choose_cpu_gemm("auto", cpu, False) == "torch"


def test_cpu_vendor_reads_cpuinfo():
    assert isinstance(gemm.cpu_vendor(), str)


def test_measure_gemm_times_both():
    mkl_s, blas_s = gemm.measure_gemm(m=64, k=32, n=48, repeats=1)
    assert mkl_s > 0 and blas_s > 0


def test_a_run_on_openblas_resumes_bit_identically_on_it(tmp_path, monkeypatch):
    """The choice is kept in the checkpoint: a resume asked for "auto" (which, on this test's
    Intel-looking CPU, would pick MKL) continues on OpenBLAS and ends with the uninterrupted run's weights."""
    import dataclasses

    from selfsup.train import checkpoint
    from tests.conftest import tiny_train_config
    from tests.train.test_loop import _rows, _simclr_run

    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    cfg = dataclasses.replace(tiny_train_config(steps=6, eval_every=2), cpu_gemm="openblas")
    _, reference = _simclr_run(tmp_path / "whole", cfg)
    assert any(type(m) is BlasLinear for m in reference.modules())
    _simclr_run(tmp_path / "crash", cfg, stop_after=3)
    state = checkpoint.load_checkpoint(checkpoint.latest_valid(tmp_path / "crash" / "checkpoints"),
                                       copy.deepcopy(reference), None)
    assert state["cpu_gemm"] == "openblas"
    _, resumed = _simclr_run(tmp_path / "crash", dataclasses.replace(cfg, cpu_gemm="auto"), resume=True)
    assert _rows(tmp_path / "crash") == _rows(tmp_path / "whole")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
