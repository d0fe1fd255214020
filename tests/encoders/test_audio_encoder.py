"""The wav2vec 2.0 audio encoder: frame arithmetic, padding invariance, masking between the two halves,
layer outputs, the encoder contract swept over every registered audio encoder, and its config.

Tiny models (conv 16, dim 32, 2 blocks, pos conv 8/4) on clips of at most 1 s, so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from selfsup.encoders import ENCODERS, build_encoder, describe_encoder, encoder_config
from selfsup.encoders.audio import AudioEncoder, AudioEncoderConfig
from selfsup.errors import SelfsupError

SECOND = 16000  # samples at 16 kHz
TINY = {"conv_channels": 16, "dim": 32, "depth": 2, "heads": 2, "pos_conv_kernel": 8, "pos_conv_groups": 4}
AUDIO_NAMES = sorted(n for n, spec in ENCODERS.items() if spec.modality == "audio")


def tiny(name: str = "wav2vec2_tiny", seed: int = 0, **extra) -> AudioEncoder:
    torch.manual_seed(seed)
    return build_encoder(name, **{**TINY, **extra})


def waves(batch: int = 3, samples: int = 4000, seed: int = 1) -> Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def conv_frames(samples: int, kernels: list[int], strides: list[int]) -> int:
    """Frames of an unpadded conv stack: floor((L - k) / s) + 1 per layer (PyTorch's Conv1d)."""
    for kernel, stride in zip(kernels, strides):
        samples = (samples - kernel) // stride + 1
    return samples


# ---------------------------------------------------------------- registry and presets


def test_audio_presets_are_registered() -> None:
    assert AUDIO_NAMES == ["wav2vec2_small", "wav2vec2_tiny"]
    for name in AUDIO_NAMES:
        assert ENCODERS[name].inputs == ()
    assert encoder_config("wav2vec2_tiny") == AudioEncoderConfig(
        conv_channels=128, dim=192, depth=4, heads=4, mlp_ratio=4.0, pos_conv_kernel=64, pos_conv_groups=8)
    assert encoder_config("wav2vec2_small") == AudioEncoderConfig(
        conv_channels=256, dim=384, depth=6, heads=6, mlp_ratio=4.0, pos_conv_kernel=128, pos_conv_groups=16)
    paper = AudioEncoderConfig()  # the defaults are the paper's BASE sizes
    assert (paper.conv_channels, paper.dim, paper.depth, paper.heads, paper.pos_conv_kernel, paper.pos_conv_groups) == (
        512, 768, 12, 12, 128, 16)
    assert (paper.conv_kernels, paper.conv_strides) == ([10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2])


def audio_parameter_count(cfg: AudioEncoderConfig) -> int:
    """Parameters from the architecture's definition (wav2vec 2.0, layer-norm feature encoder, pre-LN blocks)."""
    C, D, K, G = cfg.conv_channels, cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups
    hidden = int(D * cfg.mlp_ratio)
    total = 0
    for i, kernel in enumerate(cfg.conv_kernels):
        c_in = 1 if i == 0 else C
        total += c_in * C * kernel + (C if cfg.conv_bias else 0) + 2 * C  # conv (+ bias), its LayerNorm
    total += 2 * C + C * D + D  # latent LayerNorm, projection
    total += D  # mask embedding
    total += K + D * (D // G) * K + D  # position conv: g [1, 1, K], v [D, D/G, K], bias
    per_block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D)
    return total + cfg.depth * per_block + 2 * D  # blocks, final LayerNorm


@pytest.mark.parametrize(("name", "expected"), [("wav2vec2_tiny", 2_366_336), ("wav2vec2_small", 12_983_808)])
def test_preset_parameter_counts(name: str, expected: int) -> None:
    encoder = build_encoder(name)
    count = sum(p.numel() for p in encoder.parameters())
    assert count == audio_parameter_count(encoder.cfg) == expected  # the registry's descriptions quote these
    assert encoder.dim == encoder.cfg.dim and encoder.latent_dim == encoder.cfg.conv_channels
    assert encoder.num_layers == encoder.cfg.depth
    assert encoder.mask_embedding.shape == (encoder.dim,)


def test_paper_base_size() -> None:
    # The paper's BASE Transformer (95M with its GroupNorm extractor); ours has a LayerNorm per conv.
    assert audio_parameter_count(AudioEncoderConfig()) == 94_381_440


# ---------------------------------------------------------------- frames


def test_one_second_gives_49_frames_of_20_ms() -> None:
    encoder = tiny()
    assert encoder.frame_hop == 320 and encoder.min_samples == 400
    z, frame_mask = encoder.latents(waves(2, SECOND))
    assert z.shape == (2, 49, encoder.latent_dim) and frame_mask.shape == (2, 49) and frame_mask.all()
    assert encoder(waves(2, SECOND)).shape == (2, 49, encoder.dim)
    assert encoder.embed(waves(2, SECOND)).shape == (2, encoder.dim)


@pytest.mark.parametrize("samples", [400, 401, 719, 720, 1000, 4321, SECOND])
def test_frame_lengths_match_the_convolutions(samples: int) -> None:
    encoder = tiny()
    z, _ = encoder.latents(waves(1, samples))
    expected = conv_frames(samples, encoder.cfg.conv_kernels, encoder.cfg.conv_strides)
    assert z.shape[1] == expected == int(encoder.frame_lengths(torch.tensor([samples]))[0])


def test_frame_lengths_of_padded_clips() -> None:
    encoder = tiny()
    lengths = torch.tensor([SECOND, 8000, 400, 399, 0])
    assert encoder.frame_lengths(lengths).tolist() == [49, 24, 1, 0, 0]
    _, frame_mask = encoder.latents(waves(3, SECOND), torch.tensor([SECOND, 8000, 400]))
    assert frame_mask.sum(dim=1).tolist() == [49, 24, 1]
    assert frame_mask[1, :24].all() and not frame_mask[1, 24:].any()  # real frames first


def test_other_conv_stacks_follow_the_same_arithmetic() -> None:
    encoder = tiny(conv_kernels=[4, 3], conv_strides=[2, 2])
    assert encoder.frame_hop == 4 and encoder.min_samples == 8
    z, _ = encoder.latents(waves(1, 37))
    assert z.shape[1] == conv_frames(37, [4, 3], [2, 2]) == int(encoder.frame_lengths(torch.tensor([37]))[0])


# ---------------------------------------------------------------- padding


def test_padding_is_invisible_to_a_clip() -> None:
    """A clip alone and right-padded in a batch with a longer clip: the same real frames and embedding.

    The padding is noise, not zeros: nothing beyond a clip's length may reach its frames.
    """
    encoder = tiny().eval()
    short, long = waves(1, 3000, seed=2)[0], waves(1, 9000, seed=3)[0]
    batch = torch.randn(2, 9000, generator=torch.Generator().manual_seed(4))  # noise everywhere
    batch[0, :3000], batch[1] = short, long
    lengths = torch.tensor([3000, 9000])
    with torch.no_grad():
        alone = encoder(short[None])  # [1, F_short, D]
        padded = encoder(batch, lengths=lengths)  # [2, F_long, D]
        frames = alone.shape[1]
        torch.testing.assert_close(padded[0, :frames], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1], encoder(long[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoder.embed(batch, lengths)[0], encoder.embed(short[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoder.embed(batch, lengths)[0], alone[0].mean(dim=0), atol=1e-5, rtol=1e-5)
        for k in range(encoder.num_layers + 1):  # every layer, not only the last
            z, frame_mask = encoder.latents(batch, lengths)
            z1, mask1 = encoder.latents(short[None])
            torch.testing.assert_close(encoder.contextualise(z, frame_mask, layer=k)[0, :frames],
                                       encoder.contextualise(z1, mask1, layer=k)[0], atol=1e-5, rtol=1e-5)


def test_eval_embedding_of_a_clip_ignores_the_rest_of_the_batch() -> None:
    encoder = tiny().eval()
    x = waves(4, 2000)
    with torch.no_grad():
        together = encoder.embed(x)
        alone = torch.cat([encoder.embed(x[i : i + 1]) for i in range(len(x))])
        reordered = encoder.embed(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reordered, together, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- masking and layers


def transformer_input(encoder: AudioEncoder, z: Tensor, frame_mask: Tensor, mask: Tensor | None) -> Tensor:
    """What the position convolution receives: the projected, masked, padding-zeroed frames [B, F, D]."""
    seen: list[Tensor] = []
    handle = encoder.pos_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        encoder.contextualise(z, frame_mask, mask)
    finally:
        handle.remove()
    return seen[0]


def test_masking_replaces_exactly_the_masked_frames() -> None:
    encoder = tiny().eval()
    lengths = torch.tensor([4000, 2500])
    with torch.no_grad():
        z, frame_mask = encoder.latents(waves(2, 4000), lengths)
        mask = torch.rand(frame_mask.shape, generator=torch.Generator().manual_seed(5)) < 0.5
        mask[1, -1] = True  # a masked padded frame stays padding (zero)
        seen = transformer_input(encoder, z, frame_mask, mask)
        projected = encoder.project(z)
    masked, kept = mask & frame_mask, ~mask & frame_mask
    assert masked.any() and kept.any() and (~frame_mask).any()
    assert torch.equal(seen[masked], encoder.mask_embedding.detach().expand(int(masked.sum()), -1))
    assert torch.equal(seen[kept], projected[kept])
    assert torch.equal(seen[~frame_mask], torch.zeros_like(seen[~frame_mask]))


def test_masked_frames_content_is_invisible_and_an_empty_mask_is_no_mask() -> None:
    encoder = tiny().eval()
    with torch.no_grad():
        z, frame_mask = encoder.latents(waves(2, 4000))
        mask = torch.zeros_like(frame_mask)
        mask[:, 3:6] = True
        changed = z.clone()
        changed[:, 3:6] += 5.0
        assert torch.equal(encoder.contextualise(changed, frame_mask, mask), encoder.contextualise(z, frame_mask, mask))
        assert not torch.allclose(encoder.contextualise(changed, frame_mask), encoder.contextualise(z, frame_mask))
        none = torch.zeros_like(frame_mask)
        assert torch.equal(encoder.contextualise(z, frame_mask, none), encoder.contextualise(z, frame_mask))
        # forward(mask=...) is latents + contextualise(mask=...)
        assert torch.equal(encoder(waves(2, 4000), mask=mask), encoder.contextualise(z, frame_mask, mask))


def test_layer_k_is_the_output_of_block_k() -> None:
    encoder = tiny(depth=3).eval()
    lengths = torch.tensor([4000, 3000])
    outputs: list[Tensor] = []
    handles = [block.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
               for block in encoder.blocks]
    with torch.no_grad():
        z, frame_mask = encoder.latents(waves(2, 4000), lengths)
        final = encoder.contextualise(z, frame_mask)
        for handle in handles:
            handle.remove()
        assert len(outputs) == 3
        for k in (1, 2, 3):
            assert torch.equal(encoder.contextualise(z, frame_mask, layer=k), outputs[k - 1])
        assert torch.equal(encoder.norm(outputs[-1]), final)  # the last block, then the final LayerNorm
        # layer=0: the blocks' input, i.e. the masked projection plus its position convolution.
        x = transformer_input(encoder, z, frame_mask, None)
        torch.testing.assert_close(encoder.contextualise(z, frame_mask, layer=0), x + encoder.pos_conv(x))


def test_padded_keys_are_hidden_from_attention() -> None:
    """Changing a padded frame's block input (which only a bug would do) changes no real frame."""
    encoder = tiny().eval()
    lengths = torch.tensor([4000, 2000])
    with torch.no_grad():
        z, frame_mask = encoder.latents(waves(2, 4000), lengths)
        x = encoder.contextualise(z, frame_mask, layer=0)
        attn_mask = frame_mask[:, None, None, :]
        poked = x.clone()
        poked[~frame_mask] = 100.0
        a, b = encoder.blocks[0](x, attn_mask), encoder.blocks[0](poked, attn_mask)
    assert torch.allclose(a[frame_mask], b[frame_mask], atol=1e-5)


# ---------------------------------------------------------------- the contract, every audio preset


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_forward_and_embed_shapes(name: str) -> None:
    encoder = tiny(name)
    x, lengths = waves(3, 3000), torch.tensor([3000, 2000, 800])
    tokens, pooled = encoder(x, lengths=lengths), encoder.embed(x, lengths)
    assert tokens.shape == (3, conv_frames(3000, encoder.cfg.conv_kernels, encoder.cfg.conv_strides), encoder.dim)
    assert pooled.shape == (3, encoder.dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    encoder = tiny(name)
    x, lengths = waves(3, 3000), torch.tensor([3000, 2200, 1500])
    gen = torch.Generator().manual_seed(4)
    z, frame_mask = encoder.latents(x, lengths)
    mask = (torch.rand(frame_mask.shape, generator=gen) < 0.4) & frame_mask
    tokens = encoder.contextualise(z, frame_mask, mask)
    pooled = encoder.embed(x, lengths)
    # Random weights, not .sum(): a LayerNorm output sums to a constant and would pass no gradient.
    loss = (tokens * torch.randn(tokens.shape, generator=gen)).sum() + (pooled * torch.randn(pooled.shape, generator=gen)).sum()
    loss.backward()
    dead = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_every_parameter_is_in_the_graph_without_a_mask(name: str) -> None:
    # DDP errors on parameters without a gradient: the mask embedding takes part even unmasked.
    encoder = tiny(name)
    encoder.embed(waves(2, 2000)).square().sum().backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_bf16_autocast_matches_fp32(name: str) -> None:
    encoder = tiny(name).eval()
    x, lengths = waves(3, 3000), torch.tensor([3000, 2000, 1000])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(x, lengths=lengths)
        pooled = encoder.embed(x, lengths)
    reference = encoder(x, lengths=lengths)
    _, frame_mask = encoder.latents(x, lengths)
    error = (tokens.float() - reference)[frame_mask].norm() / reference[frame_mask].norm()
    assert error < 0.05, f"bf16 autocast deviates from fp32 by {error:.3f} (relative)"
    (tokens.float()[frame_mask].square().mean() + pooled.float().square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_deterministic_under_seed(name: str) -> None:
    first, second, other = tiny(name, seed=7), tiny(name, seed=7), tiny(name, seed=8)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(first(waves()), second(waves()))
    assert not torch.equal(first(waves()), other(waves())), "the seed should matter"


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_describe_then_build_rebuilds_the_same_encoder(name: str, tmp_path: Path) -> None:
    original = tiny(name).eval()
    description = json.loads(json.dumps(describe_encoder(name, **TINY)))
    assert set(description) == {"name", "config"}  # audio encoders take no data inputs
    assert description["config"] == dataclasses.asdict(encoder_config(name, TINY))
    torch.manual_seed(123)  # different init, so equality below comes from the loaded weights
    rebuilt = build_encoder(**description)
    save_file(original.state_dict(), str(tmp_path / "w.safetensors"))  # as export does: contiguous tensors
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    rebuilt.eval()
    x, lengths = waves(), torch.tensor([4000, 3000, 1000])
    assert torch.equal(original(x, lengths=lengths), rebuilt(x, lengths=lengths))
    assert torch.equal(original.embed(x, lengths), rebuilt.embed(x, lengths))


# ---------------------------------------------------------------- initialisation


def test_initialisation_follows_wav2vec2() -> None:
    encoder = build_encoder("wav2vec2_tiny")  # full size, so the statistics are meaningful
    pos = encoder.pos_conv
    torch.testing.assert_close(pos.weight(), pos.weight_v)  # g = ||v||: weight norm starts as the identity
    expected_std = 2 / math.sqrt(pos.kernel * encoder.dim)
    assert abs(pos.weight_v.std().item() / expected_std - 1) < 0.05
    assert torch.equal(pos.bias, torch.zeros_like(pos.bias))
    assert 0 <= encoder.mask_embedding.min() and encoder.mask_embedding.max() < 1  # uniform [0, 1)
    qkv = encoder.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() / 0.02 - 1) < 0.05 and torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    conv = encoder.convs[1].conv.weight  # Kaiming normal: std sqrt(2 / fan_in)
    assert abs(conv.std().item() / math.sqrt(2 / (conv.shape[1] * conv.shape[2])) - 1) < 0.05
    bound = 1 / math.sqrt(encoder.latent_dim)  # the projection keeps PyTorch's default
    assert encoder.project.weight.abs().max() <= bound
    with torch.no_grad():  # unit-scale frames out of the box: no exploding residual stream
        out = encoder.contextualise(*encoder.latents(waves(2, SECOND)), layer=encoder.num_layers)
    assert 0.1 < out.std().item() < 10


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("overrides", "key"), [
    ({"dim": 30, "heads": 4}, "dim"),
    ({"dim": 32, "heads": 2, "pos_conv_groups": 3}, "pos_conv_groups"),
    ({"conv_kernels": [10, 3], "conv_strides": [5]}, "conv_strides"),
    ({"conv_kernels": []}, "conv_kernels"),
    ({"conv_strides": [5, 0, 2, 2, 2, 2, 2]}, "conv_strides"),
    ({"conv_channels": 0}, "conv_channels"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"mlp_ratio": -1.0}, "mlp_ratio"),
    ({"conv_bias": "yes"}, "conv_bias"),
    ({"depth": 1.5}, "depth"),
])
def test_invalid_config_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(SelfsupError, match=f"'{key}'"):
        encoder_config("wav2vec2_tiny", overrides)


def test_unknown_key_names_the_nearest() -> None:
    with pytest.raises(SelfsupError, match="'conv_channel'.*'conv_channels'"):
        encoder_config("wav2vec2_tiny", {"conv_channel": 8})


def test_image_or_text_inputs_are_refused() -> None:
    with pytest.raises(SelfsupError, match="audio encoder.*vocab_size"):
        build_encoder("wav2vec2_tiny", vocab_size=100, **TINY)


def test_bad_inputs_are_named() -> None:
    encoder = tiny()
    with pytest.raises(SelfsupError, match="receptive field"):
        encoder(waves(2, 399))
    with pytest.raises(SelfsupError, match="receptive field"):
        encoder(waves(2, 4000), lengths=torch.tensor([4000, 300]))
    with pytest.raises(SelfsupError, match="only 4000"):
        encoder(waves(2, 4000), lengths=torch.tensor([4000, 4001]))
    with pytest.raises(SelfsupError, match="lengths"):
        encoder(waves(2, 4000), lengths=torch.tensor([4000.0, 3000.0]))
    with pytest.raises(SelfsupError, match=r"\[batch, samples\]"):
        encoder(waves(2, 4000)[:, None])
    z, frame_mask = encoder.latents(waves(2, 4000))
    with pytest.raises(SelfsupError, match="mask"):
        encoder.contextualise(z, frame_mask, mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(SelfsupError, match="bool"):
        encoder.contextualise(z, frame_mask, mask=torch.zeros(frame_mask.shape))
    with pytest.raises(SelfsupError, match="layer"):
        encoder.contextualise(z, frame_mask, layer=encoder.num_layers + 1)
    with pytest.raises(SelfsupError, match="frame_mask"):
        encoder.contextualise(z, frame_mask.long())
