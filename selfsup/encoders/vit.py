"""Vision Transformer encoder (Dosovitskiy et al. 2020, arXiv:2010.11929).

The masked-image objectives (MAE, BEiT) and DINO are defined on patch tokens, so they need a ViT;
the joint-embedding methods use it as the second backbone beside the ResNet.

Design choices:
- Pre-norm blocks (LayerNorm before attention and MLP) and a final LayerNorm, as in the paper; the
  pre-norm form trains without learning-rate warm-up tricks at depth 12.
- The blocks are the shared pre-norm blocks of `selfsup.encoders.transformer` (the text encoders use
  them too). Attention calls `torch.nn.functional.scaled_dot_product_attention` on a fused qkv
  projection, so PyTorch picks its fused (flash / memory-efficient) kernel on each device, and bf16
  autocast runs the three projections as one matmul. The one exception is bf16 on the CPU, where two
  plain matmuls were measured faster (see `attend`): ViT-Tiny fwd+bwd at 32 px, batch 64, 1 thread,
  45 -> 65 img/s.
- `mask` (True = masked patch) either replaces the masked patches' embeddings with a learned mask
  token *before* positions are added, as BEiT does (the sequence length is unchanged and the model
  still knows where each masked patch sits), or, with `drop_masked=True`, removes them after
  positions are added, as MAE's encoder does: it then runs on the visible quarter of the patches
  only, which is where MAE's 3-4x speed-up comes from. Dropping needs the same number of masked
  patches in every row (`nn.masking.random_mask` guarantees it).
- `pre_norm` adds a LayerNorm on the tokens (positions included) before the first block, as CLIP's
  image tower has (`ln_pre`), so that a CLIP run's image tower maps exactly onto CLIPVisionModel.
- Positions are learned (`positions="learned"`) or the fixed 2-D sine-cosine table MAE uses
  (`"sincos"`, computed on the fly: nothing to learn or save). Learned positions are built for
  `image_size`; other input sizes (DINO's local crops) get the patch-grid positions resized
  bicubically, the usual way to run a ViT at a resolution it was not built for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.encoders.transformer import Block, attend  # noqa: F401 (attend: re-exported, tests use it)
from selfsup.errors import SelfsupError

POOLS = ("cls", "mean")
POSITIONS = ("learned", "sincos")


def sincos_positions(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine embeddings [grid_h*grid_w, dim] (MAE): half the channels encode the row,
    half the column, each as sin/cos at geometrically spaced frequencies (1 / 10000^(2i/d))."""
    if dim % 4 != 0:
        raise SelfsupError(f"sine-cosine positions need dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [d/4]
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")  # each [gh, gw]
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * omega[None, :]  # [N, d/4]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # [N, d]


@dataclass
class ViTConfig:
    """Architecture knobs of a ViT; the presets live in `selfsup.encoders.ENCODERS`."""

    patch_size: int = 4  # side of the square patches, in pixels; image_size must be a multiple of it
    dim: int = 192  # width of every token (the embedding size D)
    depth: int = 12  # number of transformer blocks
    heads: int = 3  # attention heads per block; dim must be a multiple of it
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of dim
    pool: str = "cls"  # what embed() returns: "cls" = the [CLS] token, "mean" = the average of the patch tokens
    positions: str = "learned"  # "learned" position embeddings, or MAE's fixed 2-D "sincos" table
    pre_norm: bool = False  # a LayerNorm on the tokens before the first block (CLIP's ln_pre; exports as CLIPVisionModel)

    def __post_init__(self) -> None:
        for key in ("patch_size", "dim", "depth", "heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SelfsupError(f"encoder config key '{key}' must be a positive integer, got {value!r}")
        if self.dim % self.heads != 0:
            raise SelfsupError(
                f"encoder config key 'dim' ({self.dim}) must be a multiple of 'heads' ({self.heads}); "
                f"e.g. heads={self._suggest_heads()}"
            )
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise SelfsupError(f"encoder config key 'mlp_ratio' must be a positive number, got {self.mlp_ratio!r}")
        if self.pool not in POOLS:
            raise SelfsupError(f"encoder config key 'pool' must be one of {list(POOLS)}, got {self.pool!r}")
        if self.positions not in POSITIONS:
            raise SelfsupError(f"encoder config key 'positions' must be one of {list(POSITIONS)}, got {self.positions!r}")
        if not isinstance(self.pre_norm, bool):
            raise SelfsupError(f"encoder config key 'pre_norm' must be true or false, got {self.pre_norm!r}")
        if self.positions == "sincos" and self.dim % 4 != 0:
            raise SelfsupError(f"encoder config key 'dim' ({self.dim}) must be a multiple of 4 with positions='sincos'")

    def _suggest_heads(self) -> int:
        """The divisor of dim nearest to the requested number of heads, for the error message."""
        divisors = [h for h in range(1, self.dim + 1) if self.dim % h == 0]
        return min(divisors, key=lambda h: abs(h - self.heads))


class ViT(nn.Module):
    """ViT over square patches; tokens are [CLS] followed by the patches in row-major order."""

    def __init__(self, cfg: ViTConfig, *, in_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise SelfsupError(f"in_channels must be a positive integer, got {in_channels}")
        if image_size < 1 or image_size % cfg.patch_size != 0:
            raise SelfsupError(
                f"image_size ({image_size}) must be a positive multiple of the ViT's patch_size ({cfg.patch_size}); "
                f"resize the images or set patch_size to a divisor of {image_size}"
            )
        self.cfg = cfg
        self.dim: int = cfg.dim
        self.patch_size: int = cfg.patch_size
        self.grid_size: int = image_size // cfg.patch_size  # patches per side at the built image_size
        self.num_patches: int = self.grid_size**2
        self.patch_embed = nn.Conv2d(in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed: nn.Parameter | None = None
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, cfg.dim))
        self.pre_norm: nn.LayerNorm | None = nn.LayerNorm(cfg.dim, eps=1e-6) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small truncated-normal tokens and linears, as in ViT/DeiT: keeps early attention logits
        # near zero (near-uniform attention) so no block dominates the residual stream at step 0.
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch embedding is a linear map of flattened patches; Xavier on that view (as in MAE)
        # keeps the token scale independent of patch size and channel count.
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

    def _positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Positional embeddings [1, 1 + grid_h*grid_w, D], resized when the grid is not the built one."""
        if self.pos_embed is None:  # sincos: computed for any grid; the [CLS] token gets position zero
            table = sincos_positions(grid_h, grid_w, self.dim).to(self.cls_token.device)
            return torch.cat([torch.zeros(1, self.dim, device=table.device), table]).unsqueeze(0)
        if grid_h == grid_w == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = self.dim
        patch_pos = patch_pos.reshape(1, self.grid_size, self.grid_size, D).permute(0, 3, 1, 2)  # [1, D, g, g]
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)  # [1, N, D], row-major
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: Tensor, mask: Tensor | None = None, drop_masked: bool = False) -> Tensor:
        """All tokens after the final norm, [B, 1 + N, dim]: [CLS] first, then patches row-major.

        `mask` is [B, N] bool with True = masked patch; masked patches enter as the mask token, or
        with `drop_masked` are left out: the output is then [B, 1 + N_visible, dim], the visible
        patches in row-major order.
        """
        if x.dim() != 4:
            raise SelfsupError(f"the ViT encoder expects images shaped [B, C, H, W], got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if H % self.patch_size != 0 or W % self.patch_size != 0:
            raise SelfsupError(
                f"image height and width ({H}x{W}) must be multiples of the ViT's patch_size ({self.patch_size})"
            )
        tokens = self.patch_embed(x)  # [B, D, H/p, W/p]
        _, D, grid_h, grid_w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, N, D], patches row-major
        N = grid_h * grid_w
        if mask is None:
            # No mask = an all-False one, so the mask token is in every graph (with a zero gradient):
            # DDP fails on parameters that get no gradient unless find_unused_parameters=True,
            # which costs a graph traversal on every step.
            mask = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        elif mask.shape != (B, N) or mask.dtype != torch.bool:
            raise SelfsupError(
                f"the ViT mask must be a bool tensor of shape [batch, num_patches] = [{B}, {N}] "
                f"(True = masked), got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        positions = self._positions(grid_h, grid_w)  # [1, 1 + N, D]
        if drop_masked:
            visible = self._visible_index(mask)  # [B, N_visible]
            patches = (tokens + positions[:, 1:]).gather(1, visible.unsqueeze(-1).expand(-1, -1, D))  # [B, N_vis, D]
            cls = (self.cls_token + positions[:, :1]).expand(B, -1, -1).to(patches.dtype)  # [B, 1, D]
            # The mask token takes no part here; a zero-weight term keeps it in the graph for DDP.
            tokens = torch.cat([cls + 0.0 * self.mask_token.to(patches.dtype), patches], dim=1)  # [B, 1 + N_vis, D]
        else:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
            tokens = torch.cat([self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)  # [B, 1 + N, D]
            tokens = tokens + positions
        if self.pre_norm is not None:
            tokens = self.pre_norm(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    @staticmethod
    def _visible_index(mask: Tensor) -> Tensor:
        """Row-major indices [B, N_visible] of the unmasked patches; every row must keep as many."""
        B, N = mask.shape
        num_visible = (~mask).sum(dim=1)  # [B]
        if bool((num_visible != num_visible[0]).any()):
            raise SelfsupError("drop_masked needs the same number of masked patches in every image "
                               "(use nn.masking.random_mask)")
        # A stable sort puts the visible (False) patches first, in their row-major order.
        return mask.to(torch.uint8).argsort(dim=1, stable=True)[:, : int(num_visible[0])]

    def embed(self, x: Tensor) -> Tensor:
        """The pooled representation [B, dim]: the [CLS] token, or the mean patch token (cfg.pool)."""
        tokens = self.forward(x)
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return tokens[:, 1:].mean(dim=1)
