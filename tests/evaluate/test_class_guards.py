"""No silent degenerate success (issue 17): a task whose training labels hold one class is refused by
adapt, leverage, select and evaluate, naming the class, instead of reporting a test accuracy of 1.0."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.adapt.run import adapt
from selfsup.adapt.sampling import require_two_classes
from selfsup.adapt.task import AdaptConfig
from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.evaluate.audit import EVAL_DIR, PREDICTIONS, evaluate_predictions, evaluate_task
from selfsup.evaluate.ladder import run_leverage, select_bases
from selfsup.pretrain import pretrain
from selfsup.train.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)
ONE_CLASS = "every labelled training row is of the class 'cat'"


@pytest.fixture(scope="module")
def cat_run(tmp_path_factory):
    """A run pretrained on a manifest whose only label is "cat" (a few rows unlabelled)."""
    root = tmp_path_factory.mktemp("cats")
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for i in range(40):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{'' if i % 10 == 0 else 'cat'}")
    (root / "cats.csv").write_text("\n".join(lines) + "\n")
    run = root / "run"
    pretrain(load_config(None, [f"data.source={root / 'cats.csv'}", "data.image_size=8", "encoder.name=resnet10",
                                "encoder.width=8", "train.steps=1", "train.batch_size=16", "train.precision=fp32",
                                "train.device=cpu", "train.log_every=100"]), run, show_progress=False)
    return run


def test_the_shared_check_names_the_class():
    require_two_classes(torch.tensor([0, 1, -1]), ["cat", "dog"], "d.csv")
    with pytest.raises(SelfsupError, match=r"d\.csv: every labelled training row is of the class 'dog'.*two classes"):
        require_two_classes(torch.tensor([1, 1, -1]), ["cat", "dog"], "d.csv")
    with pytest.raises(SelfsupError, match="'3'"):
        require_two_classes(np.array([3, 3]), None, "d.npz")


def test_adapt_leverage_and_select_refuse_one_class(cat_run, tmp_path):
    with pytest.raises(SelfsupError, match=ONE_CLASS):
        adapt(str(cat_run), tmp_path / "task", AdaptConfig(mode="head", epochs=1, patience=1), runtime=CPU)
    with pytest.raises(SelfsupError, match=ONE_CLASS):
        run_leverage(str(cat_run), tmp_path / "lev", num_seeds=1, epochs=1, runtime=CPU)
    with pytest.raises(SelfsupError, match=ONE_CLASS):
        select_bases([str(cat_run), f"random:{cat_run}"], tmp_path / "sel", runtime=CPU)
    assert not any(tmp_path.iterdir()), "refused before writing anything"


def test_evaluate_refuses_a_one_class_task(cat_run, tmp_path, monkeypatch):
    """A one-class task written before adapt refused them: evaluate names the class, as does the audit of its
    predictions (a single p_ column), instead of a perfect score."""
    monkeypatch.setattr("selfsup.adapt.run.require_two_classes", lambda *args, **kwargs: None)
    # The MLP head: trained by gradient descent, it accepts one class where a fitted linear head would not.
    cfg = AdaptConfig(mode="head", head="mlp", epochs=1, patience=1)
    metrics = adapt(str(cat_run), tmp_path / "task", cfg, runtime=CPU)
    assert metrics["test_acc"] == 1.0, "the degenerate success the checks exist to stop"
    with pytest.raises(SelfsupError, match=r"task\.json: " + ONE_CLASS):
        evaluate_task(tmp_path / "task", num_bootstrap=10, runtime=CPU)
    assert not (tmp_path / "task" / EVAL_DIR).exists()
    predictions = tmp_path / PREDICTIONS
    predictions.write_text("id,label,prediction,confidence,p_cat\na,cat,cat,1.0,1.0\nb,cat,cat,1.0,1.0\n")
    with pytest.raises(SelfsupError, match=r"predictions\.csv \(its p_ columns\): " + ONE_CLASS):
        evaluate_predictions(predictions)
