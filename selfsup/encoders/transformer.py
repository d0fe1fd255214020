"""The pre-norm transformer block shared by the ViT and the text encoders, with its attention and RoPE.

One block serves every modality so that an attention speed-up or fix lands everywhere at once.
What differs between modalities enters as arguments, not as subclasses:
- `attn_mask` (bool, True = this query may attend to this key), for padding and packed documents;
- `causal`, for next-token decoders;
- `rotary` (cos, sin), for rotary positions (Su et al. 2021, arXiv:2104.09864), which act on q and k
  inside attention rather than on the token embeddings.
With none of them (the ViT), the block is plain bidirectional self-attention.
The LayerNorm epsilon is a constructor option (`eps`): 1e-6 for the ViT and the text encoders, 1e-5
for the audio encoder, whose blocks must equal transformers' wav2vec 2.0 layers (PyTorch's default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) + masks) v over the last two dims, by the fastest kernel for the inputs.

    `mask` is bool and broadcasts to [B, heads, N, N] (True = may attend); `causal` additionally
    hides keys after the query. Every query row must keep at least one key (callers keep the
    diagonal), or its softmax is 0/0.

    `scaled_dot_product_attention` everywhere except bf16 on the CPU: there its flash kernel's
    backward is slow at our token counts. Measured on the 2-vCPU dev box, 1 thread, bf16,
    [64, 3, 65, 64] q/k/v, fwd+bwd: SDPA 47 ms, these two matmuls 9 ms (and still 2x faster at
    1025 tokens); in fp32 SDPA is as fast or faster, so it keeps fp32.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, N, N]
        if causal:
            N = q.shape[-2]
            keep = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()  # [N, N], key <= query
            mask = keep if mask is None else mask & keep
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    if mask is not None and causal:
        N = q.shape[-2]
        mask = mask & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        causal = False  # SDPA refuses is_causal together with an explicit mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class RotaryEmbedding(nn.Module):
    """Rotary position angles: per position p and frequency pair i, the angle p * base^(-2i/d).

    The frequencies are a non-persistent buffer: they follow the module across devices but are not
    weights, so checkpoints and exports do not carry them.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 2 == 0, "rotary positions rotate pairs of channels; configs validate this"
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [d/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [B, 1, N, d] for `positions` [B, N] (the 1 broadcasts over heads), in fp32.

        Kept in fp32 under autocast: a bf16 angle at position 500 is off by about a radian.
        """
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # [B, N, d/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, N, d]: pair (i, i + d/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair (i, i + d/2) of `x` [B, heads, N, d] by its position's angle.

    The rotation is done in fp32 and returned in x's dtype, so q and k keep the dtype v has (SDPA
    needs all three equal). Rotating both q and k makes q_m . k_n depend on m - n only.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)  # each [B, heads, N, d/2]
    rotated_half = torch.cat([-second, first], dim=-1)  # [B, heads, N, d]: the 90-degree turn of each pair
    return (x32 * cos + rotated_half * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D/heads]
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, attn_mask, causal)  # [B, heads, N, D/heads]
        out = out.transpose(1, 2).reshape(B, N, D)  # heads concatenated per token
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); `eps` is both norms' epsilon."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = 1e-6) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, causal, rotary)
        return x + self.mlp(self.norm2(x))
