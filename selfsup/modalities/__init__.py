"""The registry of modalities: one module each (base.py says what a modality owns), one line here.

Adding a modality: write `selfsup/modalities/<name>.py` with a `Modality` subclass (data, pretraining
assembly, a `Reader` for frozen features and task inputs, a contract batch) and add its line to
`MODALITIES`; an encoder that reads it declares `modality="<name>"` and its `inputs` in the encoder
registry. Tests register a toy modality the same way (tests/modalities/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfsup.errors import SelfsupError
from selfsup.modalities.audio import AudioModality
from selfsup.modalities.base import Modality, Reader
from selfsup.modalities.image import ImageModality
from selfsup.modalities.image_text import ImageTextModality
from selfsup.modalities.text import TextModality

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


def load_splits(cfg: Any, progress: bool = True) -> tuple[Any, Any]:
    """(train, holdout) of a run config's data: the same split for pretraining, probes and adapt."""
    modality = run_modality(cfg)
    return modality.split(modality.load(cfg, progress), cfg.data.holdout_fraction, cfg.seed)


def load_reader(meta: dict[str, Any], folder: Path | None, where: str = "encoder.json") -> Reader:
    """How the encoder `meta` describes reads its data (its tokenizer is read from `folder`)."""
    modality = modality_of(meta, where)
    return modality.reader({**meta["preprocess"], "modality": modality.name}, folder)


__all__ = ["MODALITIES", "Modality", "Reader", "get_modality", "load_reader", "load_splits", "modality_of", "run_modality"]
