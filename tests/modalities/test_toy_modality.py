"""A modality defined entirely in the tests runs the whole chain: pretrain -> probe -> adapt ->
evaluate, with SimCLR, touching no package module (issue 12)."""

from __future__ import annotations

import json

import torch

from selfsup.cli import main
from selfsup.methods import build_method
from selfsup.modalities import MODALITIES
from tests.modalities.toy_vectors import NAME, register, write_vectors

RUN = ["method.name=simclr", f"data.modality={NAME}", "encoder.name=mlp_vectors", "method.proj_dim=16",
       "train.steps=30", "train.batch_size=64", "train.lr=3e-3", "train.precision=fp32", "train.device=cpu",
       "train.checkpoint_every=10", "train.log_every=10"]


def test_the_toy_modality_meets_the_method_contract(monkeypatch):
    register(monkeypatch)
    from selfsup.encoders import build_encoder

    modality = MODALITIES[NAME]
    encoder = build_encoder("mlp_vectors", **modality.contract_inputs())
    method = build_method({"name": "simclr"}, encoder)
    out = method(modality.contract_batch(), 0.0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in encoder.parameters())


def test_pretrain_probe_adapt_evaluate_on_a_toy_modality(tmp_path, monkeypatch, capsys):
    register(monkeypatch)
    data = write_vectors(tmp_path / "vectors.npz")
    run, task = tmp_path / "run", tmp_path / "task"
    assert main(["pretrain", *RUN, f"data.source={data}", "--out", str(run)]) == 0
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["preprocess"]["modality"] == NAME and meta["encoder"]["in_dim"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"], "SimCLR learns on the toy views"

    assert main(["probe", str(run), "--fractions", "1.0", "--compare-untrained"]) == 0
    probe = json.loads((run / "probe.json").read_text())
    linear = {r["features"]: r["accuracy"] for r in probe if r["probe"] == "linear"}
    assert linear["simclr"] > 0.8 and set(linear) == {"simclr", "untrained"}

    assert main(["adapt", str(run), "--out", str(task), "--mode", "head", "--epochs", "5"]) == 0
    assert json.loads((task / "metrics.json").read_text())["test_acc"] > 0.8
    assert json.loads((task / "task.json").read_text())["preprocess"]["modality"] == NAME
    capsys.readouterr()
    assert main(["evaluate", str(task), "--groups", "site", "--bootstrap", "100"]) == 0
    evaluation = json.loads((task / "evaluation" / "evaluation.json").read_text())
    assert {g["group"] for g in evaluation["subgroups"]["columns"]["site"]["groups"]} == {"a", "b"}
    assert evaluation["diagnostics"]["pairs"] == "two noisy copies of each vector"
