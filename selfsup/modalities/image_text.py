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
  encoder.json names `image` or `text`), and `PairSet` offers `images` and `texts` to those readers.

Methods that train on pairs (`inputs="pairs"`) offer `embed_images(views) -> [B, E]` and
`embed_texts(input_ids, attention_mask) -> [B, E]`, unit-normalised in a shared space: the monitor
and zero-shot classification use them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import HF_TOWER_PREFIX, RunConfig, from_dict
from selfsup.data.pairs import PairSet, load_pair_source
from selfsup.data.pipeline import channel_stats
from selfsup.data.tokenizer import TextTokenizer
from selfsup.data.views import ImageViews, ViewsConfig, normalise
from selfsup.encoders import IMAGE_INPUTS, TEXT_INPUTS
from selfsup.errors import SelfsupError
from selfsup.modalities.base import Assembly, Modality, Reader
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
        views = self.views(images, generator)
        # which caption of each image: drawn after the views, from the step's generator
        draw = torch.rand(len(indices), generator=generator, device=generator.device).cpu()  # [B]
        pick = (draw * self.num_captions[indices]).long().clamp_max(self.num_captions[indices] - 1)  # [B]
        rows = self.first_caption[indices] + pick
        mask = self.mask[rows]
        width = int(mask.sum(dim=1).max())  # trim the batch's common padding
        batch: dict[str, Any] = {
            "views": views, "input_ids": self.ids[rows, :width].to(self.device),
            "attention_mask": mask[:, :width].to(self.device), "caption": pick, "generator": generator,
            "id": [self.data.ids[i] for i in indices.tolist()], "index": indices,
        }
        if self.data.labels is not None:
            batch["label"] = self.data.labels[indices].to(self.device)
        return batch


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
        return load_pair_source(d.source, d.image_size, d.channels, text_field=d.text_field, on_bad=d.on_bad_file,
                                max_bad_fraction=d.max_bad_fraction, label_column=d.label_column,
                                group_columns=d.group_columns, progress=progress)

    def join(self, first: PairSet, second: PairSet) -> PairSet:
        return PairSet.join(first, second)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: PairSet, holdout: PairSet, spec: Any,
                 progress: bool = True) -> Assembly:
        d = cfg.data
        seq_len = d.seq_len
        text_tower = str(cfg.encoders.get("text", {}).get("name", ""))
        if text_tower.startswith(HF_TOWER_PREFIX):  # a Hugging Face text tower reads with its own tokenizer
            folder = Path(text_tower.removeprefix(HF_TOWER_PREFIX)).expanduser()
            tokenizer = TextTokenizer.load(folder / TOKENIZER_FILE)
            if runtime.is_main and not (out / TOKENIZER_FILE).exists():
                tokenizer.save(out / TOKENIZER_FILE)
            seq_len = min(seq_len, _max_positions(folder))
        else:
            tokenizer = run_tokenizer(cfg, out, _Captions([c for cs in train.captions for c in cs]), runtime,
                                      spec.tokenizer or "bpe")
        mean, std = channel_stats(train.images)
        image_pre = {"modality": "image", "image_size": d.image_size, "channels": d.channels, "mean": mean, "std": std}
        text_pre = {"modality": "text", "tokenizer": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind,
                    "seq_len": seq_len}
        views = ImageViews(from_dict(ViewsConfig, {**PAIR_VIEWS, **cfg.views}, prefix="views."), d.image_size,
                           mean, std)
        batches = PairBatches(train, views, tokenizer, seq_len, runtime.device)
        log.info("image–text: %d training pairs (%d captions), %d held out; vocabulary %d", len(train),
                 int(batches.num_captions.sum()), len(holdout), tokenizer.vocab_size)

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
