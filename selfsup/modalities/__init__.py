"""The registry of modalities: one module each (base.py says what a modality owns), one line here.

Adding a modality: write `selfsup/modalities/<name>.py` with a `Modality` subclass (data, pretraining
assembly, a `Reader` for frozen features and task inputs, a contract batch) and add its line to
`MODALITIES`; an encoder that reads it declares `modality="<name>"` and its `inputs` in the encoder
registry. Tests register a toy modality the same way (tests/modalities/).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selfsup.data.shards import ShardSplit, is_shard_folder, load_index
from selfsup.errors import SelfsupError
from selfsup.modalities.audio import AudioModality
from selfsup.modalities.base import Modality, Reader
from selfsup.modalities.image import ImageModality
from selfsup.modalities.image_text import ImageTextModality
from selfsup.modalities.text import TextModality

log = logging.getLogger("selfsup")

MODALITIES: dict[str, Modality] = {
    "image": ImageModality(),
    "text": TextModality(),
    "audio": AudioModality(),
    "image_text": ImageTextModality(),
}


def get_modality(name: object, where: str = "") -> Modality:
    """The registered modality `name`; an error naming `where` it was read from when it is unknown."""
    if not isinstance(name, str) or name not in MODALITIES:
        place = f"{where}: " if where else ""
        raise SelfsupError(f"{place}unknown modality {name!r}; selfsup knows {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name]


def modality_of(meta: dict[str, Any], where: str = "encoder.json") -> Modality:
    """The modality an encoder description (`encoder.json`, `task.json`) records in its preprocess.

    Image runs written before the modality was recorded carry none; theirs is the one their
    encoder's registry entry declares (an inference from the architecture, never a default).
    """
    preprocess = meta.get("preprocess")
    if not isinstance(preprocess, dict):
        raise SelfsupError(f"{where}: no `preprocess` section, so it does not say how its inputs are made")
    name = preprocess.get("modality")
    if name is None:
        from selfsup.encoders import ENCODERS

        encoder = (meta.get("encoder") or {}).get("name")
        if encoder not in ENCODERS:
            raise SelfsupError(f"{where}: records no modality (preprocess.modality) and its encoder "
                               f"{encoder!r} does not imply one")
        name = ENCODERS[encoder].modality
    return get_modality(name, where)


def run_modality(cfg: Any) -> Modality:
    """The modality of a run config's data (`data.modality`, the method's unless set)."""
    return get_modality(cfg.data.modality, "data.modality")


def load_splits(cfg: Any, progress: bool = True, stream: bool = False) -> tuple[Any, Any]:
    """(train, holdout) of a run config's data: the same split for pretraining, probes and adapt.

    A shards folder (`selfsup data shard`) holds its split already: the held-out split is read into
    memory; the training split too, unless `stream` (pretraining), where it stays a `ShardSplit` that
    the modality's assembly streams. Its split was made when it was written (its seed and holdout
    fraction); a run whose own differ is told so and uses the folder's."""
    modality = run_modality(cfg)
    if is_shard_folder(cfg.data.source):
        return _shard_splits(modality, cfg, progress, stream)
    return modality.split(modality.load(cfg, progress), cfg.data.holdout_fraction, cfg.seed)


def _shard_splits(modality: Modality, cfg: Any, progress: bool, stream: bool) -> tuple[Any, Any]:
    index = load_index(Path(cfg.data.source))
    if index.modality != modality.name:
        raise SelfsupError(f"{index.folder}: holds {index.modality} shards, but this run reads {modality.name} "
                           f"(data.modality); set data.modality={index.modality} with a method for it, or shard the "
                           f"{modality.name} source")
    made = {"seed": index.meta.get("seed"), "holdout_fraction": index.meta.get("holdout_fraction")}
    asked = {"seed": cfg.seed, "holdout_fraction": cfg.data.holdout_fraction}
    if made != asked:
        log.info("%s: its split was made at shard time (%s), not with this run's (%s)", index.folder,
                 ", ".join(f"{k}={v}" for k, v in made.items()), ", ".join(f"{k}={v}" for k, v in asked.items()))
    holdout = modality.load_shards(cfg, index, "holdout", progress)
    train = ShardSplit(index) if stream else modality.load_shards(cfg, index, "train", progress)
    return train, holdout


def load_reader(meta: dict[str, Any], folder: Path | None, where: str = "encoder.json") -> Reader:
    """How the encoder `meta` describes reads its data (its tokenizer is read from `folder`)."""
    modality = modality_of(meta, where)
    return modality.reader({**meta["preprocess"], "modality": modality.name}, folder)


__all__ = ["MODALITIES", "Modality", "Reader", "get_modality", "load_reader", "load_splits", "modality_of", "run_modality"]
