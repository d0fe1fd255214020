"""Hugging Face export of a CLIP run: the CLIPModel's logits_per_image are selfsup's, its tokenizer
encodes captions as selfsup does, and the zero-shot-image-classification pipeline runs on the folder.

One tiny CLIP run is pretrained with the CLI on a manifest of coloured shapes, then every tower weight
and the head are randomised (LayerNorm gains around 1, everything else around 0), so a swapped,
unsplit, unfolded or dropped tensor moves the logits far beyond 1e-4. Selfsup's side is the method's
own `embed_images` / `embed_texts` on the run's towers and `clip_head.safetensors`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from selfsup import files  # noqa: E402
from selfsup.cli import main  # noqa: E402
from selfsup.data.images import images_from_array  # noqa: E402
from selfsup.data.tokenizer import TextTokenizer  # noqa: E402
from selfsup.data.views import normalise  # noqa: E402
from selfsup.encoders import build_encoder, describe_encoder  # noqa: E402
from selfsup.errors import SelfsupError  # noqa: E402
from selfsup.export import hf_clip  # noqa: E402
from selfsup.export.encoder import load_encoder, save_encoder  # noqa: E402
from selfsup.export.hf_clip import export_hf_clip, is_clip_run  # noqa: E402
from selfsup.methods import clip  # noqa: E402
from selfsup.modalities.image_text import caption_ids  # noqa: E402

SIZE, SEQ_LEN = 16, 12
TOWER = {"dim": 32, "depth": 2, "heads": 2}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "dot", "stripe")
# Different lengths (right padding), a special-token string inside a caption (text, not the end-of-text
# id), and one longer than SEQ_LEN (cut to SEQ_LEN - 1 tokens + end-of-text).
CAPTIONS = ["a red square", "dot", "a blue <|endoftext|> stripe",
            "a green square next to a yellow stripe and a red dot on a blue square"]


def _shape(colour: tuple[int, int, int], shape: str, seed: int) -> np.ndarray:
    a = np.full((SIZE, SIZE, 3), 255, np.uint8)
    if shape == "square":
        a[4:12, 4:12] = colour
    elif shape == "dot":
        a[6:10, 6:10] = colour
    else:
        a[:, 6:10] = colour
    noise = np.random.default_rng(seed).integers(-12, 12, a.shape)
    return np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.3 * noise if is_gain else 0.3 * noise)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    rows = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            name = f"{colour}_{shape}.png"
            Image.fromarray(_shape(rgb, shape, 3 * i + j)).save(root / name)
            rows.append((name, f"a {colour} {shape}", colour))
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)
    run = root / "run"
    towers = [f"encoders.{role}.{key}={value}" for role in ("image", "text") for key, value in TOWER.items()]
    assert main(["pretrain", "--out", str(run), "method.name=clip", f"data.source={root / 'pairs.csv'}",
                 f"data.image_size={SIZE}", f"data.seq_len={SEQ_LEN}", *towers, "train.steps=3", "train.batch_size=8",
                 "train.precision=fp32", "train.device=cpu", "train.log_every=1"]) == 0
    # Randomise every weight (tower files and head) so that the parity below tests the mapping.
    for seed, role in enumerate(("image", "text")):
        encoder, _ = load_encoder(run / "towers" / role)
        _randomise(encoder, seed)
        save_model(encoder, str(run / "towers" / role / "encoder.safetensors"))
    head = load_file(str(run / clip.HEAD_FILE))
    gen = torch.Generator().manual_seed(5)
    head = {k: (v + 0.3 * torch.randn(v.shape, generator=gen)) if v.dim() else torch.tensor(3.0)
            for k, v in head.items()}
    save_file(head, str(run / clip.HEAD_FILE))
    return run


@pytest.fixture(scope="module")
def exported(clip_run, tmp_path_factory) -> Path:
    """Exported by the CLI: `selfsup export RUN --out OUT` (format hf, no --tower) is the CLIP export."""
    out = tmp_path_factory.mktemp("hf") / "clip-hf"
    assert main(["export", str(clip_run), "--out", str(out)]) == 0
    return out


def _selfsup_clip(run: Path) -> clip.CLIP:
    """The method module on the run's towers and head (what zero-shot and retrieval use)."""
    image, _ = load_encoder(run / "towers" / "image")
    text, _ = load_encoder(run / "towers" / "text")
    head = load_file(str(run / clip.HEAD_FILE))
    method = clip.CLIP(clip.Config(embed_dim=head["image_proj.weight"].shape[0]), image, text)
    missing, unexpected = method.load_state_dict(head, strict=False)
    assert not unexpected and all(k.startswith(("image.", "text.")) for k in missing)
    return method.eval()


