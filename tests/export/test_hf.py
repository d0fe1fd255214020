"""Hugging Face export: the exported model computes what the selfsup encoder computes.

Every weight (LayerNorms and the output bias included) is randomised before export, so a swapped,
untransposed or dropped tensor changes the logits far beyond the 1e-5 tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfsup.data.tokenizer import TextTokenizer, train_tokenizer  # noqa: E402
from selfsup.encoders import build_encoder, describe_encoder  # noqa: E402
from selfsup.errors import SelfsupError  # noqa: E402
from selfsup.export.encoder import save_encoder  # noqa: E402
from selfsup.export.hf import export_hf  # noqa: E402

MAX_LEN = 16
SIZE = {"dim": 32, "depth": 2, "heads": 2}
_ANIMALS = ["fox", "cat", "heron", "cow", "otter", "lynx"]
_ADJECTIVES = ["quick", "slow", "red", "sleepy", "clever", "old"]
TEXTS = [f"the {_ADJECTIVES[i % 6]} {_ANIMALS[(i * 5) % 6]} jumps over the {_ADJECTIVES[(i + 2) % 6]} dog, "
         f"number {i} of {i % 7} tries." for i in range(40)]
SAMPLE = "The clever otter jumps over the old dog."
AUTO = {"text_encoder": "AutoModelForMaskedLM", "text_decoder": "AutoModelForCausalLM"}
KIND = {"text_encoder": "wordpiece", "text_decoder": "bpe"}


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, TextTokenizer]:
    return {"wordpiece": train_tokenizer(TEXTS, "wordpiece", vocab_size=120),
            "bpe": train_tokenizer(TEXTS, "bpe", vocab_size=300)}


def _randomise(encoder: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            # LayerNorm gains around 1, everything else (biases, lm_bias, embeddings) around 0.
            is_gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.3 * noise if is_gain else 0.3 * noise)


def _make_run(
    root: Path, preset: str, tokenizer: TextTokenizer, seed: int = 0, **overrides,
) -> tuple[Path, torch.nn.Module]:
    """A fake finished run directory holding a randomised `preset` encoder and its tokenizer."""
    kw = {"vocab_size": tokenizer.vocab_size, "max_len": MAX_LEN, **SIZE, **overrides}
    encoder = build_encoder(preset, **kw)
    _randomise(encoder, seed)
    run = root / "run"
    save_encoder(run, encoder, {
        "encoder": describe_encoder(preset, **kw),
        "preprocess": {"modality": "text", "tokenizer": "tokenizer.json", "seq_len": MAX_LEN},
        "method": {"name": "mlm" if preset == "text_encoder" else "next_token"},
    })
    tokenizer.save(run / "tokenizer.json")
    return run, encoder.eval()


def _ids(tokenizer: TextTokenizer, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random ids of non-special tokens (a pad id inside the text would shift RoBERTa's positions)."""
    low = max(tokenizer.special_ids) + 1
    return torch.randint(low, tokenizer.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


_CASES = [("text_encoder", True), ("text_encoder", False), ("text_decoder", True), ("text_decoder", False)]


@pytest.fixture(scope="module", params=_CASES, ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def exported(request, tmp_path_factory, tokenizers):
    preset, tied = request.param
    tokenizer = tokenizers[KIND[preset]]
    root = tmp_path_factory.mktemp(f"{preset}-{tied}")
    run, encoder = _make_run(root, preset, tokenizer, seed=1 + tied, tie_embeddings=tied)
    out = export_hf(run, root / "hf")
    model = getattr(transformers, AUTO[preset]).from_pretrained(out).eval()
    return preset, tokenizer, encoder, model, out


def test_exported_model_gives_the_same_logits(exported) -> None:
    preset, tokenizer, encoder, model, _ = exported
    expected_type = "RobertaPreLayerNormForMaskedLM" if preset == "text_encoder" else "GPT2LMHeadModel"
    assert type(model).__name__ == expected_type
    ids = _ids(tokenizer, 3, MAX_LEN, seed=7)
    with torch.no_grad():
        ours = encoder.lm_head(encoder(ids))  # [B, L, V]
        theirs = model(input_ids=ids).logits
    assert theirs.shape == ours.shape
    assert ours.abs().max() > 1.0  # the comparison below is not between two near-zero tensors
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_exported_model_matches_with_right_padding(exported) -> None:
    preset, tokenizer, encoder, model, _ = exported
    ids = _ids(tokenizer, 3, 12, seed=8)
    lengths = torch.tensor([12, 7, 3])
    mask = torch.arange(12) < lengths[:, None]  # [B, L], True = real token
    ids = ids.masked_fill(~mask, tokenizer.pad_id)
    with torch.no_grad():
        ours = encoder.lm_head(encoder(ids, attention_mask=mask))
        theirs = model(input_ids=ids, attention_mask=mask.long()).logits
    # Padding positions' outputs are garbage in both (and differ); only real tokens count.
    assert (theirs - ours)[mask].abs().max().item() <= 1e-5


def test_exported_tokenizer_encodes_as_selfsup(exported) -> None:
    preset, tokenizer, _, _, out = exported
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.model_max_length == MAX_LEN
    assert auto.pad_token_id == tokenizer.pad_id
    ids = auto(SAMPLE)["input_ids"]
    plain = tokenizer.encode_batch([SAMPLE])[0]
    if tokenizer.kind == "wordpiece":
        assert ids == [tokenizer.cls_id, *plain, tokenizer.sep_id]
        assert auto.mask_token_id == tokenizer.mask_id
    else:  # GPT-2 convention: nothing added
        assert ids == plain
        assert auto.eos_token_id == tokenizer.eos_id
    assert auto.decode(plain) == tokenizer.decode(plain)


def test_tokenizer_output_feeds_the_model(exported) -> None:
    """tokenizer(a, b) may return token_type_ids (1 for the second segment), which the model must accept as no-ops."""
    preset, _, _, model, out = exported
    auto = transformers.AutoTokenizer.from_pretrained(out)
    batch = auto(["the quick fox", "a dog"], ["jumps over", "the old cat sleeps"], padding=True,
                 return_token_type_ids=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        without_types = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()
    if preset == "text_encoder":
        assert batch["token_type_ids"].max() == 1
        real = batch["attention_mask"].bool()
        assert (logits - without_types)[real].abs().max().item() == 0.0


def test_config_json_holds_the_mapping(exported) -> None:
    preset, tokenizer, encoder, _, out = exported
    config = json.loads((out / "config.json").read_text())
    if preset == "text_encoder":
        assert config["model_type"] == "roberta-prelayernorm"
        assert config["max_position_embeddings"] == MAX_LEN + tokenizer.pad_id + 1
        assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu"
    else:
        assert config["model_type"] == "gpt2"
        assert config["activation_function"] == "gelu" and config["layer_norm_epsilon"] == 1e-6
        assert config["n_positions"] == MAX_LEN
        assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eos_id
    assert config["tie_word_embeddings"] == encoder.cfg.tie_embeddings
    assert config["pad_token_id"] == tokenizer.pad_id


def test_rotary_positions_are_refused(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"], positions="rotary")
    with pytest.raises(SelfsupError, match="positions"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_half_bert_encoder_is_refused(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_encoder", tokenizers["wordpiece"], lm_transform=False)
    with pytest.raises(SelfsupError, match="lm_transform"):
        export_hf(run, tmp_path / "hf")


def test_missing_tokenizer_is_named(tmp_path, tokenizers) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    (run / "tokenizer.json").unlink()
    with pytest.raises(SelfsupError, match="tokenizer.json"):
        export_hf(run, tmp_path / "hf")


def test_missing_encoder_is_named(tmp_path) -> None:
    with pytest.raises(SelfsupError, match="encoder.json"):
        export_hf(tmp_path, tmp_path / "hf")


def test_non_empty_output_needs_overwrite(tmp_path, tokenizers) -> None:
    run, encoder = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SelfsupError, match="overwrite"):
        export_hf(run, out)
    assert (out / "notes.txt").read_text() == "keep me"
    # Not an export selfsup made: overwrite does not delete it either (test_hf_folder.py has the rest).
    with pytest.raises(SelfsupError, match="notes.txt"):
        export_hf(run, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    export_hf(run, out)  # an empty folder is filled without overwrite
    export_hf(run, out, overwrite=True)  # and the export selfsup made is replaced with it
    assert (out / "model.safetensors").is_file()
    # Nothing left behind from the temporary folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_missing_transformers_says_how_to_install(tmp_path, tokenizers, monkeypatch) -> None:
    run, _ = _make_run(tmp_path, "text_decoder", tokenizers["bpe"])
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(SelfsupError, match=r"pip install 'selfsup\[hf\]'"):
        export_hf(run, tmp_path / "hf")
