"""Next-token prediction — GPT (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training").

Objective: a causal Transformer reads tokens x_1..x_t and predicts x_{t+1} at every position; the
loss is the mean cross-entropy of the shifted targets, L = -1/N Σ_t log p(x_{t+1} | x_≤t). With
packed blocks, a position whose next token belongs to another document (or is padding) carries no
loss, so the model is never asked to predict across a document boundary.

Under DDP the loss is the mean over the predicted positions of the global batch (each rank's mean
weighted by its share of them, `nn/distributed.global_mean_scale`): padding and document ends make
the counts differ between ranks.

Deviations from the paper: pre-norm blocks (GPT-2) rather than post-norm; no auxiliary
fine-tuning objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.distributed import global_mean_scale
from selfsup.nn.losses import linear_cross_entropy


@dataclass
class Config:
    ignore_cross_document: bool = True  # no loss where the next token starts another document


def next_token_targets(input_ids: Tensor, document_ids: Tensor | None, attention_mask: Tensor | None,
                       ignore_cross_document: bool) -> tuple[Tensor, Tensor]:
    """(targets [B, L-1], valid bool [B, L-1]): position t predicts token t+1 when both are real and in one document."""
    targets = input_ids[:, 1:]
    valid = targets.new_ones(targets.shape, dtype=bool)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.bool()
        valid &= real[:, 1:] & real[:, :-1]
    if document_ids is not None:
        valid &= document_ids[:, 1:] >= 0
        if ignore_cross_document:
            valid &= document_ids[:, 1:] == document_ids[:, :-1]
    return targets, valid


class NextToken(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        input_ids = batch["input_ids"]  # [B, L]
        hidden = self.encoder(input_ids, attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"))  # [B, L, D]
        targets, valid = next_token_targets(input_ids, batch.get("document_ids"), batch.get("token_mask"),
                                            self.cfg.ignore_cross_document)
        positions = hidden[:, :-1][valid]  # [num_valid, D]
        # Under DDP: weighted by this rank's share of the predicted positions (padding and document
        # ends make the counts differ), so the ranks' average is the global batch's mean; 1 in one process.
        scale = global_mean_scale(valid.sum().view(1).float(), self.training)[0]
        if positions.shape[0] == 0:  # nothing to predict here (possible on one rank of several)
            zero = hidden.float().sum() * 0.0
            return {"loss": zero, "next_token_acc": zero.detach()}
        if torch.is_autocast_enabled(positions.device.type) and self.encoder.lm_transform is None:
            # Under bf16 the full float32 logits cost more than they compute (nn/losses.py).
            loss, accuracy = linear_cross_entropy(positions, self.encoder.output_embedding(), targets[valid],
                                                  self.encoder.lm_bias)
            return {"loss": loss * scale, "next_token_acc": accuracy * scale}
        logits = self.encoder.lm_head(positions).float()  # [num_valid, V]
        loss = F.cross_entropy(logits, targets[valid]) * scale
        accuracy = (logits.argmax(dim=-1) == targets[valid]).float().mean() * scale
        return {"loss": loss, "next_token_acc": accuracy.detach()}
