"""Bases `adapt` starts from: run directories, local Hugging Face folders (hf:DIR), random: twins."""

import csv

import pytest
import torch

from selfsup.adapt.bases import HFTextEncoder, base_splits, load_base
from selfsup.adapt.run import adapt, load_task, predict
from selfsup.adapt.task import AdaptConfig
from selfsup.errors import SelfsupError
from selfsup.train.runtime import Runtime
from tests.train.test_pretrain_text import tiny_text_run

pytest.importorskip("transformers")
from selfsup.export.hf import export_hf  # noqa: E402

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir, its corpus, the run exported as a Hugging Face folder)."""
    root = tmp_path_factory.mktemp("hf")
    run, corpus = tiny_text_run(root, num_docs=90, steps=4)
    return run, corpus, export_hf(run, root / "hf")


def test_hf_encoder_embeds_like_the_run_it_was_exported_from(exported):
    """Mean pooling of the Hugging Face model's last hidden states is our encoder's own embed."""
    run, _, folder = exported
    ours, meta, reader = load_base(str(run))
    theirs, hf_meta, hf_reader = load_base(f"hf:{folder}")
    tokenizer, hf_tokenizer = reader.tokenizer, hf_reader.tokenizer
    assert isinstance(theirs, HFTextEncoder) and theirs.dim == ours.dim
    assert hf_meta["preprocess"]["seq_len"] == 16, "capped by the export's model_max_length"
    texts = ["alpha beta gamma", "delta epsilon zeta eta theta iota kappa"]
    assert hf_tokenizer.encode_batch(texts) == tokenizer.encode_batch(texts)
    ids = [[tokenizer.cls_id, *doc[:14], tokenizer.sep_id] for doc in tokenizer.encode_batch(texts)]  # max_len 16
    L = max(len(x) for x in ids)
    batch = torch.full((2, L), tokenizer.pad_id)
    mask = torch.zeros(2, L, dtype=torch.bool)
    for i, row in enumerate(ids):
        batch[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval().embed(batch, mask), ours.eval().embed(batch, mask), atol=1e-4, rtol=1e-4)


def test_random_hf_twin_is_freshly_initialised(exported):
    _, _, folder = exported
    trained, _, _ = load_base(f"hf:{folder}")
    random_a, _, _ = load_base(f"random:hf:{folder}")
    random_b, _, _ = load_base(f"random:hf:{folder}")
    names = [n for n, _ in trained.named_parameters() if n.endswith("query.weight")]
    assert names
    weights = [dict(m.named_parameters())[names[0]] for m in (trained, random_a, random_b)]
    assert not torch.equal(weights[0], weights[1]), "random: must not carry the pretrained weights"
    assert torch.equal(weights[1], weights[2]), "the random twin is seeded"


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_adapt_and_predict_from_hf_folder(tmp_path, exported, mode):
    _, corpus, folder = exported
    cfg = AdaptConfig(mode=mode, epochs=2, patience=2, text_chunks=2, lr=3e-3)
    metrics = adapt(f"hf:{folder}", tmp_path / "task", cfg, data=str(corpus), runtime=CPU)
    model, task, _ = load_task(tmp_path / "task")
    assert task["encoder"]["name"] == "hf" and task["data"] == str(corpus)
    if mode == "lora":
        adapter = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "task" / "adapter.safetensors"))
        assert any(k.endswith("query.lora_a") for k in adapter) and any(k.startswith("head.") for k in adapter)
    rows = list(csv.DictReader(predict(tmp_path / "task", tmp_path / "pred.csv", runtime=CPU).open()))
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert len(rows) == metrics["num_test"] and abs(accuracy - metrics["test_acc"]) < 1e-6


def test_hf_base_needs_data_and_a_real_folder(tmp_path, exported):
    _, _, folder = exported
    with pytest.raises(SelfsupError, match="--data"):
        base_splits(f"hf:{folder}", None)
    with pytest.raises(SelfsupError, match="config.json"):
        load_base(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(SelfsupError, match="config.yaml"):
        base_splits(str(tmp_path), None)


def test_lora_on_a_gpt2_folder_names_its_conv1d_layers(tmp_path):
    run, corpus = tiny_text_run(tmp_path, "next_token", num_docs=40, steps=1)
    folder = export_hf(run, tmp_path / "hf")
    with pytest.raises(SelfsupError, match=r"Conv1D.*--mode head"):
        adapt(f"hf:{folder}", tmp_path / "task", AdaptConfig(mode="lora", epochs=1), data=str(corpus), runtime=CPU)


def test_finetune_an_hf_folder_with_layer_decay(tmp_path, exported):
    """Issue 17: `adapt hf:DIR --mode finetune` with its defaults (layer decay 0.75) must run: the
    layer-wise learning rates know a transformers encoder's embeddings, layers and top."""
    _, corpus, folder = exported
    cfg = AdaptConfig(mode="finetune", epochs=1, patience=1, text_chunks=1)
    assert cfg.layer_decay < 1
    metrics = adapt(f"hf:{folder}", tmp_path / "task", cfg, data=str(corpus), runtime=CPU)
    assert 0 <= metrics["test_acc"] <= 1
    model, task, _ = load_task(tmp_path / "task")
    assert task["adapt"]["mode"] == "finetune" and task["encoder"]["name"] == "hf"


def test_leverage_and_select_run_on_an_hf_folder(tmp_path, exported):
    """Issue 17: `leverage hf:DIR` failed always (its from-scratch side fine-tunes random:hf:DIR);
    `select` with --validate adapts an hf: base and its random twin."""
    from selfsup.evaluate.ladder import run_leverage, select_bases

    _, corpus, folder = exported
    result = run_leverage(f"hf:{folder}", tmp_path / "leverage", ladder=[12], num_seeds=1, data=str(corpus),
                          epochs=1, patience=1, text_chunks=1, runtime=CPU)
    assert [r["side"] for r in result["runs"]] == ["pretrained", "scratch"]
    assert (tmp_path / "leverage" / "leverage.json").is_file()
    for mode in ("lora", "finetune"):
        chosen = select_bases([f"hf:{folder}", f"random:hf:{folder}"], tmp_path / f"select-{mode}", data=str(corpus),
                              scores=["knn"], validate=True, mode=mode, epochs=1, text_chunks=1, runtime=CPU)
        assert set(chosen["validation"]["accuracy"]) == {f"hf:{folder}", f"random:hf:{folder}"}
