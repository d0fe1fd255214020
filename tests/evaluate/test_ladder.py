"""`selfsup leverage` and `selfsup select` end to end on tiny runs: outputs, ladder clipping, CLI wiring."""

import json

import pytest
import torch

from selfsup import cli
from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.evaluate.ladder import METRICS, default_ladder, resolve_ladder, run_leverage, select_bases, select_sample
from selfsup.evaluate.transferability import SCORES
from selfsup.pretrain import pretrain
from selfsup.train.runtime import Runtime
from tests.train.test_pretrain_text import tiny_text_run

VIT_RUN = ["method.name=mae", "data.source=digits", "data.image_size=16", "encoder.name=vit_tiny", "encoder.dim=32",
           "encoder.depth=2", "encoder.heads=2", "train.batch_size=32", "train.precision=fp32",
           "train.device=cpu", "train.log_every=100"]
NUM_TRAIN_ROWS = 1438  # digits: 1797 images, 359 held out
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)


def _vit(tmp_path_factory, steps: int):
    out = tmp_path_factory.mktemp(f"vit{steps}") / "run"
    pretrain(load_config(None, [*VIT_RUN, f"train.steps={steps}"]), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _vit(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def vit_run_longer(tmp_path_factory):
    return _vit(tmp_path_factory, 6)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return tiny_text_run(tmp_path_factory.mktemp("text"), num_docs=60)[0]


def test_leverage_end_to_end_writes_table_plot_and_every_run(tmp_path, vit_run, capsys):
    out = tmp_path / "lev"
    argv = ["leverage", str(vit_run), "--out", str(out), "--ladder", "20", "40", "5000", "--seeds", "2",
            "--epochs", "2", "--patience", "2", "--keep"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "scratch needs" in printed and "leverage" in printed and "not supervised training from scratch" in printed
    assert f"clipped to {NUM_TRAIN_ROWS}" in printed
    result = json.loads((out / "leverage.json").read_text())
    assert result["ladder"] == [20, 40, NUM_TRAIN_ROWS]  # 2 and 4 per class of 10 classes; the last rung clipped
    assert [row["num_labels"] for row in result["table"]] == result["ladder"]
    assert all(row["pretrained_seeds"] == row["scratch_seeds"] == 2 for row in result["table"])
    for side in ("pretrained", "scratch"):
        accuracies = result["accuracies"][side]
        assert len(accuracies) == 3 and all(len(seeds) == 2 for seeds in accuracies)
        assert all(0 <= a <= 1 for seeds in accuracies for a in seeds)
    runs = result["runs"]
    assert len(runs) == 3 * 2 * 2
    for n in result["ladder"]:  # both sides of one seed see the same labels
        for seed in (0, 1):
            pair = [r for r in runs if r["num_labels"] == n and r["seed"] == seed]
            assert {r["side"] for r in pair} == {"pretrained", "scratch"}
            # the linear head trains on all n (C cross-validated), fine-tuning keeps a validation tenth of them
            assert len({r["num_train_labels"] + r["num_val"] for r in pair}) == 1
            assert pair[0]["num_train_labels"] + pair[0]["num_val"] == n
    scratch_task = json.loads((out / "runs" / "scratch-n20-s1" / "task.json").read_text())
    assert scratch_task["base"] == f"random:{vit_run}" and scratch_task["adapt"]["mode"] == "finetune"
    pretrained_task = json.loads((out / "runs" / "pretrained-n40-s0" / "task.json").read_text())
    assert pretrained_task["adapt"]["mode"] == "head" and pretrained_task["adapt"]["seed"] == 0
    assert (out / "leverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == EXIT_BAD_INPUT  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_leverage_without_keep_leaves_only_its_outputs(tmp_path, vit_run):
    result = run_leverage(str(vit_run), tmp_path / "lev", ladder=[2, 3], k_shot=True, num_seeds=1, epochs=1,
                          patience=1, runtime=CPU)
    assert result["ladder"] == [20, 30] and [r["k_shot"] for r in result["rungs"]] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "lev").iterdir()) == [".selfsup.json", "leverage.json", "leverage.png"]
    # --overwrite replaces a leverage folder, never one holding files leverage did not write.
    (tmp_path / "lev" / "notes.txt").write_text("mine")
    with pytest.raises(SelfsupError, match="notes.txt"):
        run_leverage(str(vit_run), tmp_path / "lev", ladder=[2], k_shot=True, num_seeds=1, epochs=1, patience=1,
                     runtime=CPU, overwrite=True)
    assert (tmp_path / "lev" / "notes.txt").read_text() == "mine"


def test_rungs_beyond_the_data_are_clipped_and_noted():
    labels = torch.arange(100) % 4  # 25 per class
    rungs, notes = resolve_ladder([48, 8, 500, 1000], labels, k_shot=False)
    assert [r["num_labels"] for r in rungs] == [8, 48, 100] and rungs[-1]["label_fraction"] == 1.0
    assert any("500" in n and "clipped to 100" in n for n in notes)
    assert any("1000" in n and "dropped" in n for n in notes)  # clipped onto the same 100 labels
    rungs, notes = resolve_ladder([2, 30, 40], labels, k_shot=True)
    assert [(r["k_shot"], r["num_labels"]) for r in rungs] == [(2, 8), (25, 100)]
    assert any("clipped to 25" in n for n in notes) and any("40" in n and "dropped" in n for n in notes)
    with pytest.raises(SelfsupError, match="per class"):
        resolve_ladder([5, 50], labels, k_shot=False)  # 5 labels cannot give 4 classes one to train and one to validate
    with pytest.raises(SelfsupError, match="per class"):
        resolve_ladder([1], labels, k_shot=True)
    ladder = default_ladder(100, 4)
    assert ladder[0] == 8 and ladder[-1] == 100 and len(ladder) == 6 and ladder == sorted(set(ladder))
    assert default_ladder(100, 4, k_shot=True, largest_class=25)[::5] == [2, 25]
    uneven = torch.cat([torch.zeros(90), torch.ones(10)]).long()  # per-class rounding: count what is drawn
    rung = resolve_ladder([25], uneven, k_shot=False)[0][0]  # 22.5 -> 23 and 2.5 -> 3
    assert rung["requested"] == 25 and rung["num_labels"] == 26
    assert resolve_ladder([50], labels, k_shot=False)[0][0]["num_labels"] == 52  # 12.5 -> 13 per class


def test_select_ranks_validates_and_writes_json(tmp_path, vit_run, vit_run_longer, capsys):
    bases = [str(vit_run), str(vit_run_longer), f"random:{vit_run}"]
    out = tmp_path / "sel"
    argv = ["select", "--bases", *bases, "--out", str(out), "--max-samples", "300", "--budget-s", "300",
            "--validate", "--epochs", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Kendall tau" in printed and "logme" in printed and f"random:{vit_run}" in printed
    result = json.loads((out / "select.json").read_text())
    assert result["modality"] == "image" and result["data"] == "digits" and 290 <= result["num_samples"] <= 300
    ranking = result["ranking"]
    assert sorted(r["name"] for r in ranking) == sorted(bases)
    for score in SCORES:
        ranks = [r["ranks"][score] for r in ranking]
        assert all(1 <= rank <= 3 for rank in ranks) and min(ranks) == 1
    validation = result["validation"]
    assert validation["mode"] == "head" and set(validation["accuracy"]) == set(bases)
    assert set(validation["tau"]) == set(SCORES)
    assert all(tau is not None and -1 <= tau <= 1 for tau in validation["tau"].values())
    assert set(validation["tau_by_metric"]) == set(METRICS)
    assert validation["tau_by_metric"][validation["metric"]] == validation["tau"]
    assert not (out / "adapt").exists(), "adapt runs go to a temporary folder unless --keep"
    assert main(argv) == EXIT_BAD_INPUT and "--overwrite" in capsys.readouterr().err


def test_select_text_bases(tmp_path, text_run):

    result = select_bases([str(text_run), f"random:{text_run}"], tmp_path, scores=["logme", "knn"], runtime=CPU)
    assert result["modality"] == "text" and result["num_samples"] == 48  # 60 documents, a fifth held out
    assert [sorted(r["ranks"]) for r in result["ranking"]] == [["knn", "logme"]] * 2
    assert "validation" not in json.loads((tmp_path / "select.json").read_text())


def _long_tailed(num_classes: int = 40) -> list[int]:
    """Class c has 60 // (c + 1) rows: a head of a few classes and a tail of ten with a single example."""
    return [c for c in range(num_classes) for _ in range(60 // (c + 1))]


def test_select_sample_keeps_two_of_every_class_that_has_them():
    labels = torch.tensor(_long_tailed())
    counts = torch.bincount(labels)
    rows, dropped = select_sample(labels, 100, seed=0)
    kept = torch.bincount(labels[torch.from_numpy(rows)], minlength=len(counts))
    assert len(rows) <= 100 and dropped == [c for c in range(40) if counts[c] < 2]
    assert all(kept[c] >= 2 for c in range(40) if counts[c] >= 2) and all(kept[c] == 0 for c in dropped)
    assert kept[0] > kept[5], "still stratified: the large classes keep more"
    rows_again, _ = select_sample(labels, 100, seed=0)
    assert rows.tolist() == rows_again.tolist()
    everything, _ = select_sample(labels, 10_000, seed=0)
    assert len(everything) == int(counts[counts >= 2].sum())
    assert len(select_sample(labels, 10_000, seed=0, min_per_class=1)[0]) == len(labels)
    with pytest.raises(SelfsupError, match=r"--max-samples 20 .* 2 row\(s\) of each of the 30 classes.*at least 60"):
        select_sample(labels, 20, seed=0)
    with pytest.raises(SelfsupError, match=r"only the class '0' has 2 or more"):
        select_sample(torch.tensor([0, 0, 0, 1, 2]), 100, seed=0)


def test_select_runs_with_its_defaults_on_a_long_tailed_text_label_set(tmp_path, capsys):
    """Dozens of classes, some with one example, as real label sets are: select drops what no cross-validation
    can use (saying how many), ranks the rest, and with two bases gives no Kendall tau as if it meant something."""
    import random

    from tests.train.test_pretrain_text import TOPICS, text_overrides

    rng = random.Random(0)
    words = " ".join(TOPICS.values()).split()
    corpus = tmp_path / "tail.jsonl"
    with corpus.open("w") as fh:
        for i, label in enumerate(_long_tailed()):
            text = f"topic{label} " + " ".join(rng.choice(words) for _ in range(rng.randint(10, 30)))
            fh.write(json.dumps({"text": text, "label": f"class-{label}", "id": f"d{i}"}) + "\n")
    run = tmp_path / "run"
    pretrain(load_config(None, text_overrides(corpus, "mlm", **{"train.steps": 2})), run, show_progress=False)
    out = tmp_path / "sel"
    assert main(["select", "--bases", str(run), f"random:{run}", "--out", str(out), "--validate", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "select.json").read_text())
    assert result["num_classes"] >= 20 and result["dropped_classes"] > 0
    assert f"{result['dropped_classes']} class(es)" in printed and "fewer than 2" in printed
    assert all(r["scores"]["logme"] is not None for r in result["ranking"])
    assert "two bases cannot be ranked meaningfully" in printed and "Kendall tau, score vs" not in printed
    assert all(tau is None for tau in result["validation"]["tau"].values())


def test_cli_bad_input_exits_2(tmp_path, vit_run, text_run, capsys):
    assert main(["select", "--bases", str(vit_run), str(text_run), "--out", str(tmp_path / "s")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(vit_run) in err and str(text_run) in err and "modality" in err
    assert main(["select", "--bases", str(vit_run), str(vit_run), "--out", str(tmp_path / "s")]) == EXIT_BAD_INPUT
    assert main(["leverage", str(vit_run), "--out", str(tmp_path / "l"), "--ladder", "5", "50"]) == EXIT_BAD_INPUT
    assert "per class" in capsys.readouterr().err
    assert main(["leverage", f"random:{vit_run}", "--out", str(tmp_path / "l")]) == EXIT_BAD_INPUT
    assert main(["leverage", str(tmp_path / "missing"), "--out", str(tmp_path / "l")]) == EXIT_BAD_INPUT
    assert "config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "l").exists()


def test_cli_score_names_match_the_library():
    assert cli.SELECT_SCORES == SCORES  # the CLI keeps its own copy to parse without importing torch
    assert cli.LEVERAGE_METRICS == tuple(METRICS)


def test_leverage_on_balanced_accuracy_records_every_metric(tmp_path, vit_run):
    result = run_leverage(str(vit_run), tmp_path / "lev", ladder=[2], k_shot=True, num_seeds=1, epochs=1,
                          patience=1, metric="balanced_accuracy", runtime=CPU)
    assert result["metric"] == "balanced_accuracy" and "balanced accuracy" in result["text"]
    for run in result["runs"]:
        assert {"test_acc", "test_balanced_acc", "test_macro_f1"} <= set(run)
    pretrained = [r["test_balanced_acc"] for r in result["runs"] if r["side"] == "pretrained"]
    assert result["accuracies"]["pretrained"] == [pretrained]
    with pytest.raises(SelfsupError, match="--metric"):
        run_leverage(str(vit_run), tmp_path / "x", metric="auc", runtime=CPU)
