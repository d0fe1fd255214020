"""`train.parallel=fsdp` (FSDP2, `train/sharded.py`): 2 gloo ranks through torchrun train, checkpoint,
resume at world size 2 and 1, and export an encoder equal to the unsharded weights.

One torchrun launch (tests/train/fsdp_worker.py) runs every 2-rank part; the one-process parts run
here. DINO's views are fixed functions of the items, so 2 ranks train on exactly what one process
trains on; MAE's masks come from each rank's generator, so its FSDP run is compared with DDP's.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfsup.errors import SelfsupError
from selfsup.train import checkpoint, sharded
from selfsup.train.runtime import Runtime
from tests.train import fsdp_worker as worker

REPO = Path(__file__).resolve().parents[2]
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The 2-rank runs, from one torchrun launch (its start-up is most of the time)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fsdp")
    worker.run("dino", "fsdp", root / "dino_from1", CPU, stop_after=3)  # one process's checkpoint, resumed on 2 ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/train/fsdp_worker.py"), str(root)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join([line for line in lines if "rror" in line][:20] + lines[-40:])
    return root


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("samples_per_s")  # wall-clock, not state
    return rows


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, exact: bool = False) -> None:
    assert set(a) == set(b), what
    for name in a:
        assert type(a[name]) is torch.Tensor and type(b[name]) is torch.Tensor, f"{what}: {name} is not a plain tensor"
        if exact:
            assert torch.equal(a[name], b[name]), f"{what}: {name}"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")


def _log(root: Path) -> str:
    return (root / "log.0").read_text()


@pytest.mark.parametrize("name", ["dino", "mae"])
def test_fsdp_trains_as_ddp_does_on_two_ranks(launched, name):
    """Loss, gradient norm (clipped: DINO's first steps are far above train.grad_clip) and weights."""
    ddp, fsdp = _rows(launched / f"{name}_ddp"), _rows(launched / f"{name}_fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4, 5, 6]
    if name == "dino":
        assert fsdp[0]["grad_norm"] > 3.0, "the test should clip"
    for a, b in zip(ddp, fsdp):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), f"step {a['step']}: {key}"
    _assert_close(_weights(launched / f"{name}_ddp.pt"), _weights(launched / f"{name}_fsdp.pt"), f"{name} weights")
    units = 4 if name == "dino" else 3  # DINO: the student's 2 blocks and the teacher's; MAE: + 1 decoder block
    assert f"train.parallel=fsdp: {units} layers" in _log(launched)


def test_two_ranks_train_what_one_process_trains(launched):
    """DINO (an EMA teacher, a centre all-reduced over ranks) with fixed views: one process on the global batch."""
    one = worker.run("dino", "fsdp", launched / "dino_one", CPU)
    two = _rows(launched / "dino_fsdp")
    for a, b in zip(_rows(launched / "dino_one"), two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    _assert_close(one.state_dict(), _weights(launched / "dino_fsdp.pt"), "1 process vs 2 ranks")


def test_resume_on_two_ranks_is_bit_identical(launched):
    assert f"resumed from {launched / 'dino_resumed2/checkpoints/step-3'} (step 3)" in _log(launched)
    assert "skipping" not in _log(launched)
    assert _rows(launched / "dino_resumed2") == _rows(launched / "dino_fsdp")
    _assert_close(_weights(launched / "dino_resumed2.pt"), _weights(launched / "dino_fsdp.pt"), "resumed", exact=True)


def test_two_ranks_checkpoint_resumes_on_one_process(launched, caplog):
    worker.copy_run(launched / "dino_fsdp", launched / "dino_resumed1", drop_steps=(6,))
    step3 = launched / "dino_resumed1/checkpoints/step-3"
    manifest = json.loads((step3 / "manifest.json").read_text())
    assert manifest["format"] == 2 and sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                      "state.pt"]
    with caplog.at_level(logging.INFO, logger="selfsup"):
        one = worker.run("dino", "fsdp", launched / "dino_resumed1", CPU, resume=True)
    assert f"resumed from {step3} (step 3)" in caplog.text
    _assert_close(one.state_dict(), _weights(launched / "dino_fsdp.pt"), "resumed on 1 process")
    assert [r["step"] for r in _rows(launched / "dino_resumed1")] == [1, 2, 3, 4, 5, 6]
    # ... and what one process writes, 2 ranks resume (the worker resumed dino_from1 at step 3).
    assert f"resumed from {launched / 'dino_from1/checkpoints/step-3'} (step 3)" in _log(launched)
    _assert_close(_weights(launched / "dino_from1.pt"), _weights(launched / "dino_fsdp.pt"), "1 process -> 2 ranks")


def test_deferred_reads_and_the_non_finite_guard_under_fsdp(launched):
    _assert_close(_weights(launched / "dino_deferred.pt"), _weights(launched / "dino_fsdp.pt"), "fused AdamW")
    found = [json.loads((launched / f"found.{rank}.json").read_text()) for rank in range(2)]
    assert all("non-finite" in f["nonfinite"] and "step 1" in f["nonfinite"] for f in found), found
    assert found[0]["budget_steps"] == found[1]["budget_steps"] >= 1
    assert not (launched / "nan/checkpoints").exists()


def test_export_equals_the_unsharded_weights(launched):
    """The exported encoder is one file of plain tensors: rank 0's whole weights, equal to the final
    checkpoint's shards put together and to the DDP run's encoder (BatchNorm statistics included)."""
    run = launched / "pretrain_fsdp"
    exported = load_file(run / "encoder.safetensors")
    final = run / "checkpoints/step-4"
    metadata = sharded.read_metadata(final)
    target = {"model": {k.removeprefix("model."): torch.empty(tuple(v.size), dtype=v.properties.dtype)
                        for k, v in metadata.state_dict_metadata.items()
                        if k.startswith("model.encoder.") and hasattr(v, "size")}}
    sharded.load_shards(final, target, world_size=1)
    consolidated = {k.removeprefix("encoder."): v for k, v in target["model"].items()}
    _assert_close(exported, consolidated, "export vs checkpoint", exact=True)
    _assert_close(exported, load_file(launched / "pretrain_ddp/encoder.safetensors"), "FSDP vs DDP export")
    assert any("running_mean" in k for k in exported)
    assert json.loads((run / "encoder.json").read_text())["encoder"]["name"] == "resnet10"
    from selfsup.export.encoder import load_encoder

    encoder, _ = load_encoder(run)  # the file loads as any encoder does
    assert sum(p.numel() for p in encoder.parameters()) > 0
    assert _rows(run)[-1]["knn_acc"] == pytest.approx(_rows(launched / "pretrain_ddp")[-1]["knn_acc"])


def test_a_checkpoint_without_its_manifest_is_ignored(launched, caplog):
    worker.copy_run(launched / "dino_fsdp", launched / "dino_torn", drop_steps=())
    (launched / "dino_torn/checkpoints/step-6/manifest.json").unlink()
    root = launched / "dino_torn/checkpoints"
    assert checkpoint.latest_valid(root, quiet=True) == root / "step-3"
    method = worker.build("dino")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, state = sharded.resume_latest(root, method, None, CPU)
    assert path == root / "step-3" and state["step"] == 3 and "no manifest.json" in caplog.text


# ---- one process: the sharded format without sharding ------------------------------------------------


def test_one_process_resume_is_bit_identical(tmp_path):
    whole = worker.run("dino", "fsdp", tmp_path / "whole", CPU)
    worker.run("dino", "fsdp", tmp_path / "crash", CPU, stop_after=4)
    resumed = worker.run("dino", "fsdp", tmp_path / "crash", CPU, resume=True)
    assert _rows(tmp_path / "crash") == _rows(tmp_path / "whole")
    _assert_close(resumed.state_dict(), whole.state_dict(), "resumed", exact=True)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded") / "run"
    worker.run("dino", "fsdp", root, CPU, cfg={"steps": 4, "checkpoint_every": 2})
    return root / "checkpoints"


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(root, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _rehash(path: Path, name: str) -> None:
    import hashlib

    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this would create a folder: a stand-in for code a pickle could run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_metadata_naming_anything_but_dcp_classes_is_never_unpickled(two_checkpoints, tmp_path, caplog):
    root = _copy(two_checkpoints, tmp_path)
    newest = root / "step-4"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(str(tmp_path / "pwned"))))
    _rehash(newest, ".metadata")
    checkpoint.verify(newest)  # whole on disk: only loading can tell
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, _ = sharded.resume_latest(root, worker.build("dino"), None, CPU)
    assert path == root / "step-2" and not (tmp_path / "pwned").exists()
    assert "os.makedirs is not allowed" in caplog.text or "posix.makedirs is not allowed" in caplog.text


