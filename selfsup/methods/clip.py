"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", arXiv:2103.00020): align an image tower and a text tower on image–caption pairs.

The objective. Each tower's pooled output is projected linearly (no bias) into a shared space of
`embed_dim` and normalised to unit length: image embeddings I [B, E], text embeddings T [B, E]. With
the learnable temperature t = 1 / exp(s) (s is the parameter, "logit scale"), the logits are
exp(s) * I @ T^T [B, B]; pair i matches caption i and no other in the batch, so the loss is the
symmetric cross-entropy (InfoNCE both ways)

    L = ( CE(exp(s) * I @ T^T, diag) + CE(exp(s) * T @ I^T, diag) ) / 2,

the paper's figure-3 pseudocode. s starts at log(1 / 0.07) and is clamped to at most log(100)
after every optimizer step, as the paper does "to prevent scaling the logits by more than 100".

Under DDP every rank's embeddings are gathered with their gradients (`all_gather` from
`torch.distributed.nn`, whose backward sums the gradients of each rank's slice), and each rank
scores its own rows against the whole global batch (open_clip's `local_loss`): the mean of the
ranks' losses is the loss of the global batch, and DDP's gradient average gives its exact gradient.

Either tower can start from another run's tower (`encoders.image.init=RUN[:TOWER]`, as any
method's encoder can; the architectures must match, and a text tower needs that run's tokenizer:
`tokenizer.path`) or from a local Hugging Face model (`encoders.text.name=hf:DIR`), and either can
be locked (`lock_image`, `lock_text`: frozen weights, kept in eval mode; the paper's "LiT"
variant, Zhai et al. 2022, locks a pretrained image tower).

Deviations from the paper:
- Towers at CPU sizes (`clip_vit`: ViT patch 4, dim 192, depth 6; `clip_text`: causal, dim 192,
  depth 4) rather than ViT-B/32 and a 63M-parameter text Transformer; the text tower pools at the
  end-of-text token as the paper's does, over a BPE vocabulary trained on the run's own captions
  (the paper's is 49,152 tokens of web text) and without a start token.
- Augmentation is a random resized crop of 90-100 % of the image (open_clip's default; the paper
  uses a random square crop), no flips (captions name sides).
- Projections initialised N(0, width^-1/2) as in OpenAI's released code.
- A text tower with a language-model head (text_encoder's MLM head) keeps it frozen and unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.files import write_with

HEAD_FILE = "clip_head.safetensors"  # the projections and the logit scale, beside the towers
# Parts of a tower that `embed` never reaches (a text encoder's language-model head, e.g.
# text_encoder's MLM head): frozen, so that every trainable parameter gets a gradient (DDP fails on
# one that does not) and the head is saved as it was.
UNUSED_PARTS = ("lm_weight", "lm_transform", "lm_bias")


@dataclass
class Config:
    embed_dim: int = 128  # width of the shared image–text space (each tower is projected to it, no bias)
    init_temperature: float = 0.07  # the softmax temperature at step 0 (the paper's 0.07); learned from there
    max_logit_scale: float = 100.0  # exp(s) is clamped to at most this after every step (the paper's 100)
    lock_image: bool = False  # freeze the image tower (LiT: align a text tower to a pretrained image tower)
    lock_text: bool = False  # freeze the text tower (align a new image tower to a text tower one trusts)

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise SelfsupError(f"method.embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not 0 < self.init_temperature:
            raise SelfsupError(f"method.init_temperature must be positive, got {self.init_temperature!r}")
        if not self.max_logit_scale > 1:
            raise SelfsupError(f"method.max_logit_scale must be above 1, got {self.max_logit_scale!r}")
        if 1 / self.init_temperature > self.max_logit_scale:
            raise SelfsupError(f"method.init_temperature={self.init_temperature} starts above the clamp "
                               f"(1/t > max_logit_scale={self.max_logit_scale}); raise it")


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, all_image: Tensor | None = None,
              all_text: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
    """(symmetric InfoNCE, image->text top-1 accuracy) of unit embeddings image/text [B, E] whose row
    i is a pair; `all_image`/`all_text` [W*B, E] are the global batch (default: the local one) and
    `offset` where the local rows sit in it."""
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    B = image.shape[0]
    targets = torch.arange(offset, offset + B, device=image.device)  # [B]
    per_image = logit_scale * image @ all_text.T  # [B, W*B]
    per_text = logit_scale * text @ all_image.T  # [B, W*B]
    loss = (F.cross_entropy(per_image.float(), targets) + F.cross_entropy(per_text.float(), targets)) / 2
    top1 = (per_image.argmax(dim=1) == targets).float().mean()
    return loss, top1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(every rank's x concatenated in rank order [W*B, ...], this rank's offset in it); the backward
    pass sums each slice's gradients from every rank. Single process: (x, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


class CLIP(nn.Module):
    def __init__(self, cfg: Config, image: nn.Module, text: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.image, self.text = image, text
        self.image_proj = nn.Linear(image.dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image.dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        for tower, locked in ((image, cfg.lock_image), (text, cfg.lock_text)):
            if locked:
                tower.requires_grad_(False)
            for name in UNUSED_PARTS:
                part = getattr(tower, name, None)
                if part is not None:
                    part.requires_grad_(False)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for tower, locked in ((self.image, self.cfg.lock_image), (self.text, self.cfg.lock_text)):
            if locked:
                tower.eval()  # a locked tower's BatchNorm statistics stay as they were
        return self

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings [B, E] of normalised images [B, C, S, S]."""
        return F.normalize(self.image_proj(self.image.embed(images)), dim=-1)

    def embed_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit text embeddings [B, E] of captions [B, L] (right-padded, ending with end-of-text)."""
        return F.normalize(self.text_proj(self.text.embed(input_ids, attention_mask)), dim=-1)

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        image = self.embed_images(batch["views"][0])  # [B, E]
        text = self.embed_texts(batch["input_ids"], batch["attention_mask"])  # [B, E]
        all_image, offset = gather_with_grad(image)  # [W*B, E]
        all_text, _ = gather_with_grad(text)
        scale = self.logit_scale.exp()
        loss, top1 = clip_loss(image, text, scale, all_image, all_text, offset)
        return {"loss": loss, "top1": top1.detach(), "logit_scale": scale.detach()}

    def head_state(self) -> dict[str, Tensor]:
        """What joins the towers: the two projections and the logit scale."""
        return {"image_proj.weight": self.image_proj.weight, "text_proj.weight": self.text_proj.weight,
                "logit_scale": self.logit_scale}

    def save_artifacts(self, folder: Path) -> None:
        """`clip_head.safetensors` (projections, logit scale): zero-shot, retrieval and the export read it."""
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.head_state().items()}
        write_with(Path(folder) / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"kind": "clip_head"}))

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
