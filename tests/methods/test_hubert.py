"""HuBERT (Hsu et al. 2021): cross-entropy over k-means cluster ids at span-masked frames, checked
against a naive loop; MFCC targets (iteration 1) stable across save and load of the codebook;
iteration 2 reads its targets from another run's encoder, held frozen beside the trained one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model

from selfsup.errors import SelfsupError
from selfsup.export.encoder import save_encoder
from selfsup.methods import build_method
from selfsup.methods.hubert import HUBERT_TARGETS_FILE, parse_targets
from selfsup.methods.wav2vec2 import latents_with_penalty
from selfsup.modalities.base import FitData
from selfsup.nn.masking import span_mask
from selfsup.nn.mfcc import model_rate_mfcc
from selfsup.nn.targets import KMeansTokenizer
from tests.methods.test_wav2vec2 import StandInEncoder

SR = 16000
K = 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stand_in_encoder() -> StandInEncoder:
    """The stand-in with the paper's conv layout (20 ms frames, 25 ms receptive field), which the MFCC
    alignment needs."""
    return StandInEncoder(kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2))


def real_encoder():
    from selfsup.encoders import ENCODERS, build_encoder

    if "wav2vec2_tiny" not in ENCODERS:
        pytest.skip("the audio encoder is not registered yet")
    return build_encoder("wav2vec2_tiny", conv_channels=32, dim=32, depth=2, heads=2, pos_conv_kernel=8, pos_conv_groups=4)


ENCODERS = {"stand_in": stand_in_encoder, "wav2vec2_tiny": real_encoder}


def normalise(wave: torch.Tensor) -> torch.Tensor:
    return (wave - wave.mean()) / (wave.std(unbiased=False) + 1e-7)


def clips(num: int = 12, seconds: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    """Speech-ish clips: segments of a few tones with noise, so MFCC frames fall in clusters."""
    g = gen(seed)
    T = int(seconds * SR)
    t = torch.arange(T) / SR
    out = []
    for _ in range(num):
        f = 150 + 1500 * torch.rand(4, generator=g)
        segment = (t * 8).long().clamp(max=3)  # four 125 ms segments, one tone each
        wave = torch.sin(2 * math.pi * f[segment] * t) + 0.05 * torch.randn(T, generator=g)
        out.append(0.3 * wave)
    return out


def fit_data(load_run=None) -> FitData:
    return FitData(clips(), normalise, torch.device("cpu"), load_run)


def make_batch(lengths: list[int] = (8000, 6400, 4000), seed: int = 1) -> dict:
    waves = clips(len(lengths), seed=seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = normalise(waves[i][:n])
    return {"audio": audio, "lengths": torch.tensor(lengths), "generator": gen(seed + 100),
            "id": [str(i) for i in range(len(lengths))]}


def hubert(encoder=None, fit: bool = True, **cfg):
    torch.manual_seed(0)
    method = build_method({"name": "hubert", "num_clusters": K, **cfg}, encoder or stand_in_encoder())
    if fit:
        method.fit_targets(fit_data(), gen(3))
    return method


# -- the loss against a naive loop ----------------------------------------------------------------


def naive_loss(method, batch, unmasked_weight: float = 0.0) -> tuple[float, float]:
    """(masked mean, unmasked mean) cross-entropy, frame by frame: logits_k = cos(W c_t, e_k) / 0.1."""
    with torch.no_grad():
        z, frame_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        targets = method.assign_targets(batch["audio"], batch["lengths"], frame_mask)
        mask = span_mask(frame_mask, gen(int(batch["generator"].initial_seed())), mask_prob=0.8, span=10, min_masks=2)
        context = method.encoder.contextualise(z, frame_mask, mask)
        projected = method.project(context)
    losses: dict[bool, list[float]] = {True: [], False: []}
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not frame_mask[b, t]:
                continue
            logits = [F.cosine_similarity(projected[b, t], method.cluster_embeddings[k], dim=0).item() / 0.1
                      for k in range(K)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(v - top) for v in logits))
            losses[bool(mask[b, t])].append(log_z - logits[int(targets[b, t])])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(losses[True]), mean(losses[False])


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.5])
def test_masked_prediction_loss_matches_a_naive_loop(unmasked_weight):
    method = hubert(unmasked_weight=unmasked_weight, feature_penalty=10.0)
    batch = make_batch()
    with torch.no_grad():
        out = method(batch, 0.0)
    masked, unmasked = naive_loss(method, make_batch())
    assert abs(out["masked_loss"].item() - masked) < 1e-4
    expected = masked + unmasked_weight * unmasked + 10 * out["feature_penalty"].item()
    assert abs(out["loss"].item() - expected) < 1e-4
    assert ("unmasked_loss" in out) == (unmasked_weight > 0)
    if unmasked_weight:
        assert abs(out["unmasked_loss"].item() - unmasked) < 1e-4


def test_unmasked_frames_weigh_nothing_by_default(monkeypatch):
    method = hubert()
    batch = make_batch()
    with torch.no_grad():
        z, frame_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        true_targets = method.assign_targets(batch["audio"], batch["lengths"], frame_mask)
    mask = span_mask(frame_mask, gen(101), mask_prob=0.8, span=10, min_masks=2)
    scrambled = torch.where(mask | ~frame_mask, true_targets, (true_targets + 3) % K)
    monkeypatch.setattr(method, "assign_targets", lambda *args: scrambled.clone())
    with torch.no_grad():
        changed = method(make_batch(), 0.0)["loss"]
    monkeypatch.setattr(method, "assign_targets", lambda *args: true_targets.clone())
    with torch.no_grad():
        original = method(make_batch(), 0.0)["loss"]
    assert torch.equal(changed, original)


# -- targets: MFCC clusters, stable across save and load ------------------------------------------


def test_mfcc_targets_are_the_clusters_of_model_rate_mfcc():
    method = hubert()
    batch = make_batch()
    with torch.no_grad():
        _, frame_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        targets = method.assign_targets(batch["audio"], batch["lengths"], frame_mask)
    for b, n in enumerate(batch["lengths"].tolist()):
        frames = int(frame_mask[b].sum())
        assert frames == 1 + (n - 400) // 320
        expected = method.tokenizer.assign(model_rate_mfcc(batch["audio"][b, :n], frames))
        assert torch.equal(targets[b, :frames], expected)
        assert (targets[b, frames:] == -1).all()
        # A clip alone gets the targets it gets in a padded batch.
        alone = make_batch([n], seed=1)
        alone["audio"] = batch["audio"][b : b + 1, :n]
        _, mask_alone, _ = latents_with_penalty(method.encoder, alone["audio"], alone["lengths"])
        assert torch.equal(method.assign_targets(alone["audio"], alone["lengths"], mask_alone)[0], targets[b, :frames])
    assert len(targets[targets >= 0].unique()) >= 3  # the clips' tones fall in several clusters


def test_targets_stable_across_save_and_load_of_the_codebook(tmp_path):
    method = hubert()
    method.save_artifacts(tmp_path)
    path = tmp_path / HUBERT_TARGETS_FILE
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["targets"] == "mfcc" and f.metadata()["num_tokens"] == str(K)
    loaded = KMeansTokenizer.load(path)
    assert torch.equal(loaded.centroids, method.tokenizer.centroids)
    batch = make_batch()
    with torch.no_grad():
        _, frame_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        targets = method.assign_targets(batch["audio"], batch["lengths"], frame_mask)
        # A fresh method (as a resumed run builds it, without fitting) with the saved codebook and weights.
        fresh = hubert(fit=False)
        fresh.load_state_dict(method.state_dict())
        assert torch.equal(fresh.assign_targets(batch["audio"], batch["lengths"], frame_mask), targets)
        assert torch.equal(fresh(make_batch(), 0.0)["loss"], method(make_batch(), 0.0)["loss"])
        fresh.tokenizer.centroids.copy_(loaded.centroids)
        assert torch.equal(fresh.assign_targets(batch["audio"], batch["lengths"], frame_mask), targets)


def test_fitting_is_seeded_and_bounded():
    a, b = hubert(), hubert()
    assert torch.equal(a.tokenizer.centroids, b.tokenizer.centroids)
    method = build_method({"name": "hubert", "num_clusters": K, "fit_max_frames": 30}, stand_in_encoder())
    stats = method.fit_targets(fit_data(), gen(3))
    assert stats["frames"] == 30 and stats["clips"] == 2  # 24 frames per 0.5 s clip: two, then 30 of their 48
    with pytest.raises(SelfsupError, match="at least as many vectors"):
        build_method({"name": "hubert", "num_clusters": 500}, stand_in_encoder()).fit_targets(fit_data(), gen(3))


# -- iteration 2: targets from another run's layer -------------------------------------------------


def write_run(folder: Path, encoder) -> None:
    """An iteration-1 run folder as pretrain writes it: encoder.safetensors + encoder.json."""
    save_encoder(folder, encoder, {"encoder": {"name": "stand_in", "config": {}},
                                   "preprocess": {"modality": "audio", "sample_rate": SR}})


def stand_in_loader(calls: list[str]):
    def load_run(spec: str):
        calls.append(spec)
        encoder = stand_in_encoder()
        load_model(encoder, str(Path(spec) / "encoder.safetensors"))
        return encoder.eval(), {"encoder": {"name": "stand_in"}}
    return load_run


def iteration_two(run: Path, calls: list[str], targets: str | None = None, **cfg):
    torch.manual_seed(5)  # a student initialised differently from the teacher
    method = build_method({"name": "hubert", "num_clusters": K, "targets": targets or f"run:{run}", **cfg},
                          stand_in_encoder())
    method.fit_targets(fit_data(stand_in_loader(calls)), gen(3))
    return method


def test_iteration_two_reads_its_targets_from_a_run(tmp_path):
    first = hubert()
    run = tmp_path / "hubert1"
    write_run(run, first.encoder)
    calls: list[str] = []
    method = iteration_two(run, calls, targets=f"run:{run}:layer=1")
    assert calls == [str(run)] and method.target_layer == 1
    # The teacher holds the first run's weights, frozen, beside (not as) the trained encoder.
    assert method.teacher is not method.encoder
    for (name, mine), theirs in zip(method.teacher.state_dict().items(), first.encoder.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert not any(p.requires_grad for p in method.teacher.parameters())
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert trainable.isdisjoint(id(p) for p in method.teacher.parameters())
    assert method.tokenizer.dim == first.encoder.dim
    # Its targets are the clusters of block 1 of the first run's encoder.
    batch = make_batch()
    with torch.no_grad():
        z, frame_mask = first.encoder.latents(batch["audio"], batch["lengths"])
        layer = first.encoder.contextualise(z, frame_mask, layer=1)
        expected = method.tokenizer.assign(layer[frame_mask])
        _, student_mask, _ = latents_with_penalty(method.encoder, batch["audio"], batch["lengths"])
        targets = method.assign_targets(batch["audio"], batch["lengths"], student_mask)
    assert torch.equal(targets[frame_mask], expected) and (targets[~frame_mask] == -1).all()
    # Training moves the student only; the teacher stays in eval mode.
    method.train()
    assert not method.teacher.training
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    out = method(make_batch(), 0.0)
    out["loss"].backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())
    assert all(p.grad is None for p in method.teacher.parameters())


def test_iteration_two_resumes_from_its_checkpoint_alone(tmp_path):
    # The teacher's weights are in the method's state (the checkpoint): a resumed run, which skips
    # fit_targets, rebuilds exactly the same targets and loss without loading the first run again.
    first = hubert()
    run = tmp_path / "hubert1"
    write_run(run, first.encoder)
    method = iteration_two(run, [], target_layer=2)
    state = method.state_dict()
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("encoder.") for k in state)
    (run / "encoder.safetensors").unlink()  # the first run is gone
    resumed = build_method({"name": "hubert", "num_clusters": K, "targets": f"run:{run}", "target_layer": 2},
                           stand_in_encoder())
    resumed.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(resumed(make_batch(), 0.0)["loss"], method(make_batch(), 0.0)["loss"])
    method.save_artifacts(tmp_path)
    with safe_open(str(tmp_path / HUBERT_TARGETS_FILE), "pt") as f:
        assert f.metadata()["targets"] == f"run:{run}" and "block 2" in f.metadata()["features"]


def test_iteration_two_refuses_another_architecture(tmp_path):
    run = tmp_path / "other"
    save_encoder(run, StandInEncoder(dim=32, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)),
                 {"encoder": {"name": "stand_in"}, "preprocess": {"modality": "audio"}})

    def load_run(spec):
        encoder = StandInEncoder(dim=32, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2))
        load_model(encoder, str(Path(spec) / "encoder.safetensors"))
        return encoder, {"encoder": {"name": "stand_in", "config": {"dim": 32}}}

    method = build_method({"name": "hubert", "num_clusters": K, "targets": f"run:{run}"}, stand_in_encoder())
    with pytest.raises(SelfsupError, match="architecture"):
        method.fit_targets(fit_data(load_run), gen(3))


def test_iteration_two_with_the_real_encoder_and_loader(tmp_path):
    from selfsup.encoders import describe_encoder
    from selfsup.export.encoder import load_encoder

    encoder = real_encoder()
    overrides = {"conv_channels": 32, "dim": 32, "depth": 2, "heads": 2, "pos_conv_kernel": 8, "pos_conv_groups": 4}
    first = hubert(encoder)
    run = tmp_path / "hubert1"
    save_encoder(run, first.encoder, {"encoder": describe_encoder("wav2vec2_tiny", **overrides),
                                      "preprocess": {"modality": "audio", "sample_rate": SR}})
    torch.manual_seed(1)
    method = build_method({"name": "hubert", "num_clusters": K, "targets": f"run:{run}:layer=2"}, real_encoder())
    method.fit_targets(FitData(clips(), normalise, torch.device("cpu"), lambda spec: load_encoder(Path(spec))), gen(3))
    batch = make_batch()
    with torch.no_grad():
        z, frame_mask = first.encoder.latents(batch["audio"], batch["lengths"])
        expected = method.tokenizer.assign(first.encoder.contextualise(z, frame_mask, layer=2)[frame_mask])
        targets = method.assign_targets(batch["audio"], batch["lengths"], frame_mask)
    assert torch.equal(targets[frame_mask], expected)


def test_parse_targets():
    assert parse_targets("mfcc") == (None, None)
    assert parse_targets("run:runs/hubert1") == ("runs/hubert1", None)
    assert parse_targets("run:runs/hubert1:layer=4") == ("runs/hubert1", 4)
    assert parse_targets("run:runs/clip:image:layer=2") == ("runs/clip:image", 2)
    for bad in ("kmeans", "run:", "run:x:layer=four"):
        with pytest.raises(SelfsupError, match="targets"):
            parse_targets(bad)
    with pytest.raises(SelfsupError, match="give it once"):
        build_method({"name": "hubert", "targets": "run:r:layer=2", "target_layer": 3}, stand_in_encoder())


# -- the method contract, with the stand-in and with the real encoder -----------------------------


@pytest.mark.parametrize("which", sorted(ENCODERS))
def test_contract(which):
    torch.manual_seed(0)
    encoder = ENCODERS[which]()
    method = build_method({"name": "hubert", "num_clusters": K}, encoder)
    assert method.encoder is encoder and method.fits_targets
    stats = method.fit_targets(fit_data(), gen(3))
    assert stats["used"] == K
    out = method(make_batch(), 0.0)
    assert set(out) == {"loss", "masked_loss", "masked_acc", "feature_penalty", "masked_fraction"}
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value), key
    out["loss"].backward()
    without_grad = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad
    assert method(make_batch(), 0.0)["loss"].equal(method(make_batch(), 0.0)["loss"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(make_batch(), 0.0)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_learns_to_predict_the_clusters():
    method = hubert(real_encoder())
    optimizer = torch.optim.Adam(method.parameters(), lr=2e-3)
    accuracy = []
    for step in range(60):
        out = method(make_batch(seed=step % 4), 0.0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        accuracy.append(out["masked_acc"].item())
    assert sum(accuracy[-10:]) / 10 > sum(accuracy[:10]) / 10 + 0.15
