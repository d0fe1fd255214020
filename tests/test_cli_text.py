"""The text commands end to end: tokenizer train -> pretrain -> probe -> export / generate."""

import json

import pytest

from selfsup.cli import EXIT_BAD_INPUT, main
from tests.train.test_pretrain_text import text_overrides, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", num_docs=90)


def test_tokenizer_train_then_pretrain_with_it(tmp_path, corpus, capsys):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", "300", "--min-frequency", "1",
                 "--out", str(tok)]) == 0
    assert "bpe" in capsys.readouterr().out and tok.is_file()
    out = tmp_path / "run"
    args = text_overrides(corpus, "next_token", **{"tokenizer.path": str(tok), "train.steps": 4})
    assert main(["pretrain", *args, "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == tok.read_text()
    assert main(["generate", str(out), "--prompt", "socket", "--max-new-tokens", "5", "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("socket") >= 2 and "sample 2" in printed
    # A masked-LM run cannot generate; the message says why.
    mlm = tmp_path / "mlm"
    assert main(["pretrain", *text_overrides(corpus, "mlm", **{"train.steps": 2}), "--out", str(mlm)]) == 0
    assert main(["generate", str(mlm)]) == EXIT_BAD_INPUT
    assert "causal" in capsys.readouterr().err


def test_probe_text_run_against_its_untrained_start(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *text_overrides(corpus, "mlm", **{"train.steps": 4}), "--out", str(out)]) == 0
    assert main(["probe", str(out), "--compare-untrained", "--fractions", "0.5", "1.0"]) == 0
    rows = json.loads((out / "probe.json").read_text())
    assert {(r["features"], r["probe"]) for r in rows} == {(f, p) for f in ("mlm", "untrained") for p in ("linear", "knn")}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    linear = [r["accuracy"] for r in rows if r["probe"] == "linear" and r["label_fraction"] == 1.0]
    assert min(linear) > 0.6, "three topics with disjoint words are easy to tell apart"


def test_export_hf_from_the_cli(tmp_path, corpus, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert main(["pretrain", *text_overrides(corpus, "mlm", **{"train.steps": 2}), "--out", str(out)]) == 0
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "AutoModelForMaskedLM" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == EXIT_BAD_INPUT, "no silent overwrite"


def test_bad_text_inputs_are_errors_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff\xfe line\n")
    code = main(["pretrain", "method.name=mlm", f"data.source={bad}", "train.steps=1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "bad.txt:2" in err and "data.text_errors=replace" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code = main(["tokenizer", "train", str(empty), "--kind", "bpe", "--out", str(tmp_path / "t.json")])
    assert code == EXIT_BAD_INPUT and "empty" in capsys.readouterr().err
