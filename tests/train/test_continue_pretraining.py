"""Issue 17: continued pretraining from a base. `encoder.name=hf:DIR` makes an `mlm` / `next_token`
run continue a local transformers model (its own tokenizer, its LM head when the folder has one,
else a fresh head, logged), and `encoder.init=RUN` continues an image run from another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.data.tokenizer import train_tokenizer
from selfsup.export.encoder import load_encoder
from selfsup.pretrain import untrained_tower
from tests.conftest import TINY_RUN
from tests.train.test_pretrain_text import write_corpus

transformers = pytest.importorskip("transformers")

# Extra special tokens first, so the folder's [MASK] id is not selfsup's default 4.
_SPECIAL = ["[unused0]", "[unused1]", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_folder(folder: Path, texts: list[str], *, head: bool) -> Path:
    """A tiny BERT as transformers saves one (BertForMaskedLM with `head`, else a bare BertModel as
    all-MiniLM-L6-v2 ships), with a WordPiece tokenizer.json whose [MASK] id is 6."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=100, special_tokens=_SPECIAL,
                                                             show_progress=False))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size() + 3, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    (transformers.BertForMaskedLM if head else transformers.BertModel)(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", num_docs=60)


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


def _mlm(corpus: Path, folder: Path, *extra: str) -> list[str]:
    return ["method.name=mlm", f"encoder.name=hf:{folder}", f"data.source={corpus}", "data.seq_len=16",
            "train.steps=4", "train.batch_size=8", "train.lr=3e-3", "train.precision=fp32", "train.device=cpu",
            "train.eval_every=2", "train.eval_max_blocks=8", "train.log_every=1", *extra]


@pytest.mark.parametrize("head", [True, False], ids=["masked-lm-folder", "bare-bert-folder"])
def test_mlm_continues_a_bert_folder(tmp_path, corpus, texts, head, capsys):
    folder = _bert_folder(tmp_path / "bert", texts, head=head)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), *_mlm(corpus, folder)]) == 0
    log = capsys.readouterr().err
    # the folder's tokenizer, never a trained one: its vocabulary, its [MASK] id
    assert (run / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    assert "training a wordpiece tokenizer" not in log and "not training one" in log
    cfg = load_config(run / "config.yaml")
    assert cfg.method.get("mask_id", None) in (None, 6)
    assert "the other 3 rows are never read" in log  # the vocabulary mismatch is reported
    # the head: the folder's when it has one, else fresh and logged
    if head:
        assert "masked-LM head starts from the folder's weights" in log
    else:
        assert "holds no masked-LM head" in log and "freshly initialised" in log
    # it trained from the folder's weights
    encoder, meta = load_encoder(run)
    assert meta["encoder"]["name"] == "hf" and meta["encoder"]["head"] == "masked_lm"
    assert meta["encoder"]["source"] == str(folder) and meta["preprocess"]["seq_len"] == 16
    reference = transformers.BertModel.from_pretrained(folder).state_dict()
    start = untrained_tower(run, cfg, "encoder")
    assert all(torch.equal(v, reference[k]) for k, v in start.model.state_dict().items() if k in reference)
    assert any(not torch.equal(v, reference[k]) for k, v in encoder.model.state_dict().items() if k in reference)
    if head:
        lm_head = transformers.BertForMaskedLM.from_pretrained(folder).cls.state_dict()
        assert all(torch.equal(start.head.state_dict()[k], v) for k, v in lm_head.items())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "heldout_masked_acc" in metrics[-1] and metrics[-1]["step"] == 4
    # the encoder files work downstream: probe (against where it began), and the encoder export
    assert main(["probe", str(run), "--fractions", "1.0", "--compare-untrained"]) == 0
    assert main(["export", str(run), "--format", "encoder", "--out", str(tmp_path / "enc")]) == 0
    again, _ = load_encoder(tmp_path / "enc")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in encoder.state_dict().items())
    # and back to transformers: the trained model with its head, and the folder's tokenizer
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").state_dict()
    ours = encoder.transformers_model.state_dict()
    assert set(exported) == set(ours) and all(torch.equal(exported[k], v) for k, v in ours.items())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").mask_token_id == 6


