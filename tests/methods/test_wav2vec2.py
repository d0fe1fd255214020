"""wav2vec 2.0 (Baevski et al. 2020): the contrastive loss at masked frames against K distractors from
other masked frames of the same utterance, checked against a loop written from the paper's
equation; the distractor sampler; the method contract with a stand-in encoder (the audio encoder
API of the speech contract) and, when it is registered, the real `wav2vec2_tiny`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.methods import build_method
from selfsup.methods.wav2vec2 import contrastive_logits, latents_with_penalty, pack_masked, sample_distractors
from selfsup.nn.diagnostics import collapse_warning
from selfsup.nn.masking import span_mask
from selfsup.nn.quantizer import gumbel_temperature


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class StandInEncoder(nn.Module):
    """The audio encoder API of the speech contract at toy size: a strided Conv1d stack (by default 80
    samples per frame, 130 of receptive field) and its LayerNorm give z [B, F, C] + frame_mask; `contextualise`
    projects, puts `mask_embedding` at masked frames, zeroes padded ones, adds a convolutional position
embedding and runs pre-LN
    nn.TransformerEncoderLayers (padded frames hidden as keys), `layer=k` returning block k's output."""

    def __init__(self, latent_dim: int = 16, dim: int = 24, num_layers: int = 2, heads: int = 2,
                 kernels: tuple[int, ...] = (10, 4, 4), strides: tuple[int, ...] = (5, 4, 4)):
        super().__init__()
        self.latent_dim, self.dim, self.num_layers = latent_dim, dim, num_layers
        self.kernels, self.strides = kernels, strides
        self.convs = nn.ModuleList(nn.Conv1d(1 if i == 0 else latent_dim, latent_dim, k, stride=s)
                                   for i, (k, s) in enumerate(zip(self.kernels, self.strides)))
        self.latent_norm = nn.LayerNorm(latent_dim)
        self.project = nn.Linear(latent_dim, dim)
        self.mask_embedding = nn.Parameter(torch.rand(dim))
        self.pos_conv = nn.Conv1d(dim, dim, 9, padding=4, groups=4)  # relative positions, as the real one's
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        frames = lengths.long()
        for k, s in zip(self.kernels, self.strides):
            frames = torch.div(frames - k, s, rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def latents(self, audio, lengths=None):
        x = audio.unsqueeze(1)
        for conv in self.convs:
            x = F.gelu(conv(x))
        z = self.latent_norm(x.transpose(1, 2))  # [B, F, C]
        lengths = torch.full((audio.shape[0],), audio.shape[1]) if lengths is None else lengths
        frame_mask = torch.arange(z.shape[1]) < self.frame_lengths(lengths).unsqueeze(1)
        return z, frame_mask

    def contextualise(self, z, frame_mask, mask=None, layer=None):
        x = self.project(z)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        x = torch.where(frame_mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype))
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        if layer == 0:
            return x
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, src_key_padding_mask=~frame_mask)
            if index == layer:
                return x
        return self.norm(x)

    def forward(self, audio, mask=None, lengths=None):
        z, frame_mask = self.latents(audio, lengths)
        return self.contextualise(z, frame_mask, mask)

    def embed(self, audio, lengths=None):
        z, frame_mask = self.latents(audio, lengths)
        x = self.contextualise(z, frame_mask)
        real = frame_mask.unsqueeze(-1).to(x.dtype)
        return (x * real).sum(1) / real.sum(1)


def make_batch(B: int = 4, T: int = 4000, seed: int = 0, lengths: list[int] | None = None) -> dict:
    """Random audio [B, T] (some clips right-padded with zeros), its lengths and a fresh generator."""
    g = gen(seed)
    audio = torch.randn(B, T, generator=g)
    lengths_t = torch.tensor(lengths if lengths is not None else [T] + [T - 700 * i for i in range(1, B)])
    audio = audio * (torch.arange(T) < lengths_t.unsqueeze(1))
    return {"audio": audio, "lengths": lengths_t, "generator": gen(seed + 100), "id": [str(i) for i in range(B)]}


def stand_in(**cfg):
    torch.manual_seed(0)
    return build_method({"name": "wav2vec2", **cfg}, StandInEncoder())


def real_encoder():
    from selfsup.encoders import ENCODERS, build_encoder

    if "wav2vec2_tiny" not in ENCODERS:
        pytest.skip("the audio encoder is not registered yet")
    torch.manual_seed(0)
    return build_encoder("wav2vec2_tiny", conv_channels=32, dim=32, depth=2, heads=2, pos_conv_kernel=8, pos_conv_groups=4)


# -- the contrastive loss against the paper's equation -------------------------------------------


