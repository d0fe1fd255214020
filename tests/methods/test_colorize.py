"""Colourisation (Zhang, Isola & Efros 2016): CIE Lab conversions, soft-encoded ab targets, class
rebalancing weights and the weighted multinomial cross-entropy, each against the paper's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.nn.colour import lab_to_rgb, lightness_as_grey, rgb_to_lab
from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.methods import build_method
from selfsup.methods.colorize import ab_bins, soft_encode
from selfsup.modalities.base import FitData

S = 16
MEAN, STD = torch.tensor([0.5, 0.45, 0.4]), torch.tensor([0.25, 0.25, 0.3])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_colour_images(num: int, seed: int = 0) -> torch.Tensor:
    """RGB in [0, 1], [num, 3, S, S]: a 4x4 grid of saturated random colours, bilinearly blended."""
    coarse = torch.rand(num, 3, 4, 4, generator=gen(seed)) ** 2
    return F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)


def tiny_colorize(encoder: str = "resnet10"):
    torch.manual_seed(0)
    knobs = {"width": 8} if encoder == "resnet10" else {"dim": 32, "depth": 2, "heads": 2}
    return build_method({"name": "colorize", "decoder_dim": 16},
                        build_encoder(encoder, in_channels=3, image_size=S, **knobs))


def fitted_colorize(encoder: str = "resnet10"):
    method = tiny_colorize(encoder)
    images = (smooth_colour_images(48) * 255).round().to(torch.uint8)
    method.fit_targets(FitData(images, lambda x: x, torch.device("cpu")), gen(0))
    return method


# -- CIE Lab -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rgb", "lab"), [
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),  # sRGB primaries, D65 (Lindbloom's calculator)
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
])
def test_rgb_to_lab_reference_values(rgb, lab):
    got = rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(got, torch.tensor(lab), atol=0.01), got


def test_lab_round_trip_and_grey():
    x = torch.rand(4, 3, 8, 8, generator=gen(0))
    assert (lab_to_rgb(rgb_to_lab(x)) - x).abs().max() < 1e-4
    grey = lightness_as_grey(rgb_to_lab(x))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    # The grey image keeps the lightness and has no chroma.
    lab_grey = rgb_to_lab(grey)
    assert (lab_grey[:, 0] - rgb_to_lab(x)[:, 0]).abs().max() < 1e-3 and lab_grey[:, 1:].abs().max() < 1e-3


# -- soft targets and rebalancing ------------------------------------------------------------------


def test_soft_encode_spreads_over_the_nearest_bins_with_gaussian_weights():
    centres = ab_bins(10.0)
    assert centres.shape == (23 * 23, 2) and centres.min() == -110 and centres.max() == 110
    ab = torch.rand(200, 2, generator=gen(0)) * 200 - 100
    targets = soft_encode(ab, centres, 5, 5.0)
    assert torch.allclose(targets.sum(dim=1), torch.ones(200), atol=1e-6)
    assert ((targets > 0).sum(dim=1) == 5).all()
    distances = torch.cdist(ab, centres)
    assert torch.equal(targets.argmax(dim=1), distances.argmin(dim=1))
    for p in range(0, 200, 37):  # Gaussian kernel: w_i / w_j = exp(-(d_i^2 - d_j^2) / (2 sigma^2))
        bins = torch.nonzero(targets[p]).flatten()
        near = distances[p].topk(5, largest=False).indices
        assert set(bins.tolist()) == set(near.tolist())
        i, j = bins[0], bins[1]
        expected = math.exp(-(float(distances[p, i]) ** 2 - float(distances[p, j]) ** 2) / (2 * 5.0**2))
        assert abs(float(targets[p, i] / targets[p, j]) - expected) < 1e-4 * max(1.0, expected)


def test_soft_encode_puts_no_mass_on_disallowed_bins():
    centres = ab_bins(10.0)
    allowed = centres.norm(dim=1) < 40  # a disc of bins
    ab = torch.tensor([[50.0, 50.0], [0.0, 0.0], [-70.0, 10.0], [3.0, -64.0]])  # three of them outside the disc
    targets = soft_encode(ab, centres, 5, 5.0, allowed)
    assert targets[:, ~allowed].abs().max() == 0
    assert torch.allclose(targets.sum(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(targets.argmax(dim=1), torch.cdist(ab, centres).masked_fill(~allowed, 1e9).argmin(dim=1))


def test_a_colour_far_from_every_bin_in_use_still_gets_a_target():
    centres = ab_bins(10.0)
    allowed = centres.norm(dim=1) < 40
    targets = soft_encode(torch.tensor([[100.0, 100.0], [-90.0, 10.0]]), centres, 5, 5.0, allowed)
    assert torch.allclose(targets.sum(dim=1), torch.ones(2), atol=1e-6)
    # In a run: bins fitted on reddish images (the first fit_max_images, or before a hue jitter),
    # then a green view: the loss is NaN and the run diverges.
    method = tiny_colorize()
    reds = torch.zeros(8, 3, S, S)
    reds[:, 0] = torch.linspace(0.5, 1.0, S)
    method.fit_targets(FitData((reds * 255).round().to(torch.uint8), lambda x: x, torch.device("cpu")), gen(0))
    greens = torch.zeros(2, 3, S, S)
    greens[:, 1] = 0.8
    batch = {"views": [(greens - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)], "generator": gen(1),
             "pixel_mean": MEAN, "pixel_std": STD}
    assert torch.isfinite(method(batch, 0.0)["loss"])


def naive_rebalancing(images: torch.Tensor, centres: torch.Tensor, sigma: float, lam: float):
    """The paper's eq. 4, written out: p = empirical distribution of the pixels' nearest ab bins,
    p~ = p smoothed by a Gaussian over the ab plane (restricted to the bins in use, renormalised),
    w_q ∝ ((1 - λ) p~_q + λ / Q)^-1 over the Q bins in use, scaled so that sum_q p~_q w_q = 1."""
    lab = rgb_to_lab(images.float() / 255).double()
    ab = lab[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)
    counts = torch.zeros(len(centres), dtype=torch.float64)
    for q in torch.cdist(ab, centres.double()).argmin(dim=1).tolist():
        counts[q] += 1
    p = counts / counts.sum()
    used = counts > 0
    smooth = torch.zeros_like(p)
    for q in range(len(centres)):
        if used[q]:
            for r in torch.nonzero(used).flatten().tolist():
                smooth[q] += math.exp(-float((centres[q] - centres[r]).square().sum()) / (2 * sigma**2)) * p[r]
    smooth /= smooth.sum()
    Q = int(used.sum())
    w = torch.where(used, 1.0 / ((1 - lam) * smooth + lam / Q), torch.zeros_like(smooth))
    return used, smooth, w / (smooth * w).sum()


def test_fit_targets_computes_the_papers_rebalancing_weights():
    method = tiny_colorize()
    images = (smooth_colour_images(24) * 255).round().to(torch.uint8)
    stats = method.fit_targets(FitData(images, lambda x: x, torch.device("cpu")), gen(0))
    used, smooth, weights = naive_rebalancing(images, method.centres, 5.0, 0.5)
    assert torch.equal(method.in_gamut, used) and 2 < stats["bins_in_gamut"] == int(used.sum()) < len(used)
    assert torch.allclose(method.weights.double(), weights, rtol=1e-4, atol=1e-6)
    assert abs(float((smooth * method.weights.double()).sum()) - 1.0) < 1e-5  # E_p~[w] = 1
    # Rarer colours weigh more (w falls as p~ rises).
    rare, common = smooth[used].argmin(), smooth[used].argmax()
    assert method.weights[used][rare] > method.weights[used][common]
    # The weights and the bins in use are buffers, so checkpoints and resumes keep them.
    assert {"in_gamut", "weights"} <= set(method.state_dict())


def test_greyscale_data_is_refused_mentioning_colour():
    method = tiny_colorize()
    with pytest.raises(SelfsupError, match="colour"):
        method.fit_targets(FitData(torch.full((4, 1, S, S), 128, dtype=torch.uint8), lambda x: x, torch.device("cpu")), gen(0))
    grey_rgb = torch.randint(0, 256, (4, 1, S, S), dtype=torch.uint8).expand(4, 3, S, S)
    with pytest.raises(SelfsupError, match="colour"):
        method.fit_targets(FitData(grey_rgb, lambda x: x, torch.device("cpu")), gen(0))


# -- the model -----------------------------------------------------------------------------------


def make_batch(B: int = 3, seed: int = 5) -> dict:
    rgb = smooth_colour_images(B, seed)
    return {"views": [(rgb - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)], "generator": gen(1),
            "pixel_mean": MEAN, "pixel_std": STD}


def test_out_of_gamut_bins_get_minus_infinite_logits():
    method = fitted_colorize().eval()
    assert not method.in_gamut.all()
    logits = method.logits(make_batch()["views"][0], S // 4)
    assert logits.shape == (3, len(method.centres), S // 4, S // 4)
    assert torch.isneginf(logits[:, ~method.in_gamut]).all() and torch.isfinite(logits[:, method.in_gamut]).all()


@pytest.mark.parametrize("encoder", ["resnet10", "vit_tiny"])
def test_loss_is_the_papers_weighted_cross_entropy(encoder):
    """L = -mean over output pixels of v(Z) sum_q Z_q log softmax(logits)_q, with Z the soft-encoded
    mean ab of each 4x4 cell and v the rebalancing weight of its nearest bin (paper eq. 2-3)."""
    method = fitted_colorize(encoder).eval()  # eval: BatchNorm's running statistics, so two calls agree
    batch = make_batch()
    with torch.no_grad():
        out = method(batch, 0.0)
        rgb = (batch["views"][0] * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)).clamp(0, 1)
        lab = rgb_to_lab(rgb)
        # The encoder's input: the lightness only, as a grey RGB image, normalised like the views.
        grey = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
        logits = method.logits((grey - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1), S // 4).double()
    allowed = torch.nonzero(method.in_gamut).flatten().tolist()
    centres = method.centres.double()
    losses, ces = [], []
    for b in range(3):
        for i in range(S // 4):
            for j in range(S // 4):
                ab = lab[b, 1:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].double().mean(dim=(1, 2))
                dist = {q: float((centres[q] - ab).norm()) for q in allowed}
                nearest = sorted(allowed, key=dist.get)[:5]
                kernel = {q: math.exp(-dist[q] ** 2 / (2 * 5.0**2)) for q in nearest}
                log_probs = logits[b, :, i, j].log_softmax(dim=0)
                ce = -sum(kernel[q] / sum(kernel.values()) * float(log_probs[q]) for q in nearest)
                ces.append(ce)
                losses.append(float(method.weights[nearest[0]]) * ce)
    assert abs(float(out["loss"]) - sum(losses) / len(losses)) < 1e-4
    assert abs(float(out["unweighted_ce"]) - sum(ces) / len(ces)) < 1e-4


def test_the_encoder_sees_only_the_lightness():
    """Two images with the same lightness and different colours give the encoder the same input."""
    method = fitted_colorize()
    seen = []
    method.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    rgb = smooth_colour_images(3, seed=5) * 0.6 + 0.2
    lab = rgb_to_lab(rgb)
    recoloured = lab_to_rgb(torch.cat([lab[:, :1], -0.5 * lab[:, 1:]], dim=1))  # other hues, same L (in gamut)
    assert (rgb_to_lab(recoloured)[:, 0] - lab[:, 0]).abs().max() < 0.05
    assert (recoloured - rgb).abs().max() > 0.2
    for images in (rgb, recoloured):
        method({"views": [(images - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)], "generator": gen(1),
                "pixel_mean": MEAN, "pixel_std": STD}, 0.0)
    assert torch.allclose(seen[0], seen[1], atol=2e-3)
    assert torch.allclose(seen[0][:, 0] * STD[0] + MEAN[0], seen[0][:, 2] * STD[2] + MEAN[2], atol=1e-5), "grey: R = B"


def test_non_colour_views_are_refused():
    method = fitted_colorize()
    with pytest.raises(SelfsupError, match="3-channel"):
        method({"views": [torch.zeros(2, 1, S, S)], "generator": gen(0), "pixel_mean": MEAN[:1], "pixel_std": STD[:1]}, 0.0)


def test_preview_is_grey_input_and_a_colourisation_with_the_same_lightness():
    method = fitted_colorize().eval()
    rgb = smooth_colour_images(4, seed=7)
    rows = method.preview(rgb, MEAN, STD, gen(0))
    assert [title for title, _ in rows] == ["grey input", "colourised"]
    for _, images in rows:
        assert images.shape == rgb.shape and images.min() >= 0 and images.max() <= 1
    grey, colourised = rows[0][1], rows[1][1]
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-6)
    assert (rgb_to_lab(grey)[:, 0] - rgb_to_lab(rgb)[:, 0]).abs().max() < 1e-3
    # The colourisation keeps the input's lightness (up to clipping at the sRGB gamut's edge).
    assert (rgb_to_lab(colourised)[:, 0] - rgb_to_lab(rgb)[:, 0]).abs().mean() < 3.0


def test_fit_targets_samples_the_training_images_not_their_first_ones():
    """With more training images than fit_max_images, the bins in use must come from all of them,
    not from the first classes of a folder source (whose colours then fall out of gamut)."""
    torch.manual_seed(0)
    method = build_method({"name": "colorize", "decoder_dim": 16, "fit_max_images": 8},
                          build_encoder("resnet10", in_channels=3, image_size=S, width=8))
    warm, green = torch.full((3, S, S), 40, dtype=torch.uint8), torch.full((3, S, S), 40, dtype=torch.uint8)
    warm[0], warm[1, :, S // 2 :], green[1] = 220, 140, 200  # "class 1": red and orange; "class 2": green
    method.fit_targets(FitData(torch.stack([warm] * 8 + [green] * 8), lambda x: x, torch.device("cpu")), gen(0))
    for colour in (warm[:, :, :1], warm[:, :, -1:], green[:, :, :1]):
        ab = rgb_to_lab(colour[None].float() / 255)[0, 1:, 0, 0]
        assert method.in_gamut[torch.cdist(ab[None], method.centres).argmin()], "every colour's bin must be in use"
