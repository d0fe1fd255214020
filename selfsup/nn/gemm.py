"""Linear layers whose matrix products run on the faster CPU BLAS of the machine, measured at run time.

Why: PyTorch's CPU build does every fp32 `nn.Linear` product with Intel MKL's sgemm. On AMD CPUs
(Zen 2, AVX2, no AVX-512) MKL takes a slower code path: on a 2-vCPU AMD EPYC (family 23 model 49),
2 threads, the three products of a Linear's forward and backward ran at 116-131 GFLOP/s through
`torch.mm` against 171-179 GFLOP/s through OpenBLAS (the copy numpy ships with), 1.3-1.5x, for the
shapes of a ViT-Tiny or a small BERT ([2048-4096, 192-256] x [192-256, 576-8192]). A Transformer's
step is mostly these products, so on such CPUs selfsup runs them on OpenBLAS; on a CPU where MKL is
as fast (Intel), it keeps MKL. Which one is faster is measured, not guessed: `choose_cpu_gemm("auto")`
times one representative product both ways (~0.1 s) and picks OpenBLAS only when it wins by at least
`_MIN_GAIN`.

What changes: only where the products are computed. `BlasLinear` is an `nn.Linear` (same parameters,
same state dict, same initialisation) whose forward is `linear()`: y = x W^T + b, and whose backward
gives dx = g W, dW = g^T x, db = sum g — the same maths as `F.linear`, summed in another order (the
results agree to float32 rounding, ~1e-6 relative). It applies only to float32 CPU tensors outside
autocast; anything else (CUDA, bf16 autocast, float64, a second-order graph) goes to `F.linear`
unchanged. `route_linears(model, backend)` turns a model's `nn.Linear` modules (its heads, its
encoders, a Hugging Face model's layers) into `BlasLinear` in place; `restore_linears` undoes it.

Threads: OpenBLAS keeps its own pool, sized here to torch's thread count. Its idle workers spin for
~0.1 s after each product by default, stealing the cores torch's own kernels (attention, GELU,
LayerNorm) need in between; `OPENBLAS_THREAD_TIMEOUT` (read once, when numpy loads OpenBLAS) makes
them sleep at once. The `selfsup` command sets it before anything loads; where it is not set (a
script that imported numpy first), `auto` keeps MKL, since the measured gain is then not the real one.
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
_MIN_GAIN = 1.15  # OpenBLAS must be this much faster on the probe product to be used

_backend: Backend = "torch"  # the process-wide choice that `linear()` follows (set by `route_linears`)
_measured: Backend | None = None  # what "auto" measured in this process


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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, on OpenBLAS when the process chose it and the tensors fit (module doc)."""
    if _backend == "openblas" and _fits(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _BlasLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def current_backend() -> Backend:
    """The backend `linear()` follows in this process."""
    return _backend


class BlasLinear(nn.Linear):
    """An `nn.Linear` whose product follows `linear()`; made from one by `route_linears`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def route_linears(model: nn.Module, backend: Backend) -> int:
    """Sets the process's backend and, for "openblas", turns every plain `nn.Linear` in `model` into a
    `BlasLinear` in place (parameters untouched). Returns how many modules were turned."""
    global _backend
    if backend not in ("torch", "openblas"):
        raise SelfsupError(f"cpu_gemm backend must be 'torch' or 'openblas', got {backend!r}")
    _backend = backend
    if backend == "torch":
        return restore_linears(model)
    _match_threads()
    turned = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BlasLinear
            turned += 1
    return turned


def restore_linears(model: nn.Module) -> int:
    """Turns `BlasLinear` modules back into plain `nn.Linear`; returns how many."""
    turned = 0
    for module in model.modules():
        if type(module) is BlasLinear:
            module.__class__ = nn.Linear
            turned += 1
    return turned


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


def choose_cpu_gemm(setting: str, device: torch.device, autocast: bool) -> Backend:
    """The backend a run uses: `setting` is "auto", "torch" or "openblas" (train.cpu_gemm).

    Only CPU float32 runs have a choice; "auto" measures (module doc) and logs what it found."""
    global _measured
    if setting not in CPU_GEMM_SETTINGS:
        raise SelfsupError(f"train.cpu_gemm must be one of {', '.join(CPU_GEMM_SETTINGS)}, got {setting!r}")
    if device.type != "cpu" or autocast:
        return "torch"
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if setting == "auto" and _measured is not None:
        return _measured
    if os.environ.get(OPENBLAS_TIMEOUT_ENV) is None:
        logger.info("cpu_gemm: MKL (OpenBLAS not tried: %s was not set before numpy loaded)", OPENBLAS_TIMEOUT_ENV)
        return "torch"
    mkl_s, blas_s = measure_gemm()
    gain = mkl_s / blas_s
    backend: Backend = "openblas" if gain >= _MIN_GAIN else "torch"
    _measured = backend  # once per process: the machine does not change
    logger.info("cpu_gemm: %s (a Linear step's products: MKL %.1f ms, OpenBLAS %.1f ms, %.2fx; "
                "train.cpu_gemm=torch|openblas fixes it)", "OpenBLAS" if backend == "openblas" else "MKL",
                mkl_s * 1e3, blas_s * 1e3, gain)
    return backend
