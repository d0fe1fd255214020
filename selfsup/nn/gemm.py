"""Linear layers whose matrix products run on the faster CPU BLAS of the machine, measured at run time.

Why: PyTorch's CPU build does every fp32 `nn.Linear` product with Intel MKL's sgemm. On AMD CPUs
(Zen 2, AVX2, no AVX-512) MKL takes a slower code path: on a 2-vCPU AMD EPYC (family 23 model 49),
2 threads, the three products of a Linear's forward and backward ran at 116-131 GFLOP/s through
`torch.mm` against 171-179 GFLOP/s through OpenBLAS (the copy numpy ships with), 1.3-1.5x, for the
shapes of a ViT-Tiny or a small BERT ([2048-4096, 192-256] x [192-256, 576-8192]). A Transformer's
step is mostly these products, so on such CPUs selfsup runs them on OpenBLAS; on Intel CPUs, where
MKL takes its fast path, it keeps MKL. `choose_cpu_gemm("auto")` decides by the CPU's vendor
(`/proc/cpuinfo`), not by timing: a timed choice flips between runs when the two are close, and the
same config and seed must compute the same numbers however the run is launched. `measure_gemm`
times both on this machine (the benchmarks record it beside their figures).

What changes: only where the products are computed. `BlasLinear` is an `nn.Linear` (same parameters,
same state dict, same initialisation) whose forward is `linear()`: y = x W^T + b, and whose backward
gives dx = g W, dW = g^T x, db = sum g — the same maths as `F.linear`, summed in another order (the
results agree to float32 rounding, ~1e-6 relative). It applies only to float32 CPU tensors outside
autocast; anything else (CUDA, bf16 autocast, float64, a second-order graph) goes to `F.linear`
unchanged. `route_linears(model, backend)` turns a model's `nn.Linear` modules (its heads, its
encoders, a Hugging Face model's layers) into `BlasLinear` in place, and sets `cpu_gemm` on modules
that multiply by a weight directly (they declare that attribute and call `linear(..., backend=...)`,
e.g. the text LM head); `restore_linears` undoes it. There is no process-wide state.

Threads: OpenBLAS keeps its own pool, sized here to torch's thread count. Its idle workers spin for
~0.1 s after each product by default, stealing the cores torch's own kernels (attention, GELU,
LayerNorm) need in between; `OPENBLAS_THREAD_TIMEOUT` (read once, when numpy loads OpenBLAS) makes
them sleep at once. The `selfsup` command sets it before anything loads; a script that imported
numpy first gets the same numbers a little slower, and a log line saying how to avoid that.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError

logger = logging.getLogger("selfsup")

Backend = Literal["torch", "openblas"]
CPU_GEMM_SETTINGS = ("auto", "torch", "openblas")
OPENBLAS_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
# x86 vendors whose CPUs MKL runs on its generic path (it checks for GenuineIntel).
_MKL_SLOW_VENDORS = ("AuthenticAMD", "HygonGenuine")


def _fits(x: Tensor, weight: Tensor) -> bool:
    """True when the product can go to OpenBLAS: float32 CPU tensors outside autocast."""
    plain = type(x) in (Tensor, nn.Parameter) and type(weight) in (Tensor, nn.Parameter)  # not a DTensor
    return (plain and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and x.numel() > 0)


class _BlasLinear(torch.autograd.Function):
    """y = x W^T + b with its three products (forward, dx, dW) on numpy's OpenBLAS, written in place
    into torch tensors (numpy views of them, no copies beyond making the operands contiguous)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        *lead, K = x.shape
        N = weight.shape[0]
        x2 = x.detach().reshape(-1, K).contiguous()  # [M, K]
        w = weight.detach().contiguous()  # [N, K]
        out = torch.empty(x2.shape[0], N, dtype=torch.float32)  # [M, N]
        np.matmul(x2.numpy(), w.numpy().T, out=out.numpy())
        if bias is not None:
            out += bias.detach()
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out.view(*lead, N)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, w = ctx.saved_tensors  # [M, K], [N, K]
        if torch.is_grad_enabled():
            raise SelfsupError("BlasLinear does not support second-order gradients; "
                               "set train.cpu_gemm=torch for this model")
        g = grad.reshape(-1, w.shape[0]).contiguous()  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(x2.shape, dtype=torch.float32)  # [M, K]
            np.matmul(g.numpy(), w.numpy(), out=grad_x.numpy())
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty(w.shape, dtype=torch.float32)  # [N, K]
            np.matmul(g.numpy().T, x2.numpy(), out=grad_w.numpy())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # [N]
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "torch") -> Tensor:
    """`F.linear`, on OpenBLAS when `backend` is "openblas" and the tensors fit (module doc)."""
    if backend == "openblas" and _fits(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _BlasLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class BlasLinear(nn.Linear):
    """An `nn.Linear` whose product runs on OpenBLAS where it fits; made from one by `route_linears`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, "openblas")


def route_linears(model: nn.Module, backend: Backend) -> int:
    """Puts `model`'s products on `backend`: for "openblas" every plain `nn.Linear` becomes a
    `BlasLinear` in place (parameters untouched), for "torch" back; modules with a `cpu_gemm`
    attribute get `backend`. Returns how many modules changed."""
    if backend not in ("torch", "openblas"):
        raise SelfsupError(f"cpu_gemm backend must be 'torch' or 'openblas', got {backend!r}")
    if backend == "openblas":
        _match_threads()
    old, new = (nn.Linear, BlasLinear) if backend == "openblas" else (BlasLinear, nn.Linear)
    turned = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            turned += 1
        if hasattr(module, "cpu_gemm") and module.cpu_gemm != backend:
            module.cpu_gemm = backend
            turned += 1
    return turned


def restore_linears(model: nn.Module) -> int:
    """Puts every product of `model` back on torch's own kernels; returns how many modules changed."""
    return route_linears(model, "torch")


def _match_threads() -> None:
    """OpenBLAS's pool gets torch's intra-op thread count (numpy's OpenBLAS otherwise uses every core)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def measure_gemm(m: int = 2048, k: int = 256, n: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """(torch, openblas) seconds for the three products of one Linear step, [m, k] x [k, n], the best
    of `repeats`, with torch's thread count on both."""
    _match_threads()
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(a, b, generator=gen) for a, b in ((m, k), (n, k), (m, n)))
    outs = torch.empty(m, n), torch.empty(m, k), torch.empty(n, k)
    xn, wn, gn = x.numpy(), w.numpy(), g.numpy()

    def with_torch() -> None:
        torch.mm(x, w.t(), out=outs[0])
        torch.mm(g, w, out=outs[1])
        torch.mm(g.t(), x, out=outs[2])

    def with_openblas() -> None:
        np.matmul(xn, wn.T, out=outs[0].numpy())
        np.matmul(gn, wn, out=outs[1].numpy())
        np.matmul(gn.T, xn, out=outs[2].numpy())

    return _time(with_torch, repeats), _time(with_openblas, repeats)


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), "" if unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def choose_cpu_gemm(setting: str, device: torch.device, autocast: bool) -> Backend:
    """The backend a run uses: `setting` is "auto", "torch" or "openblas" (train.cpu_gemm).

    Only CPU float32 runs have a choice; "auto" is OpenBLAS on CPUs whose vendor MKL slows down
    (module doc), torch's MKL elsewhere, and says which."""
    if setting not in CPU_GEMM_SETTINGS:
        raise SelfsupError(f"train.cpu_gemm must be one of {', '.join(CPU_GEMM_SETTINGS)}, got {setting!r}")
    if device.type != "cpu" or autocast:
        return "torch"
    if setting != "auto":
        return setting  # type: ignore[return-value]
    vendor = cpu_vendor()
    if vendor not in _MKL_SLOW_VENDORS:
        return "torch"
    logger.info("cpu_gemm: OpenBLAS for fp32 Linear products (an %s CPU, where MKL takes its slow path; "
                "train.cpu_gemm=torch keeps MKL)", vendor)
    if os.environ.get(OPENBLAS_TIMEOUT_ENV) is None:
        logger.info("cpu_gemm: set %s=4 before numpy loads (the selfsup command does) so OpenBLAS's idle "
                    "threads do not spin on the cores torch needs", OPENBLAS_TIMEOUT_ENV)
    return "openblas"