@pytest.mark.parametrize("change, message", [
    (lambda m: m["files"].pop(".metadata"), r"does not list \.metadata"),
    (lambda m: m["files"].pop("__0_0.distcp"), r"does not list __0_0\.distcp"),
    (lambda m: m["files"].update({"model.safetensors": m["files"]["state.pt"]}), r"model\.safetensors"),
    (lambda m: m["files"].update({"__0_0.distcp/../x": m["files"]["state.pt"]}), r"\.\./x"),
])
def test_sharded_manifest_fields_are_checked(two_checkpoints, tmp_path, change, message):
    root = _copy(two_checkpoints, tmp_path)
    manifest = json.loads((root / "step-4/manifest.json").read_text())
    change(manifest)
    (root / "step-4/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SelfsupError, match=message):
        checkpoint.verify(root / "step-4")
    assert checkpoint.latest_valid(root, quiet=True) == root / "step-2"


def test_a_corrupt_shard_falls_back_and_a_clean_load_never_half_loads(two_checkpoints, tmp_path, caplog):
    root = _copy(two_checkpoints, tmp_path)
    shard = root / "step-4/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated after the manifest was written
    method = worker.build("dino")
    optimizer = torch.optim.AdamW(method.parameters())
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        path, state = sharded.resume_latest(root, method, optimizer, CPU)
    assert path == root / "step-2" and state["step"] == 2 and "truncated or corrupted" in caplog.text
    _rehash(root / "step-4", "__0_0.distcp")  # now whole by its hashes, but DCP cannot read it
    fresh = worker.build("dino")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(checkpoint.UnusableCheckpoint, match="cannot be loaded"):
        sharded.load_checkpoint(root / "step-4", fresh, fresh_optimizer, CPU)
    _assert_close(fresh.state_dict(), before, "after a failed load", exact=True)
    assert not fresh_optimizer.state


def test_weights_of_another_model_and_the_other_format_are_errors(two_checkpoints, tmp_path):
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method

    knobs = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "head_batchnorm": False}
    deeper = build_method({"name": "dino", **knobs},
                          build_encoder("vit_tiny", in_channels=3, image_size=16, dim=32, depth=3, heads=2))
    with pytest.raises(SelfsupError, match="do not match this model.*blocks.2.*config"):
        sharded.resume_latest(two_checkpoints, deeper, None, CPU)
    with pytest.raises(SelfsupError, match="train.parallel=fsdp"):
        checkpoint.load_checkpoint(two_checkpoints / "step-4", worker.build("dino"), None)
    method = worker.build("dino")
    optimizer = torch.optim.AdamW(method.parameters())
    plain = checkpoint.save_checkpoint(tmp_path, 2, method, optimizer, {"data_order": {}}, 1)
    with pytest.raises(SelfsupError, match="train.parallel=ddp"):
        sharded.load_checkpoint(plain, method, optimizer, CPU)


