"""Images: decoded once into memory at one resolution (uint8 [N, C, S, S]); views made on the device.

- data: a built-in name, a folder (class sub-folders become labels), a CSV/JSONL manifest or an
  .npz (`data/images.py` and `data/sources.py` decode them, naming any bad file);
- pretraining: batched views on the training device (`data/views.py`), the kNN monitor on the
  held-out split, the training images for data-fitted targets, and previews of reconstruction
  objectives (`previews.png`) after the last step;
- reading: images resized and normalised as `preprocess` says (grey first for encoders trained on
  lightness alone); features are `encoder.embed` of a whole image; positive pairs are two random
  crops of each image; a report shows a thumbnail grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from selfsup.config import RunConfig, from_dict
from selfsup.data.builtins import BUILTIN
from selfsup.data.decode import IMAGE_FILES, _BadFilePolicy, _decode, decode_image_bytes, pixel_limit_is_error
from selfsup.data.images import IMAGE_EXTENSIONS, MANIFEST_KINDS, ImageSet, load_image_source
from selfsup.data.pipeline import DecodeImages, ImageBatches, ImageStreamBatches, channel_stats, collate_images
from selfsup.data.shards import (Rows, ShardIndex, ShardReader, ShardSplit, ShardSummary, ShardWriter, StreamParts,
                                 channel_moments, channel_statistics, is_shard_folder, payload_member, read_rows,
                                 write_dataset, write_listed, write_shard_folder)
from selfsup.data.sources import FileListing, list_file_source
from selfsup.data.views import ImageViews, ViewsConfig, crop_flip_resize, normalise, sample_crop_boxes
from selfsup.encoders import IMAGE_INPUTS
from selfsup.errors import SelfsupError
from selfsup.modalities.base import (Assembly, EncoderBatch, FitData, Modality, Pairs, Reader, TaskInputs,
                                     check_no_tokenizer)
from selfsup.nn.colour import lightness_as_grey, rgb_to_lab
from selfsup.nn.knn import knn_accuracy
from selfsup.train.runtime import Runtime

PREVIEWS_FILE = "previews.png"  # reconstructions of held-out images, for the run's report
_NUM_PREVIEWS = 8
_SCALE = 3  # 32 px images are too small to judge at 1:1
_LABEL_WIDTH = 110


def prepare_images(images: Tensor, preprocess: dict[str, Any]) -> Tensor:
    """uint8 images [B, C, H, W] -> the encoder's input, as `encoder.json`'s preprocess says: resized,
    normalised, and for encoders trained on lightness alone (colourisation) made grey first."""
    if preprocess.get("input_transform") == "grey":
        images = (lightness_as_grey(rgb_to_lab(images.float() / 255)) * 255).round().to(torch.uint8)
    return normalise(images, preprocess["mean"], preprocess["std"], preprocess["image_size"])


def raw_pixels(images: Tensor) -> Tensor:
    """The raw-pixel baseline: flattened images scaled to [0, 1], [N, C*H*W]."""
    return images.flatten(1).float() / 255


class ImageTaskInputs(TaskInputs):
    batch_size = 256

    def __init__(self, data: ImageSet, rows: Tensor, preprocess: dict[str, Any]):
        self.rows, self.preprocess = rows, preprocess
        self.images = data.images[rows]
        self.labels = None if data.labels is None else data.labels[rows]

    def batch(self, index: Tensor, device: torch.device) -> EncoderBatch:
        return EncoderBatch((prepare_images(self.images[index].to(device), self.preprocess),), len(index))


class ImageReader(Reader):
    modality = "image"

    def task_inputs(self, data: ImageSet, rows: Tensor, chunks: int = 1) -> ImageTaskInputs:
        return ImageTaskInputs(data, rows, self.preprocess)

    @torch.no_grad()
    def positive_pairs(self, encoder: nn.Module, data: ImageSet, inputs: TaskInputs, rows: Tensor, runtime: Runtime,
                       generator: torch.Generator) -> Pairs:
        views: list[list[Tensor]] = [[], []]
        for start in range(0, len(rows), 256):
            images = data.images[rows[start : start + 256]]  # uint8 [B, C, H, W]
            B, C, H, W = images.shape
            for v in range(2):
                boxes = sample_crop_boxes(B, H, W, (0.5, 1.0), (3 / 4, 4 / 3), generator)
                crops = crop_flip_resize(images.float(), boxes, torch.zeros(B), H).round().clamp(0, 255).to(torch.uint8)
                with runtime.autocast():
                    views[v].append(encoder.embed(prepare_images(crops.to(runtime.device), self.preprocess)).float().cpu())
        if not views[0]:
            return Pairs(None, None, "no images")
        return Pairs(torch.cat(views[0]), torch.cat(views[1]), "two random crops (scale 0.5-1) of each image")

    def raw_features(self, data: ImageSet, rows: Tensor) -> Tensor:
        return raw_pixels(data.images[rows])

    def examples(self, data: ImageSet, rows: Tensor) -> dict[str, Any]:
        return {"thumbnail": grid_image([("nearest centre", data.images[rows].float() / 255)])}


class ImageModality(Modality):
    name = "image"
    batch_kind = "views"
    default_source = "mnist"
    unit = "images"

    def load(self, cfg: RunConfig, progress: bool = True) -> ImageSet:
        d = cfg.data
        if is_shard_folder(d.source):  # written by `data shard`: both splits, read into memory
            return self.load_shard_folder(cfg, progress)
        return load_image_source(d.source, d.image_size, d.channels, on_bad=d.on_bad_file,
                                 max_bad_fraction=d.max_bad_fraction, label_column=d.label_column,
                                 group_columns=d.group_columns, progress=progress)

    def join(self, first: ImageSet, second: ImageSet) -> ImageSet:
        groups = {g: list(first.groups[g]) + list(second.groups.get(g, [""] * len(second))) for g in first.groups}
        labels = None if first.labels is None else torch.cat([first.labels, second.labels])
        return ImageSet(images=torch.cat([first.images, second.images]), ids=first.ids + second.ids, labels=labels,
                        classes=first.classes, groups=groups, source=first.source)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: ImageSet | ShardSplit, holdout: ImageSet,
                 spec: Any, progress: bool = True) -> Assembly:
        d = cfg.data
        vc = from_dict(ViewsConfig, cfg.views, prefix="views.")
        if isinstance(train, ShardSplit):  # a shards folder, streamed: what needs the whole split was kept at shard time
            index = train.index
            mean, std = shard_stats(index, d.channels)
            views = ImageViews(vc, d.image_size, mean, std)
            parts = StreamParts(index.shards("train"), ShardReader(index.counts(), d.on_bad_file),
                                DecodeImages(d.image_size, d.channels, d.on_bad_file, d.max_bad_fraction), sum,
                                collate_images, d.workers, d.shuffle_buffer)
            batches: Any = ImageStreamBatches(parts, views, runtime.device, index.classes is not None, len(train))
            fit_items = (self._first(cfg, index, FIT_ITEMS, labelled=False).images
                         if getattr(spec.cls, "fits_targets", False) else None)

            def bank() -> Any:  # the kNN bank: the first labelled training images, read when the monitor is made
                if index.classes is None or holdout.labels is None or len(holdout) == 0:
                    return train  # no labels: no monitor
                return self._first(cfg, index, cfg.train.knn_max_bank, labelled=True)
        else:
            mean, std = channel_stats(train.images)
            views = ImageViews(vc, d.image_size, mean, std)
            batches = ImageBatches(train, views, runtime.device)
            fit_items = train.images

            def bank() -> Any:
                return train
        preprocess = {"modality": self.name, "image_size": d.image_size, "channels": d.channels, "mean": mean, "std": std}
        if spec.input_transform is not None:
            preprocess["input_transform"] = spec.input_transform
        fit_data = None if fit_items is None else FitData(fit_items, lambda x: normalise(x, mean, std, d.image_size),
                                                          runtime.device)

        def after_training(method: nn.Module, rt: Runtime, folder: Path) -> None:
            if len(holdout):
                save_previews(method, holdout, preprocess, rt, folder / PREVIEWS_FILE, cfg.seed)

        return Assembly(
            batches,
            {self.name: {"in_channels": d.channels, "image_size": d.image_size}},
            {self.name: preprocess}, dict(cfg.method),
            lambda rt, encoder_of: knn_monitor(bank(), holdout, preprocess, rt, cfg.train.knn_max_bank, cfg.probe.knn_k,
                                               cfg.seed, encoder_of),
            fit_data=fit_data, after_training=after_training,
        )

    # -- sharded sources ------------------------------------------------------------------------

    def write_shards(self, cfg: RunConfig, out: Path, shard_items: int, overwrite: bool, progress: bool = True,
                     tokenizer_kind: str | None = None) -> ShardSummary:
        """Folders and manifests: every file checked (decoded at data.image_size) under the bad-file
        rule, the kept files split as a run splits them and copied byte for byte; built-ins and .npz:
        loaded as a run loads them (at data.image_size and data.channels) and stored as PNG. The
        training split's channel statistics (both RGB and grey) go into the index."""
        check_no_tokenizer(tokenizer_kind, self.name)
        listing = _image_listing(cfg)

        def write(writers: dict[str, Any], folder: Path) -> dict[str, Any]:
            fields, _ = write_image_samples(writers, cfg, listing if listing is not None else self.load(cfg, progress),
                                            progress)
            return fields

        return write_shard_folder(out, overwrite, self.name, shard_items, str(cfg.data.source), write)

    def load_shards(self, cfg: RunConfig, index: ShardIndex, split: str, progress: bool = True) -> ImageSet:
        return self._first(cfg, index, None, labelled=False, split=split, progress=progress)

    def _first(self, cfg: RunConfig, index: ShardIndex, limit: int | None, labelled: bool, split: str = "train",
               progress: bool = False) -> ImageSet:
        """The first `limit` images of a split of a shards folder (all with None; only labelled ones with
        `labelled`), decoded as a run decodes them."""
        images, rows = read_images(cfg, index, split, progress, limit, labelled)
        return ImageSet(images=images, ids=rows.ids, labels=rows.labels, classes=rows.classes, groups=rows.groups,
                        source=index.source)

    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> ImageReader:
        return ImageReader(preprocess)

    def contract_inputs(self) -> dict[str, int]:
        return dict(zip(IMAGE_INPUTS, (3, 16)))

    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        B, C, S = batch_size, 3, 16
        gen = torch.Generator().manual_seed(0)
        return {"views": [torch.randn(B, C, S, S, generator=gen) for _ in range(2)], "id": [str(i) for i in range(B)],
                "generator": torch.Generator().manual_seed(1), "pixel_mean": torch.full((C,), 0.5),
                "pixel_std": torch.full((C,), 0.25)}

    def contract_fit_data(self) -> FitData:
        images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        return FitData(images, lambda x: (x.float() / 255 - 0.5) / 0.25, torch.device("cpu"))


