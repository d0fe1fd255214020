"""wav2vec 2.0 — self-supervised learning of speech representations (Baevski et al. 2020, arXiv:2006.11477).

Objective: the encoder's convolutional half turns raw audio into latent frames z_t (20 ms); about
half of the frames are masked in spans (each real frame starts a span of M = 10 frames with
probability p = 0.065; `nn/masking.span_mask`) — the Transformer sees the mask embedding there —
and the Transformer's output c_t at each masked frame must pick out the quantized latent q_t of
that frame (a Gumbel-softmax product quantizer, `nn/quantizer.py`, over the UNMASKED z_t) among K
distractors, the quantized latents of other masked frames of the same utterance:

    L_m = -log  exp(sim(c_t, q_t)/κ) / Σ_{q̃ ∈ {q_t} ∪ Q_t} exp(sim(c_t, q̃)/κ)

with sim the cosine similarity of c_t and q_t after linear projections to a common width (fairseq's
final_proj and project_q), κ = 0.1 and K = 100 distractors. The loss is
L = L_m + α L_d + λ ||f||² with the codebook diversity loss L_d = (G·V - perplexity)/(G·V) (the
paper: α = 0.1) and the paper's L2 penalty on the feature encoder's output f (the paper: λ = 10; a
mean of squares over the real frames, taken where fairseq takes it: the conv features entering the
latent LayerNorm).

Logged: `contrastive` (L_m), `diversity` (L_d), `feature_penalty`, `prob_perplexity` (the softmax's
batch perplexity, what L_d raises), `code_perplexity` (of the hard choices) and `code_usage` =
code_perplexity / (G · min(V, masked frames)) — the collapse alarm (`nn/diagnostics.collapse_warning`)
fires when it falls below 10 % —, `temperature` (Gumbel τ), `masked_fraction`, `contrastive_acc`
(the positive scores above every distractor).

Deviations from the paper (and fairseq's implementation):
- α = 0.3 and λ = 0 by default (the paper: 0.1 and 10), because the paper's values collapse the
  codebook at CPU scale. Measured on KLettres (wav2vec2_tiny, batch 16 crops of at most 2 s, AdamW,
  50-step warm-up, 300 steps, one seed): with λ = 10 the code perplexity fell from ~24 to 2.0 (one
  entry per group) within 60-150 steps at α = 0.1 and at α = 0.5, at lr 1e-4, 5e-4 and 1e-3, with the
  feature-encoder gradient scaled by 0.1 too, and with or without identical distractors left out: the
  penalty shrinks the conv features until the latents stop telling frames apart, and then every
  distractor has the positive's codes and leaves the denominator, so the contrastive loss reads 0.
  With λ = 0, α = 0.1 still collapsed (code perplexity 2.9 by step 120) or drifted down (11 by step
  260 with identical distractors kept); α = 0.3 and 0.5 held it at 45-85 of 128 through 300 steps (lr
  5e-4 and 1e-3). Freezing the conv stack also keeps it healthy: what collapses is the feature encoder
  learning to make the targets easy. The collapse alarm (`code_usage` < 10 %) says when it happens.
- Small sizes for CPU: codebooks of G = 2 groups x V = 64 entries (paper 2 x 320; transformers'
  small test configs and the benchmark peer use 2 x 64), codevectors of 128 in all (paper 256) and a
  common projection width of 128 (paper 256 for BASE).
- Distractors: K = min(100, masked frames of the utterance - 1), drawn uniformly WITHOUT replacement
  among the other masked frames of the same utterance (fairseq draws exactly K with replacement, so a
  short utterance repeats distractors); as fairseq, a distractor whose codes equal the positive's
  (the same quantized vector) is left out of the denominator.
- Masks: starts are independent Bernoulli(p) draws per real frame, spans cut at the utterance end,
  at least 2 spans per utterance, and every utterance keeps its own number of masked frames
  (fairseq draws a fixed count of starts and truncates all rows to the batch minimum).
- Temperature: the paper's decay 2 -> 0.5 by 0.999995 per update (floor reached at 69 % of its 400k
  updates) is expressed in the fraction of training (`gumbel_temperature`), so short runs anneal too.
- `code_perplexity` is fairseq's (noise-free argmax of the logits, also in training); the quantizer
  sees only the masked frames (as fairseq), so both perplexities are over masked frames.
- No dropout (inputs, features, attention) and no LayerDrop: short runs, exact resume. The
  feature-encoder gradient scale is a knob (fairseq: 0.1 for BASE, 1.0 for the layer-norm LARGE
  layout the encoder has); default 1.0 (under Adam it matters little: the conv stack gets no other
  gradient).
- `drop_identical` (default true, fairseq's behaviour) can keep distractors whose codes equal the
  positive's in the denominator, which takes away the reward a collapsing codebook gets.
- The feature penalty counts real frames only (fairseq averages over the padded batch).
- Under DDP the codebook usage behind the diversity loss and both perplexities is the global batch's
  (`nn/quantizer.py`: one all_reduce of the soft usage, with its gradient), and the contrastive mean,
  the feature penalty, `contrastive_acc` and `masked_fraction` are over the global batch's masked /
  real frames (`nn/distributed.global_mean_scale`): the loss and gradients are one process's on the
  global batch (fairseq computes the perplexity per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.nn.distributed import global_mean_scale
from selfsup.nn.masking import span_mask
from selfsup.nn.quantizer import PAPER_ANNEAL_UNTIL, GumbelQuantizer, diversity_loss, gumbel_temperature


@dataclass
class Config:
    mask_prob: float = 0.65  # p * M: each real frame starts a masked span with probability mask_prob / mask_length (p = 0.065)
    mask_length: int = 10  # M, frames per span (200 ms)
    min_masks: int = 2  # spans at least, per utterance
    num_distractors: int = 100  # K, other masked frames of the same utterance in each denominator (fewer when it has fewer)
    logit_temp: float = 0.1  # κ, temperature of the cosine similarities
    codebook_groups: int = 2  # G
    codebook_entries: int = 64  # V per group (the paper: 320)
    code_dim: int = 128  # width of a quantized vector, G codevectors of code_dim / G (the paper: 256)
    proj_dim: int = 128  # common width c_t and q_t are projected to (the paper: 256 for BASE)
    diversity_weight: float = 0.3  # α (the paper: 0.1, which lets the codebook collapse at CPU scale: see the docstring)
    feature_penalty: float = 0.0  # weight of the L2 penalty on the feature encoder's output (the paper: 10; see the docstring)
    temp_start: float = 2.0  # Gumbel temperature at the start
    temp_end: float = 0.5  # ... and its floor
    temp_anneal_until: float = PAPER_ANNEAL_UNTIL  # fraction of training at which it reaches temp_end (0.693, the paper's)
    feature_grad_mult: float = 1.0  # scale of the gradient entering the convolutional feature encoder (fairseq BASE: 0.1)
    drop_identical: bool = True  # leave distractors whose codes equal the positive's out of the denominator (fairseq)


def check_audio_encoder(encoder: nn.Module, method: str) -> None:
    missing = [name for name in ("latents", "contextualise", "latent_dim", "mask_embedding", "dim")
               if not hasattr(encoder, name)]
    if missing:
        raise SelfsupError(f"{method} needs an audio encoder that exposes its latents and masks between its two halves "
                           f"(missing {', '.join(missing)}): use encoder.name=wav2vec2_tiny or wav2vec2_small")


def latents_with_penalty(encoder: nn.Module, audio: Tensor, lengths: Tensor | None,
                         grad_mult: float = 1.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """(z [B, F, C], frame_mask [B, F], feature penalty or None) of `encoder.latents`.

    The penalty is the mean square of the features entering the encoder's `latent_norm` over the real
    frames (where fairseq computes its `features_pen`), read with a forward pre-hook that lives only
    for this call; the same hook scales their gradient by `grad_mult` (fairseq's GradMultiply before
    that LayerNorm). An encoder without a `latent_norm` gets no penalty and has z's gradient scaled.
    """
    captured: list[Tensor] = []
    norm = getattr(encoder, "latent_norm", None)

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        features = args[0]
        if grad_mult != 1.0:
            features = features * grad_mult + features.detach() * (1.0 - grad_mult)
        captured.append(features)
        return (features, *args[1:])

    handle = norm.register_forward_pre_hook(hook) if isinstance(norm, nn.Module) else None
    try:
        z, frame_mask = encoder.latents(audio, lengths)
    finally:
        if handle is not None:
            handle.remove()
    if handle is None or len(captured) != 1 or captured[0].shape != z.shape:
        if grad_mult != 1.0:
            z = z * grad_mult + z.detach() * (1.0 - grad_mult)
        return z, frame_mask, None
    real = frame_mask.unsqueeze(-1)  # [B, F, 1]
    squares = captured[0].float().square().masked_fill(~real, 0.0)
    penalty = squares.sum() / (real.sum().clamp(min=1) * z.shape[-1])
    return z, frame_mask, penalty


def pack_masked(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(frames [B, M] int64: the masked frames of each utterance in time order, padded with 0;
    valid [B, M] bool), M = the most masked frames of any utterance."""
    counts = mask.sum(dim=1)  # [B]
    M = int(counts.max()) if mask.numel() else 0
    frames = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :M]  # masked frames first, in order
    valid = torch.arange(M, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, frames, torch.zeros_like(frames)), valid