def test_layer_units_are_every_stack_of_students_teachers_and_decoders():
    dino, mae = worker.build("dino"), worker.build("mae")
    expected = [*reversed(list(dino.teacher["encoder"].blocks)), *reversed(list(dino.encoder.blocks))]
    assert sharded.layer_units(dino) == expected  # the reverse of the modules' order
    assert set(map(id, sharded.layer_units(mae))) == {id(m) for m in [*mae.encoder.blocks, *mae.decoder_blocks]}
    from selfsup.encoders import build_encoder

    resnet = build_encoder("resnet10", in_channels=3, image_size=16, width=8)
    assert len(sharded.layer_units(resnet)) == len(resnet.stages)


def test_parallel_is_checked_in_the_config():
    from selfsup.config import load_config

    assert load_config(None, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(SelfsupError, match="train.parallel"):
        load_config(None, ["train.parallel=zero3"])


@pytest.mark.parametrize("target", ["dcp.save", "torch_save"])
def test_no_space_while_saving_leaves_the_previous_checkpoint(two_checkpoints, tmp_path, monkeypatch, target):
    import errno

    root = _copy(two_checkpoints, tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import torch.distributed.checkpoint as dcp

    monkeypatch.setattr(*((dcp, "save") if target == "dcp.save" else (checkpoint, "torch_save")), no_space)
    method = worker.build("dino")
    with pytest.raises(SelfsupError, match=r"step-6.*No space left on device.*step-4.*intact"):
        sharded.save_checkpoint(root, 6, method, torch.optim.AdamW(method.parameters()), {"data_order": {}}, 5, CPU)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"], "no temporary and no partial step-6"


def test_sharded_runs_compute_with_torchs_gemm():
    """FSDP2 frees gathered weights by resizing their storage, which OpenBLAS's numpy views forbid."""
    from selfsup.train.loop import _choose_gemm

    two = Runtime(device=torch.device("cpu"), autocast_dtype=None, rank=0, world_size=2)
    assert _choose_gemm(worker.train_config("fsdp", cpu_gemm="openblas"), two, saved="openblas") == "torch"
    assert _choose_gemm(worker.train_config("fsdp", cpu_gemm="openblas"), CPU) == "openblas"
    assert _choose_gemm(worker.train_config("ddp"), CPU, saved="openblas") == "openblas"


def test_parameters_without_optimizer_state_resume_without_one(tmp_path):
    """A parameter that never had a gradient has no AdamW state in the checkpoint, nor after the resume."""
    def model_and_optimizer(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = model_and_optimizer(0)
    model["used"](torch.randn(5, 4)).sum().backward()
    optimizer.step()
    sharded.save_checkpoint(tmp_path, 1, model, optimizer, {"data_order": {}}, 1, CPU)
    fresh, fresh_optimizer = model_and_optimizer(1)
    assert sharded.load_checkpoint(tmp_path / "step-1", fresh, fresh_optimizer, CPU)["step"] == 1
    _assert_close(fresh.state_dict(), model.state_dict(), "weights", exact=True)
    assert [len(fresh_optimizer.state[p]) > 0 for p in fresh.parameters()] == [True, True, False, False]
    torch.testing.assert_close(fresh_optimizer.state[fresh["used"].weight]["exp_avg"],
                               optimizer.state[model["used"].weight]["exp_avg"], rtol=0, atol=0)
