"""The registry of self-supervised objectives: one file each, one line here.

Adding an objective: copy the nearest method file, edit its `Config` and `forward`, add its line to
`METHODS`; the contract test in tests/methods covers it.

The method contract (docs/architecture.md has it whole):
- `cls(cfg, **towers)`: the method's Config and its encoders by role, each kept as the attribute of
  that name (`self.encoder` for single-tower methods; what `pretrain` exports per tower);
- `forward(batch, progress) -> {"loss": ..., parts to log}`; never backward, optimizers or logging;
- optional hooks: `after_optimizer_step(progress)` (EMA, centres); `fit_targets(data: FitData,
  generator) -> stats` for targets made from the data before step 1 (`fits_targets = True`; held in
  buffers, so a resume skips it); `save_artifacts(folder)` for files the run keeps beside the
  encoder (named in MethodSpec.artifacts); `preview(rgb, mean, std, generator)` rows for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from selfsup.config import from_dict, nearest
from selfsup.errors import SelfsupError
from selfsup.methods import beit, byol, clip, colorize, dino, hubert, mae, mlm, next_token, simclr, wav2vec2


@dataclass(frozen=True)
class MethodSpec:
    config: type  # the method's Config dataclass
    cls: type[nn.Module]  # the method module: __init__(cfg, encoder), forward(batch, progress) -> dict
    # What the batch must carry: "views" = augmented views of each image; "tokens" = packed token
    # blocks (input_ids, token_mask, document_ids, optional attention_mask/position_ids, generator);
    # "audio" = padded 16 kHz clips (audio, lengths, generator); "pairs" = an image view and a caption
    # per image–text pair (views, input_ids, attention_mask, generator).
    inputs: Literal["views", "tokens", "audio", "pairs"]
    summary: str  # one line for `--help`
    modality: str = "image"  # the data it trains on unless `data.modality` says otherwise
    views: dict[str, Any] = field(default_factory=dict)  # the method's view recipe: defaults under the user's `views:`
    encoder: str = "resnet18"  # the encoder used when the config names none
    tokenizer: str | None = None  # token methods: the tokenizer kind trained for them ("wordpiece" / "bpe")
    causal: bool | None = None  # token methods: whether the encoder must be causal (None = no requirement)
    # Method config keys the run fills from its tokenizer unless the user set them (e.g. MLM's mask_id).
    tokenizer_fields: tuple[str, ...] = ()
    # How the exported encoder's inputs must be prepared beyond normalisation: "grey" = it was trained
    # on the lightness of images only (colourisation), so probes feed it grey versions too.
    input_transform: str | None = None
    vit_only: bool = False  # the objective works on ViT patch tokens (masking patches), not on a CNN
    # What couples a batch's samples in the objective itself (beyond BatchNorm, which pretrain detects):
    # with train.accum_steps > 1 it spans one micro-batch, and the run warns so (README: accumulation).
    batch_coupling: str | None = None
    # Methods with several encoders: role -> default encoder name (single-tower methods: None, and
    # `encoder` above is the default); a tower's modality, when it is not the data's (CLIP's text).
    towers: dict[str, str] | None = None
    tower_modalities: dict[str, str] = field(default_factory=dict)
    artifacts: tuple[str, ...] = ()  # files `save_artifacts` writes into the run directory
    hf_model: str | None = None  # the transformers class its export is named after (audio: HubertModel for HuBERT)

    @property
    def roles(self) -> tuple[str, ...]:
        """The method's towers, in order; the first is the one commands use by default."""
        return ("encoder",) if self.towers is None else tuple(self.towers)


METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec(simclr.Config, simclr.SimCLR, "views", "SimCLR (Chen et al. 2020): NT-Xent between two views",
                         batch_coupling="SimCLR's negatives (the other samples of the batch)"),
    "byol": MethodSpec(byol.Config, byol.BYOL, "views", "BYOL (Grill et al. 2020): predict an EMA target's projection of the other view",
                       views={"view_blur_p": [1.0, 0.1], "view_solarize_p": [0.0, 0.2]}),
    "dino": MethodSpec(dino.Config, dino.DINO, "views", "DINO (Caron et al. 2021): self-distillation from an EMA teacher over multi-crops",
                       views={"crop_scale": [0.4, 1.0], "view_blur_p": [1.0, 0.1], "view_solarize_p": [0.0, 0.2],
                              "num_local": 6, "local_crop_scale": [0.05, 0.4]}),
    "mae": MethodSpec(mae.Config, mae.MAE, "views", "MAE (He et al. 2021): reconstruct the pixels of 75 % masked patches",
                      views={"num_views": 1, "crop_scale": [0.2, 1.0], "jitter_p": 0.0, "grayscale_p": 0.0},
                      encoder="vit_tiny", vit_only=True),
    "beit": MethodSpec(beit.Config, beit.BEiT, "views",
                       "BEiT (Bao et al. 2021): predict the visual tokens (k-means on this data) of blockwise-masked patches",
                       views={"num_views": 1, "crop_scale": [0.2, 1.0], "jitter_p": 0.8, "hue": 0.0, "grayscale_p": 0.0},
                       encoder="vit_tiny", vit_only=True, artifacts=(beit.VISUAL_TOKENS_FILE,)),
    "colorize": MethodSpec(colorize.Config, colorize.Colorize, "views",
                           "Colourisation (Zhang et al. 2016): predict quantised, rebalanced ab colour from lightness",
                           views={"num_views": 1, "crop_scale": [0.5, 1.0], "jitter_p": 0.0, "grayscale_p": 0.0},
                           encoder="resnet18", input_transform="grey"),
    "mlm": MethodSpec(mlm.Config, mlm.MLM, "tokens", "BERT masked-LM (Devlin et al. 2018): predict 15 % masked tokens (80/10/10)",
                      modality="text", encoder="text_encoder", tokenizer="wordpiece", causal=False, tokenizer_fields=("mask_id", "special_ids")),
    "next_token": MethodSpec(next_token.Config, next_token.NextToken, "tokens",
                             "GPT next-token prediction (Radford et al. 2018): shifted cross-entropy with a causal decoder",
                             modality="text", encoder="text_decoder", tokenizer="bpe", causal=True),
    "wav2vec2": MethodSpec(wav2vec2.Config, wav2vec2.Wav2Vec2, "audio",
                           "wav2vec 2.0 (Baevski et al. 2020): pick the quantized latent of span-masked frames among distractors",
                           modality="audio", encoder="wav2vec2_tiny", hf_model="Wav2Vec2Model",
                           batch_coupling="the codebook diversity loss (the quantizer's softmax averaged over the masked frames)"),
    "hubert": MethodSpec(hubert.Config, hubert.HuBERT, "audio",
                         "HuBERT (Hsu et al. 2021): predict the k-means clusters (MFCC, or a run's layer) of span-masked frames",
                         modality="audio", encoder="wav2vec2_tiny", artifacts=(hubert.HUBERT_TARGETS_FILE,),
                         hf_model="HubertModel"),
    "clip": MethodSpec(clip.Config, clip.CLIP, "pairs",
                       "CLIP (Radford et al. 2021): align an image and a text tower with the symmetric InfoNCE of matching pairs",
                       modality="image_text", towers={"image": "clip_vit", "text": "clip_text"},
                       tower_modalities={"image": "image", "text": "text"}, tokenizer="bpe", artifacts=(clip.HEAD_FILE,),
                       batch_coupling="CLIP's negatives (the other pairs of the batch)", hf_model="CLIPModel"),
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise SelfsupError(f"unknown method `{name}`{nearest(name, METHODS)}")
    return METHODS[name]


def method_for(modality: str) -> str:
    """The first registered method that trains on `modality` by default (e.g. the splits of a
    default run on a source, for a base that has no run of its own)."""
    for name, spec in METHODS.items():
        if spec.modality == modality:
            return name
    raise SelfsupError(f"no registered method trains on {modality!r} data")


def method_config(section: dict[str, Any]) -> Any:
    """The chosen method's Config from a `method:` section (`name` + the method's knobs)."""
    name = section.get("name")
    if not isinstance(name, str):
        raise SelfsupError("`method.name` is required, e.g. `method.name=simclr`")
    knobs = {k: v for k, v in section.items() if k != "name"}
    return from_dict(method_spec(name).config, knobs, prefix="method.")


def build_method(section: dict[str, Any], encoder: nn.Module | None = None, **towers: nn.Module) -> nn.Module:
    """The method of a `method:` section over its towers: `encoder` for single-tower methods, or one
    keyword per role (`image=..., text=...`)."""
    spec = method_spec(section["name"])
    if encoder is not None:
        towers = {"encoder": encoder, **towers}
    if set(towers) != set(spec.roles):
        raise SelfsupError(f"method `{section['name']}` takes the towers {', '.join(spec.roles)}, got {', '.join(towers)}")
    return spec.cls(method_config(section), **towers)
