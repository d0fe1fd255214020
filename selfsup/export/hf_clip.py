"""Hugging Face export of a CLIP run: a `CLIPModel` folder `transformers` loads, with its tokenizer and
image processor, that the `zero-shot-image-classification` pipeline runs on.

`selfsup export RUN --format hf` on an image–text run whose method exports as `CLIPModel`
(`MethodSpec.hf_model`; towers `image` and `text`) writes `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`, `preprocessor_config.json` and a `README.md` model card,
loadable with `CLIPModel` / `AutoModelForZeroShotImageClassification`, `AutoTokenizer` and
`AutoImageProcessor`, with no selfsup code. `logits_per_image` equals selfsup's
exp(logit_scale) * normalise(image_proj(image.embed(x))) @ normalise(text_proj(text.embed(ids)))^T.

The towers are transformers' CLIP layout (the `clip_vit` and `clip_text` presets are built to be), so
the export is a renaming plus two exact rewrites:

| selfsup                                    | transformers `CLIPModel`                                         |
|--------------------------------------------|------------------------------------------------------------------|
| image `patch_embed.weight`                 | `vision_model.embeddings.patch_embedding.weight`                 |
| image `patch_embed.bias`                   | added to the patch rows of `...embeddings.position_embedding` (1)|
| image `cls_token`, `pos_embed`             | `...embeddings.class_embedding`, `...position_embedding.weight`  |
| image `pre_norm`                           | `vision_model.pre_layrnorm`                                      |
| image `norm` (on the [CLS] token)          | `vision_model.post_layernorm` (transformers: pooled CLS only) (2)|
| text `token_embed`, `pos_embed`            | `text_model.embeddings.token_embedding`, `.position_embedding`   |
| text `norm`                                | `text_model.final_layer_norm`                                    |
| `blocks.i.norm1`, `.attn.qkv` ([q|k|v])    | `encoder.layers.i.layer_norm1`, `.self_attn.{q,k,v}_proj`        |
| `blocks.i.attn.proj`, `.norm2`             | `encoder.layers.i.self_attn.out_proj`, `.layer_norm2`            |
| `blocks.i.mlp.0`, `.mlp.2`                 | `encoder.layers.i.mlp.fc1`, `.mlp.fc2`                           |
| head `image_proj`, `text_proj`             | `visual_projection`, `text_projection` (both without bias)       |
| head `logit_scale`                         | `logit_scale` (the log, as ours)                                 |

(1) CLIPVisionEmbeddings' patch convolution has no bias. conv(x) + b + pos_p = conv(x) + (pos_p + b)
    for every patch p, so the bias is folded into the patch positions (not the [CLS] row): exact. It
    stays exact under `interpolate_pos_encoding`, whose bicubic weights sum to one.
(2) Our final LayerNorm acts on every token and `embed` takes the [CLS] row; transformers applies
    `post_layernorm` to the [CLS] row only: the same pooled vector. (`last_hidden_state` differs: it
    is before that LayerNorm in transformers.)

Settings read from transformers 5.x `modeling_clip.py` and matched: `hidden_act="gelu"` (exact erf
GELU as our `nn.GELU()`; CLIP's default is "quick_gelu"), `layer_norm_eps=1e-6`, zero dropout,
`max_position_embeddings` = our `max_len`, `projection_dim` = `embed_dim`. The text model is always
causal, as ours must be, and masks padded keys from `attention_mask`, so right-padded captions see
exactly what selfsup's do. It pools at the *first* `eos_token_id` in each row (or, for the legacy
value 2 only, at the argmax of input_ids): `eos_token_id` is our end-of-text id (<|endoftext|> for
BPE, [SEP] for WordPiece, as `caption_ids` uses), which ends every caption and occurs nowhere else,
since selfsup encodes special-token strings in a caption as text (the exported tokenizer does the
same: `split_special_tokens`). That is our pooling at the last real token. A tokenizer whose
end-of-text id is 2 is refused.

Greyscale runs (`data.channels=1`) export as an RGB model: Pillow's luma L = 0.299 R + 0.587 G +
0.114 B (the weights sum to one), so with every channel normalised by the grey mean and std the patch
convolution's weight w becomes (0.299 w, 0.587 w, 0.114 w), and an image whose three channels are
equal gives exactly the greyscale model's output. The pipeline and the image processor feed RGB.

Tokenizer: the run's tokenizer.json with a post-processor that wraps every text as selfsup's
`caption_ids` does (BPE: `$A <|endoftext|>`, no start token; WordPiece: `[CLS] $A [SEP]`), right
padding with the pad token, `model_max_length` = max_len (`truncation=True` cuts the tokens to leave
room for the end-of-text token, as `caption_ids` does). `token_type_ids` are not returned (CLIPModel
takes none).
Image processor: `CLIPImageProcessor` with the run's preprocessing: shorter side to image_size
(bilinear), centre crop to image_size, x / 255, then (x - mean) / std per channel, as selfsup reads
images (`data.images`, `data.views.normalise`; resizing by a different library differs by rounding).

Refused (a SelfsupError naming the encoder keys to set): an image tower that is not a ViT with
learned positions, [CLS] pooling and `pre_norm` (as `clip_vit`), a text tower that is not a causal
transformer with learned positions, last-token pooling and no `embed_norm` (as `clip_text`). The
text tower's LM head (tied or not, `lm_transform`) takes no part in CLIP and is not exported.

The folder is built under a temporary name beside `out`, its files given the umask's mode and
fsynced, marked as a selfsup "export" and swapped in whole (`selfsup.export.hf.publish_export`);
`overwrite` replaces only an export selfsup made holding nothing but export files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, processors
from torch import Tensor

from selfsup import files
from selfsup.data.tokenizer import TextTokenizer
from selfsup.encoders.text import TextTransformer
from selfsup.encoders.vit import ViT
from selfsup.errors import SelfsupError
from selfsup.export.encoder import META, WEIGHTS, block_state, load_encoder
from selfsup.rundir import TOWERS_DIR

HF_MODEL = "CLIPModel"  # the MethodSpec.hf_model this export writes
ROLES = ("image", "text")
# The method's artifact holding the projections and the logit scale: selfsup.methods.clip.HEAD_FILE, not
# imported because nothing above methods/ names a method (tests/export/test_hf_clip.py checks they agree).
HEAD_FILE = "clip_head.safetensors"

# Every file a CLIP export holds besides selfsup's marker (save_pretrained shards past 50 GB only).
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json", "README.md")
_KIND = "export"  # the marker kind (selfsup.files) of an export folder, as the text and audio exports'

# The layouts that map onto CLIPVisionModel / CLIPTextModel: config key -> required value.
_VISION_LAYOUT: dict[str, Any] = {"positions": "learned", "pool": "cls", "pre_norm": True}
_TEXT_LAYOUT: dict[str, Any] = {"positions": "learned", "causal": True, "pool": "last", "embed_norm": False}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 as Pillow computes it (selfsup.data.images); sums to 1


def is_clip_run(run: Path) -> bool:
    """Whether `run` is a run directory with an image and a text tower whose method exports as CLIPModel."""
    run = Path(run)
    if not all((run / TOWERS_DIR / role / META).is_file() for role in ROLES):
        return False
    return _method_hf_model(_method_name(run)) == HF_MODEL


def _method_name(run: Path) -> str | None:
    """The run's method, as its towers record it (encoder.json "method.name")."""
    try:
        meta = json.loads((run / TOWERS_DIR / "image" / META).read_text())
    except (OSError, ValueError):
        return None
    method = meta.get("method") if isinstance(meta, dict) else None
    return str(method.get("name")) if isinstance(method, dict) and method.get("name") is not None else None


