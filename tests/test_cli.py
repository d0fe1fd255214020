"""The command line end to end: refusals, config errors, resume, signals, the demo."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.cli import EXIT_BAD_INPUT, build_parser, main
from selfsup.train import checkpoint
from selfsup.train.loop import EXIT_INTERRUPTED
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_non_empty_output_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == EXIT_BAD_INPUT
    assert "not empty" in capsys.readouterr().err
    assert main(["pretrain", *TINY_RUN, "--out", str(out), "--overwrite"]) == EXIT_BAD_INPUT
    assert "not a folder selfsup made" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_unknown_key_exits_2_naming_the_nearest(tmp_path, capsys):
    assert main(["pretrain", "train.stepz=3", "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train.stepz" in err and "did you mean `steps`" in err
    assert not (tmp_path / "r").exists()


def test_pretrain_resume_and_probe(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    assert (out / "encoder.safetensors").is_file() and (out / "config.yaml").is_file() and (out / "report.html").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "knn_acc" in metrics[-1]
    # Resuming a finished run changes nothing; a different config on resume is refused.
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert main(["pretrain", *TINY_RUN, "train.steps=9", "--out", str(out), "--resume"]) == EXIT_BAD_INPUT
    assert "train.steps" in capsys.readouterr().err
    assert main(["probe", str(out), "--fractions", "0.1", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "linear" in printed and "knn" in printed
    results = json.loads((out / "probe.json").read_text())
    assert {r["label_fraction"] for r in results} == {0.1, 1.0}


def test_sigterm_exits_75_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [a for a in TINY_RUN if not a.startswith("train.steps")] + ["train.steps=100000", "train.checkpoint_every=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "selfsup.cli", "pretrain", *args, "--out", str(out)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    path = checkpoint.latest_valid(out / "checkpoints")
    assert path is not None and "--resume" in err


def test_every_command_has_help():
    parser = build_parser()
    for command in (["pretrain"], ["probe"], ["demo"], ["data"], ["data", "list"], ["export"], ["generate"],
                    ["tokenizer"], ["tokenizer", "train"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*command, "--help"])
        assert info.value.code == 0


def test_print_config_needs_no_out(capsys):
    assert main(["pretrain", "--print-config", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["pretrain", "train.steps=7"]) == EXIT_BAD_INPUT
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [[], ["method.name=mlm", "encoder.depth=3"], ["method.name=clip"]])
def test_print_config_shows_every_knob_and_reads_back(tmp_path, capsys, overrides):
    """Issue 17: --print-config lists the method's, each encoder's and the views' own keys at their
    defaults (it showed only the given ones), and the printout fed back as --config is the same run."""
    import yaml

    from selfsup.config import dump_config, load_config
    from selfsup.encoders import ENCODERS, encoder_config
    from selfsup.methods import METHODS, method_config

    assert main(["pretrain", "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    tree = yaml.safe_load(printed)
    spec = METHODS[tree["method"]["name"]]
    method_keys = {f.name for f in dataclasses.fields(spec.config)} - set(spec.tokenizer_fields)
    assert method_keys <= set(tree["method"]) and method_keys
    sections = [tree["encoder"]] if spec.towers is None else list(tree["encoders"].values())
    for section in sections:
        assert {f.name for f in dataclasses.fields(ENCODERS[section["name"]].config_type)} <= set(section)
    if spec.inputs == "views":
        assert {"crop_scale", "jitter_p", "num_views"} <= set(tree["views"])
    assert {"max_iter", "c_grid"} <= set(tree["probe"])
    for key in spec.tokenizer_fields:
        assert f"# method.{key}: filled from the run's tokenizer" in printed
    if "encoder.depth=3" in overrides:
        assert tree["encoder"]["depth"] == 3, "a given key keeps its value"
    (tmp_path / "printed.yaml").write_text(printed)
    again, original = load_config(tmp_path / "printed.yaml"), load_config(None, overrides)
    assert dump_config(again, every_key=True) == printed, "the printout read back prints the same"
    assert method_config(again.method) == method_config(original.method)
    towers = [(again.encoder, original.encoder)] if spec.towers is None else [
        (again.encoders[role], original.encoders[role]) for role in spec.towers]
    for mine, theirs in towers:
        knobs = [{k: v for k, v in section.items() if k != "name"} for section in (mine, theirs)]
        assert encoder_config(mine["name"], knobs[0]) == encoder_config(theirs["name"], knobs[1])
    assert (again.data, again.train, again.probe) == (original.data, original.train, original.probe)


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    printed = capsys.readouterr().out
    assert "mnist" in printed and "digits" in printed


def test_demo_end_to_end_on_a_small_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps", "3", "encoder.width=8", "train.batch_size=64",
                 "train.precision=fp32", "train.eval_every=0", "probe.fractions=[0.1, 1.0]"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("raw", "random", "simclr"):
        assert name in printed
    rows = json.loads((out / "results.json").read_text())
    assert {(r["features"], r["probe"], r["label_fraction"]) for r in rows} == {
        (f, p, lf) for f in ("raw", "random", "simclr") for p in ("linear", "knn") for lf in (0.1, 1.0)}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    raw = {r["label_fraction"]: r["accuracy"] for r in rows if r["features"] == "raw" and r["probe"] == "linear"}
    assert raw[1.0] > 0.8, "a linear probe on raw MNIST pixels is far above chance; anything less is a data bug"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert 'src="http' not in html and 'href="http' not in html, "the report must open with no network"


@pytest.mark.parametrize("method", ["byol", "dino"])
def test_pretrain_each_method_from_the_cli(tmp_path, method):
    out = tmp_path / method
    small = {"byol": ["method.proj_hidden=64"], "dino": ["method.out_dim=64", "method.hidden_dim=32", "views.num_local=2"]}
    assert main(["pretrain", *TINY_RUN, f"method.name={method}", *small[method], "train.diagnostics_every=2",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "embed_std" in rows[1] and "knn_acc" in rows[-1]
    config = (out / "config.yaml").read_text()
    assert "view_blur_p" in config, "the method's view recipe is part of the resolved config"


def test_pretrain_on_a_user_folder(tmp_path):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(20):
            colour = (200, 40 + i, 40) if label == "cats" else (40, 40 + i, 200)
            Image.new("RGB", (24, 20), colour).save(tmp_path / "data" / label / f"{i}.png")
    out = tmp_path / "run"
    args = [a for a in TINY_RUN if not a.startswith(("data.source", "train.batch_size"))]
    assert main(["pretrain", *args, f"data.source={tmp_path / 'data'}", "train.batch_size=16", "method.name=dino",
                 "method.out_dim=64", "method.hidden_dim=32", "views.num_local=2", "--out", str(out)]) == 0
    assert (out / "encoder.safetensors").is_file()