def test_mlm_mask_id_is_the_folders(tmp_path, corpus, texts, monkeypatch):
    """MLM masks with the folder tokenizer's [MASK] id (6 here), not selfsup's default (4)."""
    from selfsup.methods import mlm

    folder = _bert_folder(tmp_path / "bert", texts, head=True)
    seen = []
    real = mlm.mask_tokens
    monkeypatch.setattr(mlm, "mask_tokens", lambda ids, cfg, *a: seen.append((cfg.mask_id, cfg.special_ids)) or
                        real(ids, cfg, *a))
    assert main(["pretrain", "--out", str(tmp_path / "run"), *_mlm(corpus, folder, "train.steps=1")]) == 0
    assert seen and seen[0] == (6, [2, 3, 4, 5, 6])


def test_next_token_continues_a_gpt2_export(tmp_path, corpus):
    """next_token from a GPT-2 folder (selfsup's own --format hf export): its tied lm_head is used."""
    from tests.train.test_pretrain_text import tiny_text_run

    (tmp_path / "base").mkdir()
    base, _ = tiny_text_run(tmp_path / "base", "next_token", num_docs=60, steps=2)
    assert main(["export", str(base), "--format", "hf", "--out", str(tmp_path / "gpt2")]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "method.name=next_token", f"encoder.name=hf:{tmp_path / 'gpt2'}",
                 f"data.source={corpus}", "data.seq_len=16", "train.steps=3", "train.batch_size=8",
                 "train.precision=fp32", "train.device=cpu", "train.log_every=1"]) == 0
    encoder, meta = load_encoder(run)
    assert meta["encoder"]["head"] == "causal_lm" and encoder.head.weight is encoder.model.wte.weight
    start = untrained_tower(run, load_config(run / "config.yaml"), "encoder")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").state_dict()
    assert torch.equal(start.head.weight, reference["lm_head.weight"])
    assert (run / "tokenizer.json").read_text() == (tmp_path / "gpt2" / "tokenizer.json").read_text()


def test_continued_pretraining_errors_name_the_folder(tmp_path, corpus, texts, capsys):
    bert = _bert_folder(tmp_path / "bert", texts, head=True)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=32)).save_pretrained(gpt2)
    train_tokenizer(texts, "bpe", 300, 1).save(gpt2 / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    cases = [
        (_mlm(corpus, tmp_path / "nowhere"), [f"{tmp_path / 'nowhere'} does not exist", "config.json"]),
        (_mlm(corpus, tmp_path / "empty"), [f"{tmp_path / 'empty'} is not a transformers model folder"]),
        (_mlm(corpus, gpt2), [str(gpt2), "`gpt2` model, which has no masked-LM form", "method.name=next_token"]),
        (["method.name=next_token", f"encoder.name=hf:{bert}", f"data.source={corpus}"],
         [str(bert), "bidirectional", "method.name=mlm"]),
        (_mlm(corpus, bert, "data.seq_len=64"), ["data.seq_len=64", str(bert), "at most 32 positions"]),
        (_mlm(corpus, bert, "encoder.dim=32"), ["a Hugging Face tower's architecture is its config.json"]),
    ]
    for index, (overrides, messages) in enumerate(cases):
        out = tmp_path / f"r{index}"
        assert main(["pretrain", "--out", str(out), *overrides]) == EXIT_BAD_INPUT, overrides
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, (message, err)
        assert not out.exists()


def test_simclr_continues_a_simclr_run(tmp_path):
    """Image runs continue with `encoder.init=RUN`: a SimCLR run from another SimCLR run's encoder."""
    base, follow = tmp_path / "base", tmp_path / "follow"
    assert main(["pretrain", *TINY_RUN, "method.name=simclr", "--out", str(base)]) == 0
    assert main(["pretrain", *TINY_RUN, "method.name=simclr", f"encoder.init={base}", "--out", str(follow)]) == 0
    base_weights = load_encoder(base)[0].state_dict()
    started = untrained_tower(follow, load_config(follow / "config.yaml"), "encoder").state_dict()
    assert all(torch.equal(started[k], v) for k, v in base_weights.items()), "it began where the base ended"
    trained = load_encoder(follow)[0].state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base_weights.items()), "and trained from there"
    assert json.loads(json.dumps(load_encoder(follow)[1]["encoder"]))["init"] == str(base)

