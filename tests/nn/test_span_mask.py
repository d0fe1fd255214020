"""wav2vec 2.0's span masking of audio frames: each real frame starts a span of M frames with
probability p, spans overlap, padded frames are never masked, and at least `min_masks` spans per
utterance."""

import pytest
import torch

from selfsup.errors import SelfsupError
from selfsup.nn.masking import span_mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frames(lengths: list[int], num_frames: int | None = None) -> torch.Tensor:
    """A right-padded frame mask [B, F] (True = real) for utterances of `lengths` frames."""
    num_frames = num_frames or max(lengths)
    return torch.arange(num_frames).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True in a 1-d bool tensor."""
    out, start = [], None
    for t, value in enumerate(row.tolist() + [False]):
        if value and start is None:
            start = t
        elif not value and start is not None:
            out.append((start, t - start))
            start = None
    return out


@pytest.mark.parametrize(("mask_prob", "span"), [(0.65, 10), (0.8, 10), (0.3, 5)])
def test_masked_fraction_matches_the_paper(mask_prob, span):
    # Away from the utterance edges a frame is masked when any of the M frames up to it started a span.
    p = mask_prob / span
    expected = 1 - (1 - p) ** span  # 0.49 for wav2vec 2.0's p = 0.065, M = 10
    mask = span_mask(frames([2000] * 64), gen(0), mask_prob=mask_prob, span=span, min_masks=0)
    interior = mask[:, span : -span].float().mean().item()
    assert abs(interior - expected) < 0.01, (interior, expected)
    if (mask_prob, span) == (0.65, 10):
        assert abs(expected - 0.49) < 0.005


def test_starts_are_bernoulli_with_probability_p():
    # With min_masks = 0 the number of spans (starts) per long utterance is Binomial(F, p); with a small
    # p the spans rarely touch, so the runs count the starts.
    p, span, num_frames = 0.004, 10, 5000
    mask = span_mask(frames([num_frames] * 32), gen(1), mask_prob=p * span, span=span, min_masks=0)
    num_runs = sum(len(runs(row)) for row in mask)
    expected = 32 * num_frames * p  # 640, touching spans merge ~8 % of them
    assert 0.85 * expected < num_runs < 1.05 * expected


def test_spans_have_length_m():
    # One start per utterance (p ~ 0, min_masks = 1): exactly one run of M frames, where a span fits.
    mask = span_mask(frames([300] * 200), gen(2), mask_prob=1e-9, span=10, min_masks=1)
    for row in mask:
        (start, length), = runs(row)
        assert length == 10 and 0 <= start <= 290
    # Overlapping spans make longer runs, never shorter ones, except where the utterance ends.
    lengths = [400, 397, 250, 123]
    mask = span_mask(frames(lengths), gen(3), mask_prob=0.65, span=10)
    for row, n in zip(mask, lengths):
        for start, length in runs(row):
            assert length >= 10 or start + length == n


def test_padded_frames_are_never_masked():
    lengths = [50, 13, 7, 1, 120]
    real = frames(lengths, 130)
    for seed in range(20):
        mask = span_mask(real, gen(seed), mask_prob=0.65, span=10)
        assert not (mask & ~real).any()
        assert (mask.sum(dim=1) >= 1).all()  # every utterance, the one-frame one too, has a masked frame


def test_min_masks_spans_per_utterance():
    # p tiny: every span comes from min_masks; each utterance then has min_masks starts (runs may merge).
    real = frames([100] * 500)
    mask = span_mask(real, gen(4), mask_prob=1e-9, span=10, min_masks=2)
    counts = mask.sum(dim=1)
    assert (counts >= 11).all() and (counts <= 20).all()  # two distinct starts: 11 to 20 frames
    assert (counts == 20).float().mean() > 0.7  # mostly disjoint spans
    # An utterance no longer than a span is masked whole; zero min_masks may leave one unmasked.
    short = span_mask(frames([8, 10, 3]), gen(5), mask_prob=1e-9, span=10, min_masks=2)
    assert short.equal(frames([8, 10, 3]))
    none = span_mask(frames([100] * 8), gen(6), mask_prob=1e-9, span=10, min_masks=0)
    assert not none.any()


def test_seeded_and_independent_of_the_data_for_its_draws():
    real = frames([200, 150, 90])
    a, b = span_mask(real, gen(7), mask_prob=0.65), span_mask(real, gen(7), mask_prob=0.65)
    assert a.equal(b) and a.dtype == torch.bool and a.shape == real.shape
    assert not a.equal(span_mask(real, gen(8), mask_prob=0.65))
    # The generator advances by the same amount whatever the lengths (later draws stay aligned).
    g1, g2 = gen(9), gen(9)
    span_mask(frames([200, 150, 90]), g1)
    span_mask(frames([20, 200, 1]), g2)
    assert torch.rand(4, generator=g1).equal(torch.rand(4, generator=g2))


def test_bad_arguments_are_refused():
    with pytest.raises(SelfsupError, match="frame mask"):
        span_mask(torch.ones(2, 5), gen(0))
    with pytest.raises(SelfsupError, match="mask_prob"):
        span_mask(frames([5]), gen(0), mask_prob=0.0)
