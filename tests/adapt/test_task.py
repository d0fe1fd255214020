"""`selfsup adapt` / `predict` end to end on tiny image and text runs, in every mode."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from selfsup.adapt.run import adapt, load_task, predict
from selfsup.adapt.task import AdaptConfig, label_budget
from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.pretrain import pretrain
from selfsup.train.runtime import Runtime, init_runtime
from tests.conftest import TINY_RUN
from tests.train.test_pretrain_text import tiny_text_run

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)
VIT_RUN = ["method.name=mae", "data.source=digits", "data.image_size=16", "encoder.name=vit_tiny", "encoder.dim=32",
           "encoder.depth=2", "encoder.heads=2", "train.steps=2", "train.batch_size=32", "train.precision=fp32",
           "train.device=cpu", "train.log_every=100"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "run"
    pretrain(load_config(None, VIT_RUN), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A ResNet of width 8 barely trained on scikit-learn's digits: features the probe and the head share."""
    out = tmp_path_factory.mktemp("digits") / "run"
    pretrain(load_config(None, TINY_RUN), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return tiny_text_run(tmp_path_factory.mktemp("text"), num_docs=120)[0]


@pytest.mark.parametrize("mode", ["head", "lora", "finetune"])
def test_adapt_then_predict_images(tmp_path, vit_run, mode):
    epochs = 40 if mode == "head" else 4  # the head trains on features computed once: epochs are cheap
    cfg = AdaptConfig(mode=mode, epochs=epochs, patience=epochs, label_fraction=0.5, lr=1e-3 if mode == "finetune" else 3e-3)
    metrics = adapt(str(vit_run), tmp_path / "task", cfg, runtime=CPU)
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["num_test"] == 359
    history = metrics["history"]
    if mode == "head":  # the linear head is fitted as the probe: one fit, C by cross-validation, no validation tenth
        assert metrics["test_acc"] > 0.2, "digits from a few hundred labels are far above chance (10 %)"
        assert len(history) == 1 and history[0]["C"] > 0 and 0 < history[0]["val_acc"] <= 1 and metrics["num_val"] == 0
        assert metrics["validation"].startswith("3-fold cross-validation")
    else:
        assert metrics["epochs"] == epochs and history[-1]["train_loss"] < history[0]["train_loss"]
    model, task, _ = load_task(tmp_path / "task")
    assert task["adapt"]["mode"] == mode and len(task["classes"]) == 10
    out = predict(tmp_path / "task", tmp_path / "pred.csv", runtime=CPU)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 359 and {"id", "label", "prediction", "confidence", "p_0", "p_9"} <= set(rows[0])
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert abs(accuracy - metrics["test_acc"]) < 1e-6, "predict reproduces the accuracy adapt measured"
    if mode == "lora":
        adapter = load_file(tmp_path / "task" / "adapter.safetensors")
        assert any(k.startswith("head.") for k in adapter), "the head is saved with the adapter"
        assert any(k.endswith("lora_a") for k in adapter) and not any(k.endswith("qkv.weight") for k in adapter)


def test_only_head_and_adapters_change_in_lora_mode(tmp_path, vit_run):
    from selfsup.export.encoder import load_encoder

    adapt(str(vit_run), tmp_path / "task", AdaptConfig(mode="lora", epochs=2, lr=1e-2), runtime=CPU)
    base, _ = load_encoder(vit_run)
    model, _, _ = load_task(tmp_path / "task")  # LoRA merged: qkv/proj/mlp weights moved, nothing else
    changed = {k for k, v in model.encoder.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.endswith(("qkv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight")) for k in changed)


def test_adapt_text_and_random_base(tmp_path, text_run):
    pretrained = adapt(str(text_run), tmp_path / "a", AdaptConfig(mode="head", epochs=60, patience=60, lr=3e-3), runtime=CPU)
    scratch = adapt(f"random:{text_run}", tmp_path / "b", AdaptConfig(mode="finetune", epochs=2), runtime=CPU)
    assert pretrained["test_acc"] > 0.6, "three topics with disjoint words"
    assert json.loads((tmp_path / "b" / "task.json").read_text())["base"].startswith("random:")
    assert 0 <= scratch["test_acc"] <= 1
    rows = list(csv.DictReader(predict(tmp_path / "a", tmp_path / "p.csv", runtime=CPU).open()))
    assert rows and rows[0]["id"].startswith("doc")


def test_label_budget_is_stratified_seeded_and_validates():
    labels = torch.arange(200) % 4
    train, val = label_budget(labels, AdaptConfig(label_fraction=0.5, seed=3))
    again, _ = label_budget(labels, AdaptConfig(label_fraction=0.5, seed=3))
    assert torch.equal(train, again) and len(set(train.tolist()) & set(val.tolist())) == 0
    assert len(train) + len(val) == 100 and torch.bincount(labels[val], minlength=4).min() >= 1
    shots, shots_val = label_budget(labels, AdaptConfig(k_shot=5))
    assert torch.bincount(labels[torch.cat([shots, shots_val])]).tolist() == [5, 5, 5, 5]


def test_cli_adapt_predict_and_errors(tmp_path, vit_run, capsys):
    assert main(["adapt", str(vit_run), "--out", str(tmp_path / "t"), "--epochs", "2", "--k-shot", "5"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "predictions.csv").is_file()
    assert main(["adapt", str(vit_run), "--out", str(tmp_path / "t")]) == EXIT_BAD_INPUT  # no silent overwrite
    assert main(["adapt", str(vit_run), "--out", str(tmp_path / "u"), "--label-fraction", "0"]) == EXIT_BAD_INPUT
    assert main(["predict", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "task.json" in capsys.readouterr().err


def test_resnet_refuses_lora(tmp_path):
    out = tmp_path / "r"
    pretrain(load_config(None, ["data.source=digits", "data.image_size=16", "encoder.name=resnet10", "encoder.width=8",
                                "train.steps=1", "train.batch_size=32", "train.precision=fp32", "train.device=cpu"]),
             out, show_progress=False)
    with pytest.raises(SelfsupError, match="head"):
        adapt(str(out), tmp_path / "t", AdaptConfig(mode="lora", epochs=1), runtime=CPU)


def test_task_inputs_trim_text_padding(text_run):
    from selfsup.adapt.bases import load_base
    from selfsup.modalities import load_splits

    encoder, meta, reader = load_base(str(text_run))
    tokenizer = reader.tokenizer
    train, _ = load_splits(load_config(text_run / "config.yaml"))
    inputs = reader.task_inputs(train, torch.arange(4))
    batch = inputs.batch(torch.arange(4), torch.device("cpu"))
    (ids, mask), owner = batch.args, batch.owner
    assert ids.shape == mask.shape and ids.shape[1] <= 16 and bool(mask[:, 0].all())
    assert ids[mask].min() >= 0 and int(ids[0, 0]) == tokenizer.cls_id
    assert owner.tolist() == [0, 1, 2, 3], "one block per document by default"


def test_text_chunks_pool_matches_frozen_features(text_run):
    """A document's feature in adapt is the mean over its first text_chunks blocks, exactly what
    `text_features` (probe, select) computes, whatever order the batch takes the documents in."""
    from selfsup.adapt.bases import load_base
    from selfsup.adapt.task import TaskModel
    from selfsup.modalities import load_splits

    encoder, meta, reader = load_base(str(text_run))
    train, _ = load_splits(load_config(text_run / "config.yaml"))
    rows = torch.arange(6)
    inputs = reader.task_inputs(train, rows, chunks=3)
    index = torch.tensor([4, 0, 5])
    batch = inputs.batch(index, torch.device("cpu"))
    counts = torch.bincount(batch.owner).tolist()
    assert len(counts) == 3 and all(1 <= c <= 3 for c in counts) and max(counts) > 1, "the documents span blocks"
    model = TaskModel(encoder, 3, "linear").eval()
    with torch.no_grad():
        pooled = model.pool(batch)
    expected = reader.features(encoder, train, index, init_runtime("cpu", "fp32"), chunks=3)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_test_metrics_see_through_a_majority_class_guess():
    from selfsup.adapt.task import test_metrics

    labels = torch.tensor([0] * 8 + [1, 2])
    majority = test_metrics(torch.zeros(10, dtype=torch.long), labels)
    assert majority["test_acc"] == pytest.approx(0.8)
    assert majority["test_balanced_acc"] == pytest.approx(1 / 3)  # recall 1, 0, 0
    assert majority["test_macro_f1"] == pytest.approx((2 * 8 / 18) / 3)  # F1 of class 0 = 16/18, others 0
    perfect = test_metrics(labels.clone(), labels)
    assert perfect == {"test_acc": 1.0, "test_balanced_acc": 1.0, "test_macro_f1": 1.0}


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_linear_head_is_as_good_as_the_probe(tmp_path, digits_run, capsys, fraction):
    """Issue 17: `adapt --mode head` early-stopped on a validation set of 25 labels and scored 5 points
    below `selfsup probe` on the same labels. On the same encoder, labels and fraction it must be
    within 1 point of the probe's linear accuracy."""
    assert main(["probe", str(digits_run), "--fractions", str(fraction), "--out", str(tmp_path / "probe.json")]) == 0
    linear = next(r for r in json.loads((tmp_path / "probe.json").read_text()) if r["probe"] == "linear")
    assert main(["adapt", str(digits_run), "--out", str(tmp_path / "task"), "--label-fraction", str(fraction)]) == 0
    metrics = json.loads((tmp_path / "task" / "metrics.json").read_text())
    assert metrics["num_train_labels"] + metrics["num_val"] == linear["num_labels"], "the same label budget"
    assert metrics["test_acc"] >= linear["accuracy"] - 0.01, (metrics["test_acc"], linear["accuracy"])
    assert abs(metrics["test_acc"] - linear["accuracy"]) <= 0.01


def test_linear_head_with_too_few_labels_to_cross_validate_and_the_mlp_head(tmp_path, digits_run, capsys):
    """Two labels per class cannot choose C by 3-fold cross-validation: C=1, as the probe, and adapt
    says so; the MLP head still trains with early stopping on a validation tenth."""
    assert main(["adapt", str(digits_run), "--out", str(tmp_path / "few"), "--k-shot", "2"]) == 0
    assert "C=1 (too few labels per class to cross-validate)" in capsys.readouterr().out
    few = json.loads((tmp_path / "few" / "metrics.json").read_text())
    assert few["num_train_labels"] == 20 and few["num_val"] == 0 and few["val_acc"] is None
    assert few["validation"].startswith("none")
    mlp = adapt(str(digits_run), tmp_path / "mlp", AdaptConfig(head="mlp", epochs=2, label_fraction=0.2), runtime=CPU)
    assert mlp["num_val"] > 0 and mlp["validation"] == f"early stopping on {mlp['num_val']} labels"


def test_probe_exposes_its_solver_and_the_raw_baseline(tmp_path, digits_run, text_run, capsys, monkeypatch):
    """Issue 17: the knob the probe's warning names exists (--max-iter; probe.max_iter in a run config),
    --compare-raw adds the demo's raw-pixel row, a modality without raw inputs says so, and a class too
    small to cross-validate is selfsup's message, not scikit-learn's warning."""
    import warnings

    from selfsup.adapt import probes

    monkeypatch.setattr(probes, "_convergence_warned", False)
    monkeypatch.setattr(probes, "_tiny_class_said", False)
    out = tmp_path / "probe.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["probe", str(digits_run), "--fractions", "0.005", "1.0", "--compare-raw", "--max-iter", "2",
                     "--c-grid", "0.1", "1", "--out", str(out)]) == 0
    assert not [w for w in caught if "least populated" in str(w.message)]
    printed = capsys.readouterr()
    assert "raise it with --max-iter" in printed.err and "fewer than the 3 that choosing C" in printed.err
    rows = json.loads(out.read_text())
    assert {(r["features"], r["probe"]) for r in rows} >= {("raw", "linear"), ("raw", "knn"), ("simclr", "linear")}
    assert next(r for r in rows if r["features"] == "raw" and r["label_fraction"] == 1.0)["accuracy"] > 0.8
    assert main(["probe", str(text_run), "--compare-raw", "--out", str(tmp_path / "text.json")]) == EXIT_BAD_INPUT
    assert "--compare-raw: text has no raw-input baseline" in capsys.readouterr().err
    assert main(["probe", str(digits_run), "--max-iter", "0"]) == EXIT_BAD_INPUT
    assert "--max-iter must be at least 1" in capsys.readouterr().err
