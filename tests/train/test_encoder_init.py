"""`encoder.init=RUN` (`encoders.ROLE.init=RUN:TOWER` for towers): a run that starts from another
run's encoder instead of a random one, for any method; "untrained" then means that encoder."""

from __future__ import annotations

import torch

from selfsup.cli import EXIT_BAD_INPUT, main
from selfsup.config import load_config
from selfsup.export.encoder import load_encoder
from selfsup.pretrain import untrained_tower
from tests.conftest import TINY_RUN


def _weights(folder):
    return load_encoder(folder)[0].state_dict()


def test_a_run_continues_from_another_runs_encoder(tmp_path, capsys):
    base, follow = tmp_path / "base", tmp_path / "follow"
    assert main(["pretrain", *TINY_RUN, "method.name=simclr", "--out", str(base)]) == 0
    assert main(["pretrain", *TINY_RUN, "method.name=byol", f"encoder.init={base}", "--out", str(follow)]) == 0
    started = untrained_tower(follow, load_config(follow / "config.yaml"), "encoder").state_dict()
    assert all(torch.equal(started[k], v) for k, v in _weights(base).items()), "it began where the base ended"
    assert any(not torch.equal(started[k], v) for k, v in _weights(follow).items()), "and trained from there"
    assert main(["probe", str(follow), "--fractions", "1.0", "--compare-untrained"]) == 0
    # another architecture is refused before anything is written, naming the key
    capsys.readouterr()
    wide = tmp_path / "wide"
    assert main(["pretrain", *TINY_RUN, "method.name=byol", "encoder.width=16", f"encoder.init={base}",
                 "--out", str(wide)]) == EXIT_BAD_INPUT
    assert "encoder.init=" in capsys.readouterr().err and not wide.exists()
