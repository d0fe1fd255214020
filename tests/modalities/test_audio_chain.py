"""The chain on audio (issue 14): pretrain wav2vec 2.0 and HuBERT (both iterations) on espeak-ng
words, resume bit-identically, probe, adapt, evaluate per voice with playable examples in the report,
export to transformers and read the export back as an `hf:` speech base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data.builtins.espeak import prepare_espeak
from selfsup.pretrain import pretrain

TINY = ["encoder.conv_channels=16", "encoder.dim=32", "encoder.depth=2", "encoder.heads=2", "encoder.pos_conv_kernel=8",
        "encoder.pos_conv_groups=2", "data.source=espeak", "data.max_seconds=1.0", "train.batch_size=8",
        "train.precision=fp32", "train.device=cpu", "train.checkpoint_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SELFSUP_CACHE", str(cache))
        prepare_espeak()
    return cache


@pytest.fixture
def cache(spoken, monkeypatch) -> Path:
    monkeypatch.setenv("SELFSUP_CACHE", str(spoken))
    return spoken


@pytest.mark.parametrize("method", ["wav2vec2", "hubert"])
def test_resume_is_bit_identical(cache, tmp_path, method):
    cfg = load_config(None, [f"method.name={method}", *TINY, "train.steps=4", "method.fit_max_frames=2000"]
                      if method == "hubert" else [f"method.name={method}", *TINY, "train.steps=4"])
    pretrain(cfg, tmp_path / "whole", show_progress=False)
    pretrain(cfg, tmp_path / "cut", stop_after=3, show_progress=False)
    pretrain(None, tmp_path / "cut", resume=True, show_progress=False)
    whole = (tmp_path / "whole" / "encoder.safetensors").read_bytes()
    assert (tmp_path / "cut" / "encoder.safetensors").read_bytes() == whole


def test_pretrain_probe_adapt_evaluate_report_export(cache, tmp_path, capsys):
    run, task = tmp_path / "w2v", tmp_path / "task"
    assert main(["pretrain", "method.name=wav2vec2", *TINY, "train.steps=3", "--out", str(run)]) == 0
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["preprocess"]["modality"] == "audio" and meta["preprocess"]["sample_rate"] == 16000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"code_perplexity", "contrastive", "diversity"} <= set(rows[-1])
    assert main(["probe", str(run), "--fractions", "1.0", "--compare-untrained"]) == 0
    assert main(["adapt", str(run), "--out", str(task), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(task), "--groups", "voice", "--bootstrap", "50", "--clusters", "2"]) == 0
    evaluation = json.loads((task / "evaluation" / "evaluation.json").read_text())
    assert set(evaluation["subgroups"]["columns"]["voice"]["groups"][0]) >= {"group", "accuracy"}
    assert evaluation["diagnostics"]["pairs"].startswith("two random crops")
    assert main(["report", str(task)]) == 0
    # Export to transformers, then use the export as an hf: base: same features as our encoder.
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    from selfsup.adapt.bases import load_base
    from selfsup.modalities import load_splits

    ours, _, reader = load_base(str(run))
    theirs, hf_meta, hf_reader = load_base(f"hf:{tmp_path / 'hf'}")
    assert hf_meta["preprocess"]["modality"] == "audio"
    train, _ = load_splits(load_config(run / "config.yaml"))
    rows_ = torch.arange(6)
    cpu = __import__("selfsup.train.runtime", fromlist=["init_runtime"]).init_runtime("cpu", "fp32")
    torch.testing.assert_close(hf_reader.features(theirs, train, rows_, cpu), reader.features(ours, train, rows_, cpu),
                               atol=1e-4, rtol=1e-4)
    for mode in ("head", "lora", "finetune"):  # issue 17: every mode on an hf: speech base (finetune: layer decay)
        assert main(["adapt", f"hf:{tmp_path / 'hf'}", "--data", "espeak", "--out", str(tmp_path / f"hf-{mode}"),
                     "--mode", mode, "--epochs", "1"]) == 0


def test_hubert_second_iteration_reads_its_targets_from_a_run(cache, tmp_path):
    first = tmp_path / "hubert1"
    assert main(["pretrain", "method.name=hubert", *TINY, "train.steps=2", "method.fit_max_frames=2000",
                 "--out", str(first)]) == 0
    assert main(["pretrain", "method.name=hubert", f"method.targets=run:{first}", "method.target_layer=1", *TINY,
                 "train.steps=2", "method.fit_max_frames=2000", "--out", str(tmp_path / "hubert2")]) == 0
    assert (tmp_path / "hubert2" / "encoder.safetensors").is_file()