def _selfsup_logits(method: clip.CLIP, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return method.logit_scale.exp() * method.embed_images(pixels) @ method.embed_texts(ids, mask).T


def test_export_holds_a_clip_model_with_every_weight(clip_run, exported) -> None:
    assert is_clip_run(clip_run) and not is_clip_run(clip_run / "towers" / "image")
    names = {p.name for p in exported.iterdir()}
    assert names - {files.MARKER} == set(hf_clip.EXPORT_FILES)
    assert files.read_marker(exported)["kind"] == "export"
    model, info = transformers.CLIPModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((exported / "config.json").read_text())
    tokenizer = TextTokenizer.load(clip_run / "towers" / "text" / "tokenizer.json")
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["hidden_act"] == vision["hidden_act"] == "gelu"
    assert text["layer_norm_eps"] == vision["layer_norm_eps"] == 1e-6
    assert text["eos_token_id"] == tokenizer.eos_id != 2 and text["pad_token_id"] == tokenizer.pad_id
    assert text["max_position_embeddings"] == SEQ_LEN and vision["image_size"] == SIZE
    assert hf_clip.HEAD_FILE == clip.HEAD_FILE


def test_tokenizer_encodes_captions_as_selfsup(clip_run, exported) -> None:
    ours = TextTokenizer.load(clip_run / "towers" / "text" / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    batch = theirs(CAPTIONS, padding=True, truncation=True, return_tensors="pt")
    ids, mask = caption_ids(ours, CAPTIONS, SEQ_LEN)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"].bool(), mask)
    assert (ids == ours.eos_id).sum(dim=1).tolist() == [1] * len(CAPTIONS), "end-of-text only at the end"


def test_logits_per_image_match_selfsup(clip_run, exported) -> None:
    model = transformers.CLIPModel.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    batch = tokenizer(CAPTIONS, padding=True, truncation=True, return_tensors="pt")
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(**batch, pixel_values=pixels).logits_per_image  # [3, 4]
    ours = _selfsup_logits(_selfsup_clip(clip_run), pixels, batch["input_ids"], batch["attention_mask"].bool())
    assert theirs.shape == ours.shape == (3, len(CAPTIONS))
    assert ours.abs().max() > 0.5, "the logits are not all near zero"
    assert (theirs - ours).abs().max().item() < 1e-4


def test_image_processor_prepares_images_as_selfsup(clip_run, exported) -> None:
    processor = transformers.AutoImageProcessor.from_pretrained(exported)
    pre = json.loads((clip_run / "towers" / "image" / "encoder.json").read_text())["preprocess"]
    images = [_shape(rgb, shape, 7) for rgb in COLOURS.values() for shape in SHAPES[:1]]
    pixels = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    ours = normalise(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), pre["mean"], pre["std"], SIZE)
    assert (pixels - ours).abs().max().item() < 1e-5


def test_zero_shot_pipeline_scores_as_selfsup(clip_run, exported) -> None:
    classify = transformers.pipeline("zero-shot-image-classification", model=str(exported), device="cpu")
    labels = ["red square", "dot", "a blue stripe, green"]  # the pipeline pads (padding=True)
    image = Image.fromarray(_shape(COLOURS["red"], "square", 9))
    result = classify(image, candidate_labels=labels, hypothesis_template="a {}")
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    # The same scores from selfsup: the processor's pixels, selfsup's tokens, the method's embeddings.
    pixels = transformers.AutoImageProcessor.from_pretrained(exported)(images=[image], return_tensors="pt")
    ids, mask = caption_ids(TextTokenizer.load(clip_run / "towers" / "text" / "tokenizer.json"),
                            [f"a {label}" for label in labels], SEQ_LEN)
    assert len(set(mask.sum(dim=1).tolist())) == 3, "captions of three lengths"
    probs = _selfsup_logits(_selfsup_clip(clip_run), pixels["pixel_values"], ids, mask).softmax(dim=-1)[0]
    assert {r["label"]: r["score"] for r in result} == pytest.approx(dict(zip(labels, probs.tolist())), abs=1e-5)


def _copy_run(clip_run: Path, root: Path) -> Path:
    run = root / "run"
    shutil.copytree(clip_run / "towers", run / "towers")
    shutil.copy(clip_run / clip.HEAD_FILE, run / clip.HEAD_FILE)
    return run


def _replace_tower(run: Path, role: str, name: str, preprocess: dict | None = None, **config) -> torch.nn.Module:
    """Saves a randomised `name` encoder as the run's `role` tower (the other files unchanged)."""
    folder = run / "towers" / role
    meta = json.loads((folder / "encoder.json").read_text())
    inputs = {k: v for k, v in meta["encoder"].items() if k not in ("name", "config")}
    inputs.update(config)
    encoder = build_encoder(name, **inputs)
    _randomise(encoder, 11)
    meta["encoder"] = describe_encoder(name, **inputs)
    if preprocess is not None:
        meta["preprocess"].update(preprocess)
    save_encoder(folder, encoder, meta)
    return encoder.eval()


def test_greyscale_run_exports_as_an_rgb_model_of_the_luma(clip_run, tmp_path) -> None:
    run = _copy_run(clip_run, tmp_path)
    _replace_tower(run, "image", "clip_vit", {"channels": 1, "mean": [0.8], "std": [0.25]}, in_channels=1, **TOWER)
    out = export_hf_clip(run, tmp_path / "hf")
    model = transformers.CLIPModel.from_pretrained(out).eval()
    assert model.config.vision_config.num_channels == 3
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.8] * 3 and processor["image_std"] == [0.25] * 3
    # Colour images: selfsup reads them as their luma (images_from_array, before its rounding to uint8);
    # the export reads them as RGB normalised with the grey mean and std.
    rgb = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    luma = (rgb.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    assert torch.equal(luma.round().to(torch.uint8), images_from_array(rgb.numpy(), SIZE, 1))
    grey = (luma / 255 - 0.8) / 0.25  # [2, 1, S, S]
    ids, mask = caption_ids(TextTokenizer.load(run / "towers" / "text" / "tokenizer.json"), CAPTIONS[:2], SEQ_LEN)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask.long(),
                       pixel_values=normalise(rgb, [0.8] * 3, [0.25] * 3)).logits_per_image
    assert (theirs - _selfsup_logits(_selfsup_clip(run), grey, ids, mask)).abs().max().item() < 1e-4


