import re
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
    ("probe.max_iter=0", "`probe.max_iter` must be at least 1"),  # issue 17: the probe's solver knobs
    ("probe.c_grid=[0.1, 0]", "`probe.c_grid` must list positive numbers"),
    ("probe.c_grid=[]", "`probe.c_grid` must list positive numbers"),
    ("probe.max_iter=5000", None),
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


# ---- non-finite numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, shown", [
    ("train.lr=nan", "train.lr", "nan"),
    ("train.lr=inf", "train.lr", "inf"),
    ("train.lr=-inf", "train.lr", "-inf"),
    ("train.lr=.nan", "train.lr", "nan"),
    ("train.lr=.inf", "train.lr", "inf"),
    ("train.lr=-.inf", "train.lr", "-inf"),
    ("train.lr=1e400", "train.lr", "inf"),  # overflows to inf when read
    ("train.betas=[0.9, .nan]", "train.betas[1]", "nan"),
    ("train.grad_clip=.inf", "train.grad_clip", "inf"),  # an Optional float
    ("probe.fractions=[0.5, .nan]", "probe.fractions[1]", "nan"),
    ("data.holdout_fraction=nan", "data.holdout_fraction", "nan"),  # the range check alone let nan through
    ("data.max_bad_fraction=inf", "data.max_bad_fraction", "inf"),
    ("method.temperature=.nan", "method.temperature", "nan"),
    ("views.flip_p=.nan", "views.flip_p", "nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key, shown):
    with pytest.raises(SelfsupError) as err:
        load_config(None, [override])
    assert str(err.value) == f"`{key}`: {shown} is not a finite number"


def test_non_finite_encoder_knob_is_refused():
    # The encoder's own Config (TextTransformerConfig.mlp_ratio) is checked like every other section.
    with pytest.raises(SelfsupError, match=r"^`encoder.mlp_ratio`: nan is not a finite number$"):
        load_config(None, ["method.name=mlm", "encoder.mlp_ratio=.nan"])


def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path: Path):
    path = tmp_path / "run.yaml"
    for text, key, shown in [("train:\n  lr: .nan\n", "train.lr", "nan"),
                             ("train:\n  weight_decay: -.inf\n", "train.weight_decay", "-inf"),
                             ("train:\n  betas: [.NaN, 0.99]\n", "train.betas[0]", "nan"),
                             ("probe:\n  fractions: [.Inf]\n", "probe.fractions[0]", "inf")]:
        path.write_text(text)
        with pytest.raises(SelfsupError) as err:
            load_config(path)
        assert str(err.value) == f"`{key}`: {shown} is not a finite number", text


def _float_overrides(cls: type, prefix: str) -> list[str]:
    """`key=value` overrides putting NaN in every float knob of dataclass `cls` (plain, Optional, tuple, list)."""
    import dataclasses
    import types
    import typing

    out = []
    for name, hint in typing.get_type_hints(cls).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = list(typing.get_args(hint)) if union else [hint]  # `float | None`: each alternative
        if float in options:
            out.append(f"{prefix}{name}=.nan")
        for option in options:
            args = typing.get_args(option)
            if typing.get_origin(option) in (list, tuple) and args and args[0] is float:
                length = len(args) if typing.get_origin(option) is tuple and args[-1] is not Ellipsis else 1
                out.append(f"{prefix}{name}=[{', '.join(['.nan'] * length)}]")
    assert {f.name for f in dataclasses.fields(cls)}  # a dataclass
    return out


def _every_float_knob() -> list[tuple[list[str], str]]:
    """(base overrides, nan override) for every float knob of every section, method and encoder."""
    from selfsup.config import DataConfig, ProbeConfig, TokenizerConfig, TrainConfig
    from selfsup.data.views import ViewsConfig
    from selfsup.encoders import ENCODERS
    from selfsup.methods import METHODS

    cases = []
    for cls, section in [(DataConfig, "data"), (TokenizerConfig, "tokenizer"), (TrainConfig, "train"),
                         (ProbeConfig, "probe"), (ViewsConfig, "views")]:
        cases += [([], o) for o in _float_overrides(cls, f"{section}.")]
    for name, spec in METHODS.items():
        cases += [([f"method.name={name}"], o) for o in _float_overrides(spec.config, "method.")]
    for name, enc in ENCODERS.items():
        # A method that trains this kind of encoder: the one defaulting to it, else to the same Config type.
        method = next((m for m, s in METHODS.items() if s.encoder == name), None) or next(
            m for m, s in METHODS.items() if ENCODERS[s.encoder].config_type is enc.config_type)
        base = [f"method.name={method}", f"encoder.name={name}"]
        cases += [(base, o) for o in _float_overrides(enc.config_type, "encoder.")]
    return cases


_FLOAT_KNOBS = _every_float_knob()


def test_every_float_knob_is_covered():
    keys = {o.split("=")[0] for _, o in _FLOAT_KNOBS}
    # A sample from each kind of section, so an empty discovery cannot pass the test below vacuously.
    assert {"train.lr", "train.betas", "train.grad_clip", "probe.fractions", "data.holdout_fraction",
            "views.crop_scale", "method.temperature", "method.mask_ratio", "encoder.mlp_ratio"} <= keys


@pytest.mark.parametrize("base, override", _FLOAT_KNOBS, ids=[" ".join(b + [o]) for b, o in _FLOAT_KNOBS])
def test_every_float_knob_refuses_nan(base, override):
    key = override.split("=")[0]
    with pytest.raises(SelfsupError, match=rf"^`{re.escape(key)}(\[0\])?`: nan is not a finite number$"):
        load_config(None, [*base, override])


def test_a_yaml_file_may_write_floats_without_a_dot(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); a config file means the number, as an override does."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5e-4\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(SelfsupError, match="train.lr"):
        load_config(path)
