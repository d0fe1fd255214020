"""Image–text pairs: images in memory with their captions, for methods with an image and a text tower.

- data: the `emoji` built-in (CLDR names as captions) or a .csv/.jsonl manifest of image paths and
  captions (`data/pairs.py`); labels and group columns as for images;
- pretraining: per step, one view of each image (a random resized crop of 90-100 % of its area,
  no flip, jitter or greyscale: captions name sides and colours) and one of its captions, drawn
  with the step's generator, tokenized by the run's BPE tokenizer (trained on the training
  captions, or `tokenizer.path`) and ended with the end-of-text token, right-padded to the batch's
  longest caption; the held-out monitor is the retrieval recall of the held-out pairs; each tower
  records its own modality's preprocessing (the image tower's normalisation, the text tower's
  tokenizer), so either tower is read by the image or the text reader like any other encoder;
- reading: a pair modality has no encoder of its own: `reader` is never asked for one (each tower's
  encoder.json names `image` or `text`), and `PairSet` offers `images` and `texts` to those readers;
- shards (`selfsup data shard --modality image_text`): images stored as image shards store them (the
  files' bytes, checked once; the built-in as PNG; the training split's channel statistics in the
  index), each with all its captions as text (`KEY.captions.json`), and the BPE tokenizer trained on
  the training captions (or `tokenizer.path`) as `tokenizer.json`. A streamed run reads with that
  tokenizer (or its own `tokenizer.path`: captions are text), so nothing is read whole at start-up;
  its batches come from `data/stream.py` and are built as in-memory ones are (`pair_batch`).

Methods that train on pairs (`inputs="pairs"`) offer `embed_images(views) -> [B, E]` and
`embed_texts(input_ids, attention_mask) -> [B, E]`, unit-normalised in a shared space: the monitor
and zero-shot classification use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import HF_TOWER_PREFIX, RunConfig, from_dict
from selfsup.data.pairs import (CAPTIONS, PAIR_BUILTINS, DecodePairs, PairListing, PairSet, captions_member,
                                collate_pairs, list_pair_manifest, load_pair_source, pair_manifest, sample_captions)
from selfsup.data.pipeline import channel_stats
from selfsup.data.shards import (ShardIndex, ShardReader, ShardSplit, ShardSummary, StreamParts, is_shard_folder,
                                 write_shard_folder)
from selfsup.data.tokenizer import TextTokenizer, train_tokenizer
from selfsup.data.views import ImageViews, ViewsConfig, normalise
from selfsup.encoders import IMAGE_INPUTS, TEXT_INPUTS
from selfsup.errors import SelfsupError
from selfsup.modalities.base import Assembly, Modality, Reader, check_no_tokenizer
from selfsup.modalities.image import read_images, shard_stats, write_image_samples
from selfsup.modalities.text import TOKENIZER_FILE, run_tokenizer
from selfsup.train.runtime import Runtime

log = logging.getLogger("selfsup")

# CLIP trains on a random square crop and nothing else (Radford et al. 2021, section 2.5); open_clip
# crops 90-100 % of the area. Flips, jitter and greyscale would contradict captions.
PAIR_VIEWS = {"num_views": 1, "crop_scale": [0.9, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}
RECALL_AT = (1, 5, 10)
_SIZE, _VOCAB, _SEQ = 16, 50, 10  # contract-test sizes


def caption_ids(tokenizer: TextTokenizer, captions: list[str], seq_len: int) -> tuple[Tensor, Tensor]:
    """(input_ids [B, L], attention_mask bool [B, L]): each caption's tokens wrapped as the tokenizer
    wraps a document (BPE: then <|endoftext|>, where the text tower pools; WordPiece: [CLS] ... [SEP],
    as a BERT-style Hugging Face tower reads text), cut to seq_len, right-padded to the longest (L)."""
    bos, eos = tokenizer.packing_bounds
    if eos is None:
        raise SelfsupError("the caption tokenizer has no end-of-text token; use a BPE tokenizer (`selfsup tokenizer "
                           "train --kind bpe`)")
    head = [] if bos is None else [bos]
    body = seq_len - len(head) - 1
    if body < 1:
        raise SelfsupError(f"data.seq_len={seq_len} leaves no room for a caption between the tokenizer's bounds")
    rows = [head + ids[:body] + [eos] for ids in tokenizer.encode_batch(captions)]
    L = max(len(row) for row in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids, mask


class PairBatches:
    """`batches(indices, generator)` -> {"views": [float [B, C, S, S]], "input_ids" [B, L],
    "attention_mask" bool [B, L], "caption" (the drawn index per row), "id", "index", "label"?,
    "generator"}: one view and one drawn caption per image."""

    def __init__(self, data: PairSet, views: ImageViews, tokenizer: TextTokenizer, seq_len: int,
                 device: torch.device):
        self.data, self.views, self.device = data, views, device
        self.num_items = len(data)
        self.num_captions = torch.tensor([len(c) for c in data.captions])  # [N]
        # every caption tokenized once: [sum of captions] rows, indexed by first_caption[i] + k
        flat = [caption for captions in data.captions for caption in captions]
        self.ids, self.mask = caption_ids(tokenizer, flat, seq_len)
        self.first_caption = torch.cat([torch.zeros(1, dtype=torch.long), self.num_captions.cumsum(0)[:-1]])

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]:
        images = self.data.images[indices].to(self.device)  # uint8 [B, C, H, W]
        first = self.first_caption[indices]

        def tokens(pick: Tensor) -> tuple[Tensor, Tensor]:
            return self.ids[first + pick], self.mask[first + pick]

        labels = None if self.data.labels is None else self.data.labels[indices].to(self.device)
        return pair_batch(self.views, images, self.num_captions[indices], tokens,
                          [self.data.ids[i] for i in indices.tolist()], labels, generator, indices)


class PairStreamBatches:
    """The pairs batches of a streamed shards folder: `stream_parts` (data/stream.py reads them in its
    workers: images decoded at the run's size there, captions kept as text, `pairs.DecodePairs`) and
    `(collated, generator)` -> the batch dict `PairBatches` makes, from a collated micro-batch (uint8
    [B, C, S, S], ids, labels int64 [B], each image's captions), tokenizing only the drawn captions."""

    def __init__(self, stream_parts: StreamParts, views: ImageViews, tokenizer: TextTokenizer, seq_len: int,
                 device: torch.device, labelled: bool, num_items: int):
        self.stream_parts, self.views, self.tokenizer, self.seq_len = stream_parts, views, tokenizer, seq_len
        self.device, self.labelled = device, labelled
        self.num_items = num_items  # the training split's pairs (the stream's epochs are its own)

    def __call__(self, collated: tuple[Tensor, list[str], Tensor, list[tuple[str, ...]]],
                 generator: torch.Generator) -> dict[str, Any]:
        images, ids, labels, captions = collated

        def tokens(pick: Tensor) -> tuple[Tensor, Tensor]:
            return caption_ids(self.tokenizer, [c[int(k)] for c, k in zip(captions, pick)], self.seq_len)

        return pair_batch(self.views, images.to(self.device, non_blocking=True),
                          torch.tensor([len(c) for c in captions]), tokens, list(ids),
                          labels.to(self.device) if self.labelled else None, generator)


def pair_batch(views: ImageViews, images: Tensor, num_captions: Tensor,
               tokens: Callable[[Tensor], tuple[Tensor, Tensor]], ids: list[str], labels: Tensor | None,
               generator: torch.Generator, index: Tensor | None = None) -> dict[str, Any]:
    """The pairs batch of uint8 images [B, C, H, W] on the device (in memory or streamed alike): one view
    of each image, then which of its `num_captions` [B] captions it is paired with, drawn from the step's
    generator after the views; `tokens(pick)` gives the picked captions' (input_ids, mask) [B, >= L],
    trimmed here to the batch's longest caption L."""
    batch_views = views(images, generator)
    draw = torch.rand(len(images), generator=generator, device=generator.device).cpu()  # [B]
    pick = (draw * num_captions).long().clamp_max(num_captions - 1)  # [B]
    input_ids, mask = tokens(pick)
    width = int(mask.sum(dim=1).max())  # trim the batch's common padding
    batch: dict[str, Any] = {
        "views": batch_views, "input_ids": input_ids[:, :width].to(images.device),
        "attention_mask": mask[:, :width].to(images.device), "caption": pick, "generator": generator, "id": ids,
    }
    if index is not None:  # a streamed batch has no in-memory rows to index
        batch["index"] = index
    if labels is not None:
        batch["label"] = labels
    return batch


CAPTION_TOKENIZER = "bpe"  # the tokenizer kind `data shard` trains on captions: CLIP's (pair methods' `tokenizer`)


def _stream_tokenizer(cfg: RunConfig, out: Path, index: ShardIndex, runtime: Runtime, kind: str) -> TextTokenizer:
    """A streamed run's caption tokenizer, without reading the captions: the run's tokenizer.json when it
    has one (a resume), else `tokenizer.path` (captions are stored as text, so any tokenizer reads
    them), else the shards folder's, trained on its training captions at shard time. Rank 0 writes it."""
    if runtime.is_main and cfg.tokenizer.path is None and not (out / TOKENIZER_FILE).exists():
        tokenizer = TextTokenizer.load(index.folder / TOKENIZER_FILE)
        if tokenizer.kind != kind:
            raise SelfsupError(f"{index.folder / TOKENIZER_FILE}: a {tokenizer.kind} tokenizer, but method "
                               f"`{cfg.method['name']}` needs {kind}; pass tokenizer.path=FILE of a {kind} tokenizer "
                               f"(`selfsup tokenizer train --kind {kind}`), or shard the source again")
        tokenizer.save(out / TOKENIZER_FILE)
    # the file now exists (or tokenizer.path is copied): nothing is trained, so no caption is read
    return run_tokenizer(cfg, out, _Captions([]), runtime, kind)


def _max_positions(folder: Path) -> int:
    """The longest input a Hugging Face text model takes (its config's max_position_embeddings)."""
    import json

    value = json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 512)
    return int(value) if isinstance(value, int) and value > 2 else 512


@dataclass
class _Captions:
    """All training captions as the tokenizer trainer reads a text dataset (`texts`)."""

    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def retrieval_recall(similarity: Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall@k both ways of a square similarity matrix [N, N] whose diagonal holds the true pairs:
    image->text (rows) and text->image (columns). A tie with the true pair counts against it."""
    N = similarity.shape[0]
    assert similarity.shape == (N, N), similarity.shape
    true = similarity.diagonal()  # [N]
    # rank of the true pair = how many candidates score at least as high, itself excluded
    rank_i2t = (similarity >= true[:, None]).sum(dim=1) - 1  # [N]
    rank_t2i = (similarity >= true[None, :]).sum(dim=0) - 1  # [N]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_r{k}"] = float((rank_t2i < k).float().mean())
    return out


@torch.no_grad()
def image_embeddings(method: nn.Module, images: Tensor, prepare, runtime: Runtime, batch_size: int = 256) -> Tensor:
    """Unit embeddings [N, E] (float32, CPU) of uint8 images [N, C, H, W] in a pairs method's shared
    space; `prepare` normalises a batch as the image tower was trained. The method is left as it was."""
    was_training = method.training
    method.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            with runtime.autocast():
                out.append(method.embed_images(prepare(images[start : start + batch_size].to(runtime.device))).float().cpu())
    finally:
        method.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(method: nn.Module, texts: list[str], tokenizer: TextTokenizer, seq_len: int, runtime: Runtime,
                    batch_size: int = 256) -> Tensor:
    """Unit embeddings [N, E] (float32, CPU) of texts, tokenized as the run's captions (`caption_ids`)."""
    was_training = method.training
    method.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = caption_ids(tokenizer, texts[start : start + batch_size], seq_len)
            with runtime.autocast():
                out.append(method.embed_texts(ids.to(runtime.device), mask.to(runtime.device)).float().cpu())
    finally:
        method.train(was_training)
    return torch.cat(out)


def pair_embeddings(method: nn.Module, data: PairSet, rows: Tensor, prepare, tokenizer: TextTokenizer, seq_len: int,
                    runtime: Runtime) -> tuple[Tensor, Tensor]:
    """(image [N, E], text [N, E]) embeddings of the rows' images and first captions in the method's
    shared space (float32, CPU)."""
    return (image_embeddings(method, data.images[rows], prepare, runtime),
            text_embeddings(method, [data.captions[int(i)][0] for i in rows], tokenizer, seq_len, runtime))


class ImageTextModality(Modality):
    name = "image_text"
    batch_kind = "pairs"
    default_source = "emoji"
    unit = "pairs"

    def load(self, cfg: RunConfig, progress: bool = True) -> PairSet:
        d = cfg.data
        if is_shard_folder(d.source):  # written by `data shard`: both splits, read into memory
            return self.load_shard_folder(cfg, progress)
        return load_pair_source(d.source, d.image_size, d.channels, text_field=d.text_field, on_bad=d.on_bad_file,
                                max_bad_fraction=d.max_bad_fraction, label_column=d.label_column,
                                group_columns=d.group_columns, progress=progress)

    def join(self, first: PairSet, second: PairSet) -> PairSet:
        return PairSet.join(first, second)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: PairSet | ShardSplit, holdout: PairSet,
                 spec: Any, progress: bool = True) -> Assembly:
        d = cfg.data
        seq_len = d.seq_len
        streamed = isinstance(train, ShardSplit)  # a shards folder: what needs the whole split was kept at shard time
        text_tower = str(cfg.encoders.get("text", {}).get("name", ""))
        if text_tower.startswith(HF_TOWER_PREFIX):  # a Hugging Face text tower reads with its own tokenizer
            folder = Path(text_tower.removeprefix(HF_TOWER_PREFIX)).expanduser()
            tokenizer = TextTokenizer.load(folder / TOKENIZER_FILE)
            if runtime.is_main and not (out / TOKENIZER_FILE).exists():
                tokenizer.save(out / TOKENIZER_FILE)
            seq_len = min(seq_len, _max_positions(folder))
        elif streamed:
            tokenizer = _stream_tokenizer(cfg, out, train.index, runtime, spec.tokenizer or "bpe")
        else:
            tokenizer = run_tokenizer(cfg, out, _Captions([c for cs in train.captions for c in cs]), runtime,
                                      spec.tokenizer or "bpe")
        mean, std = shard_stats(train.index, d.channels) if streamed else channel_stats(train.images)
        image_pre = {"modality": "image", "image_size": d.image_size, "channels": d.channels, "mean": mean, "std": std}
        text_pre = {"modality": "text", "tokenizer": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind,
                    "seq_len": seq_len}
        views = ImageViews(from_dict(ViewsConfig, {**PAIR_VIEWS, **cfg.views}, prefix="views."), d.image_size,
                           mean, std)
        batches: PairBatches | PairStreamBatches
        if streamed:
            index = train.index
            parts = StreamParts(index.shards("train"), ShardReader(index.counts(), d.on_bad_file),
                                DecodePairs(d.image_size, d.channels, d.on_bad_file, d.max_bad_fraction), sum,
                                collate_pairs, d.workers, d.shuffle_buffer)
            batches = PairStreamBatches(parts, views, tokenizer, seq_len, runtime.device, index.classes is not None,
                                        len(train))
            num_captions = int(index.settings.get("captions", 0))
        else:
            batches = PairBatches(train, views, tokenizer, seq_len, runtime.device)
            num_captions = int(batches.num_captions.sum())
        log.info("image–text: %d training pairs (%d captions%s), %d held out; vocabulary %d", len(train),
                 num_captions, ", streamed" if streamed else "", len(holdout), tokenizer.vocab_size)

        def monitor(rt: Runtime, encoder_of):
            if len(holdout) < 2:
                return None
            rows = torch.arange(min(len(holdout), cfg.train.knn_max_bank))

            def recall(method: nn.Module) -> dict[str, float]:
                img, txt = pair_embeddings(method, holdout, rows, lambda x: normalise(x, mean, std, d.image_size),
                                           tokenizer, seq_len, rt)
                found = retrieval_recall(img @ txt.T, (1, 5))
                return {f"heldout_{key}": value for key, value in found.items()}

            return recall

        return Assembly(
            batches,
            {"image": {"in_channels": d.channels, "image_size": d.image_size},
             "text": {"vocab_size": tokenizer.vocab_size, "max_len": seq_len}},
            {"image": image_pre, "text": text_pre}, dict(cfg.method), monitor,
            tower_files={"text": {TOKENIZER_FILE: lambda folder: tokenizer.save(folder / TOKENIZER_FILE)}},
        )

    # -- sharded sources ------------------------------------------------------------------------

    def write_shards(self, cfg: RunConfig, out: Path, shard_items: int, overwrite: bool, progress: bool = True,
                     tokenizer_kind: str | None = None) -> ShardSummary:
        """Images as image shards hold them (`image.write_image_samples`: a manifest's files checked at
        data.image_size under the bad-file rule, split as a run splits them and copied byte for byte; the
        built-in loaded as a run loads it and stored as PNG; channel statistics in the index), each sample
        with all its captions as text (KEY.captions.json). Then the captions' tokenizer — BPE, what pair
        methods read, trained on the training captions with `tokenizer.*` as a run trains it, or
        `tokenizer.path` — is saved as tokenizer.json, so that a streamed run need not read every caption
        before its first step."""
        check_no_tokenizer(tokenizer_kind, self.name)
        d = cfg.data
        source = str(d.source)
        if is_shard_folder(source):
            raise SelfsupError(f"{source}: already a shards folder; train on it with data.source={source}")
        listing: PairListing | None = None
        if source not in PAIR_BUILTINS:
            listing = list_pair_manifest(pair_manifest(source), d.text_field, d.label_column, d.group_columns)
        given = None if cfg.tokenizer.path is None else TextTokenizer.load(Path(cfg.tokenizer.path))

        def write(writers: dict[str, Any], folder: Path) -> dict[str, Any]:
            rows: Any
            if listing is not None:
                rows, captions = listing.files, listing.captions
            else:
                rows = self.load(cfg, progress)
                captions = rows.captions
            fields, train_rows = write_image_samples(writers, cfg, rows, progress,
                                                     lambda row: captions_member(captions[row]))
            train_captions = [caption for row in train_rows for caption in captions[row]]
            if given is not None:
                tokenizer = given
            else:
                log.info("training a %s tokenizer (vocab %d) on %d training captions", CAPTION_TOKENIZER,
                         cfg.tokenizer.vocab_size, len(train_captions))
                tokenizer = train_tokenizer(train_captions, CAPTION_TOKENIZER, cfg.tokenizer.vocab_size,
                                            cfg.tokenizer.min_frequency)
            tokenizer.save(folder / TOKENIZER_FILE)
            fields["settings"].update({"captions": len(train_captions), "tokenizer": TOKENIZER_FILE,
                                       "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size})
            return fields

        return write_shard_folder(out, overwrite, self.name, shard_items, source, write)

    def load_shards(self, cfg: RunConfig, index: ShardIndex, split: str, progress: bool = True) -> PairSet:
        images, rows = read_images(cfg, index, split, progress, besides=(CAPTIONS,), extra=sample_captions)
        return PairSet(images, rows.extras, rows.ids, rows.labels, rows.classes, rows.groups, index.source)

    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> Reader:
        raise SelfsupError("image–text pairs are read by each tower's own reader (its encoder.json names `image` or "
                           "`text`); pick the tower with --tower image|text")

    def contract_inputs(self) -> dict[str, int]:
        return dict(zip(IMAGE_INPUTS, (3, _SIZE)))

    def contract_tower_inputs(self) -> dict[str, dict[str, int]]:
        """Tiny inputs per tower modality (the contract test builds each tower from them)."""
        return {"image": dict(zip(IMAGE_INPUTS, (3, _SIZE))), "text": dict(zip(TEXT_INPUTS, (_VOCAB, _SEQ)))}

    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        B = batch_size
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(2, _SEQ + 1, (B,), generator=gen)
        ids = torch.randint(3, _VOCAB, (B, _SEQ), generator=gen)
        mask = torch.arange(_SEQ)[None, :] < lengths[:, None]
        ids[torch.arange(B), lengths - 1] = 1  # an end-of-text id at each caption's end
        ids[~mask] = 0
        return {"views": [torch.randn(B, 3, _SIZE, _SIZE, generator=gen)], "input_ids": ids, "attention_mask": mask,
                "id": [str(i) for i in range(B)], "index": torch.arange(B), "generator": torch.Generator().manual_seed(1)}
