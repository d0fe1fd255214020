"""wav2vec 2.0's Gumbel-softmax product quantizer (Baevski et al. 2020, arXiv:2006.11477, section 2;
Jang et al. 2016 for the Gumbel softmax).

A latent frame z [C] is mapped to G groups of logits over V entries each (one Linear, C -> G*V);
in each group one entry is chosen and the chosen codevectors (each C_q / G wide) are concatenated
into q [C_q]. In training the choice is a hard Gumbel-softmax sample: the forward pass uses the
one-hot of argmax(l + n) (n Gumbel noise drawn from the caller's generator), the backward pass the
gradient of softmax((l + n) / τ) (straight-through), so the logits projection learns. In eval it is
argmax(l), without noise.

Diagnostics, both "perplexities" as in fairseq's GumbelVectorQuantizer:
- `prob_perplexity` = Σ_g exp(-Σ_v p̄_gv log p̄_gv), p̄_g the softmax of the logits (no noise, τ = 1)
  averaged over the frames: the paper's codebook diversity, G*V when all entries are used evenly, G
  when each group always picks the same entry. The diversity loss is (G*V - prob_perplexity) / (G*V).
- `code_perplexity`: the same formula on the batch's frequencies of the hard argmax(l) choices
  (fairseq's, noise-free also in training): how many entries are actually in use.

Under DDP (training mode) both are taken over the global batch, every rank's frames: the per-rank
soft sums, hard counts and frame counts are summed in one all_reduce whose backward returns each
rank its share of the gradient (`nn/distributed.all_reduce_shared`), so the diversity loss and
its gradient equal one process's on the global batch (fairseq's per-GPU perplexity does not).

Temperature: the paper anneals τ from 2 to 0.5 by a factor 0.999995 per update, τ = max(0.5, 2 *
0.999995^step) over 400k updates (BASE), so τ reaches 0.5 at step ln(4)/-ln(0.999995) ≈ 277k, i.e.
at 69.3 % of training, and stays there. A method only knows `progress` (0 at the first step, 1 at
the last), so `gumbel_temperature(progress)` keeps that curve's shape on any run length: exponential
decay from `start` reaching `end` at progress `anneal_until` (0.693), then constant. Choice made:
the curve is expressed in the fraction of training, not per update, so a 2,000-step CPU run anneals
as the paper's 400k-step run does rather than staying near τ = 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.nn.distributed import all_reduce_shared, world

# The paper's schedule (2 -> 0.5 by 0.999995 per update over 400k updates) reaches its floor here.
PAPER_ANNEAL_UNTIL = math.log(2.0 / 0.5) / -math.log(0.999995) / 400_000  # 0.693


def gumbel_temperature(progress: float, start: float = 2.0, end: float = 0.5,
                       anneal_until: float = PAPER_ANNEAL_UNTIL) -> float:
    """τ at `progress` in [0, 1]: start * (end/start)^(progress/anneal_until), floored at `end`."""
    if start <= 0 or end <= 0 or anneal_until <= 0:
        raise SelfsupError(f"Gumbel temperatures and the anneal fraction must be positive, got start={start}, "
                           f"end={end}, anneal_until={anneal_until}")
    fraction = max(progress, 0.0) / anneal_until
    return end if fraction >= 1.0 else start * (end / start) ** fraction


def perplexity(probs: Tensor) -> Tensor:
    """Σ_g exp(entropy of probs[g]) of per-group distributions [G, V] (each row sums to 1)."""
    p = probs.float()
    return torch.exp(-(p * torch.log(p + 1e-7)).sum(dim=-1)).sum()


def diversity_loss(prob_perplexity: Tensor, num_codes: int) -> Tensor:
    """The paper's codebook diversity penalty (G*V - prob_perplexity) / (G*V): 0 when every entry is
    used evenly, (G*V - G)/(G*V) when each group picks one entry."""
    return (num_codes - prob_perplexity) / num_codes


class GumbelQuantizer(nn.Module):
    """z [..., in_dim] -> q [..., code_dim]: G groups of V learned codevectors of code_dim / G each."""

    def __init__(self, in_dim: int, groups: int = 2, entries: int = 320, code_dim: int = 256) -> None:
        super().__init__()
        if groups < 1 or entries < 2 or code_dim % groups:
            raise SelfsupError(f"the quantizer needs groups >= 1, entries >= 2 and code_dim a multiple of groups, "
                               f"got groups={groups}, entries={entries}, code_dim={code_dim}")
        self.groups, self.entries, self.code_dim = groups, entries, code_dim
        self.num_codes = groups * entries
        self.logits = nn.Linear(in_dim, groups * entries)  # fairseq's weight_proj
        self.codevectors = nn.Parameter(torch.empty(groups, entries, code_dim // groups))  # fairseq's vars
        # fairseq: N(0, 1) projection with zero bias (sharp, varied choices from the start), uniform codevectors.
        nn.init.normal_(self.logits.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.logits.bias)
        nn.init.uniform_(self.codevectors)

    def forward(self, z: Tensor, temperature: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(q [..., code_dim], {"prob_perplexity", "code_perplexity", "num_frames", "codes": int64 [..., G]}).

        Under DDP in training both perplexities and "num_frames" are the global batch's (every rank's
        frames; one collective, which every rank must reach); else this call's frames'.

        In training the Gumbel noise comes from `generator` (the batch's; torch's global generator
        when None); in eval the choice is the noise-free argmax. "codes" are the entries used for q.
        """
        lead = z.shape[:-1]
        G, V = self.groups, self.entries
        logits = self.logits(z.reshape(-1, z.shape[-1])).float().view(-1, G, V)  # [N, G, V]
        best = logits.argmax(dim=-1)  # [N, G]
        hard_counts = torch.zeros(G, V, device=logits.device).scatter_add_(
            1, best.T, torch.ones_like(best.T, dtype=torch.float))  # [G, V]
        if self.training and world()[1] > 1:
            # Under DDP the usage is the global batch's: the soft sums (with their gradients), the hard
            # counts and the frame count of every rank, summed in one collective, so every rank's
            # diversity loss is the one process's on the global batch (DDP's average of the ranks'
            # gradients is then its gradient: `all_reduce_shared`).
            packed = all_reduce_shared(torch.cat([logits.softmax(dim=-1).sum(dim=0).flatten(), hard_counts.flatten(),
                                                     hard_counts.new_full((1,), float(logits.shape[0]))]))
            num_frames = packed[-1].detach()
            num = num_frames.clamp(min=1)
            hard_freq = packed[G * V : 2 * G * V].detach().view(G, V) / num
            soft = packed[: G * V].view(G, V) / num
            diagnostics = {"code_perplexity": perplexity(hard_freq),
                           "prob_perplexity": torch.where(num_frames > 0, perplexity(soft), perplexity(hard_freq)),
                           "num_frames": num_frames}
        else:
            num = max(logits.shape[0], 1)
            hard_freq = hard_counts / num  # [G, V]
            diagnostics = {"code_perplexity": perplexity(hard_freq),
                           "prob_perplexity": perplexity(logits.softmax(dim=-1).mean(dim=0) if len(logits) else hard_freq),
                           "num_frames": torch.tensor(float(logits.shape[0]), device=logits.device)}
        if self.training:
            device = generator.device if generator is not None else logits.device
            u = torch.rand(logits.shape, generator=generator, device=device).to(logits.device)
            noise = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))  # Gumbel(0, 1)
            soft = ((logits + noise) / temperature).softmax(dim=-1)  # [N, G, V]
            codes = soft.argmax(dim=-1)  # [N, G]
            one_hot = F.one_hot(codes, V).to(soft.dtype)
            choice = one_hot - soft.detach() + soft  # forward: the one-hot; backward: the softmax's gradient
        else:
            codes = best
            choice = F.one_hot(codes, V).to(logits.dtype)
        q = torch.einsum("ngv,gvd->ngd", choice.to(self.codevectors.dtype), self.codevectors)  # [N, G, d]
        diagnostics["codes"] = codes.view(*lead, G)
        return q.reshape(*lead, self.code_dim), diagnostics
