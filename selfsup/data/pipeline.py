"""Turns dataset indices into training batches on the device: image views made there, batched, or
packed token blocks with their masks.

A shards folder streams instead (`data/stream.py`): its `*StreamBatches` hand the stream the parts it
runs in its workers (`DecodeImages`, `PackDocuments`: decoding and packing as the in-memory load does)
and turn each collated micro-batch into the same batch dict, through the same builders
(`image_batch`, `text_batch`)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from selfsup.data.decode import _BadFile, decode_image_bytes, pixel_limit_is_error
from selfsup.data.images import IMAGE_EXTENSIONS, ImageSet
from selfsup.data.packing import PAD_DOCUMENT, PackedBlocks, block_attention_mask, document_positions
from selfsup.data.shards import BadSamples, Sample, StreamParts, payload_member, sample_meta
from selfsup.data.views import ImageViews

# Datasets below this size (uint8 bytes) are moved to the accelerator once, so a step copies nothing.
_ON_DEVICE_BYTES = 2 << 30


class ImageBatches:
    """`batches(indices, generator)` -> {"views": [V x float [B, C, S, S]], "id": [...], "index", "label"?,
    "generator", "pixel_mean"/"pixel_std" (float [C], the views' normalisation)}."""

    def __init__(self, data: ImageSet, views: ImageViews, device: torch.device):
        self.data, self.views, self.device = data, views, device
        images = data.images
        if device.type != "cpu" and images.numel() < _ON_DEVICE_BYTES:
            images = images.to(device)
        self.images = images
        self.num_items = len(data)
        self.pixel_mean = torch.tensor(views.mean, device=device)  # [C]
        self.pixel_std = torch.tensor(views.std, device=device)  # [C]

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        images = self.images[indices.to(self.images.device)].to(self.device, non_blocking=True)  # uint8 [B, C, H, W]
        labels = None if self.data.labels is None else self.data.labels[indices].to(self.device)
        return image_batch(self.views, images, [self.data.ids[i] for i in indices.tolist()], labels, generator,
                           self.pixel_mean, self.pixel_std, indices)


def image_batch(views: ImageViews, images: Tensor, ids: list[str], labels: Tensor | None, generator: torch.Generator,
                pixel_mean: Tensor, pixel_std: Tensor, index: Tensor | None = None) -> dict[str, Any]:
    """The views batch of uint8 images [B, C, H, W] on the device (in memory or streamed alike)."""
    batch: dict[str, Any] = {
        "views": views(images, generator),
        "id": ids,
        # Masking that is the objective (MAE, BEiT) draws from the step's generator after the views.
        "generator": generator,
        # The views' normalisation, [C] each, for methods that need pixels back (colourisation).
        "pixel_mean": pixel_mean,
        "pixel_std": pixel_std,
    }
    if index is not None:  # a streamed batch has no in-memory rows to index
        batch["index"] = index
    if labels is not None:
        batch["label"] = labels
    return batch


class ImageStreamBatches:
    """The views batches of a streamed shards folder: `stream_parts` (data/stream.py reads them in its
    workers: images decoded at the run's size there) and `(collated, generator)` -> the batch dict
    `ImageBatches` makes, from a collated micro-batch (uint8 [B, C, S, S], ids, labels int64 [B])."""

    def __init__(self, stream_parts: StreamParts, views: ImageViews, device: torch.device, labelled: bool,
                 num_items: int):
        self.stream_parts, self.views, self.device, self.labelled = stream_parts, views, device, labelled
        self.num_items = num_items  # the training split's images (the stream's epochs are its own)
        self.pixel_mean = torch.tensor(views.mean, device=device)  # [C]
        self.pixel_std = torch.tensor(views.std, device=device)  # [C]

    def __call__(self, collated: tuple[Tensor, list[str], Tensor], generator: torch.Generator) -> dict[str, Any]:
        images, ids, labels = collated  # uint8 [B, C, S, S], B ids, int64 [B]
        images = images.to(self.device, non_blocking=True)
        return image_batch(self.views, images, list(ids), labels.to(self.device) if self.labelled else None,
                           generator, self.pixel_mean, self.pixel_std)


@dataclass(frozen=True)
class DecodeImages:
    """A stream's `to_items` for images (runs in a DataLoader worker): each sample's image member
    decoded as a file is at load (`decode.decode_image_bytes`: centre square, data.image_size,
    data.channels) -> (uint8 [C, S, S], id, label); a member that cannot be decoded stops the run
    naming shard and member, or is skipped and counted (`data.on_bad_file`, shards.BadSamples)."""

    image_size: int
    channels: int
    on_bad: str = "error"
    max_bad_fraction: float = 0.01
    per_sample: ClassVar[bool] = True  # one item per sample, nothing carried over: a resume skips samples undecoded
    besides: ClassVar[tuple[str, ...]] = ()  # members that are never the image (image–text: the captions)

    def __call__(self, samples: Iterator[Sample]) -> Iterator[tuple[Any, ...]]:
        bad = BadSamples(self.on_bad, self.max_bad_fraction)
        payload = payload_member(IMAGE_EXTENSIONS, "image", self.besides)
        for key, files in samples:
            meta = sample_meta(key, files)
            ext = payload(key, files)
            try:
                with pixel_limit_is_error():
                    pixels = decode_image_bytes(files[ext], self.image_size, self.channels)  # uint8 [C, S, S]
            except _BadFile as err:
                bad.failed(f"{key}.{ext}", err)
                continue
            bad.ok()
            yield self.item(torch.from_numpy(np.array(pixels)), key, files, meta)  # a writable copy

    def item(self, image: Tensor, key: str, files: dict[str, bytes], meta: dict[str, Any]) -> tuple[Any, ...]:
        """The item a decoded sample gives: (uint8 [C, S, S], id, label); a subclass adds the sample's other
        members (image–text: its captions, `pairs.DecodePairs`)."""
        return image, meta["id"], int(meta["label"])


def collate_images(items: list[tuple[Tensor, str, int]]) -> tuple[Tensor, list[str], Tensor]:
    """(uint8 [B, C, S, S], ids, labels int64 [B]) of a micro-batch of decoded images."""
    return (torch.stack([item[0] for item in items]), [item[1] for item in items],
            torch.tensor([item[2] for item in items], dtype=torch.long))


class TextBatches:
    """`batches(indices, generator)` -> packed token blocks for the text methods:

    - "input_ids" int64 [B, L]; "token_mask" bool [B, L] (True = a real token, False = padding);
    - "document_ids" int64 [B, L] (-1 = padding), so next-token prediction skips document boundaries;
    - "attention_mask": absent when every key may be seen (the fast path: no mask tensor at all),
      [B, L] when the batch holds padding, or [B, L, L] block-diagonal with `document_masks`
      (a token sees its own document only) — then "position_ids" restart at each document too;
    - "generator": the step's generator, for masking that is the objective (MLM);
    - "id": the documents each block holds (for error messages), "index": the block indices,
      "num_tokens": the real tokens in the batch (an int, counted before the copy to the device).
    Causality is the encoder's business (its config), not the batch's.
    """

    def __init__(self, blocks: PackedBlocks, document_names: list[str], device: torch.device, document_masks: bool):
        self.blocks, self.document_names, self.device = blocks, document_names, device
        self.document_masks = document_masks
        self.num_items = blocks.num_blocks

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        names = [block_name([self.document_names[d] for d in torch.unique_consecutive(row).tolist()
                             if d != PAD_DOCUMENT]) for row in self.blocks.document_ids[indices]]
        return text_batch(self.blocks.input_ids[indices], self.blocks.document_ids[indices],
                          self.blocks.attention_mask[indices], names, self.device, self.document_masks, generator,
                          indices)


def block_name(documents: list[str]) -> str:
    """What a block is called in messages: its documents' ids, the first and last of a long run."""
    if len(documents) <= 3:
        return "+".join(documents)
    return f"{documents[0]}+...+{documents[-1]} ({len(documents)} documents)"


def text_batch(input_ids: Tensor, document_ids: Tensor, real: Tensor, names: list[str], device: torch.device,
               document_masks: bool, generator: torch.Generator, index: Tensor | None = None) -> dict[str, Any]:
    """The token batch (`TextBatches`' fields) of blocks on the CPU: ids, document ids int64 [B, L] and
    real-token mask bool [B, L], moved to `device` (in memory or streamed alike)."""
    real_cpu = real
    input_ids = input_ids.to(device, non_blocking=True)  # [B, L]
    document_ids = document_ids.to(device, non_blocking=True)  # [B, L]
    real = real_cpu.to(device, non_blocking=True)
    batch: dict[str, Any] = {"input_ids": input_ids, "token_mask": real, "document_ids": document_ids,
                             "generator": generator, "id": names, "num_tokens": int(real_cpu.sum())}
    if index is not None:  # a streamed batch has no in-memory blocks to index
        batch["index"] = index
    if document_masks:
        batch["attention_mask"] = block_attention_mask(document_ids, causal=False)  # [B, L, L]
        batch["position_ids"] = document_positions(document_ids)  # [B, L]
    elif not bool(real_cpu.all()):
        batch["attention_mask"] = real
    return batch


class TextStreamBatches:
    """The token batches of a streamed shards folder: `stream_parts` (documents' token ids packed into
    blocks in data/stream.py's workers) and `(collated, generator)` -> the batch dict `TextBatches`
    makes, from a collated micro-batch of full blocks (ids and document ids int64 [B, L], names)."""

    def __init__(self, stream_parts: StreamParts, device: torch.device, document_masks: bool, num_items: int):
        self.stream_parts, self.device, self.document_masks = stream_parts, device, document_masks
        self.num_items = num_items  # the training split's full blocks, as the shard counts give them

    def __call__(self, collated: tuple[Tensor, Tensor, list[str]], generator: torch.Generator) -> dict[str, Any]:
        input_ids, document_ids, names = collated  # [B, L], [B, L], B names
        return text_batch(input_ids, document_ids, torch.ones_like(input_ids, dtype=torch.bool), list(names),
                          self.device, self.document_masks, generator)


@dataclass(frozen=True)
class BlocksIn:
    """A stream's `items_in` for text: the full blocks of `seq_len` tokens a reader packs from shards
    holding these packed lengths (token ids + each document's bounds): their sum // seq_len."""

    seq_len: int

    def __call__(self, counts: list[int]) -> int:
        return sum(counts) // self.seq_len


@dataclass(frozen=True)
class PackDocuments:
    """A stream's `to_items` for text (runs in a DataLoader worker): each sample's token ids
    (`KEY.ids.npy`) wrapped with the tokenizer's bounds and packed, as `packing.pack_documents` packs a
    split, into full blocks of `seq_len` -> (ids int64 [L], document ids int64 [L], block name); a
    document continues into the next block, the reader's last partial block is dropped (as training
    blocks are in memory). Document ids count the reader's documents (only their equality matters)."""

    seq_len: int
    bos_id: int | None
    eos_id: int | None
    on_bad: str = "error"
    max_bad_fraction: float = 0.01

    def __call__(self, samples: Iterator[Sample]) -> Iterator[tuple[Tensor, Tensor, str]]:
        bad = BadSamples(self.on_bad, self.max_bad_fraction)
        head = np.array([] if self.bos_id is None else [self.bos_id], dtype=np.int64)
        tail = np.array([] if self.eos_id is None else [self.eos_id], dtype=np.int64)
        L = self.seq_len
        tokens = np.zeros(0, dtype=np.int64)  # the pending stream: < L tokens between documents
        documents = np.zeros(0, dtype=np.int64)
        names: dict[int, str] = {}
        number = 0
        for key, files in samples:
            meta = sample_meta(key, files)
            try:
                ids = token_ids(files)
            except _BadFile as err:
                bad.failed(f"{key}.{TOKEN_IDS}", err)
                continue
            bad.ok()
            piece = np.concatenate([head, ids.astype(np.int64), tail])
            tokens = np.concatenate([tokens, piece])
            documents = np.concatenate([documents, np.full(len(piece), number, dtype=np.int64)])
            names[number] = meta["id"]
            number += 1
            while len(tokens) >= L:
                block, docs = tokens[:L], documents[:L]
                held = [names[int(d)] for d in np.unique(docs)]  # consecutive ids, in order
                yield torch.from_numpy(block.copy()), torch.from_numpy(docs.copy()), block_name(held)
                tokens, documents = tokens[L:], documents[L:]
                first = int(documents[0]) if len(documents) else number
                names = {d: n for d, n in names.items() if d >= first}


TOKEN_IDS = "ids.npy"  # a text sample's token ids member


def token_ids(files: dict[str, bytes]) -> np.ndarray:
    """A text sample's token ids (`KEY.ids.npy`, 1-D integers), or `_BadFile` with the reason."""
    raw = files.get(TOKEN_IDS)
    if raw is None:
        raise _BadFile(f"no {TOKEN_IDS} member (the document's token ids)")
    try:
        ids = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as err:  # a truncated or foreign .npy: numpy's errors vary
        raise _BadFile(f"not a readable .npy array ({type(err).__name__}: {err})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise _BadFile(f"token ids must be a 1-D integer array, got {ids.dtype} of shape {list(ids.shape)}")
    return ids


def collate_blocks(items: list[tuple[Tensor, Tensor, str]]) -> tuple[Tensor, Tensor, list[str]]:
    """(ids int64 [B, L], document ids int64 [B, L], names) of a micro-batch of packed blocks."""
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), [i[2] for i in items]


def channel_stats(images: Tensor, max_items: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from at most `max_items` of them."""
    N, C, H, W = images.shape
    step = max(1, N // max_items)
    x = images[::step].float().div_(255).transpose(0, 1).reshape(C, -1)  # [C, n*H*W]
    std = x.std(dim=1).clamp_min(1e-3)
    return x.mean(dim=1).tolist(), std.tolist()