def _method_hf_model(method: str | None) -> str | None:
    from selfsup.methods import METHODS

    spec = METHODS.get(str(method))
    return spec.hf_model if spec is not None else None


def export_hf_clip(run_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Writes a folder that transformers.CLIPModel (and AutoTokenizer, AutoImageProcessor and the
    zero-shot-image-classification pipeline) loads, from the CLIP run in `run_dir`; returns `out`.

    An existing non-empty `out` is replaced only with `overwrite`, and only when it is an export
    selfsup made holding nothing but its files (selfsup.files.check_owned).
    """
    run_dir, out = Path(run_dir), Path(out)
    folders = {role: run_dir / TOWERS_DIR / role for role in ROLES}
    for folder in folders.values():
        for name in (META, WEIGHTS):
            if not (folder / name).is_file():
                raise SelfsupError(f"{folder / name}: not found; is {run_dir} a finished CLIP run directory "
                                   f"(towers {' and '.join(ROLES)})?")
    method = _method_name(run_dir)
    if _method_hf_model(method) != HF_MODEL:
        raise SelfsupError(f"{folders['image'] / META}: method {method!r} does not export as {HF_MODEL}; only "
                           f"CLIP runs do (a method whose MethodSpec.hf_model is {HF_MODEL})")
    image, image_meta = load_encoder(folders["image"])
    text, text_meta = load_encoder(folders["text"])
    _check_vision(image, image_meta, folders["image"] / META)
    _check_text(text, text_meta, folders["text"] / META)
    head = _load_head(run_dir / HEAD_FILE, image, text)
    pre = _image_preprocess(image, image_meta, folders["image"] / META)

    tokenizer_path = folders["text"] / str(text_meta.get("preprocess", {}).get("tokenizer") or "tokenizer.json")
    if not tokenizer_path.is_file():
        raise SelfsupError(f"{tokenizer_path}: not found; a CLIP export ships the tokenizer the text tower was trained "
                           f"with (named in {folders['text'] / META} under preprocess.tokenizer)")
    tokenizer = TextTokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > text.vocab_size:
        raise SelfsupError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the text tower only "
                           f"{text.vocab_size} embedding rows; this tokenizer does not belong to this run")
    # How selfsup's caption_ids wraps a caption: BPE tokens + <|endoftext|>; WordPiece [CLS] ... [SEP].
    bos, eos = tokenizer.packing_bounds
    assert eos is not None, "both tokenizer kinds have an end-of-text id"
    if eos == 2:
        raise SelfsupError(
            f"{tokenizer_path}: the end-of-text token has id 2, which transformers' CLIPTextModel reads as a legacy "
            "config and pools at the largest token id instead of at the end-of-text token; train the run with a "
            "selfsup tokenizer (tokenizer.path unset, or one from `selfsup tokenizer train --kind bpe`: id 1)"
        )
    known = _known_files()
    files.claim_output(out, _KIND, known, overwrite=overwrite)

    try:
        import transformers
    except ImportError:
        raise SelfsupError(
            "the Hugging Face export needs the optional dependency transformers: pip install 'selfsup[hf]'"
        ) from None

    ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": eos if bos is None else bos, "eos_token_id": eos}
    config = _config(transformers, image, text, head, ids)
    model = transformers.CLIPModel(config)
    state = _state_dict(image, text, head, grey=pre["channels"] == 1)
    expected = set(model.state_dict())
    assert set(state) == expected, f"mapping mismatch: {sorted(set(state) ^ expected)[:8]}"
    model.load_state_dict(state, strict=True)
    model.eval()
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    size = pre["image_size"]
    processor = processor_class(
        do_resize=True, size={"shortest_edge": size}, resample=2,  # PIL.Image.BILINEAR, as selfsup resizes
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(pre["mean"]) * (3 if pre["channels"] == 1 else 1),
        image_std=list(pre["std"]) * (3 if pre["channels"] == 1 else 1), do_convert_rgb=True,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        _write_tokenizer(folder, tokenizer_path, tokenizer, text.max_len)
        _write_readme(folder, out.name, str(method), image, text, head["image_proj.weight"].shape[0], pre)

    from selfsup.export.hf import publish_export

    return publish_export(transformers, out, write,
                          lambda: files.claim_output(out, _KIND, known, overwrite=overwrite))  # again, just before


def _known_files() -> Any:
    """What `overwrite` may delete: the files of any Hugging Face export (one kind may replace another)."""
    from selfsup.export.hf import EXPORT_FILES as TEXT_EXPORT_FILES
    from selfsup.export.hf_audio import EXPORT_FILES as AUDIO_EXPORT_FILES

    return files.names_in(*EXPORT_FILES, *TEXT_EXPORT_FILES, *AUDIO_EXPORT_FILES)


def _layout_error(meta_path: Path, role: str, what: str, wrong: dict[str, Any], need: dict[str, Any],
                  preset: str, hf: str) -> SelfsupError:
    settings = ", ".join(f"encoders.{role}.{key}={value if isinstance(value, str) else json.dumps(value)}"
                         for key, value in need.items() if key in wrong)
    found = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
    return SelfsupError(
        f"{meta_path}: the {role} tower ({what}{': ' + found if found else ''}) has no {hf} equivalent; a CLIP run "
        f"exports to Hugging Face when its {role} tower is the {preset} layout: pretrain with "
        f"{settings or f'encoders.{role}.name={preset}'} (the {preset} preset's settings), or use the towers' "
        "encoder.safetensors + encoder.json with selfsup (--format encoder --tower ROLE)"
    )


def _check_vision(encoder: Any, meta: dict, meta_path: Path) -> None:
    name = meta.get("encoder", {}).get("name")
    if not isinstance(encoder, ViT):
        raise _layout_error(meta_path, "image", f"encoder '{name}', not a ViT", {}, {},
                            "clip_vit", "CLIPVisionModel")
    values = {key: getattr(encoder.cfg, key) for key in _VISION_LAYOUT}
    wrong = {key: value for key, value in values.items() if value != _VISION_LAYOUT[key]}
    if wrong:
        raise _layout_error(meta_path, "image", f"ViT '{name}'", wrong, _VISION_LAYOUT, "clip_vit", "CLIPVisionModel")


def _check_text(encoder: Any, meta: dict, meta_path: Path) -> None:
    name = meta.get("encoder", {}).get("name")
    if not isinstance(encoder, TextTransformer):
        raise _layout_error(meta_path, "text", f"encoder '{name}', not a text transformer", {}, {},
                            "clip_text", "CLIPTextModel")
    values = {key: getattr(encoder.cfg, key) for key in _TEXT_LAYOUT}
    wrong = {key: value for key, value in values.items() if value != _TEXT_LAYOUT[key]}
    if wrong:
        raise _layout_error(meta_path, "text", f"text transformer '{name}'", wrong, _TEXT_LAYOUT, "clip_text",
                            "CLIPTextModel")


def _load_head(path: Path, image: ViT, text: TextTransformer) -> dict[str, Tensor]:
    """The projections and the logit scale, checked against the towers' widths."""
    if not path.is_file():
        raise SelfsupError(f"{path}: not found; a CLIP run keeps its projections and logit scale there (written when "
                           "pretraining finishes); finish the run with --resume")
    try:
        head = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for truncated or corrupt files
        raise SelfsupError(f"{path}: cannot read the CLIP head ({err})") from None
    need = {"image_proj.weight": 2, "text_proj.weight": 2, "logit_scale": 0}
    if set(head) != set(need) or any(head[k].dim() != d for k, d in need.items()):
        raise SelfsupError(f"{path}: not a CLIP head (expected {sorted(need)}, got "
                           f"{ {k: list(v.shape) for k, v in head.items()} })")
    (e_img, d_img), (e_txt, d_txt) = head["image_proj.weight"].shape, head["text_proj.weight"].shape
    if e_img != e_txt or d_img != image.dim or d_txt != text.dim:
        raise SelfsupError(f"{path}: projections {list(head['image_proj.weight'].shape)} and "
                           f"{list(head['text_proj.weight'].shape)} do not fit towers of width {image.dim} and "
                           f"{text.dim} with one shared space; this head does not belong to this run")
    return {key: value.float() for key, value in head.items()}


def _image_preprocess(image: ViT, meta: dict, meta_path: Path) -> dict[str, Any]:
    """image_size, channels, mean and std of the image tower, checked against the encoder."""
    pre = meta.get("preprocess", {})
    channels = image.patch_embed.in_channels
    size = image.grid_size * image.patch_size
    mean, std = pre.get("mean"), pre.get("std")
    ok = (pre.get("image_size", size) == size and pre.get("channels", channels) == channels and channels in (1, 3)
          and isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels
          and all(isinstance(v, (int, float)) for v in mean + std) and all(v > 0 for v in std))
    if not ok:
        raise SelfsupError(f"{meta_path}: preprocess must hold image_size {size}, channels {channels} (1 or 3) and "
                           f"a mean and a positive std per channel, got {pre}")
    return {"image_size": size, "channels": channels, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std]}


