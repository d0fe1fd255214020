"""BEiT (Bao et al. 2021): cross-entropy on the visual tokens of the masked patches only, tokens from
a k-means tokenizer fitted on the run's images, masked patches hidden behind the mask token."""

import pytest
import torch

from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.methods import build_method
from selfsup.nn.masking import blockwise_mask, patchify, unpatchify
from selfsup.modalities.base import FitData

S, P, K = 16, 4, 16  # 16 px, 4 px patches (4x4 grid), 16 visual tokens
N = (S // P) ** 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.25


def tiny_beit(fit: bool = True):
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", in_channels=3, image_size=S, dim=32, depth=2, heads=2)
    beit = build_method({"name": "beit", "num_tokens": K}, encoder)
    if fit:
        beit.fit_targets(FitData(training_images(), normalise, torch.device("cpu")), gen(3))
    return beit


def training_images(num: int = 64) -> torch.Tensor:
    """uint8 [M, 3, S, S]: flat patches of a few colours, so the tokens mean something."""
    g = gen(2)
    colours = torch.randint(0, 256, (num, 3, S // P, S // P), generator=g, dtype=torch.uint8)
    return colours.repeat_interleave(P, dim=2).repeat_interleave(P, dim=3)


def make_batch(B: int = 4, seed: int = 1) -> dict:
    return {"views": [normalise(training_images(B))], "generator": gen(seed)}


def batch_mask(B: int = 4, seed: int = 1) -> torch.Tensor:
    """The mask forward draws for `make_batch(B, seed)` (same generator, same call)."""
    return blockwise_mask(B, S // P, 0.4, gen(seed), min_block=16)


def with_targets(beit, monkeypatch, targets: torch.Tensor) -> None:
    monkeypatch.setattr(beit.tokenizer, "assign", lambda patches: targets.clone())


def loss_of(beit, batch_seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return beit(make_batch(seed=batch_seed), 0.0)["loss"]


def test_only_masked_positions_count(monkeypatch):
    beit = tiny_beit().eval()
    mask = batch_mask()
    assert 0 < int(mask.sum()) < mask.numel()
    targets = torch.randint(K, (4, N), generator=gen(4))
    with_targets(beit, monkeypatch, targets)
    base = loss_of(beit)
    # New tokens at every visible patch: the same loss, bit for bit.
    with_targets(beit, monkeypatch, torch.where(mask, targets, (targets + 1 + torch.randint(K - 1, (4, N))) % K))
    assert torch.equal(loss_of(beit), base)
    # A new token at one masked patch: a different loss.
    changed = targets.clone()
    b, n = torch.nonzero(mask)[0].tolist()
    changed[b, n] = (changed[b, n] + 1) % K
    with_targets(beit, monkeypatch, changed)
    assert not torch.equal(loss_of(beit), base)


def test_loss_is_the_naive_cross_entropy_of_the_masked_tokens(monkeypatch):
    beit = tiny_beit().eval()
    targets = torch.randint(K, (4, N), generator=gen(4))
    with_targets(beit, monkeypatch, targets)
    logits_seen = []
    beit.head.register_forward_hook(lambda _m, _a, out: logits_seen.append(out))
    out = beit(make_batch(), 0.0)
    # From the paper: -1/|M| sum over masked (b, n) of log softmax(W h_{b,n})[z_{b,n}], written as a loop
    # over the encoder's own outputs (the corrupted image: masked patches are the mask token).
    mask = batch_mask()
    with torch.no_grad():
        hidden = beit.encoder(make_batch()["views"][0], mask)[:, 1:]  # [B, N, D]
        terms, hits = [], []
        for b in range(4):
            for n in range(N):
                if mask[b, n]:
                    logits = beit.head(hidden[b, n]).double()
                    terms.append(float(torch.logsumexp(logits, 0) - logits[targets[b, n]]))
                    hits.append(int(logits.argmax()) == int(targets[b, n]))
    assert abs(float(out["loss"].detach()) - sum(terms) / len(terms)) < 1e-5
    assert abs(float(out["token_acc"]) - sum(hits) / len(hits)) < 1e-6
    assert logits_seen[0].shape == (int(mask.sum()), K), "the head runs on the masked positions only"


def test_the_encoder_cannot_see_the_masked_patches():
    """The tokens to predict come from the masked pixels, but the encoder's output does not."""
    beit = tiny_beit().eval()
    images = make_batch()["views"][0]
    mask = batch_mask()
    scribbled = unpatchify(torch.where(mask.unsqueeze(-1), torch.randn(4, N, P * P * 3), patchify(images, P)), P, 3, S, S)
    with torch.no_grad():
        assert torch.allclose(beit.encoder(images, mask), beit.encoder(scribbled, mask), atol=1e-6)
    targets = beit.tokenizer.assign(patchify(images, P))
    assert not torch.equal(targets, beit.tokenizer.assign(patchify(scribbled, P)))


def test_targets_are_the_tokens_of_the_uncorrupted_view(monkeypatch):
    beit = tiny_beit()
    given = []
    original = beit.tokenizer.assign
    monkeypatch.setattr(beit.tokenizer, "assign", lambda patches: given.append(patches) or original(patches))
    batch = make_batch()
    beit(batch, 0.0)
    assert torch.equal(given[0], patchify(batch["views"][0], P))


def test_fit_targets_fits_the_tokenizer_on_normalised_patches():
    beit = tiny_beit(fit=False)
    assert not bool(beit.tokenizer.fitted)
    with pytest.raises(SelfsupError, match="not fitted"):
        beit(make_batch(), 0.0)
    images = training_images()
    stats = beit.fit_targets(FitData(images, normalise, torch.device("cpu")), gen(3))
    assert bool(beit.tokenizer.fitted) and stats["used"] == K
    assert beit.tokenizer.dim == P * P * 3
    # Fitted on patchify(normalise(images)): every training patch lies on (flat patches: near) its centroid.
    patches = patchify(normalise(images), P).reshape(-1, P * P * 3)
    ids = beit.tokenizer.assign(patches)
    assert len(ids.unique()) == K
    nearest = (patches - beit.tokenizer.centroids[ids]).square().sum(1).mean()
    spread = (patches - patches.mean(0)).square().sum(1).mean()
    assert nearest < 0.25 * spread
    # The codebook is a buffer: it travels with the method's checkpoints.
    assert torch.equal(beit.state_dict()["tokenizer.centroids"], beit.tokenizer.centroids)


def test_gradients_reach_the_mask_token_and_the_head():
    beit = tiny_beit()
    beit(make_batch(), 0.0)["loss"].backward()
    assert beit.encoder.mask_token.grad.abs().sum() > 0
    assert beit.head.weight.grad.abs().sum() > 0
    assert beit.tokenizer.centroids.grad is None and not beit.tokenizer.centroids.requires_grad


def test_a_non_vit_encoder_is_refused():
    resnet = build_encoder("resnet10", in_channels=3, image_size=S, width=8)
    with pytest.raises(SelfsupError, match="ViT"):
        build_method({"name": "beit"}, resnet)


def test_fit_targets_samples_the_training_images_not_their_first_ones():
    """A folder source lists class folders in order and the split keeps that order, so with more
    than fit_max_images images the tokens would only know the first classes' patches."""
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", in_channels=3, image_size=S, dim=32, depth=2, heads=2)
    beit = build_method({"name": "beit", "num_tokens": 2, "fit_max_images": 8}, encoder)
    red, blue = torch.zeros(3, S, S, dtype=torch.uint8), torch.zeros(3, S, S, dtype=torch.uint8)
    red[0], blue[2] = 255, 255
    images = torch.stack([red] * 8 + [blue] * 8)  # "class folder" order
    beit.fit_targets(FitData(images, normalise, torch.device("cpu")), gen(3))
    ids = beit.tokenizer.assign(patchify(normalise(torch.stack([red, blue])), P))  # [2, N]
    assert ids[0, 0] != ids[1, 0], "red and blue patches must get different tokens"
