"""Sequence packing: documents of any length into fixed-length blocks, and the attention masks that
keep packed documents apart.

Padding every document to the longest one wastes most of a batch on a corpus of mixed lengths (man
pages run from 20 to 20,000 tokens). Packing concatenates the documents into one stream (each
wrapped with bos/eos when given) and cuts it into blocks of `block_len`, so every position carries a
real token except at the very end. A document longer than a block simply continues in the next
block, as in GPT-2 / RoBERTa "full sentences" pretraining.

Whether a token may attend to another document in the same block is the model's choice: GPT-2 and
RoBERTa let it (the eos separator is the only cue), which is cheapest (`is_causal=True` or no mask
at all). `block_attention_mask` gives the stricter variant: attention only within a document.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from selfsup.errors import SelfsupError

PAD_DOCUMENT = -1  # document id of padding positions


@dataclass
class PackedBlocks:
    """Blocks cut from the concatenated documents; row-major order is the stream order."""

    input_ids: Tensor  # int64 [N, L]
    document_ids: Tensor  # int64 [N, L]: index into the packed token_lists; PAD_DOCUMENT (-1) for padding
    attention_mask: Tensor  # bool [N, L]: True = real token (bos/eos included), False = padding

    @property
    def num_blocks(self) -> int:
        return self.input_ids.shape[0]


def pack_documents(token_lists: list[list[int]], block_len: int, *, bos_id: int | None, eos_id: int | None,
                   pad_id: int, drop_last: bool = False) -> PackedBlocks:
    """Concatenate `token_lists` (each as [bos] + tokens + [eos] where those ids are given) and cut
    the stream into blocks of `block_len` tokens.

    The last, partial block is padded with `pad_id` (document id -1, attention_mask False), or
    dropped with `drop_last=True` (no padding anywhere: every block then has the same cost and
    signal). An empty document still contributes its bos/eos, so a document id always points at
    the list it came from. No tokens at all give zero blocks, shape [0, block_len].
    """
    if not isinstance(block_len, int) or block_len < 1:
        raise SelfsupError(f"packing block_len must be a positive integer, got {block_len!r}")
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    num_extra = len(head) + len(tail)
    lengths = np.fromiter((len(tokens) + num_extra for tokens in token_lists), dtype=np.int64,
                          count=len(token_lists))
    num_tokens = int(lengths.sum())
    stream = np.fromiter(itertools.chain.from_iterable(itertools.chain(head, tokens, tail) for tokens in token_lists),
                         dtype=np.int64, count=num_tokens)
    documents = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)  # [num_tokens]

    num_full, remainder = divmod(num_tokens, block_len)
    if drop_last or remainder == 0:
        num_kept = num_full * block_len
        stream, documents = stream[:num_kept], documents[:num_kept]
        real = np.ones(num_kept, dtype=bool)
    else:
        num_pad = block_len - remainder
        stream = np.concatenate([stream, np.full(num_pad, pad_id, dtype=np.int64)])
        documents = np.concatenate([documents, np.full(num_pad, PAD_DOCUMENT, dtype=np.int64)])
        real = np.concatenate([np.ones(num_tokens, dtype=bool), np.zeros(num_pad, dtype=bool)])
    return PackedBlocks(input_ids=torch.from_numpy(stream).view(-1, block_len),  # [N, L]
                        document_ids=torch.from_numpy(documents).view(-1, block_len),  # [N, L]
                        attention_mask=torch.from_numpy(real).view(-1, block_len))  # [N, L]


def block_attention_mask(document_ids: Tensor, causal: bool) -> Tensor:
    """Which key each query may attend to: bool [N, L, L], True = may attend (query row, key column).

    A real token attends to tokens of its own document only (and, if `causal`, only to those not
    after it); it never attends to padding. A padding query attends to itself alone: a row with no
    True makes scaled_dot_product_attention return NaN there, and that NaN would reach real tokens
    through the keys/values of the next layer. Pass `mask[:, None]` ([N, 1, L, L]) as SDPA's
    `attn_mask` to broadcast it over heads.
    """
    N, L = document_ids.shape
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [N, L(query), L(key)]
    real_key = (document_ids != PAD_DOCUMENT)[:, None, :]  # [N, 1, L(key)]
    mask = same_document & real_key
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=document_ids.device).tril()
    return mask | torch.eye(L, dtype=torch.bool, device=document_ids.device)


def document_positions(document_ids: Tensor) -> Tensor:
    """Position of each token within its document's run in the block: int64 [N, L], restarting at 0
    where a document starts and at the start of every block (a document continued from the previous
    block starts again at 0, as its beginning is not in this block's context). Padding counts on from
    0 like one more document; it is masked anyway. Pass as the encoder's `position_ids` together with
    `block_attention_mask`, so a packed document is encoded as if it were alone."""
    N, L = document_ids.shape
    index = torch.arange(L, device=document_ids.device).expand(N, L)  # [N, L]
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    run_start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values  # [N, L]
    return index - run_start
