"""The model card: parseable front matter, every section, a table row per subgroup, and the Hugging
Face ModelCard parser's view of it (skipped where huggingface_hub is not installed)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from selfsup.errors import SelfsupError
from selfsup.report.model_card import model_card, write_model_card

SECTIONS = ["## Model details", "## Training data", "## Evaluation", "## Limitations and bias", "## How to use"]

TASK = {"base": "runs/simclr-digits", "encoder": {"name": "resnet10", "width": 8}, "preprocess": {"modality": "image"},
        "adapt": {"mode": "lora", "head": "linear", "label_fraction": 0.1, "k_shot": None, "lora_rank": 8, "seed": 3},
        "classes": [str(c) for c in range(10)], "data": "faces.csv"}
METRICS = {"test_acc": 0.871, "val_acc": 0.9, "num_train_labels": 120, "num_val": 12, "num_test": 400}
PRETRAINING = {"method": {"name": "simclr", "temperature": 0.2}, "data": {"source": "unlabelled-faces"},
               "train": {"steps": 2000, "batch_size": 256}, "num_items": 50000}


def _ci(value: float, width: float = 0.03) -> dict:
    return {"value": value, "low": value - width, "high": value + width}


def _group(name: str, n: int, acc: float, gap: float, p: float, significant: bool, small: bool) -> dict:
    return {"group": name, "n": n, "small": small, "accuracy": _ci(acc), "gap_to_overall": gap, "p_value": p,
            "significant": significant}


SUBGROUPS = {
    "n": 400,
    "overall": {"accuracy": _ci(0.871), "macro_f1": _ci(0.85), "ece": _ci(0.041, 0.01)},
    "columns": {
        "skin_tone": {"groups": [_group("I-II", 180, 0.9, 0.029, 0.2, False, False),
                                 _group("III-IV", 190, 0.86, -0.011, 0.6, False, False),
                                 _group("V|VI", 30, 0.70, -0.171, 0.001, True, True)],
                      "worst": _group("V|VI", 30, 0.70, -0.171, 0.001, True, True),
                      "gap_worst_to_best": -0.2, "gap_worst_to_overall": -0.171},
        "site": {"groups": [_group("a", 200, 0.88, 0.009, 0.7, False, False),
                            _group("b", 200, 0.862, -0.009, 0.7, False, False)]},
    },
}
SLICES = {"slices": [{"description": "site = b and skin_tone = V|VI", "n": 14, "accuracy": _ci(0.5, 0.2),
                      "gap_to_overall": -0.371}]}
DIAGNOSTICS = {"group_predictability": {"skin_tone": {"accuracy": 0.81, "chance": 0.475}}}


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _full_card() -> str:
    return model_card(TASK, METRICS, SUBGROUPS, SLICES, DIAGNOSTICS, PRETRAINING, task_dir="runs/faces-lora",
                      num_params=1_234_567)


def test_front_matter_parses_with_tags_datasets_and_results():
    front, _ = _split(_full_card())
    assert front["library_name"] == "selfsup"
    assert front["tags"][:3] == ["self-supervised", "simclr", "image"]
    assert front["datasets"] == ["unlabelled-faces", "faces.csv"]
    assert front["metrics"] == ["accuracy", "f1", "ece"]
    results = front["model-index"][0]["results"][0]
    assert results["task"]["type"] == "image-classification"
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"accuracy": 0.871, "f1": 0.85, "ece": 0.041}


def test_every_section_in_order_with_the_facts_it_must_state():
    _, body = _split(_full_card())
    positions = [body.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    details = body[positions[0]:positions[1]]
    assert "runs/simclr-digits" in details and "`simclr`" in details and "resnet10" in details
    assert "1.23 M" in details and "`lora`" in details
    training = body[positions[1]:positions[2]]
    assert "unlabelled-faces" in training and "50,000 items" in training and "120 labelled" in training
    evaluation = body[positions[2]:positions[3]]
    assert "87.1 % [84.1, 90.1]" in evaluation and "85.0 % [82.0, 88.0]" in evaluation and "0.041 [0.031, 0.051]" in evaluation
    limits = body[positions[3]:positions[4]]
    assert "`V|VI` (n = 30)" in limits and "17.1 pp below overall" in limits and "20.0 pp behind the best" in limits
    assert "site = b and skin_tone = V|VI: n = 14" in limits and "81.0 % accuracy (chance 47.5 %)" in limits
    usage = body[positions[4]:]
    assert "selfsup predict runs/faces-lora" in usage and "--label-fraction 0.1" in usage and "--seed 3" in usage


def test_subgroup_table_has_a_row_per_group_with_its_flags():
    _, body = _split(_full_card())
    table = body.split("### Per `skin_tone`")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert len(rows) == 3
    cells = [c.strip() for c in rows[2].strip("|").split(" | ")]  # the escaped pipe must not split the row
    assert cells == ["V\\|VI", "30", "70.0 % [67.0, 73.0]", "-17.1 pp", "0.001", "yes", "yes"]
    site = body.split("### Per `site`")[1]
    assert sum(line.startswith("| a ") or line.startswith("| b ") for line in site.splitlines()) == 2


def test_a_group_without_a_test_is_not_called_insignificant():
    groups = {"n": 10, "columns": {"sex": {"groups": [{"group": "f", "n": 6, "accuracy": 0.5}]}}}
    _, body = _split(model_card(TASK, METRICS, groups))
    row = next(line for line in body.splitlines() if line.startswith("| f "))
    assert [c.strip() for c in row.strip("|").split(" | ")] == ["f", "6", "50.0 %", "", "", "", ""]


def test_minimal_inputs_say_what_was_not_measured():
    card = model_card({"base": "runs/b"}, {"test_acc": 0.5})
    front, body = _split(card)
    assert front["tags"][0] == "self-supervised" and front["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert all(section in body for section in SECTIONS)
    assert "not evaluated" in body and "macro-F1 | not measured" in body


def test_missing_base_is_an_actionable_error():
    with pytest.raises(SelfsupError, match="task.json"):
        model_card({}, METRICS)


def test_write_model_card_is_atomic(tmp_path):
    path = write_model_card(tmp_path / "card" / "README.md", "hello\n")
    assert path.read_text() == "hello\n"
    assert [p.name for p in path.parent.iterdir()] == ["README.md"]


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None, reason="huggingface_hub not installed")
def test_hugging_face_model_card_parses_it():
    from huggingface_hub import ModelCard

    card = ModelCard(_full_card())
    assert card.data.library_name == "selfsup"
    assert "simclr" in card.data.tags and card.data.datasets == ["unlabelled-faces", "faces.csv"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.871, "f1": 0.85, "ece": 0.041}
    assert card.data.model_name.startswith("simclr resnet10")
    assert "## Limitations and bias" in card.text


def test_reads_the_evaluation_producers_layout():
    """The layout evaluate/subgroups.py, slices.py and representation.py write: "worst" is a group
    name, significance is decided on "p_holm", slices are embedding clusters with error rates, and
    group predictability sits under diagnostics["groups"] as balanced accuracy."""
    groups = [dict(_group("dark", 40, 0.6, -0.2, 0.0004, True, False), p_holm=0.0008, rest_accuracy=0.82),
              dict(_group("light", 360, 0.82, 0.02, 0.0004, False, False), p_holm=0.6, rest_accuracy=0.6)]
    subgroups = {"n": 400, "settings": {"min_n": 30, "confidence_level": 0.9, "test": "Fisher exact, two-sided, group vs rest",
                                        "correction": "Holm within each column"},
                 "overall": {"accuracy": _ci(0.8)},
                 "columns": {"tone": {"groups": groups, "worst": "dark", "best": "light", "gap_worst_to_best": -0.22,
                                      "gap_worst_to_overall": -0.2,
                                      "worst_vs_rest": {"group": "dark", "n": 40, "accuracy": 0.6}}}}
    slices = {"slices": [{"cluster": 3, "size": 25, "num_errors": 15, "error_rate": 0.6, "overall_error_rate": 0.2,
                          "p_value": 0.0001, "p_holm": 0.002, "example_ids": ["img7", "img9"]}], "clusters": []}
    diagnostics = {"num_rows": 400, "effective_rank": 12.0,
                   "groups": {"tone": {"balanced_accuracy": 0.9, "chance": 0.5}, "site": {"skipped": "one group"}}}
    _, body = _split(model_card(TASK, METRICS, subgroups, slices, diagnostics))
    assert "brackets are 90 % confidence intervals" in body and "accuracy [90 % CI]" in body
    dark = next(line for line in body.splitlines() if line.startswith("| dark "))
    assert [c.strip() for c in dark.strip("|").split(" | ")][4:6] == ["0.0008", "yes"]
    assert "fewer than 30 rows" in body and "Holm within each column" in body
    limits = body.split("## Limitations and bias")[1]
    assert "**Worst `tone` group:** `dark` (n = 40), accuracy 60.0 % [57.0, 63.0], 20.0 pp below overall" in limits
    assert "22.0 pp behind the best group (`light`) (significant)" in limits
    assert "embedding cluster 3: n = 25, accuracy 40.0 %, 40.0 pp below overall, p = 0.002; e.g. `img7`, `img9`" in limits
    assert "predicts `tone` with 90.0 % balanced accuracy (chance 50.0 %)" in limits and "`site`" not in limits


def test_no_slices_found_is_said():
    _, body = _split(model_card(TASK, METRICS, SUBGROUPS, {"slices": [], "clusters": [{"cluster": 0}]}))
    assert "found no slice significantly worse" in body