def naive_contrastive(c_frames, q_frames, codes_frames, mask, distractors, kappa, drop_identical=True):
    """-log exp(sim(c_t, q_t)/κ) / Σ_{q̃ ∈ {q_t} ∪ Q_t} exp(sim(c_t, q̃)/κ), averaged over every masked
    frame of every utterance, with Q_t listed explicitly: for masked frame t, the frames named by
    distractors (slot k = the k-th masked frame of that utterance), skipping those whose codes equal
    q_t's. c_frames [B, F, P] and q_frames [B, F, P] are per frame (q of every frame, masked or not)."""
    losses, checked = [], 0
    for b in range(mask.shape[0]):
        masked = [t for t in range(mask.shape[1]) if mask[b, t]]
        for i, t in enumerate(masked):
            others = [masked[int(k)] for k in distractors[b, i] if k >= 0]
            assert t not in others, "a distractor is the positive"
            assert all(mask[b, u] for u in others), "a distractor is not a masked frame"
            assert len(set(others)) == len(others) == min(100, len(masked) - 1)
            if drop_identical:
                others = [u for u in others if not torch.equal(codes_frames[b, u], codes_frames[b, t])]
            checked += 1
            sim = lambda u: F.cosine_similarity(c_frames[b, t], q_frames[b, u], dim=0).item() / kappa  # noqa: E731
            numerator = math.exp(sim(t))
            denominator = numerator + sum(math.exp(sim(u)) for u in others)
            losses.append(-math.log(numerator / denominator))
    return sum(losses) / len(losses), checked


@pytest.mark.parametrize(("train", "drop_identical"), [(True, True), (False, True), (True, False)])
def test_contrastive_loss_matches_the_papers_equation(train, drop_identical):
    # Few codes (4 entries x 2 groups: 16 vectors): distractors identical to the positive occur.
    method = stand_in(num_distractors=100, codebook_entries=4, drop_identical=drop_identical)
    method.train(train)
    batch = make_batch(B=3, T=6000, lengths=[6000, 4400, 2100])
    out = method(batch, 0.3)
    # Replay the draws forward makes from the batch's generator: the mask, the Gumbel noise, the distractors.
    g = gen(100)
    with torch.no_grad():
        z, frame_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        mask = span_mask(frame_mask, g, mask_prob=0.65, span=10, min_masks=2)
        context = method.encoder.contextualise(z, frame_mask, mask)
        q_masked, diag = method.quantizer(z[mask], gumbel_temperature(0.3), g)  # in time order, utterance by utterance
        distractors = sample_distractors(mask.sum(1), 100, g)
        q_frames = torch.zeros(*mask.shape, method.cfg.proj_dim)
        q_frames[mask] = method.project_q(q_masked)
        codes_frames = torch.full((*mask.shape, 2), -1, dtype=torch.long)
        codes_frames[mask] = diag["codes"]
        expected, checked = naive_contrastive(method.project_c(context), q_frames, codes_frames, mask, distractors, 0.1,
                                              drop_identical)
    assert checked == int(mask.sum()) > 20
    assert abs(out["contrastive"].item() - expected) < 1e-4 * max(1.0, expected)
    # Some distractor was left out for having the positive's codes (4 entries x 2 groups: 16 vectors).
    identical = sum(int((codes_frames[b, mask[b]].unsqueeze(1) == codes_frames[b, mask[b]].unsqueeze(0)).all(-1).sum())
                    - int(mask[b].sum()) for b in range(3))
    assert identical > 0


def test_distractors_are_other_masked_frames_of_the_utterance_uniformly():
    counts = torch.tensor([5, 1, 3, 0, 120])
    slots = sample_distractors(counts, 100, gen(0))
    assert slots.shape == (5, 120, 100)
    for b, n in enumerate(counts.tolist()):
        for i in range(120):
            row = [int(k) for k in slots[b, i] if k >= 0]
            if i >= n:
                assert not row
                continue
            assert i not in row and len(set(row)) == len(row) == min(100, n - 1) and all(0 <= k < n for k in row)
    # Uniform: over many draws each other slot of a 5-frame utterance is drawn equally often.
    hits = torch.zeros(5)
    for seed in range(400):
        for k in sample_distractors(torch.tensor([5]), 2, gen(seed))[0, 0]:
            hits[int(k)] += 1
    assert hits[0] == 0 and ((hits[1:] / 200 - 1).abs() < 0.15).all()