def _config(transformers: Any, image: ViT, text: TextTransformer, head: dict[str, Tensor],
            ids: dict[str, int]) -> Any:
    """The CLIPConfig of these towers and head."""
    embed_dim = head["image_proj.weight"].shape[0]
    common: dict[str, Any] = dict(hidden_act="gelu",  # exact erf GELU as nn.GELU(); CLIP's default is quick_gelu
                                  layer_norm_eps=1e-6, attention_dropout=0.0, projection_dim=embed_dim)
    vision = dict(hidden_size=image.dim, intermediate_size=_hidden(image), num_hidden_layers=len(image.blocks),
                  num_attention_heads=image.cfg.heads, num_channels=3, image_size=image.grid_size * image.patch_size,
                  patch_size=image.patch_size, **common)
    text_config = dict(vocab_size=text.vocab_size, hidden_size=text.dim, intermediate_size=_hidden(text),
                       num_hidden_layers=len(text.blocks), num_attention_heads=text.cfg.heads,
                       max_position_embeddings=text.max_len, **ids, **common)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=embed_dim,
                                     logit_scale_init_value=float(head["logit_scale"]))
    config.architectures = [HF_MODEL]
    return config


def _hidden(encoder: ViT | TextTransformer) -> int:
    """The MLP width (int(dim * mlp_ratio), read from the weights)."""
    return encoder.blocks[0].mlp[0].out_features if len(encoder.blocks) else int(encoder.dim * encoder.cfg.mlp_ratio)


