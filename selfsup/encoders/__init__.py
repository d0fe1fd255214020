"""Image, text and audio encoders by name: the registry, config resolution, building and a JSON description.

Every encoder follows the Encoder contract (DESIGN.md, "Contracts"): `forward(x, mask=None)` returns
feature tokens [B, N, D], `embed(x)` the pooled representation [B, D], and `dim` is D. Methods,
probes and export only ever go through `build_encoder`, so a new architecture is one more entry
in `ENCODERS`, and `describe_encoder` writes what `encoder.json` needs to rebuild the weights' shape.
What an encoder is built for depends on its modality: image encoders take `in_channels` and
`image_size`, text encoders `vocab_size` and `max_len` (the tokenizer's vocabulary, the longest sequence),
audio encoders nothing (16 kHz mono waveforms of any length: their config is the whole architecture).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, NamedTuple

import torch
from torch import nn

from selfsup.encoders.audio import AudioEncoder, AudioEncoderConfig
from selfsup.encoders.resnet import ResNet, ResNetConfig
from selfsup.encoders.text import TextTransformer, TextTransformerConfig
from selfsup.encoders.vit import ViT, ViTConfig
from selfsup.errors import SelfsupError


class EncoderSpec(NamedTuple):
    """One registered encoder: how to configure it, what to build, and its preset."""

    config_type: type  # the config dataclass
    module_type: type[nn.Module]  # built as module_type(config, **inputs)
    defaults: dict[str, Any]  # the preset: overrides of the config dataclass defaults
    description: str  # one line for `--help` listings
    modality: str = "image"  # the modality it reads (a name in selfsup.modalities.MODALITIES)
    inputs: tuple[str, ...] = ("in_channels", "image_size")  # what the data fixes besides the config (module kwargs)


IMAGE_INPUTS, TEXT_INPUTS, AUDIO_INPUTS = ("in_channels", "image_size"), ("vocab_size", "max_len"), ()


ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec(
        ResNetConfig, ResNet, {"layers": [2, 2, 2, 2], "width": 64},
        "ResNet-18 (BasicBlock, 11.2M params, dim 512); CIFAR stem unless small_input=False",
    ),
    "resnet10": EncoderSpec(
        ResNetConfig, ResNet, {"layers": [1, 1, 1, 1], "width": 32},
        "ResNet-10 at half width (1.2M params, dim 256): the small one for quick runs and the demo",
    ),
    "vit_tiny": EncoderSpec(
        ViTConfig, ViT, {"patch_size": 4, "dim": 192, "depth": 12, "heads": 3, "mlp_ratio": 4.0},
        "ViT-Tiny (patch 4, dim 192, depth 12, 3 heads, 5.4M params)",
    ),
    "vit_small": EncoderSpec(
        ViTConfig, ViT, {"patch_size": 4, "dim": 384, "depth": 12, "heads": 6, "mlp_ratio": 4.0},
        "ViT-Small (patch 4, dim 384, depth 12, 6 heads, 21.3M params)",
    ),
    "text_encoder": EncoderSpec(
        TextTransformerConfig, TextTransformer,
        {"dim": 256, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "positions": "learned", "causal": False,
         "embed_norm": True, "lm_transform": True},
        "bidirectional text transformer for MLM (dim 256, depth 4, 4 heads, FFN 1024, learned positions, "
        "BERT's embedding norm and MLM head; exports as RoBERTa-PreLayerNorm)",
        "text", TEXT_INPUTS,
    ),
    "text_decoder": EncoderSpec(
        TextTransformerConfig, TextTransformer,
        {"dim": 256, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "positions": "learned", "causal": True},
        "causal text transformer for next-token prediction (dim 256, depth 4, 4 heads, FFN 1024, learned positions; "
        "exports as GPT-2)",
        "text", TEXT_INPUTS,
    ),
    # CLIP's two towers at CPU sizes: a ViT with the pre-encoder LayerNorm and a causal text
    # transformer pooled at its last real token (the end-of-text token CLIP captions end with).
    "clip_vit": EncoderSpec(
        ViTConfig, ViT, {"patch_size": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 4.0, "pre_norm": True},
        "CLIP image tower (ViT patch 4, dim 192, depth 6, 3 heads, pre-encoder LayerNorm, 2.7M params; "
        "with clip_text exports as CLIPModel)",
    ),
    "clip_text": EncoderSpec(
        TextTransformerConfig, TextTransformer,
        {"dim": 192, "depth": 4, "heads": 3, "mlp_ratio": 4.0, "positions": "learned", "causal": True, "pool": "last"},
        "CLIP text tower (causal, dim 192, depth 4, 3 heads, FFN 768, learned positions, pooled at the "
        "end-of-text token; with clip_vit exports as CLIPModel)",
        "text", TEXT_INPUTS,
    ),
    # wav2vec 2.0's encoder (also HuBERT's) at CPU sizes; the paper's BASE is the config defaults
    # (conv 512, dim 768, 12 blocks, 12 heads, FFN 3072, pos conv 128/16: 94.4M params).
    "wav2vec2_tiny": EncoderSpec(
        AudioEncoderConfig, AudioEncoder,
        {"conv_channels": 128, "dim": 192, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "pos_conv_kernel": 64,
         "pos_conv_groups": 8},
        "wav2vec 2.0 encoder, tiny (conv 128, dim 192, 4 blocks, 4 heads, FFN 768, pos conv 64/8; 2.4M params); "
        "20 ms frames of 16 kHz audio; exports as Wav2Vec2Model / HubertModel",
        "audio", AUDIO_INPUTS,
    ),
    "wav2vec2_small": EncoderSpec(
        AudioEncoderConfig, AudioEncoder,
        {"conv_channels": 256, "dim": 384, "depth": 6, "heads": 6, "mlp_ratio": 4.0, "pos_conv_kernel": 128,
         "pos_conv_groups": 16},
        "wav2vec 2.0 encoder, small (conv 256, dim 384, 6 blocks, 6 heads, FFN 1536, pos conv 128/16; 13.0M params); "
        "20 ms frames of 16 kHz audio; exports as Wav2Vec2Model / HubertModel",
        "audio", AUDIO_INPUTS,
    ),
}


# Descriptions of Hugging Face encoders (`hf:DIR` bases and towers): rebuilt from their config by
# encoders/hf.py rather than from a preset here.
HF_ENCODERS = ("hf", "hf_audio")
# Keys of a description that say where a tower's starting weights came from ("source": a Hugging Face
# folder; "init": another run's tower, `encoder.init=RUN[:TOWER]`), which build_encoder ignores.
DESCRIPTION_ONLY = ("source", "init")


def _spec(name: str) -> EncoderSpec:
    """The registry entry for `name`, or an error that suggests the nearest registered name."""
    if name in ENCODERS:
        return ENCODERS[name]
    close = difflib.get_close_matches(str(name).lower(), list(ENCODERS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise SelfsupError(f"unknown encoder '{name}'; {hint}available encoders: {', '.join(sorted(ENCODERS))}")


def encoder_config(name: str, overrides: dict | None = None) -> Any:
    """The named encoder's config: the preset with `overrides` applied on top.

    Unknown override keys are an error naming the nearest valid key, so a typo never silently
    builds the default architecture.
    """
    spec = _spec(name)
    overrides = dict(overrides or {})
    field_names = [f.name for f in dataclasses.fields(spec.config_type)]
    for key in overrides:
        if key not in field_names:
            close = difflib.get_close_matches(str(key), field_names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SelfsupError(
                f"unknown config key '{key}' for encoder '{name}'; {hint}valid keys: {', '.join(field_names)}"
            )
    values = copy.deepcopy({**spec.defaults, **overrides})  # never alias the preset's lists
    return spec.config_type(**values)


def _split_inputs(name: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the encoder's inputs, config overrides) of `given`; an error naming what is missing, or what
    is another encoder's input (an image encoder given a vocabulary size, say)."""
    spec = _spec(name)
    every_input = {key for entry in ENCODERS.values() for key in entry.inputs}
    inputs = {key: given[key] for key in spec.inputs if given.get(key) is not None}
    missing = [key for key in spec.inputs if key not in inputs]
    foreign = [key for key, value in given.items() if value is not None and key in every_input - set(spec.inputs)]
    if missing or foreign:
        article = "an" if spec.modality[:1] in "aeiou" else "a"
        needs = f"build it with {' and '.join(spec.inputs)}" if spec.inputs else "its config is all it takes"
        raise SelfsupError(
            f"encoder '{name}' is {article} {spec.modality} encoder: {needs}"
            + (f" (missing {', '.join(missing)})" if missing else "")
            + (f" (not {', '.join(foreign)}, which are for other modalities)" if foreign else "")
        )
    overrides = {key: value for key, value in given.items() if key not in every_input}
    return inputs, overrides