def test_identical_codes_and_missing_distractors_are_left_out():
    c = torch.randn(1, 3, 4)
    q = torch.randn(1, 3, 4)
    codes = torch.tensor([[[0, 1], [0, 1], [2, 1]]])
    distractors = torch.tensor([[[1, 2], [0, -1], [0, 1]]])
    logits = contrastive_logits(c, q, distractors, codes, 0.1)
    assert logits.shape == (1, 3, 3)
    assert torch.isinf(logits[0, 0, 1]) and torch.isfinite(logits[0, 0, 2])  # frame 1 has frame 0's codes
    assert torch.isinf(logits[0, 1, 1]) and torch.isinf(logits[0, 1, 2])  # identical codes; no second distractor
    assert torch.isfinite(logits[0, 2]).all()
    sim = F.cosine_similarity(c[0, 2], q[0, 1], dim=0) / 0.1
    assert torch.isclose(logits[0, 2, 2], sim, atol=1e-5)


def test_pack_masked_lists_masked_frames_in_time_order():
    mask = torch.tensor([[False, True, True, False, True], [False] * 5, [True, False, False, False, False]])
    frames, valid = pack_masked(mask)
    assert frames.tolist() == [[1, 2, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True, True, True], [False] * 3, [True, False, False]]


# -- the method contract, with the stand-in and with the real encoder -----------------------------


ENCODERS = {"stand_in": StandInEncoder, "wav2vec2_tiny": real_encoder}

LOGGED = {"loss", "contrastive", "diversity", "feature_penalty", "code_perplexity", "prob_perplexity", "code_usage",
          "temperature", "masked_fraction", "contrastive_acc"}


@pytest.mark.parametrize("which", sorted(ENCODERS))
def test_contract(which):
    torch.manual_seed(0)
    encoder = ENCODERS[which]()
    method = build_method({"name": "wav2vec2"}, encoder)
    assert method.encoder is encoder
    out = method(make_batch(), 0.0)
    assert set(out) == LOGGED
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value), key
    assert out["temperature"].item() == 2.0 and 0.2 < out["masked_fraction"].item() < 1.0
    assert out["code_perplexity"].item() >= 2.0 and out["feature_penalty"].item() > 0
    out["loss"].backward()
    without_grad = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad
    assert method.quantizer.logits.weight.grad.abs().sum() > 0  # straight-through, inside the method
    assert method(make_batch(), 0.0)["loss"].equal(method(make_batch(), 0.0)["loss"])  # the batch's generator only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(), 0.5)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("which", sorted(ENCODERS))
def test_padding_changes_nothing(which):
    # The padded samples' content and a batch's extra padding never reach the loss: masks, quantizer,
    # distractors and the feature penalty all read real frames only.
    torch.manual_seed(0)
    method = build_method({"name": "wav2vec2"}, ENCODERS[which]()).eval()
    batch = make_batch(B=3, T=5000, lengths=[5000, 3000, 4100])
    noisy = dict(batch, generator=gen(100))
    pad = torch.arange(5000) >= batch["lengths"].unsqueeze(1)
    noisy["audio"] = torch.where(pad, torch.randn(3, 5000), batch["audio"])
    with torch.no_grad():
        a, b = method(batch, 0.2), method(noisy, 0.2)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_loss_weights():
    method = stand_in(diversity_weight=0.0, feature_penalty=0.0)
    out = method(make_batch(), 0.0)
    assert torch.isclose(out["loss"], out["contrastive"])
    method = stand_in(diversity_weight=0.1, feature_penalty=10.0)  # the paper's weights
    out = method(make_batch(), 0.0)
    expected = out["contrastive"] + 0.1 * out["diversity"] + 10 * out["feature_penalty"]
    assert torch.isclose(out["loss"], expected, atol=1e-5)
    assert torch.isclose(out["diversity"], (128 - out["prob_perplexity"]) / 128, atol=1e-6)


def test_learns_on_a_toy_signal():
    # Some steps on four chirps with fresh masks: the masked frames get told apart from their distractors
    # (the real encoder: the stand-in's small position convolution learns too slowly to show it here).
    method = build_method({"name": "wav2vec2", "codebook_entries": 16}, real_encoder())
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    t = torch.arange(8000) / 16000
    audio = torch.stack([torch.sin(2 * math.pi * (f + 8 * f * t) * t) for f in (200, 450, 800, 1300)])
    accuracy = []
    for step in range(120):
        out = method({"audio": audio, "lengths": torch.full((4,), 8000), "generator": gen(step)}, step / 120)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        accuracy.append(out["contrastive_acc"].item())
    assert sum(accuracy[-20:]) / 20 > sum(accuracy[:20]) / 20 + 0.2


def test_collapse_alarm_on_code_usage():
    assert "codebook collapsing" in collapse_warning({"code_perplexity": 2.3, "code_usage": 0.018})
    assert collapse_warning({"code_perplexity": 60.0, "code_usage": 0.47}) is None
    # Existing alarms keep their precedence and behaviour.
    assert "embeddings collapsing" in collapse_warning({"embed_std": 0.01, "code_usage": 0.01})
    assert collapse_warning({"embed_std": 0.5, "embed_erank": 20.0}) is None
