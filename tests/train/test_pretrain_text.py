"""Text pretraining end to end: MLM and next-token on a small labelled corpus, resume, tokenizer reuse, errors."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.export.encoder import load_encoder
from selfsup.modalities.text import TOKENIZER_FILE
from selfsup.pretrain import pretrain

# Three "topics", each with its own words, so there is something to learn and to probe.
TOPICS = {
    "net": "socket packet address port route network interface bind listen connect",
    "file": "file directory path mode owner permission read write inode link",
    "proc": "process signal thread fork exit wait child parent priority kill",
}


def write_corpus(path: Path, num_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(num_docs):
            label = list(TOPICS)[i % 3]
            words = TOPICS[label].split()
            # Word order follows a fixed cycle with random starts: next-token prediction can learn it.
            text = " ".join(words[(rng.randrange(len(words)) + j) % len(words)] for j in range(rng.randint(30, 60)))
            fh.write(json.dumps({"text": text, "label": label, "id": f"doc{i}"}) + "\n")
    return path


def text_overrides(corpus: Path, method: str, **extra: object) -> list[str]:
    encoder = "text_encoder" if method == "mlm" else "text_decoder"
    base = {"method.name": method, "encoder.name": encoder, "encoder.dim": 32, "encoder.depth": 2, "encoder.heads": 2,
            "data.source": str(corpus), "data.seq_len": 16, "tokenizer.vocab_size": 120 if method == "mlm" else 300, "tokenizer.min_frequency": 1,
            "train.steps": 8, "train.batch_size": 8, "train.lr": 3e-3, "train.checkpoint_every": 2, "train.keep_last": 10,
            "train.precision": "fp32", "train.device": "cpu", "train.eval_every": 2, "train.eval_max_blocks": 16,
            "train.log_every": 100}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_text_run(root: Path, method: str = "mlm", num_docs: int = 60, steps: int = 2) -> tuple[Path, Path]:
    """(run directory, its corpus): a tiny text run for the tests of what comes after pretraining."""
    corpus = write_corpus(root / "corpus.jsonl", num_docs=num_docs)
    run = root / "run"
    pretrain(load_config(None, text_overrides(corpus, method, **{"train.steps": steps})), run, show_progress=False)
    return run, corpus


def rows(run: Path) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in out:
        row.pop("samples_per_s")
        row.pop("tokens_per_s")
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.mark.parametrize("method", ["mlm", "next_token"])
def test_text_run_learns_and_exports(tmp_path, corpus, method):
    cfg = load_config(None, text_overrides(corpus, method, **{"train.steps": 30, "train.eval_every": 5}))
    result = pretrain(cfg, tmp_path / "run", show_progress=False)
    assert result.fit.steps == 30
    metrics = rows(tmp_path / "run")
    held = [r["heldout_loss"] for r in metrics if "heldout_loss" in r]
    assert len(held) == 6 and held[-1] < held[0] - 0.3, f"held-out loss must fall: {held}"
    accuracy = "heldout_masked_acc" if method == "mlm" else "heldout_next_token_acc"
    assert accuracy in metrics[-1] and "heldout_ppl" in metrics[-1]
    encoder, meta = load_encoder(tmp_path / "run")
    assert meta["preprocess"]["modality"] == "text" and meta["preprocess"]["seq_len"] == 16
    assert encoder.cfg.causal == (method == "next_token")
    assert (tmp_path / "run" / TOKENIZER_FILE).is_file()


def test_mlm_takes_mask_id_from_the_tokenizer(tmp_path, corpus, monkeypatch):
    """A BERT-style tokenizer from elsewhere with its own special-token order: MLM must mask with
    that tokenizer's [MASK] id and spare its special ids, not selfsup's defaults (4 and 0..4)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    import selfsup.methods.mlm as mlm

    words = sorted(set(" ".join(TOPICS.values()).split()))
    vocab = {t: i for i, t in enumerate(["[UNK]", "word0", "[SEP]", "[PAD]", "[CLS]", "word1", "[MASK]", *words])}
    hf = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.save(str(tmp_path / "given.json"))
    seen = []
    original = mlm.mask_tokens
    monkeypatch.setattr(mlm, "mask_tokens", lambda ids, cfg, *a: seen.append(cfg) or original(ids, cfg, *a))
    cfg = load_config(None, text_overrides(corpus, "mlm", **{"tokenizer.path": str(tmp_path / "given.json"),
                                                             "train.steps": 1}))
    pretrain(cfg, tmp_path / "run", show_progress=False)
    assert seen and seen[0].mask_id == 6 and sorted(seen[0].special_ids) == [0, 2, 3, 4, 6]
    assert (tmp_path / "run" / TOKENIZER_FILE).is_file()


