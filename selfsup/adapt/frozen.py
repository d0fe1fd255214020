"""Probing a frozen encoder on a labelled split: features once, then every probe and label fraction.

Images are prepared as the encoder was trained (size, normalisation). Text documents are tokenized
with the run's tokenizer and cut into chunks of the training block length, each wrapped with the
tokenizer's bounds as in training; a document's feature is the mean of its first `max_chunks` chunk
embeddings (man pages run to thousands of tokens; the first block alone would see only the header).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selfsup.adapt.probes import extract_features
from selfsup.data.colour import lightness_as_grey, rgb_to_lab
from selfsup.data.images import ImageSet
from selfsup.data.text import TextSet
from selfsup.data.tokenizer import TextTokenizer
from selfsup.data.views import normalise
from selfsup.errors import SelfsupError


def labelled_rows(data: ImageSet | TextSet, what: str) -> Tensor:
    """Indices of the rows that carry a label; an error when there are none."""
    if data.labels is None or not bool((data.labels >= 0).any()):
        raise SelfsupError(f"{data.source}: the {what} split has no labels, so it cannot be probed; "
                           f"use a labelled source (class sub-folders, a manifest label column, or .npz `y`)")
    return torch.nonzero(data.labels >= 0).flatten()


def labelled(data: ImageSet, what: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of the rows that carry a label; an error when there are none."""
    keep = labelled_rows(data, what)
    return data.images[keep], data.labels[keep]


def prepare_images(images: Tensor, preprocess: dict[str, Any]) -> Tensor:
    """uint8 images [B, C, H, W] -> the encoder's input, as `encoder.json`'s preprocess says: resized,
    normalised, and for encoders trained on lightness alone (colourisation) made grey first."""
    if preprocess.get("input_transform") == "grey":
        images = (lightness_as_grey(rgb_to_lab(images.float() / 255)) * 255).round().to(torch.uint8)
    return normalise(images, preprocess["mean"], preprocess["std"], preprocess["image_size"])


def encoder_features(encoder: nn.Module, images: Tensor, preprocess: dict[str, Any], device: torch.device,
                     autocast_dtype: torch.dtype | None) -> Tensor:
    """Pooled embeddings [N, D] (float32, CPU) of uint8 images, prepared as the encoder was trained."""
    encoder.eval()
    return extract_features(encoder.embed, images, device=device, autocast_dtype=autocast_dtype,
                            preprocess=lambda x: prepare_images(x, preprocess))


def raw_pixels(images: Tensor) -> Tensor:
    """The raw-pixel baseline: flattened images scaled to [0, 1], [N, C*H*W]."""
    return images.flatten(1).float() / 255



def document_chunks(tokenizer: TextTokenizer, texts: list[str], seq_len: int,
                    max_chunks: int) -> tuple[list[list[int]], list[int]]:
    """(chunks, owner): each document's first `max_chunks` chunks of at most `seq_len` token ids,
    wrapped with the tokenizer's bounds as in training (an empty document gives one chunk of bounds),
    and the index of the document each chunk belongs to; a document's chunks are consecutive."""
    if max_chunks < 1:
        raise SelfsupError(f"max_chunks must be at least 1, got {max_chunks}")
    bos, eos = tokenizer.packing_bounds
    head, tail = [] if bos is None else [bos], [] if eos is None else [eos]
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise SelfsupError(f"seq_len={seq_len} leaves no room for text between the tokenizer's bounds")
    chunks: list[list[int]] = []
    owner: list[int] = []
    for index, ids in enumerate(tokenizer.encode_batch(texts)):
        for start in range(0, max(len(ids), 1), body)[:max_chunks]:
            chunks.append(head + ids[start : start + body] + tail)
            owner.append(index)
    return chunks, owner


def pad_chunks(chunks: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids [K, L], real-token mask [K, L]) of right-padded chunks, L the longest chunk."""
    L = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), L), pad_id, dtype=torch.long)
    real = torch.zeros(len(chunks), L, dtype=torch.bool)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk)] = torch.tensor(chunk)
        real[row, : len(chunk)] = True
    return ids, real


def mean_by_owner(per_chunk: Tensor, owner: Tensor, num_docs: int) -> Tensor:
    """[num_docs, D]: the mean of each document's chunk embeddings [K, D] (owner [K] indexes documents)."""
    sums = torch.zeros(num_docs, per_chunk.shape[1], dtype=per_chunk.dtype, device=per_chunk.device)
    sums = sums.index_add(0, owner, per_chunk)
    counts = torch.bincount(owner, minlength=num_docs).clamp_min(1)
    return sums / counts.unsqueeze(1).to(per_chunk.dtype)


@torch.no_grad()
def text_features(encoder: nn.Module, tokenizer: TextTokenizer, texts: list[str], seq_len: int, device: torch.device,
                  autocast_dtype: torch.dtype | None, max_chunks: int = 4, batch_size: int = 64) -> Tensor:
    """Pooled embeddings [N, D] (float32, CPU) of documents: the mean of `encoder.embed` over each
    document's first `max_chunks` chunks of `seq_len` tokens (bounds included, padding masked)."""
    if not texts:
        raise SelfsupError("text_features got no documents: the dataset or split is empty")
    chunks, owner = document_chunks(tokenizer, texts, seq_len, max_chunks)
    encoder.eval().to(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    pieces = []
    for start in range(0, len(chunks), batch_size):
        ids, real = pad_chunks(chunks[start : start + batch_size], tokenizer.pad_id)
        with autocast:
            pieces.append(encoder.embed(ids.to(device), attention_mask=real.to(device)).float().cpu())
    return mean_by_owner(torch.cat(pieces), torch.tensor(owner), len(texts))
