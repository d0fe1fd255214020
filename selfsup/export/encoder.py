"""The pretrained encoder as a run hands it on: `encoder.safetensors` + `encoder.json`.

`encoder.json` says how to rebuild the module (registry name and config) and how inputs must be
prepared (size, channels, normalisation), so a probe, an adapter or another program can use the
weights without the run's config or any pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.files import write_atomic, write_with

WEIGHTS, META = "encoder.safetensors", "encoder.json"


def save_encoder(directory: Path, encoder: nn.Module, meta: dict[str, Any]) -> None:
    """Writes both files atomically (temporary name, fsync, umask mode, rename); `meta` must hold
    "encoder" and "preprocess"."""
    assert "encoder" in meta and "preprocess" in meta
    directory.mkdir(parents=True, exist_ok=True)
    try:
        write_with(directory / WEIGHTS, lambda tmp: save_model(encoder, str(tmp)))
        write_atomic(directory / META, json.dumps(meta, indent=2))
    except (OSError, SafetensorError) as err:  # a full disk: safetensors reports it as its own error type
        raise SelfsupError(f"{directory / WEIGHTS}: cannot write the encoder ({getattr(err, 'strerror', None) or err}); "
                           "nothing half-written was left, and a run's checkpoints are intact: free space and "
                           "rerun with --resume to write it") from None


def load_encoder(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder in eval mode, its meta) from a run directory or any folder holding the two files."""
    meta_path, weights = Path(directory) / META, Path(directory) / WEIGHTS
    for path in (meta_path, weights):
        if not path.is_file():
            raise SelfsupError(f"{path}: not found; is {directory} a finished selfsup run directory?")
    try:
        meta = json.loads(meta_path.read_text())
        encoder = build_encoder(**meta["encoder"])
    except (ValueError, KeyError, TypeError) as err:
        raise SelfsupError(f"{meta_path}: not a valid encoder description ({err})") from None
    try:
        missing, unexpected = load_model(encoder, str(weights), strict=False)
    except Exception as err:  # safetensors raises its own types for truncated/corrupt headers
        raise SelfsupError(f"{weights}: cannot read weights ({err})") from None
    if missing or unexpected:
        raise SelfsupError(f"{weights}: weights do not match {meta_path} (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return encoder.eval(), meta


EXPORT_FILES = (WEIGHTS, META, "tokenizer.json")  # what `export_encoder` may write (a text encoder's tokenizer)


def export_encoder(folder: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Copies one encoder (a run's, or a tower's) to `out` as a standalone folder: its weights, its
    description and the files it reads its inputs with, so `load_encoder(out)` and a modality's
    reader work from `out` alone. Built beside `out` and swapped in; `overwrite` replaces only an
    encoder export selfsup made."""
    from selfsup.files import build_dir, claim_output, names_in
    from selfsup.modalities import load_reader

    folder, out = Path(folder), Path(out)
    encoder, meta = load_encoder(folder)
    reader = load_reader(meta, folder, str(folder / META))
    claim_output(out, "encoder", names_in(*EXPORT_FILES), overwrite=overwrite)

    def write(built: Path) -> None:
        save_encoder(built, encoder, {**meta, "preprocess": reader.save(built)})

    build_dir(out, "encoder", write, "encoder export")
    return out


def block_state(src: dict[str, Tensor], dim: int, depth: int, layer_prefix: str, qkv: tuple[str, str, str],
                renames: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    """Our shared pre-LN blocks (`encoders/transformer.py`) as a Hugging Face layer stack, layer i at
    `layer_prefix` + "i.": the fused `attn.qkv` ([q | k | v], each [dim, dim]) split into the three
    `qkv` names, and every other parameter renamed by `renames` (ours -> theirs); weights and biases."""
    state: dict[str, Tensor] = {}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"{layer_prefix}{i}."
        weights = src[f"{ours}attn.qkv.weight"].split(dim)
        biases = src[f"{ours}attn.qkv.bias"].split(dim)
        for name, w, b in zip(qkv, weights, biases):
            state[f"{theirs}{name}.weight"] = w.contiguous()
            state[f"{theirs}{name}.bias"] = b.contiguous()
        for a, b in renames:
            state[f"{theirs}{b}.weight"] = src[f"{ours}{a}.weight"]
            state[f"{theirs}{b}.bias"] = src[f"{ours}{a}.bias"]
    return state
