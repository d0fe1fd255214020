"""Text encoder/decoder contract and invariants: causality, packing masks, padding, tied head, RoPE.

Tiny models (dim 32, depth 2, 2 heads, vocab 50, sequences <= 24) so the file runs in seconds.
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
from selfsup.encoders.text import TextTransformer, TextTransformerConfig
from selfsup.encoders.transformer import RotaryEmbedding, apply_rotary, attend
from selfsup.errors import SelfsupError

VOCAB, MAX_LEN = 50, 24
TINY = {"dim": 32, "depth": 2, "heads": 2}
TEXT_NAMES = sorted(n for n, spec in ENCODERS.items() if spec.modality == "text")
# Every registered text preset, with learned and with rotary positions.
VARIANTS = [(name, positions) for name in TEXT_NAMES for positions in ("learned", "rotary")]


def tiny(name: str, seed: int = 0, **extra) -> TextTransformer:
    torch.manual_seed(seed)
    encoder = build_encoder(name, vocab_size=VOCAB, max_len=MAX_LEN, **{**TINY, **extra})
    return encoder.eval()


def token_ids(batch: int = 3, length: int = 12, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def packing_mask(lengths: list[int]) -> tuple[Tensor, Tensor]:
    """([L, L] bool same-document mask, [L] positions restarting at each document) for one packed row."""
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])  # [L], document index per token
    positions = torch.cat([torch.arange(n) for n in lengths])
    return doc[:, None] == doc[None, :], positions


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- registry and presets


def test_text_presets_are_registered() -> None:
    assert TEXT_NAMES == ["clip_text", "text_decoder", "text_encoder"]
    base = dict(dim=256, depth=4, heads=4, mlp_ratio=4.0, positions="learned", tie_embeddings=True)
    assert encoder_config("text_encoder") == TextTransformerConfig(**base, causal=False, embed_norm=True,
                                                                   lm_transform=True)
    assert encoder_config("text_decoder") == TextTransformerConfig(**base, causal=True)


def test_preset_parameter_count_matches_the_architecture() -> None:
    # The PEERS.md benchmark size: hidden 256, 4 layers, FFN 1024, vocab 8192, sequence 128.
    V, L, D, F, depth = 8192, 128, 256, 1024, 4
    per_block = (3 * D * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D  # qkv, proj, MLP, 2 LNs
    expected = V * D + L * D + depth * per_block + 2 * D  # tied head adds nothing; final LN
    decoder = build_encoder("text_decoder", vocab_size=V, max_len=L)
    assert sum(p.numel() for p in decoder.parameters()) == expected
    bert_parts = 2 * D + (D * D + D + 2 * D) + V  # embedding LN; MLM transform (dense, LN) and output bias
    encoder = build_encoder("text_encoder", vocab_size=V, max_len=L)
    assert sum(p.numel() for p in encoder.parameters()) == expected + bert_parts
    assert encoder.dim == 256


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_describe_then_build_rebuilds_the_same_encoder(name: str, tmp_path: Path) -> None:
    original = tiny(name, positions="rotary", pool="last")
    description = json.loads(json.dumps(describe_encoder(name, vocab_size=VOCAB, max_len=MAX_LEN, **TINY,
                                                         positions="rotary", pool="last")))
    assert set(description) == {"name", "vocab_size", "max_len", "config"}
    assert description["config"] == dataclasses.asdict(original.cfg)
    torch.manual_seed(123)
    rebuilt = build_encoder(**description).eval()
    save_file(original.state_dict(), str(tmp_path / "w.safetensors"))  # refuses shared storage: the tie must not show
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    ids = token_ids()
    assert torch.equal(original(ids), rebuilt(ids))
    assert torch.equal(original.embed(ids), rebuilt.embed(ids))
    assert torch.equal(original.lm_head(original(ids)), rebuilt.lm_head(rebuilt(ids)))


def test_wrong_modality_inputs_are_errors() -> None:
    with pytest.raises(SelfsupError, match="text encoder.*vocab_size and max_len.*in_channels"):
        build_encoder("text_encoder", in_channels=3, image_size=16)
    with pytest.raises(SelfsupError, match="missing max_len"):
        build_encoder("text_decoder", vocab_size=VOCAB)
    with pytest.raises(SelfsupError, match="image encoder.*not vocab_size"):
        build_encoder("vit_tiny", in_channels=3, image_size=16, vocab_size=VOCAB)
    with pytest.raises(SelfsupError, match="text encoder"):
        describe_encoder("text_encoder", in_channels=3, image_size=16)
    with pytest.raises(SelfsupError, match="'heeds'.*'heads'"):
        encoder_config("text_encoder", {"heeds": 2})


@pytest.mark.parametrize(("overrides", "key"), [
    ({"dim": 30, "heads": 4}, "dim"), ({"dim": 6, "heads": 2, "positions": "rotary"}, "dim"),
    ({"positions": "sinusoidal"}, "positions"), ({"pool": "max"}, "pool"), ({"causal": "yes"}, "causal"),
])
def test_invalid_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(SelfsupError, match=f"'{key}'"):
        encoder_config("text_encoder", overrides)


def test_bad_inputs_are_errors() -> None:
    encoder = tiny("text_encoder")
    ids = token_ids()
    with pytest.raises(SelfsupError, match=r"\[MASK\] id"):
        encoder(ids, mask=torch.zeros_like(ids, dtype=torch.bool))
    with pytest.raises(SelfsupError, match="max_len"):
        encoder(token_ids(length=MAX_LEN + 1))
    too_large = ids.clone()
    too_large[1, 3] = VOCAB
    with pytest.raises(SelfsupError, match="vocab_size=50"):
        encoder(too_large)
    with pytest.raises(SelfsupError, match="integer token ids"):
        encoder(ids.float())
    with pytest.raises(SelfsupError, match=r"\[3, 12\]"):
        encoder(ids, attention_mask=torch.ones(3, 11, dtype=torch.bool))
    with pytest.raises(SelfsupError, match="padding mask"):
        encoder.embed(ids, attention_mask=torch.ones(3, 12, 12, dtype=torch.bool))
    rotary = tiny("text_encoder", positions="rotary")  # no learned table: longer sequences are fine
    assert rotary(token_ids(length=MAX_LEN + 8)).shape == (3, MAX_LEN + 8, 32)


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize(("name", "positions"), VARIANTS)
@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_shapes(name: str, positions: str, pool: str) -> None:
    encoder = tiny(name, positions=positions, pool=pool)
    ids = token_ids()
    tokens, pooled = encoder(ids), encoder.embed(ids)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32) and encoder.dim == 32
    assert encoder.lm_head(tokens).shape == (3, 12, VOCAB)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_output_ignores_later_tokens(positions: str, with_mask: bool, bf16: bool) -> None:
    # Every attention path: SDPA is_causal, SDPA with a mask, the bf16 matmul path with and without one.
    decoder, encoder = tiny("text_decoder", positions=positions), tiny("text_encoder", positions=positions)
    ids = token_ids()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    mask = torch.ones_like(ids, dtype=torch.bool) if with_mask else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        before, after = decoder(ids, attention_mask=mask), decoder(changed, attention_mask=mask)
        assert not torch.allclose(before[:, 7:], after[:, 7:])
        close(before[:, :7], after[:, :7], tol=1e-6)
        bidirectional = encoder(ids, attention_mask=mask), encoder(changed, attention_mask=mask)
        assert not torch.allclose(bidirectional[0][:, :7], bidirectional[1][:, :7]), "the encoder sees the future"


@pytest.mark.parametrize(("name", "positions"), VARIANTS)
def test_packed_documents_equal_documents_alone(name: str, positions: str) -> None:
    encoder = tiny(name, positions=positions)
    lengths = [5, 4, 7]
    block, restart = packing_mask(lengths)
    docs = [token_ids(batch=1, length=n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # [1, 16]
    out = encoder(packed, attention_mask=block.unsqueeze(0), position_ids=restart.unsqueeze(0))
    alone = torch.cat([encoder(doc) for doc in docs], dim=1)
    close(out, alone)
    # Changing one document leaves the others' outputs alone (positions not restarted here).
    changed = packed.clone()
    changed[:, 5:9] = (changed[:, 5:9] + 3) % VOCAB
    a, b = encoder(packed, attention_mask=block.unsqueeze(0)), encoder(changed, attention_mask=block.unsqueeze(0))
    close(a[:, :5], b[:, :5])
    close(a[:, 9:], b[:, 9:])
    assert not torch.allclose(a[:, 5:9], b[:, 5:9])


@pytest.mark.parametrize(("name", "positions"), VARIANTS)
@pytest.mark.parametrize("bf16", [False, True])
def test_padding_keys_are_ignored(name: str, positions: str, bf16: bool) -> None:
    # Left padding: a causal model's real tokens would see it too, so the mask is what hides it.
    encoder = tiny(name, positions=positions)
    ids = token_ids(batch=2, length=10)
    lengths = torch.tensor([6, 10])
    real = torch.arange(10) >= (10 - lengths)[:, None]  # [2, 10]; row 0's real tokens are the last 6
    positions_ids = (real.cumsum(dim=1) - 1).clamp(min=0)  # real tokens numbered from 0
    other_padding = torch.where(real, ids, (ids + 5) % VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = encoder(ids, attention_mask=real, position_ids=positions_ids)
        out_other = encoder(other_padding, attention_mask=real, position_ids=positions_ids)
        alone = encoder(ids[:1, 4:])
        unmasked = encoder(ids, position_ids=positions_ids)
    close(out[real], out_other[real], tol=1e-6)
    tol = 0.05 if bf16 else 1e-5
    close(out[0, 4:].float(), alone[0].float(), tol=tol)
    if not bf16:  # bf16 noise can be as large as what padding changes once the embeddings are normalised
        assert not torch.allclose(out[0, 4:], unmasked[0, 4:], atol=tol), "the mask must matter"


@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_embed_pools_the_real_tokens(pool: str) -> None:
    encoder = tiny("text_decoder", pool=pool)
    ids = token_ids(batch=2, length=10)
    real = torch.tensor([[True] * 6 + [False] * 4, [True] * 10])
    tokens, pooled = encoder(ids, attention_mask=real), encoder.embed(ids, attention_mask=real)
    expected = {"mean": torch.stack([tokens[0, :6].mean(0), tokens[1].mean(0)]),
                "cls": tokens[:, 0], "last": torch.stack([tokens[0, 5], tokens[1, 9]])}[pool]
    close(pooled, expected)
    alone = encoder.embed(ids[:1, :6])  # padding changes nothing
    close(pooled[:1], alone)


def test_a_sequence_of_only_padding_stays_finite() -> None:
    for name in TEXT_NAMES:
        encoder = tiny(name)
        real = torch.tensor([[False] * 8, [True] * 8])
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                assert torch.isfinite(encoder(token_ids(batch=2, length=8), attention_mask=real)).all()


# ---------------------------------------------------------------- tied head, gradients, bf16


def test_tied_lm_head_is_the_input_embedding() -> None:
    tied, untied = tiny("text_decoder"), tiny("text_decoder", tie_embeddings=False)
    assert tied.output_embedding().data_ptr() == tied.token_embed.weight.data_ptr()
    assert untied.output_embedding().data_ptr() != untied.token_embed.weight.data_ptr()
    assert len(untied.state_dict()) == len(tied.state_dict()) + 1  # the tie stores the matrix once
    hidden = torch.randn(4, 32)
    close(tied.lm_head(hidden), hidden @ tied.token_embed.weight.T)
    tied.lm_head(hidden).square().sum().backward()  # the output side alone trains the embedding
    assert tied.token_embed.weight.grad is not None and tied.token_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "positions"), VARIANTS)
@pytest.mark.parametrize("tie", [True, False])
def test_gradients_reach_every_parameter(name: str, positions: str, tie: bool) -> None:
    encoder = tiny(name, positions=positions, tie_embeddings=tie).train()
    ids = token_ids()
    gen = torch.Generator().manual_seed(4)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, 9:] = False
    logits = encoder.lm_head(encoder(ids, attention_mask=real))
    pooled = encoder.embed(ids, attention_mask=real)
    loss = (logits * torch.randn(logits.shape, generator=gen)).sum() + (pooled * torch.randn(pooled.shape, generator=gen)).sum()
    loss.backward()
    dead = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize(("name", "positions"), VARIANTS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_bf16_autocast_matches_fp32(name: str, positions: str, with_mask: bool) -> None:
    encoder = tiny(name, positions=positions)
    ids = token_ids()
    mask = (torch.arange(12) < torch.tensor([[8], [12], [10]])) if with_mask else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(ids, attention_mask=mask)
        logits = encoder.lm_head(tokens)
    reference = encoder(ids, attention_mask=mask)
    error = (tokens.float() - reference).norm() / reference.norm()
    assert error < 0.05, f"bf16 autocast deviates from fp32 by {error:.3f} (relative)"
    logits.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


# ---------------------------------------------------------------- attention and RoPE parity


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    q, k, v = q.double(), k.double(), v.double()
    N = q.shape[-2]
    allowed = torch.ones(N, N, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("with_mask", "causal"), [(True, False), (False, True), (True, True)])
def test_attend_with_masks_matches_naive_attention(dtype: torch.dtype, with_mask: bool, causal: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) * 2 for _ in range(3))
    mask = (torch.rand(2, 1, 9, 9, generator=gen) < 0.6) | torch.eye(9, dtype=torch.bool) if with_mask else None
    reference = naive_attention(q, k, v, mask, causal)
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, causal).double()
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    assert (out - reference).abs().max() < tolerance * reference.abs().max()


def test_rotary_matches_complex_rotation() -> None:
    # RoPE from the paper: channel pair j of a vector at position p is multiplied by exp(i p theta_j),
    # theta_j = 10000^(-2j/d); here the pair is (x_j, x_{j + d/2}).
    d, positions = 8, torch.tensor([[0, 3, 17]])
    x = torch.randn(1, 2, 3, d, generator=torch.Generator().manual_seed(7))
    cos, sin = RotaryEmbedding(d)(positions)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    pairs = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    rotated = pairs * torch.polar(torch.ones(3, d // 2, dtype=torch.float64), positions[0, :, None] * theta)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    close(apply_rotary(x, cos, sin).double(), expected, tol=1e-5)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    d = 16
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 1, 1, d, generator=gen), torch.randn(1, 1, 1, d, generator=gen)
    rope = RotaryEmbedding(d)

    def score(m: int, n: int) -> Tensor:
        qm, kn = apply_rotary(q, *rope(torch.tensor([[m]]))), apply_rotary(k, *rope(torch.tensor([[n]])))
        return (qm * kn).sum()

    for m, n in [(0, 0), (5, 2), (2, 9)]:
        for shift in (1, 13, 100):
            close(score(m + shift, n + shift), score(m, n), tol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3), "the distance must matter"


def test_rotary_encoder_is_shift_invariant_and_learned_is_not() -> None:
    ids = token_ids()
    shifted = torch.arange(12).expand(3, 12) + 7
    rotary, learned = tiny("text_decoder", positions="rotary"), tiny("text_decoder")
    close(rotary(ids, position_ids=shifted), rotary(ids), tol=1e-4)
    assert not torch.allclose(learned(ids, position_ids=shifted), learned(ids), atol=1e-4)


def test_bert_parts_embedding_norm_and_lm_transform() -> None:
    """The encoder preset's BERT parts: LayerNorm on the embeddings, dense-GELU-LayerNorm + bias before
    the tied vocabulary projection; the decoder preset has neither."""
    encoder, decoder = tiny("text_encoder"), tiny("text_decoder")
    assert encoder.embed_norm is not None and encoder.lm_transform is not None and encoder.lm_bias is not None
    assert decoder.embed_norm is None and decoder.lm_transform is None and decoder.lm_bias is None
    with torch.no_grad():
        encoder.lm_bias.normal_()
        encoder.embed_norm.weight.normal_()
    hidden = torch.randn(4, 32)
    dense, norm = encoder.lm_transform[0], encoder.lm_transform[2]
    expected = norm(torch.nn.functional.gelu(dense(hidden))) @ encoder.token_embed.weight.T + encoder.lm_bias
    close(encoder.lm_head(hidden), expected)
    ids = torch.randint(0, VOCAB, (2, 7))
    x = encoder.embed_norm(encoder.token_embed(ids) + encoder.pos_embed(torch.arange(7)))
    for block in encoder.blocks:
        x = block(x)
    close(encoder(ids), encoder.norm(x))
