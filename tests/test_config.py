from pathlib import Path

import pytest

from selfsup.config import RunConfig, load_config, parse_override
from selfsup.errors import SelfsupError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.method["name"] == "simclr"


def test_overrides_are_typed_yaml():
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=7", "train.betas=[0.8, 0.9]", "train.grad_clip=null",
                             "probe.fractions=[0.5, 1]", "method.temperature=0.1"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.grad_clip is None
    assert cfg.probe.fractions == [0.5, 1.0]
    assert cfg.method["temperature"] == 0.1


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=5", "did you mean `steps`"),
    ("trian.steps=5", "did you mean `train`"),
    ("method.temprature=0.1", "did you mean `temperature`"),
    ("encoder.widht=8", "width"),
    ("views.flip=0.5", "flip_p"),
])
def test_unknown_key_names_nearest(override, expected):
    with pytest.raises(SelfsupError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=many", "`train.steps` must be an integer"),
    ("train.steps=0", "`train.steps` must be at least 1"),
    ("train.precision=fp16", "`train.precision` must be one of"),
    ("train.tensorboard=3", "true or false"),
    ("train.batch_size=10", None),  # fine on its own
    ("data.channels=2", "`data.channels` must be 1 or 3"),
    ("method.name=simclrr", "did you mean `simclr`"),
    ("encoder.name=resnet19", "resnet18"),
    ("views.flip_p=1.5", "flip_p"),
])
def test_bad_values_are_named(override, expected):
    if expected is None:
        load_config(None, [override])
        return
    with pytest.raises(SelfsupError, match=expected):
        load_config(None, [override])


def test_batch_must_split_into_accumulation():
    with pytest.raises(SelfsupError, match="divisible"):
        load_config(None, ["train.batch_size=10", "train.accum_steps=3"])


def test_yaml_file_and_override_precedence(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 11\n  lr: 0.01\nmethod:\n  name: simclr\n  temperature: 0.3\n")
    cfg = load_config(path, ["train.lr=0.02"])
    assert cfg.train.steps == 11 and cfg.train.lr == 0.02 and cfg.method["temperature"] == 0.3


def test_yaml_errors_name_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n   lr: [\n")
    with pytest.raises(SelfsupError, match=r"bad.yaml: line \d"):
        load_config(path)
    with pytest.raises(SelfsupError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    with pytest.raises(SelfsupError, match="section.key=value"):
        parse_override("train.steps")


def test_a_run_written_before_a_key_was_renamed_still_loads(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  knn_every: 7\n")
    assert load_config(old).train.eval_every == 7
    with pytest.raises(SelfsupError, match="eval_every"):
        load_config(old, ["train.eval_every=3"])
