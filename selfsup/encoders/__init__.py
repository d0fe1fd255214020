"""Image encoders by name: the registry, config resolution, building and a JSON description.

Every encoder follows the Encoder contract (DESIGN.md, "Contracts"): `forward(x, mask=None)` returns
feature tokens [B, N, D], `embed(x)` the pooled representation [B, D], and `dim` is D. Methods,
probes and export only ever go through `build_encoder`, so a new architecture is one more entry
in `ENCODERS`, and `describe_encoder` writes what `encoder.json` needs to rebuild the weights' shape.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, NamedTuple

from torch import nn

from selfsup.encoders.resnet import ResNet, ResNetConfig
from selfsup.encoders.vit import ViT, ViTConfig
from selfsup.errors import SelfsupError


class EncoderSpec(NamedTuple):
    """One registered encoder: how to configure it, what to build, and its preset."""

    config_type: type  # the config dataclass
    module_type: type[nn.Module]  # built as module_type(config, in_channels=..., image_size=...)
    defaults: dict[str, Any]  # the preset: overrides of the config dataclass defaults
    description: str  # one line for `--help` listings


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
}


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


def build_encoder(
    name: str, *, in_channels: int, image_size: int, config: dict | None = None, **overrides: Any
) -> nn.Module:
    """Build the named encoder for images of `in_channels` x `image_size` x `image_size`.

    `config` (as written by `describe_encoder`) and `overrides` are both applied to the preset,
    `overrides` last, so `build_encoder(**describe_encoder(...))` rebuilds the same architecture.
    ResNets accept any image size and ignore `image_size`.
    """
    cfg = encoder_config(name, {**(config or {}), **overrides})
    return _spec(name).module_type(cfg, in_channels=in_channels, image_size=image_size)


def describe_encoder(name: str, *, in_channels: int, image_size: int, **overrides: Any) -> dict:
    """A JSON-able description of the encoder that `build_encoder(**description)` rebuilds.

    The full resolved config is stored (not just the overrides), so the description still rebuilds
    the same shapes if a preset's defaults change later.
    """
    cfg = encoder_config(name, overrides)
    return {
        "name": name,
        "in_channels": in_channels,
        "image_size": image_size,
        "config": dataclasses.asdict(cfg),
    }


__all__ = ["ENCODERS", "EncoderSpec", "ResNet", "ResNetConfig", "ViT", "ViTConfig",
           "build_encoder", "describe_encoder", "encoder_config"]