FIT_ITEMS = 8192  # a streamed run fits data-fitted targets (BEiT, colourisation) on this many first training images


def write_image_samples(writers: dict[str, ShardWriter], cfg: RunConfig, source: FileListing | Any, progress: bool,
                        members: Callable[[int], dict[str, bytes]] | None = None) -> tuple[dict[str, Any], list[int]]:
    """Writes a source's images into the writers of both splits, as `data shard` stores images (shared by
    images and image–text pairs): a listed folder or manifest (`FileListing`) has every file checked
    (decoded at data.image_size) under the bad-file rule, split as a run splits it and copied byte for
    byte (`shards.write_listed`); a dataset loaded in memory (a built-in, an .npz) is split alike and
    stored as PNG (`shards.write_dataset`). `members(row)` adds members to each row's sample (image–text:
    its captions). Returns the index's fields, with the training split's channel statistics (RGB and
    grey) as settings {"stats"}, and the training rows in source order as rows of `source` (listing
    items or dataset rows), for what else a modality fits on the training split (a tokenizer)."""
    d = cfg.data
    if isinstance(source, FileListing):
        moments = np.zeros((len(source.items), 13))  # per kept image: the sums its statistics are made of
        kept: list[int] = []

        def checked(number: int, pixels: np.ndarray) -> None:
            moments[number] = channel_moments(pixels[None])[0]

        with pixel_limit_is_error():
            fields = write_listed(writers, source, lambda path: _decode(path, d.image_size, 3),
                                  _BadFilePolicy(d.on_bad_file, d.max_bad_fraction), IMAGE_FILES, d.holdout_fraction,
                                  cfg.seed, progress, checked=checked, after_check=kept.extend, members=members)
        train_rows = fields.pop("train_rows")
        train_moments = moments[train_rows]
        source_rows = [kept[i] for i in train_rows]
    else:
        fields = write_dataset(writers, source, lambda i: {"png": png_bytes(source.images[i]),
                                                           **(members(i) if members is not None else {})},
                               d.holdout_fraction, cfg.seed, progress)
        source_rows = train_rows = fields.pop("train_rows")
        train_moments = np.concatenate([np.zeros((0, 13))] + [
            channel_moments(source.images[train_rows[i : i + 1024]].numpy()) for i in range(0, len(train_rows), 1024)])
    if not train_rows:
        raise SelfsupError(f"{d.source}: the training split is empty (data.holdout_fraction={d.holdout_fraction}); "
                           "add images or hold out fewer")
    stats = {"image_size": d.image_size, "images": len(train_rows), **channel_statistics(train_moments)}
    return {**fields, "seed": cfg.seed, "holdout_fraction": d.holdout_fraction, "label_column": d.label_column,
            "settings": {"stats": stats}}, source_rows


