"""Hugging Face export of an audio run: a `Wav2Vec2Model` or `HubertModel` folder `transformers` loads.

`selfsup export RUN --format hf` on a run whose encoder is an `AudioEncoder` (selfsup.encoders.audio)
writes `config.json`, `model.safetensors`, `preprocessor_config.json` (a `Wav2Vec2FeatureExtractor`:
16 kHz, per-utterance normalisation, attention masks) and a `README.md` model card, loadable with
`AutoModel` / `AutoFeatureExtractor` and no selfsup code. The encoder *is* transformers' layout with
feat_extract_norm="layer" (a LayerNorm in every feature-encoder convolution) and
do_stable_layer_norm=True (pre-LN blocks, a final LayerNorm), so the export is a renaming:

| selfsup `AudioEncoder`                   | transformers (`Wav2Vec2Model` and `HubertModel` alike)               |
|------------------------------------------|----------------------------------------------------------------------|
| `convs.i.conv`, `convs.i.norm`           | `feature_extractor.conv_layers.i.conv`, `.layer_norm`                |
| `latent_norm`, `project`                 | `feature_projection.layer_norm`, `.projection`                       |
| `mask_embedding`                         | `masked_spec_embed`                                                  |
| `pos_conv.weight_g`, `.weight_v`, `.bias`| `encoder.pos_conv_embed.conv.parametrizations.weight.original0`,     |
|                                          | `.original1` (weight norm, dim=2), `encoder.pos_conv_embed.conv.bias`|
| `blocks.i.norm1`, `.attn.qkv` ([q|k|v])  | `encoder.layers.i.layer_norm`, `.attention.{q,k,v}_proj`             |
| `blocks.i.attn.proj`, `.norm2`           | `encoder.layers.i.attention.out_proj`, `.final_layer_norm`           |
| `blocks.i.mlp.0`, `.mlp.2`               | `encoder.layers.i.feed_forward.intermediate_dense`, `.output_dense`  |
| `norm`                                   | `encoder.layer_norm`                                                 |

Which class: the run's method (encoder.json "method.name") picks it, by its `MethodSpec.hf_model`;
the two classes compute the same function here (HuBERT's only differences, a feature projection
without its LayerNorm or a batch-normed position conv, are switched to wav2vec 2.0's), and a method
not in the table exports as `Wav2Vec2Model`, the architecture's own name.

What transformers does, and how it lines up (read from transformers 5.x `modeling_wav2vec2.py` /
`modeling_hubert.py`): it derives the frame mask from the sample-level `attention_mask` with the
same length arithmetic as `AudioEncoder.frame_lengths`, zeroes padded frames before the position
convolution and masks padded keys, as selfsup does, so real frames match to float rounding and
padded frames hold the same (meaningless) values. `hidden_states[k]` (with `output_hidden_states`)
is selfsup's `contextualise(..., layer=k)`: index 0 the blocks' input after positions, k the output
of block k before the final LayerNorm (transformers keeps it unnormalised for this model). Dropout
and LayerDrop are zero, as in selfsup (a fine-tuner may raise them in config.json); SpecAugment
keeps transformers' defaults (mask_time_prob 0.05, spans of 10 frames, with our mask embedding),
which acts in training mode only. Clips must hold at least one frame's receptive field (400 samples
at the paper's kernels), as in selfsup.

The folder is built under a temporary name beside `out` (selfsup.files.temp_dir), its files given
the umask's mode and fsynced, marked as a selfsup "export" and swapped in whole; `overwrite`
replaces only an export selfsup made that holds nothing but export files, and a failed write raises
a SelfsupError naming `out` with the previous export left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from selfsup import files
from selfsup.encoders.audio import AudioEncoder
from selfsup.errors import SelfsupError
from selfsup.export.encoder import META, WEIGHTS, block_state, load_encoder

_DEFAULT_MODEL = "Wav2Vec2Model"  # any other method: the architecture's own name
_CONFIGS = {"Wav2Vec2Model": "Wav2Vec2Config", "HubertModel": "HubertConfig"}

# Every file an audio export holds besides selfsup's marker (save_pretrained shards past 50 GB only).
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
_KIND = "export"  # the marker kind (selfsup.files) of an export folder, the text export's too


def hf_model_name(method: str | None) -> str:
    """The transformers class a run pretrained with `method` exports as: the method's own
    (`MethodSpec.hf_model`), else the architecture's name."""
    from selfsup.methods import METHODS

    spec = METHODS.get(str(method))
    return (spec.hf_model if spec is not None else None) or _DEFAULT_MODEL