def sample_distractors(counts: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """Distractor slots [B, M, K] (K = min(num, M - 1), M = counts.max()): for masked frame i of utterance b
    (i < counts[b]), min(num, counts[b] - 1) distinct other slots j != i, j < counts[b], uniformly
    without replacement; -1 where there is none. One [B, M, M] draw of uniforms from `generator`."""
    B = counts.shape[0]
    M = int(counts.max()) if B else 0
    device = counts.device
    if M == 0:
        return torch.full((B, 0, 0), -1, dtype=torch.long, device=device)
    scores = torch.rand(B, M, M, generator=generator, device=generator.device).to(device)  # [B, M, M]
    j = torch.arange(M, device=device)
    invalid = (j.view(1, 1, M) >= counts.view(B, 1, 1)) | (j.view(1, M, 1) == j.view(1, 1, M))  # [B, M, M]
    K = max(min(num, M - 1), 0)
    slots = scores.masked_fill(invalid, 2.0).topk(K, dim=-1, largest=False).indices  # [B, M, K], valid ones first
    keep = (torch.arange(K, device=device).view(1, 1, K) < (counts - 1).view(B, 1, 1)) \
        & (j.view(1, M, 1) < counts.view(B, 1, 1))
    return torch.where(keep, slots, torch.full_like(slots, -1))


def contrastive_logits(context: Tensor, quantized: Tensor, distractors: Tensor, codes: Tensor | None,
                       temperature: float) -> Tensor:
    """Logits [B, M, 1 + K]: column 0 sim(c_i, q_i)/κ, column 1 + k sim(c_i, q_{distractors[i, k]})/κ,
    -inf where distractors is -1 or where that distractor's codes equal the positive's (fairseq's
    neg_is_pos). context/quantized [B, M, P] (slot order of `pack_masked`), codes [B, M, G] or None."""
    c = F.normalize(context.float(), dim=-1)
    q = F.normalize(quantized.float(), dim=-1)
    with torch.autocast(c.device.type, enabled=False):  # float32 similarities, as fairseq's cosine_similarity
        sims = torch.bmm(c, q.transpose(1, 2))  # [B, M, M]: every masked frame's context against every quantized one
    positive = sims.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # [B, M, 1]
    index = distractors.clamp(min=0)
    negative = sims.gather(2, index)  # [B, M, K]
    drop = distractors < 0
    if codes is not None:
        G = codes.shape[-1]
        B, M, K = distractors.shape
        theirs = codes.gather(1, index.reshape(B, M * K, 1).expand(B, M * K, G)).view(B, M, K, G)
        drop = drop | (theirs == codes.unsqueeze(2)).all(dim=-1)
    negative = negative.masked_fill(drop, float("-inf"))
    return torch.cat([positive, negative], dim=-1) / temperature


class Wav2Vec2(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module):
        super().__init__()
        check_audio_encoder(encoder, "wav2vec2")
        if cfg.mask_length < 1 or not 0.0 < cfg.mask_prob <= cfg.mask_length:
            raise SelfsupError(f"method.mask_prob must be in (0, method.mask_length] and mask_length >= 1, got "
                               f"{cfg.mask_prob}, {cfg.mask_length}")
        if cfg.num_distractors < 1 or cfg.logit_temp <= 0:
            raise SelfsupError("method.num_distractors must be >= 1 and method.logit_temp positive")
        if cfg.code_dim % cfg.codebook_groups:
            raise SelfsupError(f"method.code_dim ({cfg.code_dim}) must be a multiple of method.codebook_groups "
                               f"({cfg.codebook_groups})")
        self.cfg = cfg
        self.encoder = encoder
        self.quantizer = GumbelQuantizer(encoder.latent_dim, cfg.codebook_groups, cfg.codebook_entries, cfg.code_dim)
        self.project_q = nn.Linear(cfg.code_dim, cfg.proj_dim)  # fairseq's project_q
        self.project_c = nn.Linear(encoder.dim, cfg.proj_dim)  # fairseq's final_proj

    def forward(self, batch: dict, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        audio, generator = batch["audio"], batch["generator"]
        z, frame_mask, penalty = latents_with_penalty(self.encoder, audio, batch.get("lengths"), cfg.feature_grad_mult)
        mask = span_mask(frame_mask, generator, mask_prob=cfg.mask_prob, span=cfg.mask_length,
                         min_masks=cfg.min_masks)  # [B, F], True = masked
        context = self.encoder.contextualise(z, frame_mask, mask)  # [B, F, D]
        frames, valid = pack_masked(mask)  # [B, M]
        B, M = frames.shape
        # Quantize the unmasked latents of the masked frames only (the positives and the distractors).
        z_masked = z.gather(1, frames.unsqueeze(-1).expand(B, M, z.shape[-1]))[valid]  # [N, C]
        temperature = gumbel_temperature(progress, cfg.temp_start, cfg.temp_end, cfg.temp_anneal_until)
        q_flat, diag = self.quantizer(z_masked, temperature, generator)  # [N, code_dim]
        q = q_flat.new_zeros(B, M, q_flat.shape[-1]).masked_scatter(valid.unsqueeze(-1), q_flat)
        codes = torch.full((B, M, cfg.codebook_groups), -1, dtype=torch.long, device=q.device)
        codes[valid] = diag["codes"]
        c = self.project_c(context.gather(1, frames.unsqueeze(-1).expand(B, M, context.shape[-1])))  # [B, M, P]
        distractors = sample_distractors(valid.sum(dim=1), cfg.num_distractors, generator)  # [B, M, K]
        logits = contrastive_logits(c, self.project_q(q), distractors, codes if cfg.drop_identical else None,
                                    cfg.logit_temp)[valid]  # [N, 1 + K]
        num_masked = logits.shape[0]
        # Under DDP the means over masked frames and over real frames are weighted by this rank's share
        # of them (the quantizer's frame count is already the global one), so the ranks' average is the
        # global batch's mean; ones in one process. The diversity term is global already (quantizer).
        scales = global_mean_scale(torch.stack([mask.sum(), frame_mask.sum()]).float(), self.training)
        if num_masked:
            contrastive = F.cross_entropy(logits, torch.zeros(num_masked, dtype=torch.long, device=logits.device))
            accuracy = (logits[:, 0:1] > logits[:, 1:]).all(dim=1).float().mean()
            contrastive, accuracy = contrastive * scales[0], accuracy * scales[0]
        else:  # nothing masked (min_masks = 0): no term, but the graph stays whole
            contrastive, accuracy = 0.0 * context.float().sum(), torch.zeros((), device=audio.device)
        diversity = diversity_loss(diag["prob_perplexity"], self.quantizer.num_codes)
        loss = contrastive + cfg.diversity_weight * diversity
        out = {}
        if penalty is not None:
            penalty = penalty * scales[1]  # a mean over the real frames
            loss = loss + cfg.feature_penalty * penalty
            out["feature_penalty"] = penalty.detach()
        reachable = cfg.codebook_groups * torch.clamp(diag["num_frames"], 1, cfg.codebook_entries)
        return {
            "loss": loss,
            "contrastive": contrastive.detach(),
            "diversity": diversity.detach(),
            **out,
            "prob_perplexity": diag["prob_perplexity"].detach(),
            "code_perplexity": diag["code_perplexity"].detach(),
            "code_usage": (diag["code_perplexity"] / reachable).detach(),
            "temperature": torch.tensor(temperature, device=loss.device),
            "masked_fraction": (mask.sum() / frame_mask.sum().clamp(min=1)).float() * scales[1],
            "contrastive_acc": accuracy.detach(),
        }