@pytest.mark.parametrize(("role", "name", "config", "message"), [
    ("image", "resnet10", {"width": 8}, r"encoder 'resnet10', not a ViT.*encoders\.image\.name=clip_vit"),
    ("image", "clip_vit", {**TOWER, "pre_norm": False}, r"pre_norm=False.*encoders\.image\.pre_norm=true"),
    ("text", "clip_text", {**TOWER, "pool": "mean"}, r"pool='mean'.*encoders\.text\.pool=last"),
    ("text", "clip_text", {**TOWER, "causal": False}, r"causal=False.*encoders\.text\.causal=true"),
    ("text", "clip_text", {**TOWER, "positions": "rotary"}, r"encoders\.text\.positions=learned"),
])
def test_layouts_without_a_clip_equivalent_are_refused(clip_run, tmp_path, role, name, config, message) -> None:
    run = _copy_run(clip_run, tmp_path)
    _replace_tower(run, role, name, **config)
    with pytest.raises(SelfsupError, match=message):
        export_hf_clip(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_end_of_text_id_of_2_is_refused(clip_run, tmp_path, monkeypatch) -> None:
    # transformers pools at argmax(input_ids) when eos_token_id == 2 (a legacy config), not at the token.
    monkeypatch.setattr(TextTokenizer, "eos_id", property(lambda self: 2))
    with pytest.raises(SelfsupError, match="id 2"):
        export_hf_clip(clip_run, tmp_path / "hf")


def test_missing_head_is_named(clip_run, tmp_path) -> None:
    run = _copy_run(clip_run, tmp_path)
    (run / clip.HEAD_FILE).unlink()
    with pytest.raises(SelfsupError, match=clip.HEAD_FILE):
        export_hf_clip(run, tmp_path / "hf")


def test_overwrite_replaces_only_an_export_selfsup_made(clip_run, tmp_path) -> None:
    """The rules of the other exports (claim_output, publish_export), on the CLIP export."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="overwrite"):
        export_hf_clip(clip_run, out)
    with pytest.raises(SelfsupError, match="notes.txt"):  # not an export selfsup made: never deleted
        export_hf_clip(clip_run, out, overwrite=True)
    (out / "notes.txt").unlink()
    export_hf_clip(clip_run, out)
    export_hf_clip(clip_run, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind


def test_readme_code_runs(exported, monkeypatch, capsys) -> None:
    """The README's snippet is what a user pastes: it must load and run as written."""
    text = (exported / "README.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(exported.parent)  # `folder = "<name>"` is relative to where the user stands
    scope: dict = {}
    exec(compile(code, str(exported / "README.md"), "exec"), scope)
    assert "'label': 'red'" in capsys.readouterr().out and scope["logits"].shape == (1, 2)
