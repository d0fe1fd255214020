"""A full disk (OSError ENOSPC) while a checkpoint, the encoder or a Hugging Face export is written:
a SelfsupError naming the path (exit 2, never a traceback), the previous checkpoint or export still
loads, the broken one is never chosen, and the run completes once there is space again.

In-process, with the writers the package uses replaced (`torch.save`, safetensors' `save_model`,
transformers' `save_pretrained`) wherever selfsup bound them.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from selfsup.config import load_config
from selfsup.errors import SelfsupError
from selfsup.train import checkpoint
from tests.faults.helpers import TINY, Reference, assert_same_as_reference, listing

try:  # the orchestration moved from selfsup.train.pretrain to selfsup.pretrain
    from selfsup.pretrain import pretrain
except ImportError:
    from selfsup.train.pretrain import pretrain


def _file_of(target: Any) -> Path | None:
    if isinstance(target, (str, os.PathLike)):
        return Path(target)
    name = getattr(target, "name", None)  # torch.save(obj, open_file)
    return Path(name) if isinstance(name, (str, os.PathLike)) else None


def full_disk(original: Callable, target_arg: int, when: Callable[[Path], bool], hits: list[Path]) -> Callable:
    """`original` (a writer taking its target at `target_arg`), except that where `when(path)` it writes
    a few bytes — what fits before the disk is full — and raises OSError(ENOSPC)."""

    def writer(*args: Any, **kwargs: Any) -> Any:
        target = kwargs.get("f", kwargs.get("filename", args[target_arg] if len(args) > target_arg else None))
        path = _file_of(target)
        if path is None or not when(path):
            return original(*args, **kwargs)
        hits.append(path)
        if hasattr(target, "write"):
            target.write(b"\0" * 64)
        else:
            path.write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return writer


def replace_everywhere(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, replacement: Callable) -> None:
    """Sets `owner.name` and every `from owner import name` binding in the loaded selfsup modules
    (importing `pretrain` above loaded every module that writes a run's files)."""
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, replacement)
    for module_name, module in list(sys.modules.items()):
        if module_name == "selfsup" or module_name.startswith("selfsup."):
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)


def fill_disk(monkeypatch: pytest.MonkeyPatch, when: Callable[[Path], bool]) -> list[Path]:
    """ENOSPC for every write of torch.save / safetensors where `when(path)`; returns the paths hit."""
    import safetensors.torch
    import torch.serialization

    hits: list[Path] = []
    for owner, name, arg in ((torch, "save", 1), (torch.serialization, "save", 1),
                             (safetensors.torch, "save_model", 1), (safetensors.torch, "save_file", 1)):
        replace_everywhere(monkeypatch, owner, name, full_disk(getattr(owner, name), arg, when, hits))
    return hits


def _tiny_config():
    return load_config(None, TINY)


def _tiny_mlm_run(root: Path) -> Path:
    """A 2-step BERT-style run on 60 made-up documents (about a second)."""
    corpus = root / "corpus.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    corpus.write_text("".join(
        json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40)), "id": f"doc{i}"}) + "\n"
        for i in range(60)))
    overrides = {"method.name": "mlm", "encoder.name": "text_encoder", "encoder.dim": 32, "encoder.depth": 2,
                 "encoder.heads": 2, "data.source": str(corpus), "data.seq_len": 16, "tokenizer.vocab_size": 120,
                 "tokenizer.min_frequency": 1, "train.steps": 2, "train.batch_size": 8, "train.checkpoint_every": 2,
                 "train.precision": "fp32", "train.device": "cpu", "train.threads": 1}
    run = root / "text-run"
    pretrain(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), run, show_progress=False)
    return run


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt"])
def test_enospc_while_a_checkpoint_is_written(tmp_path: Path, reference: Reference, monkeypatch: pytest.MonkeyPatch,
                                              file: str) -> None:
    out = tmp_path / "run"
    root = out / "checkpoints"
    # The disk fills once the step-3 checkpoint is complete: the step-6 one cannot be written.
    hits = fill_disk(monkeypatch, lambda p: root in p.parents and file in p.name
                     and (root / "step-3" / "manifest.json").is_file())
    with pytest.raises(Exception) as raised:
        pretrain(_tiny_config(), out, show_progress=False)
    assert hits, f"the full disk was never reached: selfsup no longer writes {file} with torch.save/safetensors?"
    err = raised.value
    assert isinstance(err, SelfsupError), (
        f"a full disk while writing {hits[0]} must be a SelfsupError (a message, exit 2), not "
        f"{type(err).__name__}: {err}")
    assert str(root) in str(err), f"the error must name the checkpoint being written (under {root}): {err}"
    monkeypatch.undo()

    assert checkpoint.latest_valid(root) == root / "step-3", (
        f"the intact step-3 checkpoint must be the one chosen; the folder holds {listing(root)}")
    checkpoint.verify(root / "step-3")
    assert not (root / "step-6").exists() or checkpoint.latest_valid(root) != root / "step-6", (
        "the half-written step-6 checkpoint must never be chosen")
    # With space again, --resume continues from step 3 and ends as the uninterrupted run did.
    pretrain(None, out, resume=True, show_progress=False)
    assert_same_as_reference(out, reference, f"ENOSPC writing {file} of step 6, resumed in-process")


