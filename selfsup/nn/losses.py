"""Cross-entropy over a large vocabulary without materialising the logits.

A language model's last step — hidden states [N, D] times the embedding matrix [V, D], then
cross-entropy — is its most memory-hungry one: at 4,096 positions and V = 8,192 the float32 logits
alone take 134 MB, and autograd keeps them, their bf16 copy and the softmax for the backward pass.
`linear_cross_entropy` computes the loss chunk by chunk of positions and, in the same pass, the
gradients with respect to the hidden states, the weight and the bias (softmax minus one-hot, the
closed form), so only one chunk of logits ever exists. Under bf16 autocast on a 2-core CPU this made
a next-token training step 30 % faster (bench/text.py, measured by profiling: the full-size float32
copy, its cast back, and log_softmax over it were 18 % of the step, the bf16 argmax for the accuracy
another 9 %). In float32 the plain path is as fast, so `next_token` uses this one under autocast only.

The maths is the plain path's: logits are computed in the hidden states' dtype (bf16 under
autocast) and taken to float32 for the softmax, and the logits gradient is rounded to that dtype
before the two matmuls of the backward pass, as autograd would; the weight gradient is accumulated
over chunks in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk: int) -> tuple[Tensor, Tensor]:
        N, D = hidden.shape
        V = weight.shape[0]
        dtype = hidden.dtype
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty_like(hidden) if need_grads else None
            grad_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_grads else None
            grad_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_grads and bias is not None else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            num_correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, N, chunk):
                h = hidden[start : start + chunk]  # [c, D]
                t = targets[start : start + chunk]  # [c]
                logits = (h @ w.T).float()  # [c, V]
                if bias is not None:
                    logits += bias.float()
                lse = logits.logsumexp(dim=1)  # [c]
                loss_sum += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
                num_correct += (logits.argmax(dim=1) == t).sum()
                if not need_grads:
                    continue
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_logits = probs.div_(N)  # d(mean loss)/d(logits), [c, V]
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0)
                grad_logits = grad_logits.to(dtype)
                grad_hidden[start : start + chunk] = grad_logits @ w
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_sum / N, num_correct / N

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_accuracy: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        dh = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        dw = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        db = None if grad_bias is None else (grad_bias * grad_loss).to(ctx.bias_dtype)
        return dh, dw, db, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         chunk: int = 512) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, accuracy) of the logits `hidden @ weight.T + bias` against `targets`,
    never holding more than `chunk` rows of logits. `hidden` [N, D], `weight` [V, D], `targets` [N]."""
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy got no positions")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the matmuls run in the autocast dtype, as F.linear's would
        hidden = hidden.to(torch.get_autocast_dtype(device))
    loss, accuracy = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    return loss, accuracy.detach()
