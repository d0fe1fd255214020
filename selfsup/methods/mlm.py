"""Masked language modelling — BERT (Devlin et al. 2018, arXiv:1810.04805).

Objective: 15 % of the (non-special) tokens of each sequence are selected; of those, 80 % are
replaced by [MASK], 10 % by a random token and 10 % left unchanged, and a bidirectional Transformer
predicts the original token at every selected position with cross-entropy over the vocabulary
(through the LM head tied to the input embedding). Unselected positions carry no loss.

The selection draws from the batch's per-step generator, so a resumed run masks exactly as an
uninterrupted one. Only the selected positions go through the LM head: the vocabulary projection
at the other ~85 % of positions would cost compute and change nothing (Hugging Face's
BertForMaskedLM computes them all).

Deviations from the paper: no next-sentence prediction (RoBERTa showed it does not help); the
random replacement draws from the non-special vocabulary; masking is dynamic (new positions every
time a sequence is seen, as in RoBERTa) rather than fixed at preprocessing.

Under DDP the loss is the mean over the selected tokens of the global batch (each rank's mean weighted
by its share of them, `nn/distributed.global_mean_scale`), as one process computes it; ranks select
different numbers of tokens, so a plain average of their means would weigh their tokens unequally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.distributed import global_mean_scale


@dataclass
class Config:
    mask_prob: float = 0.15  # fraction of non-special tokens selected for prediction
    mask_token_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_token_frac: float = 0.1  # of the selected: replaced by a random token (the rest stay unchanged)
    # A pretraining run sets the two below from its tokenizer; the defaults are selfsup's WordPiece ids.
    mask_id: int = 4  # id of [MASK] ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4)
    special_ids: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # never selected, never drawn as random tokens


def mask_tokens(input_ids: Tensor, cfg: Config, vocab_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(corrupted ids [B, L], selected bool [B, L]) with BERT's 80/10/10 corruption of the selected positions."""
    B, L = input_ids.shape
    device = input_ids.device
    special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    special[torch.tensor(cfg.special_ids, device=device)] = True
    eligible = ~special[input_ids]
    selected = (torch.rand(B, L, generator=generator, device=device) < cfg.mask_prob) & eligible
    action = torch.rand(B, L, generator=generator, device=device)
    to_mask = selected & (action < cfg.mask_token_frac)
    to_random = selected & (action >= cfg.mask_token_frac) & (action < cfg.mask_token_frac + cfg.random_token_frac)
    # Random replacements come from the non-special ids only.
    normal_ids = torch.nonzero(~special).flatten()
    random_ids = normal_ids[torch.randint(len(normal_ids), (B, L), generator=generator, device=device)]
    corrupted = torch.where(to_mask, torch.full_like(input_ids, cfg.mask_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, selected


class MLM(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        input_ids = batch["input_ids"]  # [B, L]
        corrupted, selected = mask_tokens(input_ids, self.cfg, self.encoder.vocab_size, batch["generator"])
        hidden = self.encoder(corrupted, attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"))  # [B, L, D]
        logits = self.encoder.lm_head(hidden[selected]).float()  # [num_selected, V]; argmax is 4x slower on bf16
        targets = input_ids[selected]  # [num_selected]
        # Under DDP: weighted by this rank's share of the selected tokens, so the ranks' average is the
        # mean over the global batch's tokens (ranks select different numbers); 1 in one process.
        scale = global_mean_scale(selected.sum().view(1).float(), self.training)[0]
        if targets.numel() == 0:  # a batch of only special tokens: nothing to predict
            zero = hidden.sum() * 0.0
            return {"loss": zero, "masked_acc": zero.detach()}
        loss = F.cross_entropy(logits, targets) * scale
        masked_acc = (logits.argmax(dim=-1) == targets).float().mean() * scale
        return {"loss": loss, "masked_acc": masked_acc.detach()}
