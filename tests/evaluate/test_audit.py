"""`selfsup evaluate` and `selfsup report` end to end on tiny runs with a planted failing subgroup."""

import csv
import json

import numpy as np
import pytest
import torch

from selfsup.adapt.run import adapt
from selfsup.adapt.task import AdaptConfig
from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.evaluate.audit import EMBEDDINGS, EVAL_DIR, EVAL_JSON, PREDICTIONS, evaluate_task
from selfsup.report.browser import check_in_browser, external_urls, find_chromium
from selfsup.report.task_report import MODEL_CARD, write_task_report
from selfsup.pretrain import pretrain
from selfsup.train.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)
N = 600


def planted_images(path):
    """Red vs blue squares (the label), site "a" clean, site "b" pure noise with random labels: a
    model can be right on a and no better than chance on b, whatever it learnt."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, N)
    site = np.where(rng.random(N) < 0.25, "b", "a")
    x = (rng.random((N, 16, 16, 3)) * 40).astype(np.uint8)
    x[labels == 0, :, :, 0] += 180
    x[labels == 1, :, :, 2] += 180
    noisy = site == "b"
    x[noisy] = (rng.random((int(noisy.sum()), 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(path, x=x, y=labels, site=site)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    source = planted_images(root / "planted.npz")
    run = root / "run"
    pretrain(load_config(None, [f"data.source={source}", "data.group_columns=[site]", "data.image_size=16",
                                "encoder.name=resnet10", "encoder.width=8", "train.steps=1", "train.batch_size=32",
                                "train.precision=fp32", "train.device=cpu", "train.log_every=100"]),
             run, show_progress=False)
    adapt(str(run), root / "task", AdaptConfig(mode="head", epochs=20, patience=20), runtime=CPU)
    return root / "task"


@pytest.fixture(scope="module")
def evaluated(task):
    return evaluate_task(task, num_bootstrap=200, min_n=10, runtime=CPU)


def test_subgroup_audit_finds_the_planted_group(evaluated):
    sub = evaluated["subgroups"]
    column = sub["columns"]["site"]
    assert sum(g["n"] for g in column["groups"]) == sub["n"] == evaluated["num_labelled"] == 120  # a fifth held out
    by_name = {g["group"]: g for g in column["groups"]}
    assert by_name["a"]["accuracy"]["value"] > 0.9 and by_name["b"]["accuracy"]["value"] < 0.75
    assert column["worst"] == "b" and column["worst_vs_rest"]["significant"]
    low, high = by_name["b"]["accuracy"]["low"], by_name["b"]["accuracy"]["high"]
    assert low <= by_name["b"]["accuracy"]["value"] <= high


def test_slices_and_diagnostics_point_at_the_noise(evaluated, task):
    slices = evaluated["slices"]["slices"]
    site = {row["id"]: row["site"] for row in csv.DictReader((task / EVAL_DIR / PREDICTIONS).open())}
    assert slices, "the noise images cluster together and err far more than the squares"
    for s in slices:  # the slices are the noisy site's images, named by their misclassified members
        assert (task / EVAL_DIR / s["thumbnails"]).is_file() and s["example_ids"]
        assert all(site[i] == "b" for i in s["example_ids"]) and s["error_rate"] > 0.4
    d = evaluated["diagnostics"]
    assert d["groups"]["site"]["balanced_accuracy"] > 0.9, "noise vs squares: the features encode the site"
    assert 0 <= d["alignment"] and d["num_pairs"] == 120 and 0.4 < d["knn_label_agreement"] <= 1
    written = json.loads((task / EVAL_DIR / EVAL_JSON).read_text())
    assert written["subgroups"]["n"] == 120 and "text" not in written
    assert (task / EVAL_DIR / PREDICTIONS).is_file() and (task / EVAL_DIR / EMBEDDINGS).is_file()


def test_report_is_self_contained_with_every_section(evaluated, task):
    report = write_task_report(task)
    page = report.read_text()
    for heading in ("Subgroup audit", "Slices nobody labelled", "Embedding map", "Representation diagnostics",
                    "Adaptation", "Pretraining of the base", "Model card"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert external_urls(page) == []
    assert page.count("<img") >= 5 and "site" in page
    card = (task / MODEL_CARD).read_text()
    assert card.startswith("---") and "| b |" in card.replace("**", "")


@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed: `make report-check` installs the Debian package")
def test_report_loads_in_a_real_browser(evaluated, task, tmp_path):
    checked = check_in_browser(write_task_report(task), tmp_path / "shot.png")
    assert checked["images"] >= 5 and checked["loaded"] == checked["images"] and checked["failed"] == []


def test_cli_evaluate_then_report(evaluated, task, tmp_path, capsys):
    assert main(["evaluate", str(task), "--bootstrap", "100", "--min-n", "10", "--no-slices"]) == 0
    out = capsys.readouterr().out
    assert "worst: b" in out and "selfsup report" in out
    assert "slices" not in json.loads((task / EVAL_DIR / EVAL_JSON).read_text())
    assert main(["report", str(task)]) == 0
    assert "Slice discovery was not run" in (task / "report.html").read_text()
    assert main(["evaluate", "--predictions", str(task / EVAL_DIR / PREDICTIONS), "--bootstrap", "100", "--min-n", "10"]) == 0
    assert "worst: b" in capsys.readouterr().out
    assert main(["evaluate"]) == EXIT_BAD_INPUT
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    (tmp_path / "task.json").write_text((task / "task.json").read_text())
    (tmp_path / "metrics.json").write_text((task / "metrics.json").read_text())
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "selfsup evaluate" in capsys.readouterr().err, "a task not yet evaluated says what to run"


def test_text_task_evaluates_with_two_block_pairs(tmp_path):
    """Text: documents of several blocks give alignment pairs (a document's first two blocks), and the
    corpus's `group` field is audited."""
    import random

    from tests.train.test_pretrain_text import TOPICS, text_overrides

    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as fh:
        for i in range(150):
            label = list(TOPICS)[i % 3]
            words = TOPICS[label].split()
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            fh.write(json.dumps({"text": text, "label": label, "id": f"d{i}", "group": "long" if i % 2 else "short"}) + "\n")
    run = tmp_path / "run"
    pretrain(load_config(None, text_overrides(corpus, "mlm", **{"train.steps": 2})), run, show_progress=False)
    adapt(str(run), tmp_path / "task", AdaptConfig(mode="head", epochs=5, patience=5, text_chunks=3), runtime=CPU)
    result = evaluate_task(tmp_path / "task", num_bootstrap=50, min_n=5, runtime=CPU)
    column = result["subgroups"]["columns"]["group"]
    assert {g["group"] for g in column["groups"]} == {"long", "short"} and sum(g["n"] for g in column["groups"]) == 30
    d = result["diagnostics"]
    assert d["num_pairs"] > 10 and d["alignment"] >= 0 and "blocks" in d["pairs"]
    for s in result["slices"]["slices"]:
        assert s["snippets"] and "thumbnails" not in s
    page = write_task_report(tmp_path / "task").read_text()
    assert "<h2>Subgroup audit</h2>" in page and external_urls(page) == []


def test_groups_and_pairs_outside_them_and_all_rows_of_data(task, tmp_path):
    """--groups picks columns without hiding the ones a pair names; --data scores every row and says so."""
    from selfsup.evaluate.audit import evaluate_predictions

    source = task.parent / "planted.npz"
    result = evaluate_task(task, data=str(source), num_bootstrap=20, min_n=10, slices=False, runtime=CPU)
    assert result["num_labelled"] == N and "every row" in result["rows"]
    assert "every row" in write_task_report(task).read_text()
    csv_path = tmp_path / "p.csv"
    rows = list(csv.reader((task / EVAL_DIR / PREDICTIONS).open()))
    header = rows[0][:5] + ["half"] + rows[0][5:]
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, row in enumerate(rows[1:]):
            writer.writerow(row[:5] + ["x" if i % 2 else "y"] + row[5:])
    report = evaluate_predictions(csv_path, group_columns=["site"], pairs=[("site", "half")], min_n=10, num_bootstrap=20)
    assert set(report["columns"]) == {"site", "site×half"}


def test_an_unknown_group_column_is_named_with_the_data_and_its_columns(task):
    """--groups and --pairs are checked against the evaluated data before the model runs, naming the data and
    its group columns (not a temporary predictions file)."""
    with pytest.raises(SelfsupError, match=r"--groups sight: .*planted\.npz.* no group column 'sight'.*: site") as err:
        evaluate_task(task, group_columns=["sight"], runtime=CPU)
    assert ".evaluation" not in str(err.value)
    with pytest.raises(SelfsupError, match=r"--pairs site:sight: .*no group column 'sight'") as err:
        evaluate_task(task, pairs=[("site", "sight")], runtime=CPU)
    assert ".evaluation" not in str(err.value)


def test_unlabelled_rows_are_refused_with_a_clear_error(task, tmp_path):
    x = np.zeros((40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", x=x, site=np.array(["a"] * 40))
    with pytest.raises(SelfsupError, match="carry no labels"):
        evaluate_task(task, data=str(tmp_path / "unlabelled.npz"), runtime=CPU)
    assert not [p for p in task.iterdir() if p.name.startswith(".evaluation")], "no temporary folder left behind"


def test_embedding_map_of_few_rows_in_many_dimensions():
    from selfsup.evaluate.audit import embedding_map

    coords, shown, method = embedding_map(torch.randn(20, 64), seed=0)
    assert coords.shape == (20, 2) and shown.tolist() == list(range(20)) and method in ("tsne", "umap")
