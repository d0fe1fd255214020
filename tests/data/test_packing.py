"""Sequence packing: every token lands exactly once and in order, and the block attention mask equals
a naive per-position rule and gives SDPA the same answer as a naive masked softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.data.packing import PAD_DOCUMENT, block_attention_mask, document_positions, pack_documents
from selfsup.errors import SelfsupError

# Lengths chosen to cover: an empty document, one shorter than a block, one spanning three blocks.
DOCS = [[10, 11, 12], [], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40], [50, 51, 52, 53, 54]]
BOS, EOS, PAD = 1, 2, 0


def expected_stream(docs: list[list[int]], bos: int | None, eos: int | None) -> tuple[list[int], list[int]]:
    """The concatenated stream and its document ids, written out one token at a time."""
    tokens, owners = [], []
    for d, doc in enumerate(docs):
        wrapped = ([bos] if bos is not None else []) + doc + ([eos] if eos is not None else [])
        tokens += wrapped
        owners += [d] * len(wrapped)
    return tokens, owners


@pytest.mark.parametrize("bos, eos", [(BOS, EOS), (None, EOS), (None, None)])
@pytest.mark.parametrize("block_len", [1, 4, 7, 64])
def test_every_token_once_in_order_with_padding_only_at_the_end(bos, eos, block_len):
    packed = pack_documents(DOCS, block_len, bos_id=bos, eos_id=eos, pad_id=PAD)
    tokens, owners = expected_stream(DOCS, bos, eos)
    N, L = packed.input_ids.shape
    assert L == block_len and N == math.ceil(len(tokens) / block_len)
    assert packed.input_ids.dtype == torch.int64 and packed.document_ids.dtype == torch.int64
    assert packed.attention_mask.dtype == torch.bool
    assert packed.document_ids.shape == packed.attention_mask.shape == (N, L)

    flat_mask = packed.attention_mask.flatten()
    num_real = int(flat_mask.sum())
    assert num_real == len(tokens)
    # Padding only after the last real token: the mask is all True then all False.
    assert flat_mask[:num_real].all() and not flat_mask[num_real:].any()
    assert packed.input_ids.flatten()[:num_real].tolist() == tokens
    assert packed.document_ids.flatten()[:num_real].tolist() == owners
    assert (packed.input_ids.flatten()[num_real:] == PAD).all()
    assert (packed.document_ids.flatten()[num_real:] == PAD_DOCUMENT).all()
    assert num_real > (N - 1) * L  # never a whole block of padding


def test_drop_last_keeps_only_full_blocks():
    tokens, owners = expected_stream(DOCS, BOS, EOS)  # 30 tokens
    packed = pack_documents(DOCS, 8, bos_id=BOS, eos_id=EOS, pad_id=PAD, drop_last=True)
    assert packed.input_ids.shape == (3, 8)
    assert packed.attention_mask.all()
    assert packed.input_ids.flatten().tolist() == tokens[:24]
    assert packed.document_ids.flatten().tolist() == owners[:24]
    # Exactly divisible: nothing dropped, no padding, same with and without drop_last.
    exact = pack_documents(DOCS, 6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert exact.input_ids.shape == (5, 6) and exact.attention_mask.all()


def test_no_tokens_gives_zero_blocks_and_bad_block_len_is_refused():
    empty = pack_documents([[], []], 5, bos_id=None, eos_id=None, pad_id=PAD)
    assert empty.input_ids.shape == empty.document_ids.shape == empty.attention_mask.shape == (0, 5)
    short = pack_documents([[3, 4]], 5, bos_id=None, eos_id=None, pad_id=PAD, drop_last=True)
    assert short.input_ids.shape == (0, 5)
    for bad in (0, -3, 2.5):
        with pytest.raises(SelfsupError, match="block_len"):
            pack_documents(DOCS, bad, bos_id=None, eos_id=None, pad_id=PAD)


def naive_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """The rule, one (query, key) pair at a time."""
    N, L = document_ids.shape
    mask = torch.zeros(N, L, L, dtype=torch.bool)
    for n in range(N):
        for q in range(L):
            for k in range(L):
                dq, dk = int(document_ids[n, q]), int(document_ids[n, k])
                if dq == PAD_DOCUMENT:
                    mask[n, q, k] = q == k  # padding sees only itself
                else:
                    mask[n, q, k] = dq == dk and (not causal or k <= q)
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_matches_naive_rule_and_never_crosses_documents(causal):
    # 30 tokens: 5 blocks, the last with 5 pads.
    packed = pack_documents(DOCS, 7, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    doc = packed.document_ids
    mask = block_attention_mask(doc, causal=causal)
    N, L = doc.shape
    assert mask.shape == (N, L, L) and mask.dtype == torch.bool
    assert torch.equal(mask, naive_mask(doc, causal))
    # Independent of the naive rule: no pair across documents, no real query sees padding,
    # every row can attend somewhere (else SDPA returns NaN).
    cross = doc[:, :, None] != doc[:, None, :]
    assert not (mask & cross).any()
    assert mask.any(dim=-1).all()
    if causal:
        assert not (mask & torch.ones(L, L, dtype=torch.bool).triu(1)).any()
    else:
        real = doc != PAD_DOCUMENT
        # Bidirectional: a real query sees every token of its document in the block.
        assert torch.equal(mask & real[:, :, None], (~cross) & real[:, :, None] & real[:, None, :])


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the allowed keys only, one query position at a time."""
    N, H, L, Dh = q.shape
    out = torch.zeros_like(q)
    for n in range(N):
        for h in range(H):
            for i in range(L):
                allowed = mask[n, i].nonzero().flatten()
                scores = torch.stack([q[n, h, i] @ k[n, h, j] for j in allowed]) / math.sqrt(Dh)
                weights = scores.softmax(dim=0)
                out[n, h, i] = (weights[:, None] * v[n, h, allowed]).sum(dim=0)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_with_block_mask_equals_naive_masked_attention(causal):
    # 12 tokens: 3 blocks, the last with 3 pads.
    packed = pack_documents([[5, 6, 7], [8, 9], [3, 3, 3, 3]], 5, bos_id=None, eos_id=EOS, pad_id=PAD)
    mask = block_attention_mask(packed.document_ids, causal=causal)  # [N, L, L]
    N, L = packed.input_ids.shape
    H, Dh = 2, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, H, L, Dh, generator=gen, dtype=torch.float64) for _ in range(3))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # mask broadcast over heads
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, naive_attention(q, k, v, mask), rtol=1e-10, atol=1e-10)
    # The mask matters: in block 0, query 4 is the first token of document 1; changing document
    # 0's values (positions 0..3, before it, so also visible to a causal query without the mask)
    # leaves its output unchanged.
    assert packed.document_ids[0].tolist() == [0, 0, 0, 0, 1]
    v_changed = v.clone()
    v_changed[0, :, :4] += 100.0
    again = F.scaled_dot_product_attention(q, k, v_changed, attn_mask=mask[:, None])
    torch.testing.assert_close(again[0, :, 4], got[0, :, 4], rtol=0, atol=1e-12)
    assert not torch.allclose(again[0, :, 3], got[0, :, 3])  # while document 0's own queries do change


def test_document_positions_restart_at_each_document_and_block():
    packed = pack_documents(DOCS, 7, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    doc = packed.document_ids
    got = document_positions(doc)
    assert got.dtype == torch.int64 and got.shape == doc.shape
    N, L = doc.shape
    for n in range(N):
        for j in range(L):
            start = j
            while start > 0 and doc[n, start - 1] == doc[n, j]:
                start -= 1
            assert got[n, j] == j - start, (n, j)
    # Document 2 (13 tokens) fills block 1 and continues into block 2, where its positions restart at 0.
    assert doc[1].tolist() == [2] * 7 and got[1].tolist() == list(range(7))
    assert doc[2, :6].tolist() == [2] * 6 and got[2, :7].tolist() == [0, 1, 2, 3, 4, 5, 0]