def test_enospc_while_the_encoder_is_exported(tmp_path: Path, reference: Reference,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    hits = fill_disk(monkeypatch, lambda p: "encoder.safetensors" in p.name and "checkpoints" not in p.parts)
    with pytest.raises(Exception) as raised:
        pretrain(_tiny_config(), out, show_progress=False)
    assert hits, "the full disk was never reached: selfsup no longer writes encoder.safetensors with safetensors?"
    err = raised.value
    assert isinstance(err, SelfsupError), (
        f"a full disk while exporting the encoder must be a SelfsupError, not {type(err).__name__}: {err}")
    assert str(out) in str(err) and "encoder.safetensors" in str(err), (
        f"the error must name the file being written ({out / 'encoder.safetensors'}): {err}")
    monkeypatch.undo()
    assert not (out / "encoder.safetensors").exists(), "a half-written encoder.safetensors was left in place"
    assert not [p.name for p in out.iterdir() if ".encoder.safetensors" in p.name], (
        f"the temporary encoder file was left behind: {listing(out)}")
    assert checkpoint.latest_valid(out / "checkpoints") == out / "checkpoints" / "step-12"
    pretrain(None, out, resume=True, show_progress=False)
    assert_same_as_reference(out, reference, "ENOSPC writing encoder.safetensors, resumed in-process")


def test_enospc_while_the_hugging_face_export_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")  # a test dependency (pyproject [test]): never skipped in CI
    from selfsup.export.hf import export_hf

    run = _tiny_mlm_run(tmp_path)
    out = tmp_path / "export"
    export_hf(run, out)
    ids = torch.tensor([[3, 10, 20, 30, 4]])

    def logits() -> torch.Tensor:
        model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    before, files_before = logits(), sorted(p.name for p in out.iterdir())

    hits: list[Path] = []

    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(save_directory) / "model.safetensors"
        hits.append(path)
        path.write_bytes(b"\0" * 64)  # what fitted before the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    with pytest.raises(Exception) as raised:
        export_hf(run, out, overwrite=True)
    monkeypatch.undo()
    assert hits, "the export never called save_pretrained"
    err = raised.value
    assert isinstance(err, SelfsupError), (
        f"a full disk during the Hugging Face export must be a SelfsupError, not {type(err).__name__}: {err}")
    assert str(out) in str(err), f"the error must name the export folder {out}: {err}"
    assert sorted(p.name for p in out.iterdir()) == files_before, "the previous export must be left as it was"
    torch.testing.assert_close(logits(), before, rtol=0, atol=0, msg="the previous export must still load unchanged")
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, f"the failed export left temporary folders beside {out}: {leftovers}"


@pytest.mark.faults_full
@pytest.mark.parametrize("where", ["checkpoint#5", "encoder#1"])
def test_a_full_disk_is_a_message_and_exit_2_then_resume_completes(tmp_path: Path, reference: Reference,
                                                                   where: str) -> None:
    """The same as a real process sees it: `selfsup: error: ...` naming the file, exit 2, no traceback;
    with space again, --resume finishes the run bit-identically. (checkpoint#5: the optimizer of step 6.)"""
    from tests.faults.helpers import run_cli

    out = tmp_path / "run"
    full = run_cli(out, *TINY, hook=f"enospc@{where}")
    assert "hooked_cli: enospc" in full.stderr, f"the planted full disk was never reached: {full.describe()}"
    assert full.returncode == 2, f"a full disk must exit 2 with a message: {full.describe()}"
    assert "Traceback" not in full.stderr, f"a full disk must be a message, not a traceback: {full.describe()}"
    errors = [line for line in full.stderr.splitlines() if line.startswith("selfsup: error:")]
    assert errors and str(out) in errors[0], f"the message must name the file under {out}: {full.describe()}"
    resumed = run_cli(out, "--resume")
    assert resumed.returncode == 0, f"--resume after the full disk: {resumed.describe()}"
    assert_same_as_reference(out, reference, f"ENOSPC at {where}, then --resume")