def read_images(cfg: RunConfig, index: ShardIndex, split: str, progress: bool, limit: int | None = None,
                labelled: bool = False, besides: tuple[str, ...] = (),
                extra: Callable[[str, dict[str, bytes]], Any] | None = None) -> tuple[Tensor, Rows]:
    """(uint8 images [N, C, S, S], their rows) of the first `limit` samples of a split of a shards folder
    (all with None; only labelled ones with `labelled`), decoded as a run decodes them, under the
    bad-file rule; `besides` and `extra` as `shards.payload_member` and `shards.read_rows` take them
    (image–text: the captions member, read beside each image)."""
    d = cfg.data
    with pixel_limit_is_error():
        rows = read_rows(index, split, payload_member(IMAGE_EXTENSIONS, "image", besides),
                         lambda data: decode_image_bytes(data, d.image_size, d.channels),
                         _BadFilePolicy(d.on_bad_file, d.max_bad_fraction), IMAGE_FILES, progress, limit, labelled,
                         extra)
    images = (torch.from_numpy(np.stack(rows.values)) if rows.values else
              torch.zeros((0, d.channels, d.image_size, d.image_size), dtype=torch.uint8))
    return images, rows


def shard_stats(index: ShardIndex, channels: int) -> tuple[list[float], list[float]]:
    """The training split's channel mean and std kept in a shards folder's index, for `channels`."""
    try:
        stats = index.settings["stats"]["grey" if channels == 1 else "rgb"]
        return [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
    except (KeyError, TypeError) as err:
        raise SelfsupError(f"{index.folder}: its index holds no channel statistics ({err}); write it again with "
                           "`selfsup data shard`") from None


def _image_listing(cfg: RunConfig) -> FileListing | None:
    """The files of a folder or manifest source, listed (not read); None for a built-in or an .npz,
    which `load` reads into memory as a run does."""
    d = cfg.data
    source = str(d.source)
    if is_shard_folder(source):
        raise SelfsupError(f"{source}: already a shards folder; train on it with data.source={source}")
    if source in BUILTIN:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return list_file_source(path, IMAGE_EXTENSIONS, "image files")
    if path.is_file() and path.suffix.lower() in MANIFEST_KINDS:
        return list_file_source(path, IMAGE_EXTENSIONS, "images", d.label_column, d.group_columns)
    return None


def png_bytes(image: Tensor) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as a PNG file's bytes."""
    import io

    array = image.numpy()
    picture = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def knn_monitor(train: ImageSet, holdout: ImageSet, preprocess: dict[str, Any], runtime: Runtime,
                max_bank: int, k: int, seed: int,
                encoder_of: Callable[[nn.Module], nn.Module] = lambda method: method.encoder):
    """kNN accuracy of the current encoder (`encoder_of(method)`) on the held-out split (None when
    the data have no labels)."""
    if train.labels is None or holdout.labels is None or len(holdout) == 0:
        return None
    labelled = torch.nonzero(train.labels >= 0).flatten()
    gen = torch.Generator().manual_seed(seed)
    bank = labelled[torch.randperm(len(labelled), generator=gen)[:max_bank]]
    queries = torch.nonzero(holdout.labels >= 0).flatten()
    if len(bank) == 0 or len(queries) == 0:
        return None
    reader = ImageReader(preprocess)

    def monitor(method: nn.Module) -> dict[str, float]:
        fx = reader.features(encoder_of(method), train, bank, runtime)
        fq = reader.features(encoder_of(method), holdout, queries, runtime)
        return {"knn_acc": knn_accuracy(fx, train.labels[bank], fq, holdout.labels[queries], k=k)}

    return monitor


def save_previews(method: nn.Module, holdout: ImageSet, preprocess: dict[str, Any], runtime: Runtime, path: Path,
                  seed: int) -> bool:
    """Writes `path` when the method has a `preview(rgb, mean, std, generator) -> [(title, images in
    [0, 1]), ...]` hook (reconstruction objectives); returns whether it did. The method's rows go
    above the original images."""
    preview = getattr(method, "preview", None)
    if preview is None:
        return False
    images = holdout.images[:_NUM_PREVIEWS].to(runtime.device)
    size = preprocess["image_size"]
    rgb = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False) if images.shape[-1] != size else images.float() / 255
    mean = torch.tensor(preprocess["mean"], device=runtime.device)
    std = torch.tensor(preprocess["std"], device=runtime.device)
    was_training = method.training
    method.eval()
    try:
        rows = preview(rgb, mean, std, torch.Generator(device=runtime.device).manual_seed(seed))
    finally:
        method.train(was_training)
    grid_image([*rows, ("original", rgb)]).save(path)
    return True


def grid_image(rows: list[tuple[str, Tensor]]) -> Image.Image:
    """A labelled grid: one row per (title, images [B, C, H, W] in [0, 1])."""
    B, C, H, W = rows[0][1].shape
    cell_h, cell_w = H * _SCALE, W * _SCALE
    canvas = Image.new("RGB", (_LABEL_WIDTH + B * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images) in enumerate(rows):
        top = r * (cell_h + 2)
        draw.text((4, top + cell_h // 2 - 6), title, fill="black")
        pixels = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        for i in range(B):
            tile = Image.fromarray(np.ascontiguousarray(pixels[i].permute(1, 2, 0).numpy()))
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (_LABEL_WIDTH + i * (cell_w + 2), top))
    return canvas