def build_encoder(name: str, *, config: dict | None = None, **given: Any) -> nn.Module:
    """Build the named encoder for its inputs (images: `in_channels` and `image_size`; text:
    `vocab_size` and `max_len`; audio: none; each registered encoder declares its own).

    `config` (as written by `describe_encoder`) and the other keywords (overrides) are both applied
    to the preset, overrides last, so `build_encoder(**describe_encoder(...))` rebuilds the same
    architecture. ResNets accept any image size and ignore `image_size`.
    """
    for key in DESCRIPTION_ONLY:  # where a tower's weights came from: not part of its architecture
        given.pop(key, None)
    if name in HF_ENCODERS:  # a Hugging Face model described by its own config (encoders/hf.py)
        from selfsup.encoders.hf import build_hf_encoder

        return build_hf_encoder({"name": name, "config": config or {}, "head": given.get("head")})
    inputs, overrides = _split_inputs(name, given)
    cfg = encoder_config(name, {**(config or {}), **overrides})
    return _spec(name).module_type(cfg, **inputs)


def build_seeded(seed: int, descriptions: dict[str, dict]) -> dict[str, nn.Module]:
    """The encoders of `descriptions` (role -> description) built in order after seeding torch with
    `seed`: a run's towers as pretraining began, rebuilt identically by anyone who has the descriptions.
    What is built next from the same random stream (a method's heads) is identical too."""
    from selfsup.encoders.hf import load_source_weights

    torch.manual_seed(seed)
    built = {}
    for role, description in descriptions.items():
        built[role] = build_encoder(**description)
        if description.get("source") is not None:  # a Hugging Face tower starts from its folder's weights
            load_source_weights(built[role], description)
    return built


def describe_encoder(name: str, **given: Any) -> dict:
    """A JSON-able description of the encoder that `build_encoder(**description)` rebuilds.

    The full resolved config is stored (not just the overrides), so the description still rebuilds
    the same shapes if a preset's defaults change later. It holds the encoder's declared inputs only.
    """
    inputs, overrides = _split_inputs(name, given)
    cfg = encoder_config(name, overrides)
    return {"name": name, **inputs, "config": dataclasses.asdict(cfg)}


__all__ = ["AUDIO_INPUTS", "ENCODERS", "IMAGE_INPUTS", "TEXT_INPUTS", "AudioEncoder", "AudioEncoderConfig", "EncoderSpec",
           "ResNet", "ResNetConfig", "TextTransformer", "TextTransformerConfig", "ViT", "ViTConfig", "build_encoder",
           "describe_encoder", "encoder_config"]