def export_hf_audio(folder: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Writes a folder `transformers.AutoModel.from_pretrained` (a Wav2Vec2Model or HubertModel) and
    `AutoFeatureExtractor.from_pretrained` load, from the audio encoder in `folder` (a run directory,
    a tower folder or an encoder export); returns `out`.

    An existing non-empty `out` is replaced only with `overwrite`, and only when it is an export
    selfsup made holding nothing but its files (selfsup.files.check_owned).
    """
    folder, out = Path(folder), Path(out)
    for name in (META, WEIGHTS):
        if not (folder / name).is_file():
            raise SelfsupError(f"{folder / name}: not found; is {folder} a finished selfsup run directory?")
    encoder, meta = load_encoder(folder)
    if not isinstance(encoder, AudioEncoder):
        raise SelfsupError(
            f"{folder / META}: encoder '{meta.get('encoder', {}).get('name')}' is not an audio encoder; "
            "export_hf_audio writes Wav2Vec2Model / HubertModel folders (selfsup.export.hf.export_hf picks the "
            "export for each encoder)"
        )
    sample_rate = meta.get("preprocess", {}).get("sample_rate", 16000)
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < 1:
        raise SelfsupError(f"{folder / META}: preprocess.sample_rate must be a positive integer, got {sample_rate!r}")
    method = str((meta.get("method") or {}).get("name") or "?")
    model_name = hf_model_name(method)
    known = _known_files()
    files.claim_output(out, _KIND, known, overwrite=overwrite)

    try:
        import transformers
    except ImportError:
        raise SelfsupError(
            "the Hugging Face export needs the optional dependency transformers: pip install 'selfsup[hf]'"
        ) from None

    config = _config(transformers, encoder, model_name)
    model = getattr(transformers, model_name)(config)
    state = _state_dict(encoder)
    expected = set(model.state_dict())
    assert set(state) == expected, f"mapping mismatch: {sorted(set(state) ^ expected)[:8]}"
    model.load_state_dict(state, strict=True)
    model.eval()
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True, return_attention_mask=True,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        extractor.save_pretrained(folder)
        _write_readme(folder, out.name, config, method, encoder, sample_rate)

    from selfsup.export.hf import publish_export

    return publish_export(transformers, out, write,
                          lambda: files.claim_output(out, _KIND, known, overwrite=overwrite))  # again, just before


def _known_files() -> Any:
    """What `overwrite` may delete: the files of either Hugging Face export (a text export may be
    replaced by an audio one)."""
    from selfsup.export.hf import EXPORT_FILES as TEXT_EXPORT_FILES

    return files.names_in(*EXPORT_FILES, *TEXT_EXPORT_FILES)


def _config(transformers: Any, encoder: AudioEncoder, model_name: str) -> Any:
    """The Wav2Vec2Config / HubertConfig of this encoder's layout."""
    cfg = encoder.cfg
    layers = len(cfg.conv_kernels)
    common: dict[str, Any] = dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
        intermediate_size=encoder.blocks[0].mlp[0].out_features if cfg.depth else int(cfg.dim * cfg.mlp_ratio),
        hidden_act="gelu", feat_extract_activation="gelu",  # exact erf GELU, as nn.GELU / F.gelu
        feat_extract_norm="layer", do_stable_layer_norm=True, layer_norm_eps=1e-5,
        conv_dim=[cfg.conv_channels] * layers, conv_kernel=list(cfg.conv_kernels), conv_stride=list(cfg.conv_strides),
        conv_bias=cfg.conv_bias, num_conv_pos_embeddings=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        # No dropout or LayerDrop, as in selfsup; SpecAugment at transformers' defaults (training mode
        # only), which needs mask_time_prob > 0 for the model to hold masked_spec_embed at all.
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, apply_spec_augment=True, mask_time_prob=0.05, mask_time_length=10,
    )
    if model_name == "HubertModel":
        common.update(feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    config = getattr(transformers, _CONFIGS[model_name])(**common)
    config.architectures = [model_name]
    return config


def _state_dict(encoder: AudioEncoder) -> dict[str, Tensor]:
    """The Wav2Vec2Model / HubertModel state dict (the two share their names) of `encoder`."""
    src = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    D = encoder.dim
    state: dict[str, Tensor] = {
        "feature_projection.layer_norm.weight": src["latent_norm.weight"],
        "feature_projection.layer_norm.bias": src["latent_norm.bias"],
        "feature_projection.projection.weight": src["project.weight"],
        "feature_projection.projection.bias": src["project.bias"],
        "masked_spec_embed": src["mask_embedding"],
        # torch.nn.utils.parametrizations.weight_norm: original0 = g, original1 = v.
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": src["pos_conv.weight_g"],
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": src["pos_conv.weight_v"],
        "encoder.pos_conv_embed.conv.bias": src["pos_conv.bias"],
        "encoder.layer_norm.weight": src["norm.weight"],
        "encoder.layer_norm.bias": src["norm.bias"],
    }
    for i in range(len(encoder.convs)):
        ours, theirs = f"convs.{i}.", f"feature_extractor.conv_layers.{i}."
        state[f"{theirs}conv.weight"] = src[f"{ours}conv.weight"]
        if encoder.cfg.conv_bias:
            state[f"{theirs}conv.bias"] = src[f"{ours}conv.bias"]
        state[f"{theirs}layer_norm.weight"] = src[f"{ours}norm.weight"]
        state[f"{theirs}layer_norm.bias"] = src[f"{ours}norm.bias"]
    state.update(block_state(src, D, encoder.num_layers, "encoder.layers.",
                             ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                             (("norm1", "layer_norm"), ("attn.proj", "attention.out_proj"), ("norm2", "final_layer_norm"),
                              ("mlp.0", "feed_forward.intermediate_dense"), ("mlp.2", "feed_forward.output_dense"))))
    return state


def _write_readme(folder: Path, name: str, config: Any, method: str, encoder: AudioEncoder,
                  sample_rate: int) -> None:
    """README.md (the model card on the Hub): the architecture, how to load it, what its inputs must be."""
    cfg = encoder.cfg
    model_name, model_type = config.architectures[0], config.model_type
    hop_ms = 1000 * encoder.frame_hop / sample_rate
    text = f"""\
---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- audio
- speech
---

# {name}

A speech encoder pretrained with selfsup (method `{method}`) and exported by `selfsup export --format hf`.
It loads with plain `transformers`: no selfsup code and no `trust_remote_code`.

Architecture: `{model_name}` (model_type `{model_type}`), wav2vec 2.0's layout with a LayerNorm in every
feature-encoder convolution (`feat_extract_norm="layer"`) and pre-LN Transformer blocks
(`do_stable_layer_norm=True`): {len(cfg.conv_kernels)} convolutions of {cfg.conv_channels} channels, one frame per
{encoder.frame_hop} samples ({hop_ms:g} ms), then {cfg.depth} blocks of width {cfg.dim} with {cfg.heads} heads. No
CTC or classification head: `{model_name.replace("Model", "ForCTC")}` or
`{model_name.replace("Model", "ForSequenceClassification")}` `.from_pretrained` on this folder add a new one.

```python
from transformers import AutoFeatureExtractor, AutoModel

folder = "{name}"  # this folder's path, or its Hub repo id
extractor = AutoFeatureExtractor.from_pretrained(folder)
model = AutoModel.from_pretrained(folder).eval()
# waves: 1-D float arrays, mono, {sample_rate} Hz
batch = extractor(waves, sampling_rate={sample_rate}, padding=True, return_tensors="pt")
out = model(**batch, output_hidden_states=True)
frames = out.last_hidden_state  # [batch, frames, {cfg.dim}]
```

Inputs: mono audio at {sample_rate} Hz, each clip normalised to zero mean and unit variance (the feature
extractor does it: `do_normalize=True`), right-padded, with the `attention_mask` the extractor returns. A clip
needs at least {encoder.min_samples} samples (one frame). Frames past a clip's end are padding: their outputs
are not meaningful, so pool over the real frames only
(`model._get_feature_vector_attention_mask(frames.shape[1], batch["attention_mask"])` marks them), which is
what selfsup's clip embedding does (the mean of the real frames' `last_hidden_state`).

`hidden_states[k]` is the output of block k before the final LayerNorm (`hidden_states[0]`: the blocks' input);
`last_hidden_state` is the last block's output after it. Dropout and LayerDrop are zero, as in pretraining;
SpecAugment (`mask_time_prob=0.05`, with the pretrained mask embedding) applies in training mode only.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")
