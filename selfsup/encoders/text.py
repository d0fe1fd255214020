"""Transformer text encoder (bidirectional, BERT: Devlin et al. 2018, arXiv:1810.04805) and decoder
(causal, GPT: Radford et al. 2018), one class with a `causal` switch.

The two text objectives need the same network up to the attention pattern: MLM reads the whole
sequence, next-token prediction may only look back. Keeping one class means one set of blocks (the
ViT's, from `selfsup.encoders.transformer`), one export path and one probe path for both.

Design choices:
- Pre-norm blocks and a final LayerNorm (as GPT-2; BERT is post-norm, but pre-norm trains without
  warm-up tricks and is what the ViT uses). No dropout: our corpora are small enough that the
  runs are short, and dropout would make fp32/bf16 parity and resume tests stochastic.
- Positions are learned vectors added to the token embeddings (BERT, GPT-2; `max_len` of them), or
  rotary (RoPE, applied to q and k inside attention, so attention scores depend only on the
  distance between tokens and no position is a weight; `max_len` is then not a hard limit).
- `lm_head` maps hidden states to vocabulary logits with the input embedding's own matrix when
  `tie_embeddings` (BERT and GPT-2 do): fewer parameters, and rare tokens' input vectors get the
  gradient of every output softmax. It is a method rather than an `nn.Linear` holding the shared
  matrix, so the state dict holds the matrix once and safetensors can save it.
- Two BERT parts are switches, on in the `text_encoder` preset and off in `text_decoder`, so that each
  preset maps exactly onto a Hugging Face architecture (`selfsup.export.hf`): `embed_norm`, a
  LayerNorm on token + position embeddings (BERT, RoBERTa); and `lm_transform`, BERT's MLM
  prediction-head transform (dense -> GELU -> LayerNorm) before the vocabulary projection, with a
  per-token output bias. The encoder preset is then RoBERTa-PreLayerNorm (Liu et al. 2019 with
  pre-norm blocks) and the decoder preset is GPT-2. Neither part is used by `embed`.
- The Encoder contract's `mask` (positions to replace by a learned mask token, as the ViT does) is
  not supported: MLM replaces tokens by the tokenizer's [MASK] id in `input_ids`, as BERT does, so a
  mask token embedding would duplicate the vocabulary's. Passing one is an error, not a no-op.
- `attention_mask` is either [B, L] (True = real token; padding keys are hidden) or [B, L, L] per-
  query key masks, for sequences packed from several documents (no attention across documents).
  Every token always sees itself, so a query whose keys are all masked (a padding token) yields
  finite garbage instead of NaN; its output is never meant to be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.encoders.transformer import Block, RotaryEmbedding
from selfsup.errors import SelfsupError
from selfsup.nn.gemm import linear

POSITIONS = ("learned", "rotary")
POOLS = ("mean", "cls", "last")


@dataclass
class TextTransformerConfig:
    """Architecture knobs of a text transformer; the presets live in `selfsup.encoders.ENCODERS`."""

    dim: int = 256  # width of every token (the embedding size D)
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads per block; dim must be a multiple of it (an even multiple for rotary positions)
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of dim (4.0 at dim 256 = FFN 1024)
    positions: str = "learned"  # "learned" = a trained vector per position up to max_len (BERT, GPT-2); "rotary" = RoPE on q and k
    causal: bool = False  # True = each token sees only itself and earlier tokens (a decoder, for next-token prediction)
    pool: str = "mean"  # what embed() returns: "mean" of the real tokens, "cls" = the first token, "last" = the last real token
    tie_embeddings: bool = True  # lm_head reuses the input token embedding matrix (as BERT and GPT-2 do)
    embed_norm: bool = False  # LayerNorm on token + position embeddings before the blocks (BERT, RoBERTa)
    lm_transform: bool = False  # BERT's MLM head: dense -> GELU -> LayerNorm, then the vocabulary projection + bias

    def __post_init__(self) -> None:
        for key in ("dim", "depth", "heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SelfsupError(f"encoder config key '{key}' must be a positive integer, got {value!r}")
        if self.dim % self.heads != 0:
            raise SelfsupError(f"encoder config key 'dim' ({self.dim}) must be a multiple of 'heads' ({self.heads})")
        if self.positions == "rotary" and (self.dim // self.heads) % 2 != 0:
            raise SelfsupError(
                f"encoder config key 'dim' ({self.dim}) / 'heads' ({self.heads}) must be even with positions='rotary' "
                f"(RoPE rotates pairs of channels per head)"
            )
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise SelfsupError(f"encoder config key 'mlp_ratio' must be a positive number, got {self.mlp_ratio!r}")
        if self.positions not in POSITIONS:
            raise SelfsupError(f"encoder config key 'positions' must be one of {list(POSITIONS)}, got {self.positions!r}")
        if self.pool not in POOLS:
            raise SelfsupError(f"encoder config key 'pool' must be one of {list(POOLS)}, got {self.pool!r}")
        for key in ("causal", "tie_embeddings", "embed_norm", "lm_transform"):
            if not isinstance(getattr(self, key), bool):
                raise SelfsupError(f"encoder config key '{key}' must be true or false, got {getattr(self, key)!r}")


class TextTransformer(nn.Module):
    """Token embedding, positions, pre-norm blocks, final LayerNorm; `lm_head` gives vocabulary logits."""

    def __init__(self, cfg: TextTransformerConfig, *, vocab_size: int, max_len: int) -> None:
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SelfsupError(f"text encoder '{key}' must be a positive integer, got {value!r}")
        self.cfg = cfg
        self.dim: int = cfg.dim
        self.vocab_size: int = vocab_size
        self.max_len: int = max_len
        self.token_embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos_embed: nn.Embedding | None = nn.Embedding(max_len, cfg.dim) if cfg.positions == "learned" else None
        self.rotary: RotaryEmbedding | None = (
            RotaryEmbedding(cfg.dim // cfg.heads) if cfg.positions == "rotary" else None
        )
        self.embed_norm: nn.LayerNorm | None = nn.LayerNorm(cfg.dim, eps=1e-6) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.lm_weight: nn.Parameter | None = (
            None if cfg.tie_embeddings else nn.Parameter(torch.empty(vocab_size, cfg.dim))
        )
        self.lm_transform: nn.Sequential | None = None
        self.lm_bias: nn.Parameter | None = None
        if cfg.lm_transform:
            self.lm_transform = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.LayerNorm(cfg.dim, eps=1e-6))
            self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.cpu_gemm = "torch"  # where the LM head's fp32 CPU product runs; `nn.gemm.route_linears` sets it
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02) everywhere, as BERT and GPT-2: small initial logits (near-uniform attention and
        # output softmax), and a tied output matrix at the same scale as a separate one would be.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.lm_weight is not None:
            nn.init.trunc_normal_(self.lm_weight, std=0.02)

    def output_embedding(self) -> Tensor:
        """The [vocab_size, dim] matrix `lm_head` projects with: the input embedding itself when tied."""
        return self.token_embed.weight if self.lm_weight is None else self.lm_weight

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits [..., vocab_size] of hidden states [..., dim] (e.g. forward's output).

        Apply it to the selected positions only where possible: at vocab 8192 the logits cost more
        than a block, and MLM needs them at 15 % of the tokens.
        """
        if self.lm_transform is not None:
            hidden = self.lm_transform(hidden)
        return linear(hidden, self.output_embedding(), self.lm_bias, self.cpu_gemm)  # F.linear, or OpenBLAS (nn/gemm.py)

    def forward(
        self, input_ids: Tensor, mask: Tensor | None = None, attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """All tokens after the final norm, [B, L, dim].

        `attention_mask`: [B, L] (True/1 = real token) or [B, L, L] (True/1 = query may see key);
        causality is added on top when the config is causal. `position_ids` [B, L] default to
        0..L-1; packed documents may restart them at each document start.
        """
        if mask is not None:
            raise SelfsupError(
                "the text encoder takes no `mask`: for masked-token objectives replace the tokens by the "
                "tokenizer's [MASK] id in input_ids"
            )
        B, L = self._check_ids(input_ids)
        if position_ids is None:
            positions = torch.arange(L, device=input_ids.device).unsqueeze(0)  # [1, L], broadcasts over the batch
        elif position_ids.shape != (B, L) or position_ids.is_floating_point():
            raise SelfsupError(
                f"position_ids must be an integer tensor shaped like input_ids [{B}, {L}], "
                f"got {position_ids.dtype} of shape {tuple(position_ids.shape)}"
            )
        else:
            positions = position_ids
        x = self.token_embed(input_ids)  # [B, L, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        rotary = self.rotary(positions) if self.rotary is not None else None
        attn_mask = self._attention_mask(attention_mask, B, L, input_ids.device)  # [B, 1, L, L] or None
        # Without an explicit mask the kernel applies causality itself (SDPA's is_causal fast path).
        causal = self.cfg.causal and attn_mask is None
        for block in self.blocks:
            x = block(x, attn_mask, causal, rotary)
        return self.norm(x)

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The pooled representation [B, dim] per cfg.pool; `attention_mask` [B, L] marks real tokens.

        "last" takes the last real token wherever the padding is (left or right).
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise SelfsupError(
                f"embed() pools one sequence per row: pass a [batch, length] padding mask, not packed block "
                f"masks (got shape {tuple(attention_mask.shape)}); embed each document as its own row"
            )
        tokens = self.forward(input_ids, attention_mask=attention_mask)  # [B, L, D]; validates the mask
        B, L, D = tokens.shape
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        real = (
            torch.ones(B, L, dtype=torch.bool, device=tokens.device) if attention_mask is None else attention_mask != 0
        )  # [B, L]
        if self.cfg.pool == "mean":
            weights = real.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
            return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        last = (real * torch.arange(L, device=tokens.device)).amax(dim=1)  # [B], index of the last real token
        return tokens[torch.arange(B, device=tokens.device), last]

    def _check_ids(self, input_ids: Tensor) -> tuple[int, int]:
        """(B, L) of valid token ids, or an error saying what to fix."""
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise SelfsupError(
                f"the text encoder expects integer token ids shaped [batch, length], "
                f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        B, L = input_ids.shape
        if L < 1:
            raise SelfsupError("the text encoder got sequences of length 0; drop empty documents before batching")
        if self.pos_embed is not None and L > self.max_len:
            raise SelfsupError(
                f"sequence length {L} exceeds the encoder's max_len ({self.max_len}) for learned positions; "
                f"cut or pack sequences to at most {self.max_len} tokens, or build the encoder with a larger max_len"
            )
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= self.vocab_size:
            raise SelfsupError(
                f"input_ids hold token ids in [{int(low)}, {int(high)}] but the encoder was built with "
                f"vocab_size={self.vocab_size}; build it with the tokenizer's vocabulary size"
            )
        return B, L

    def _attention_mask(self, attention_mask: Tensor | None, B: int, L: int, device: torch.device) -> Tensor | None:
        """The bool [B, 1, L, L] mask the blocks use (True = may attend), or None for "all" / plain causal."""
        if attention_mask is None:
            return None
        if attention_mask.shape not in ((B, L), (B, L, L)) or attention_mask.is_floating_point():
            raise SelfsupError(
                f"attention_mask must be a bool (or 0/1 integer) tensor shaped [batch, length] = [{B}, {L}] "
                f"(True = real token) or [batch, length, length] = [{B}, {L}, {L}] (True = query may attend "
                f"to key), got {attention_mask.dtype} of shape {tuple(attention_mask.shape)}"
            )
        keep = attention_mask != 0
        if keep.dim() == 2:
            keep = keep.unsqueeze(1)  # [B, 1, L]: the same keys for every query
        if self.cfg.causal:
            keep = keep & torch.ones(L, L, dtype=torch.bool, device=device).tril()  # [B, L, L]
        keep = keep | torch.eye(L, dtype=torch.bool, device=device)  # [B, L, L]: no query without a key
        return keep.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