@pytest.mark.parametrize("method", ["mlm", "next_token"])
def test_resume_is_bit_identical(tmp_path, corpus, method):
    pretrain(load_config(None, text_overrides(corpus, method)), tmp_path / "whole", show_progress=False)
    # The WordPiece trainer is not deterministic (data/tokenizer.py): both runs use the first one's tokenizer.
    overrides = text_overrides(corpus, method, **{"tokenizer.path": str(tmp_path / "whole" / TOKENIZER_FILE)})
    pretrain(load_config(None, overrides), tmp_path / "cut", show_progress=False, stop_after=3)
    tokenizer_bytes = (tmp_path / "cut" / TOKENIZER_FILE).read_bytes()
    pretrain(None, tmp_path / "cut", resume=True, show_progress=False)
    assert (tmp_path / "cut" / TOKENIZER_FILE).read_bytes() == tokenizer_bytes, "resume must reuse the tokenizer"
    whole, cut = load_file(tmp_path / "whole" / "encoder.safetensors"), load_file(tmp_path / "cut" / "encoder.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert rows(tmp_path / "whole") == rows(tmp_path / "cut")


def test_document_masks_run(tmp_path, corpus):
    cfg = load_config(None, text_overrides(corpus, "next_token", **{"data.document_masks": True, "train.steps": 3}))
    assert pretrain(cfg, tmp_path / "run", show_progress=False).fit.steps == 3


def test_defaults_follow_the_method():
    cfg = load_config(None, ["method.name=next_token"])
    assert cfg.encoder["name"] == "text_decoder" and cfg.data.source == "manpages"
    cfg = load_config(None, ["method.name=mlm"])
    assert cfg.encoder["name"] == "text_encoder"
    assert load_config(None, []).encoder["name"] == "resnet18" and load_config(None, []).data.source == "mnist"


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.name=mlm", "encoder.name=resnet18"], "text encoder"),
    (["method.name=simclr", "encoder.name=text_encoder"], "image encoder"),
    (["method.name=next_token", "encoder.name=text_encoder"], "causal"),
    (["method.name=mlm", "encoder.name=text_decoder"], "bidirectional"),
    (["method.name=mlm", "data.seq_len=0"], "data.seq_len"),
])
def test_mismatched_configs_are_refused(overrides, message):
    with pytest.raises(SelfsupError, match=message):
        load_config(None, overrides)


def test_a_corpus_smaller_than_one_block_is_refused(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"a b {i}"}) for i in range(6)) + "\n")
    cfg = load_config(None, text_overrides(corpus, "mlm", **{"data.seq_len": 64}))
    with pytest.raises(SelfsupError, match="seq_len"):
        pretrain(cfg, tmp_path / "run", show_progress=False)


def test_a_given_tokenizer_of_the_wrong_kind_is_refused(tmp_path, corpus):
    from selfsup.data.tokenizer import train_tokenizer

    train_tokenizer([TOPICS["net"]] * 3, "bpe", vocab_size=300, min_frequency=1).save(tmp_path / "bpe.json")
    cfg = load_config(None, text_overrides(corpus, "mlm", **{"tokenizer.path": str(tmp_path / "bpe.json")}))
    with pytest.raises(SelfsupError, match="wordpiece"):
        pretrain(cfg, tmp_path / "run", show_progress=False)