def _blocks(src: dict[str, Tensor], dim: int, depth: int, prefix: str) -> dict[str, Tensor]:
    """CLIPEncoderLayer weights under `prefix` (e.g. "vision_model.encoder.") of our pre-LN blocks."""
    return block_state(src, dim, depth, f"{prefix}layers.", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                        ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")))


def _state_dict(image: ViT, text: TextTransformer, head: dict[str, Tensor], grey: bool) -> dict[str, Tensor]:
    """The CLIPModel state dict of the towers and head (the module docstring's table)."""
    img = {key: value.detach().float().clone() for key, value in image.state_dict().items()}
    txt = {key: value.detach().float().clone() for key, value in text.state_dict().items()}
    positions = img["pos_embed"][0].clone()  # [1 + N, D]
    positions[1:] += img["patch_embed.bias"]  # the conv bias, folded into every patch position (exact)
    patch = img["patch_embed.weight"]  # [D, C, p, p]
    if grey:  # one grey channel = the luma of three equal-normalised ones (module docstring)
        patch = torch.cat([patch * c for c in _LUMA], dim=1)  # [D, 3, p, p]
    v, t = "vision_model.", "text_model."
    state: dict[str, Tensor] = {
        f"{v}embeddings.class_embedding": img["cls_token"].reshape(-1),
        f"{v}embeddings.patch_embedding.weight": patch.contiguous(),
        f"{v}embeddings.position_embedding.weight": positions,
        f"{v}pre_layrnorm.weight": img["pre_norm.weight"],
        f"{v}pre_layrnorm.bias": img["pre_norm.bias"],
        f"{v}post_layernorm.weight": img["norm.weight"],
        f"{v}post_layernorm.bias": img["norm.bias"],
        f"{t}embeddings.token_embedding.weight": txt["token_embed.weight"],
        f"{t}embeddings.position_embedding.weight": txt["pos_embed.weight"],
        f"{t}final_layer_norm.weight": txt["norm.weight"],
        f"{t}final_layer_norm.bias": txt["norm.bias"],
        "visual_projection.weight": head["image_proj.weight"].clone(),
        "text_projection.weight": head["text_proj.weight"].clone(),
        "logit_scale": head["logit_scale"].reshape(()).clone(),
    }
    state.update(_blocks(img, image.dim, len(image.blocks), f"{v}encoder."))
    state.update(_blocks(txt, text.dim, len(text.blocks), f"{t}encoder."))
    return state


def _write_tokenizer(folder: Path, tokenizer_path: Path, tokenizer: TextTokenizer, max_len: int) -> None:
    """tokenizer.json (wrapping every text as caption_ids does) and tokenizer_config.json into `folder`."""
    backend = Tokenizer.from_file(str(tokenizer_path))
    backend.no_padding()  # the caller pads (padding=True), to the right, with the pad token
    backend.no_truncation()
    bos, eos = tokenizer.packing_bounds
    assert eos is not None
    eos_token, pad_token = backend.id_to_token(eos), backend.id_to_token(tokenizer.pad_id)
    bos_token = eos_token if bos is None else backend.id_to_token(bos)
    start = "" if bos is None else f"{bos_token} "
    # A caption is its tokens and the end-of-text token, where the text tower pools (caption_ids):
    # "$A <|endoftext|>" for BPE ("[CLS] $A [SEP]" for WordPiece). A pair has no meaning for CLIP; it is
    # given the same shape so that it encodes at all.
    specials = [(eos_token, eos)] + ([] if bos is None else [(bos_token, bos)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{start}$A {eos_token}", pair=f"{start}$A {eos_token} $B:1 {eos_token}:1", special_tokens=specials,
    )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # runs tokenizer.json as is (CLIPTokenizer rebuilds its own)
        "model_max_length": max_len,
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],  # CLIPModel takes no token_type_ids
        "clean_up_tokenization_spaces": False,
        # selfsup encodes special-token strings inside a caption as text, so the end-of-text id (where
        # the model pools) occurs only at the end; the same here.
        "split_special_tokens": True,
        "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
    }
    if tokenizer.unk_id is not None:
        config["unk_token"] = backend.id_to_token(tokenizer.unk_id)
    # Written by Python rather than backend.save, whose I/O errors are plain Exceptions: a full disk
    # must arrive as the OSError publish_export reports.
    (folder / "tokenizer.json").write_text(backend.to_str(pretty=True), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_readme(folder: Path, name: str, method: str, image: ViT, text: TextTransformer, embed_dim: int,
                  pre: dict[str, Any]) -> None:
    """README.md (the model card on the Hub): the architecture, how to load it, what its inputs must be."""
    size = pre["image_size"]
    grey = (
        "\nThe run trained on greyscale images; the export is an RGB model that computes their luma (ITU-R 601, as "
        "Pillow's `convert(\"L\")`) inside its first layer, so give it colour or greyscale images as RGB.\n"
        if pre["channels"] == 1 else ""
    )
    text_card = f"""\
---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags:
- clip
---

# {name}

An image–text model pretrained with selfsup (method `{method}`) and exported by `selfsup export --format hf`.
It loads with plain `transformers`: no selfsup code and no `trust_remote_code`.

Architecture: `CLIPModel` (model_type `clip`): a ViT image tower ({len(image.blocks)} blocks of width {image.dim},
{image.cfg.heads} heads, {image.patch_size}-pixel patches of {size}x{size} images) and a causal text tower
({len(text.blocks)} blocks of width {text.dim}, {text.cfg.heads} heads, pooled at the end-of-text token), projected
into a shared space of {embed_dim}.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, pipeline

folder = "{name}"  # this folder's path, or its Hub repo id
classify = pipeline("zero-shot-image-classification", model=folder)
image = Image.new("RGB", ({size}, {size}), "red")
print(classify(image, candidate_labels=["red", "green"], hypothesis_template="{{}}"))

model = CLIPModel.from_pretrained(folder).eval()
tokenizer, processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
texts = tokenizer(["a red square", "a green dot"], padding=True, truncation=True, return_tensors="pt")
pixels = processor(images=[image], return_tensors="pt")
with torch.no_grad():
    logits = model(**texts, **pixels).logits_per_image  # [images, texts]
```

Inputs: images are resized so that the shorter side is {size} pixels and centre-cropped to {size}x{size}, then
normalised with the training data's per-channel mean and std (`preprocessor_config.json`). Captions are the
tokenizer's tokens followed by the end-of-text token (the tokenizer adds it; no start token), right-padded, at most
{text.max_len} tokens (`model_max_length`): pass `truncation=True` for longer texts, which otherwise fail inside the
model. The tokenizer encodes special-token strings inside a text as text (`split_special_tokens`), as
pretraining did. The pipeline's default `hypothesis_template` is "This is a photo of {{}}."; a template like the
captions the model was trained on usually works better.
{grey}"""
    (folder / "README.md").write_text(text_card, encoding="utf-8")
