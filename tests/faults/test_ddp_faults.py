"""One of two DDP ranks (gloo, CPU) killed mid-training under torchrun: the job ends instead of
hanging, and with `--max-restarts=1` the restarted workers resume the run by themselves and finish
it bit-identical to an uninterrupted 2-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.helpers import (REPO, TINY, child_pids, listing, metric_steps, process_env, run_env, sha256,
                                  stop_process, wait_for)

DDP_STEPS, DDP_EVERY = 60, 10
# The tiny run with 60 steps (about a second of training on 2 ranks) and a checkpoint every 10:
# rank 1 dies once step-20 is on disk, with 40 steps still to go.
DDP = [arg for arg in TINY if not arg.startswith(("train.steps=", "train.checkpoint_every="))] + [
    f"train.steps={DDP_STEPS}", f"train.checkpoint_every={DDP_EVERY}"]
KILL_AFTER = f"step-{2 * DDP_EVERY}"
JOB_TIMEOUT = 240  # the uninterrupted job: ~8 s
RESTART_TIMEOUT = 90  # from the kill to the end of the restarted job: ~10 s, unless the restart hangs


def _torchrun_cmd(out: Path, *extra: str) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", "2", *extra, "-m", "selfsup.cli", "pretrain",
            "--out", str(out), *DDP]


def _start(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.torchrun.log", "w+")
    proc = subprocess.Popen(_torchrun_cmd(out, *extra), cwd=REPO, env=run_env(**(env or {})), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return proc


def _log(proc: subprocess.Popen) -> str:
    lines = Path(proc.log_path).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
    # The workers' own error lines first: torchrun's summary alone hides them.
    return "\n".join([line for line in lines if "rror" in line][:15] + ["..."] + lines[-40:])


def _worker(agent: int, rank: int, restart: int) -> int | None:
    """The pid of worker `rank` of attempt `restart`, a child of torchrun's agent process."""
    for pid in child_pids(agent):
        env = process_env(pid)
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart):
            return pid
    return None


def _descendants(pid: int) -> list[int]:
    found = []
    for child in child_pids(pid):
        found += [child, *_descendants(child)]
    return found


def _cleanup(proc: subprocess.Popen) -> None:
    """Ends the job if a failed assertion left it running: its workers first (torchrun starts each in
    a session of its own, so they would outlive a killed agent), then the agent."""
    if proc.poll() is None:
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stop_process(proc)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_rank_1_mid_training(proc: subprocess.Popen, out: Path) -> tuple[int, int]:
    """SIGKILLs rank 1 of the first attempt once KILL_AFTER is on disk; returns (rank 0's pid, rank 1's)."""
    ranks: dict[int, int | None] = {}

    def started() -> bool:
        ranks.update({r: _worker(proc.pid, r, 0) for r in (0, 1)})
        return None not in ranks.values()

    assert wait_for(started, timeout=120, poll=0.02, proc=proc), f"the two workers never started:\n{_log(proc)}"
    rank0, rank1 = ranks[0], ranks[1]
    assert rank0 is not None and rank1 is not None
    assert wait_for(lambda: (out / "checkpoints" / KILL_AFTER).is_dir(), timeout=120, poll=0.005, proc=proc), (
        f"the job never wrote {KILL_AFTER}:\n{_log(proc)}")
    assert proc.poll() is None and not (out / "encoder.safetensors").exists(), (
        "training ended before rank 1 could be killed mid-way; raise DDP_STEPS")
    os.kill(rank1, signal.SIGKILL)
    return rank0, rank1


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """sha256 of encoder.safetensors of the uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    proc = _start(out)
    try:
        proc.wait(timeout=JOB_TIMEOUT)
    finally:
        _cleanup(proc)
    assert proc.returncode == 0, f"the uninterrupted 2-process run failed:\n{_log(proc)}"
    assert metric_steps(out) == list(range(1, DDP_STEPS + 1))
    return sha256(out / "encoder.safetensors")


def test_a_killed_rank_ends_the_job_without_a_hang(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    try:
        rank0, _ = _kill_rank_1_mid_training(proc, out)
        tic = time.monotonic()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 1 was SIGKILLed, and 60 s later the job still runs (a hang):\n{_log(proc)}"
                                 ) from None
        took = time.monotonic() - tic
        assert proc.returncode != 0, f"the job exited 0 although rank 1 died mid-training:\n{_log(proc)}"
        assert wait_for(lambda: not _alive(rank0), timeout=5), f"rank 0 (pid {rank0}) outlived the job"
    finally:
        _cleanup(proc)
    assert took < 60


# torch 2.13's torchrun shares its rendezvous TCPStore with the workers (the default since 2.5) and
# the restarted workers' process group then reads the dead attempt's addresses from it: gloo fails
# to connect or hangs (pytorch/pytorch#135712). `plain` is the command users type, and needs selfsup
# to keep the attempts apart itself; `unshared_store` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
# torch's workaround, and so checks selfsup's own resume-on-restart alone.
STORES = {"plain": {}, "unshared_store": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}}


@pytest.mark.faults_full
@pytest.mark.parametrize("store", list(STORES))
def test_torchrun_restart_resumes_by_itself_bit_identically(tmp_path: Path, ddp_reference: str, store: str) -> None:
    out = tmp_path / "run"
    proc = _start(out, "--max-restarts=1", env=STORES[store])
    try:
        _kill_rank_1_mid_training(proc, out)
        tic = time.monotonic()
        restarted = wait_for(lambda: _worker(proc.pid, 0, 1) is not None, timeout=RESTART_TIMEOUT, poll=0.02,
                             proc=proc)
        proc.wait(timeout=max(1.0, RESTART_TIMEOUT - (time.monotonic() - tic)))
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the job restarted after rank 1 died (restarted: {restarted}) but did not finish within "
            f"{RESTART_TIMEOUT} s — a hang, typically the restarted workers' process group waiting on the dead "
            f"attempt's addresses (pytorch/pytorch#135712):\n{_log(proc)}") from None
    finally:
        _cleanup(proc)
    assert proc.returncode == 0, (
        f"with --max-restarts=1 the restarted workers must resume the run (TORCHELASTIC_RESTART_COUNT=1) and "
        f"finish it, exit 0 (restarted: {restarted}):\n{_log(proc)}\nthe run holds {listing(out)}")
    assert metric_steps(out) == list(range(1, DDP_STEPS + 1)), "metrics.jsonl must log each step exactly once"
    assert sha256(out / "encoder.safetensors") == ddp_reference, (
        "the encoder of the restarted 2-process run differs from the uninterrupted 2-process run's")
