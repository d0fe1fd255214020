"""Image–text pairs: images held in memory as `ImageSet` holds them, each with one or more captions.

Sources:
- the `emoji` built-in: each emoji's picture with its CLDR name as the caption ("grinning face",
  "waving hand: medium skin tone"), labelled by CLDR group with `subgroup` and `skin_tone` groups;
- a .csv or .jsonl manifest with an image column (`image`, else `path`) and a caption column
  (`data.text_field` when the manifest has it, else `caption`, else `text`). Several rows naming the
  same image give it several captions (a JSONL cell may also hold a list of them); one is drawn per
  step. Labels and group columns come from an image's first row. Every image rule of
  `data/sources.py` applies (paths stay inside the manifest's folder, bad files are named or skipped
  under `data.on_bad_file=skip`), and an empty caption is an error naming its line.

`PairSet` offers both faces the rest of selfsup reads: `images` (what an image tower's reader
embeds) and `texts` (each image's first caption: what a text tower's reader embeds), so either
tower of a CLIP run can be probed, adapted and audited on the run's own data.

Sharded (`selfsup data shard --modality image_text`): a sample is an image's member as image shards
hold it (the file's own bytes, or PNG for the built-in), `KEY.captions.json` (all its captions, a JSON
list: text, tokenized by the run) and `KEY.json`; `DecodePairs` decodes one in a stream's worker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from selfsup.data.decode import _BadFilePolicy, _decode_all, check_bad_file_settings
from selfsup.data.pipeline import DecodeImages, collate_images
from selfsup.data.sources import FileListing, _cell, _manifest_labels, _read_manifest_rows, manifest_listing
from selfsup.data.shards import json_member
from selfsup.errors import SelfsupError

PAIR_BUILTINS = ("emoji",)
CAPTION_COLUMNS = ("caption", "text")  # tried after data.text_field
IMAGE_COLUMNS = ("image", "path")


@dataclass
class PairSet:
    """Images uint8 [N, C, S, S], each with its captions (one or more), labels and subgroups."""

    images: torch.Tensor
    captions: list[tuple[str, ...]]
    ids: list[str]
    labels: torch.Tensor | None
    classes: list[str] | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    num_skipped: int = 0

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.captions) == len(self.ids), (len(self.images), len(self.captions))
        assert all(self.captions), "every image has at least one caption"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def texts(self) -> list[str]:
        """Each image's first caption: what a text encoder reads of a row."""
        return [captions[0] for captions in self.captions]

    def subset(self, index: torch.Tensor | list[int]) -> PairSet:
        """The rows at `index`, in the order given (a boolean mask selects rows in order)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        rows = index.tolist()
        return PairSet(images=self.images[index], captions=[self.captions[i] for i in rows],
                       ids=[self.ids[i] for i in rows], labels=None if self.labels is None else self.labels[index],
                       classes=self.classes, groups={g: [v[i] for i in rows] for g, v in self.groups.items()},
                       source=self.source, num_skipped=self.num_skipped)

    @staticmethod
    def join(first: PairSet, second: PairSet) -> PairSet:
        """`first`'s rows, then `second`'s (a source's two splits as one)."""
        groups = {g: list(first.groups[g]) + list(second.groups.get(g, [""] * len(second))) for g in first.groups}
        labels = None if first.labels is None else torch.cat([first.labels, second.labels])
        return PairSet(torch.cat([first.images, second.images]), first.captions + second.captions,
                       first.ids + second.ids, labels, first.classes, groups, first.source,
                       first.num_skipped + second.num_skipped)


def load_pair_source(source: str | Path, image_size: int, channels: int = 3, *, text_field: str = "text",
                     on_bad: str = "error", max_bad_fraction: float = 0.01, label_column: str = "label",
                     group_columns: list[str] | None = None, progress: bool = False) -> PairSet:
    """Every image–caption pair a source names (module docstring): a built-in or a manifest."""
    source = os.fspath(source)
    check_bad_file_settings(on_bad, max_bad_fraction)
    if source in PAIR_BUILTINS:
        return load_emoji_pairs(image_size, channels, label_column)
    listing = list_pair_manifest(pair_manifest(source), text_field, label_column, group_columns)
    kept, pixels, bad = _decode_all(listing.files.items, image_size, channels, _BadFilePolicy(on_bad, max_bad_fraction),
                                    progress)
    ids, labels, classes, groups = listing.files.rows(kept)
    return PairSet(torch.from_numpy(pixels), [listing.captions[i] for i in kept], ids, labels, classes, groups,
                   listing.files.source, len(bad))


def pair_manifest(source: str) -> Path:
    """The manifest a pair source that is not a built-in names; an error saying what a pair source is
    when it names a folder, another file or nothing."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return path
    what = "a folder" if path.is_dir() else ("a file" if path.is_file() else "nothing")
    raise SelfsupError(f"image–text data: {source} is {what}; give a built-in ({', '.join(PAIR_BUILTINS)}) or a "
                       f".csv/.jsonl manifest with an `image` (or `path`) column and a `caption` (or `text`) column")


def load_emoji_pairs(image_size: int, channels: int = 3, label_column: str = "label") -> PairSet:
    """The emoji built-in with each emoji's CLDR name as its caption."""
    from selfsup.data.builtins.emoji import MANIFEST, emoji_dir, load_emoji  # builtins import data modules lazily

    images = load_emoji(image_size, channels)
    rows, columns = _read_manifest_rows(emoji_dir() / MANIFEST)
    names = {_cell(row, "path"): _cell(row, "name") for _, row in rows}
    missing = [i for i in images.ids if not names.get(i)]
    if missing:
        raise SelfsupError(f"{emoji_dir() / MANIFEST}: no name for {missing[0]} (and {len(missing) - 1} more); "
                           "prepare it again: selfsup data prepare emoji --force")
    labels, classes = images.labels, images.classes
    if label_column != "label":
        if label_column not in columns:
            raise SelfsupError(f"emoji has no column {label_column!r} to label by; its columns are {', '.join(columns)}")
        by_path = {_cell(row, "path"): row for _, row in rows}
        labels, classes = _manifest_labels([(0, by_path[i]) for i in images.ids], columns, label_column)
    return PairSet(images.images, [(names[i],) for i in images.ids], images.ids, labels, classes, images.groups,
                   "builtin:emoji")


@dataclass
class PairListing:
    """A pair manifest's images, listed and not read (`files`: one row per distinct image, with its
    id, label and groups from the image's first manifest row), and each listed image's captions."""

    files: FileListing
    captions: list[tuple[str, ...]]


def list_pair_manifest(manifest: Path, text_field: str = "text", label_column: str = "label",
                       group_columns: list[str] | None = None) -> PairListing:
    """The images a .csv/.jsonl manifest names with their captions (module docstring), before any image
    is read: what a run decodes (`load_pair_source`) and what `data shard` checks and copies."""
    rows, columns = _read_manifest_rows(manifest, required=None)
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_column = next((c for c in (text_field, *CAPTION_COLUMNS) if c in columns), None)
    if image_column is None or caption_column is None:
        raise SelfsupError(f"{manifest}: image–text pairs need an image column ({' or '.join(IMAGE_COLUMNS)}) and a "
                           f"caption column ({' or '.join(dict.fromkeys((text_field, *CAPTION_COLUMNS)))}); "
                           f"columns are: {', '.join(columns) or '(none)'}")
    if not rows:
        raise SelfsupError(f"{manifest}: the manifest lists no image–caption pairs")
    first_row: dict[str, int] = {}  # the file an image cell names -> index into `images`
    images: list[tuple[int, dict]] = []
    captions: list[list[str]] = []
    for line_number, row in rows:
        written = _cell(row, image_column)
        texts = _captions(row.get(caption_column), f"{manifest}:{line_number}", caption_column)
        # the same file however it is written ("img/a.png", "./img/a.png", its absolute path) is one image
        key = os.path.normpath(manifest.parent.resolve() / written) if written else ""
        if key in first_row:
            captions[first_row[key]].extend(texts)
            continue
        first_row[key] = len(images)
        images.append((line_number, {**row, "path": written}))
        captions.append(texts)
    files = manifest_listing(manifest, images, columns, label_column, group_columns)
    return PairListing(files, [tuple(texts) for texts in captions])


def _captions(value: object, where: str, column: str) -> list[str]:
    """A cell's captions: a string, or (JSONL) a list of strings; an empty one is an error naming the line."""
    values = value if isinstance(value, list) else [value]
    texts = []
    for item in values:
        if item is not None and not isinstance(item, str):
            raise SelfsupError(f"{where}: `{column}` must be text or a list of texts, got {type(item).__name__}")
        text = " ".join((item or "").split())
        if not text:
            raise SelfsupError(f"{where}: empty `{column}`; every image needs a caption (drop the row or write one)")
        texts.append(text)
    if not texts:
        raise SelfsupError(f"{where}: `{column}` is an empty list; every image needs a caption")
    return texts


# ---- shards (`selfsup data shard --modality image_text`, data/shards.py) --------------------------

CAPTIONS = "captions.json"  # a pair sample's captions member: KEY.captions.json, a JSON list of strings


def captions_member(captions: tuple[str, ...] | list[str]) -> dict[str, bytes]:
    """An image's captions as a sample's member {"captions.json": a JSON list, UTF-8}: every caption, in
    the source's order (a run draws one per step; probes read the first)."""
    return {CAPTIONS: json.dumps(list(captions), ensure_ascii=False).encode("utf-8")}


def sample_captions(key: str, files: dict[str, bytes]) -> tuple[str, ...]:
    """A pair sample's captions (KEY.captions.json); an error naming the sample when the member is
    missing or is not a non-empty list of non-empty strings (a damaged or foreign shard: no caption
    can be made up, so it is never skipped as a bad image is)."""
    value = json_member(key, files, CAPTIONS, "its captions")
    raw = files[CAPTIONS]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise SelfsupError(f"{key}.{CAPTIONS}: expected a non-empty list of captions, got {raw[:120]!r}; write the "
                           "shard again with `selfsup data shard`")
    return tuple(value)


@dataclass(frozen=True)
class DecodePairs(DecodeImages):
    """A stream's `to_items` for image–text pairs (runs in a DataLoader worker): each sample's image
    decoded as `DecodeImages` decodes it (bad images named, or skipped and counted) and its captions
    -> (uint8 [C, S, S], id, label, captions). Captions stay text: the training process tokenizes the
    one it draws per step with the run's tokenizer."""

    besides: ClassVar[tuple[str, ...]] = (CAPTIONS,)

    def item(self, image: torch.Tensor, key: str, files: dict[str, bytes],
             meta: dict[str, Any]) -> tuple[torch.Tensor, str, int, tuple[str, ...]]:
        return image, meta["id"], int(meta["label"]), sample_captions(key, files)


def collate_pairs(items: list[tuple[torch.Tensor, str, int, tuple[str, ...]]]
                  ) -> tuple[torch.Tensor, list[str], torch.Tensor, list[tuple[str, ...]]]:
    """(uint8 [B, C, S, S], ids, labels int64 [B], captions per image) of a micro-batch of pairs."""
    images, ids, labels = collate_images([item[:3] for item in items])
    return images, ids, labels, [item[3] for item in items]
