"""Shared pieces of the fault-injection suite: the tiny run, running the CLI as a real process,
killing and signalling it at chosen moments, and the checkpoint corruptors.

Every subprocess gets a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOOKED_CLI = Path(__file__).resolve().parent / "hooked_cli.py"

# Full mode (`make faults`): every seed and every variant; the default is the reduced set CI runs.
FULL = os.environ.get("SELFSUP_FAULTS", "").strip().lower() == "full"

STEPS = 12
CHECKPOINT_EVERY = 3
# A tiny pretraining that takes ~4 s as a process on one core (1.5 s of it imports and data):
# built-in digits at 16 px, a width-8 ResNet-10, 12 steps, a checkpoint every 3.
TINY = ["method.name=simclr", "data.source=digits", "data.image_size=16", "encoder.name=resnet10", "encoder.width=8",
        "train.batch_size=32", f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.keep_last=2", "train.threads=1", "train.diagnostics_every=0", "train.log_every=1",
        "train.precision=fp32", "train.device=cpu"]

RUN_TIMEOUT = 180  # seconds: one tiny run takes ~4 s; this only stops a hang
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 75

# What must not leak from the test process into the runs (a torchrun around pytest, a planted fault).
_DROPPED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "SELFSUP_FAULTS_HOOK")


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.update(extra)
    return env


def pretrain_cmd(out: Path, *args: str, hook: bool = False) -> list[str]:
    """`selfsup pretrain --out OUT ARGS` as a process; `hook` runs it through hooked_cli.py."""
    entry = [str(HOOKED_CLI)] if hook else ["-m", "selfsup.cli"]
    return [sys.executable, *entry, "pretrain", "--out", str(out), *args]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        tail = "\n".join((self.stdout + self.stderr).splitlines()[-40:])
        return f"exit {self.returncode} after {self.seconds:.1f} s; output ends:\n{tail}"


def run_cli(out: Path, *args: str, hook: str | None = None, timeout: float = RUN_TIMEOUT) -> Result:
    """Runs `selfsup pretrain --out OUT ARGS` to its end (or the timeout, which fails the test)."""
    env = run_env(**({"SELFSUP_FAULTS_HOOK": hook} if hook else {}))
    tic = time.monotonic()
    try:
        proc = subprocess.run(pretrain_cmd(out, *args, hook=hook is not None), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"`selfsup pretrain --out {out} {' '.join(args)}` hung: still running after "
                             f"{timeout} s\n{_text(err.stderr)[-3000:]}") from None
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - tic)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def start_cli(out: Path, *args: str, hook: str | None = None) -> subprocess.Popen:
    """Starts `selfsup pretrain` without waiting; stdout/stderr go to files beside `out`."""
    env = run_env(**({"SELFSUP_FAULTS_HOOK": hook} if hook else {}))
    log = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
    fh = open(log, "w+")
    proc = subprocess.Popen(pretrain_cmd(out, *args, hook=hook is not None), cwd=REPO, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, text=True)
    proc.log_path = log  # type: ignore[attr-defined]
    fh.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> Result:
    """Waits for a process from `start_cli` (killing it on timeout, which fails the test)."""
    tic = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.args} hung: still running after {timeout} s\n"
                             f"{read_log(proc)[-3000:]}") from None
    return Result(proc.returncode, read_log(proc), "", time.monotonic() - tic)


def read_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def stop_process(proc: subprocess.Popen) -> None:
    """Ends a process this suite started (cleanup): SIGKILL, then reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def wait_for(condition: Callable[[], bool], timeout: float, poll: float = 0.005,
             proc: subprocess.Popen | None = None) -> bool:
    """Polls `condition` until true (True), or the timeout or the end of `proc` (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(poll)
    return False


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has installed a SIGTERM handler (bit 15 of SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, read from /proc (no ps needed)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# ---- what a finished run must hold ---------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metric_steps(run: Path) -> list[int]:
    """The `step` of every row of run/metrics.jsonl, in file order."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def listing(run: Path) -> str:
    """Every entry under `run` (for failure messages: what a kill left behind)."""
    if not run.exists():
        return f"{run}: does not exist"
    return ", ".join(sorted(str(p.relative_to(run)) for p in run.rglob("*"))) or f"{run}: empty"


def assert_same_as_reference(run: Path, reference: "Reference", context: str = "") -> None:
    """The run finished as the uninterrupted one did: same encoder bytes, every step logged once, a report."""
    where = f" ({context})" if context else ""
    encoder = run / "encoder.safetensors"
    assert encoder.is_file(), f"{encoder} missing after the run completed{where}; the folder holds {listing(run)}"
    assert sha256(encoder) == reference.encoder_sha256, (
        f"{encoder} differs from the uninterrupted run's{where}: an interrupted and resumed run must "
        "finish bit-identical")
    steps = metric_steps(run)
    assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl must log each step exactly once{where}; steps: {steps}"
    assert (run / "encoder.json").is_file(), f"encoder.json missing{where}"
    assert (run / "report.html").is_file(), f"report.html missing{where}"


@dataclass
class Reference:
    """The uninterrupted tiny run every faulted run is compared with."""

    run: Path
    encoder_sha256: str
    seconds: float  # how long the process lived: the window for kills at random moments


def make_reference(root: Path) -> Reference:
    run = root / "reference"
    result = run_cli(run, *TINY)
    assert result.returncode == 0, "the uninterrupted reference run failed: " + result.describe()
    assert metric_steps(run) == list(range(1, STEPS + 1))
    return Reference(run, sha256(run / "encoder.safetensors"), result.seconds)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (the lock file, rewritten by any opener, aside)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".selfsup.lock"}


# ---- checkpoint corruptors -----------------------------------------------------------------------


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's `step-N` checkpoint folders, newest first."""
    root = run / "checkpoints"
    found = [(int(p.name.split("-", 1)[1]), p) for p in root.glob("step-*") if p.is_dir()]
    return sorted(found, reverse=True)


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def flip_byte(ckpt: Path) -> str:
    """One byte of the weights' data (past the safetensors header) inverted."""
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    at = 8 + header + (len(data) - 8 - header) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return "model.safetensors"


def truncate_optimizer(ckpt: Path) -> str:
    path = ckpt / "optimizer.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "optimizer.pt"


def remove_manifest(ckpt: Path) -> str:
    (ckpt / "manifest.json").unlink()
    return "manifest.json"


def empty_manifest(ckpt: Path) -> str:
    """A manifest that lists no file: it verifies nothing, so nothing in the folder may be trusted."""
    step = _manifest(ckpt)["step"]
    (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "step": step, "files": {}}))
    return "manifest.json"


class PlantedPayload:
    """A custom class pickled into a forged state.pt. Unpickling it runs `plant_file` — which a
    loader that refuses arbitrary pickles (torch.load(weights_only=True)) never lets happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (plant_file, (self.marker,))


def plant_file(marker: str) -> "PlantedPayload":
    Path(marker).write_text("the forged state.pt was unpickled: arbitrary code ran\n")
    return PlantedPayload(marker)


def pickle_state(ckpt: Path) -> str:
    """state.pt replaced by a pickle of a custom class, with the manifest's sha256 and size updated to
    match, so only the loader's refusal of pickled code stands between it and the process."""
    import torch

    marker = ckpt.parent.parent.parent / f"{ckpt.parent.parent.name}.PLANTED"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["payload"] = PlantedPayload(str(marker))
    torch.save(state, ckpt / "state.pt")
    manifest = _manifest(ckpt)
    data = (ckpt / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return "state.pt"


def planted_marker(run: Path) -> Path:
    return run.parent / f"{run.name}.PLANTED"


CORRUPTORS: dict[str, Callable[[Path], str]] = {
    "flipped_byte_in_model": flip_byte,
    "truncated_optimizer": truncate_optimizer,
    "missing_manifest": remove_manifest,
    "emptied_manifest": empty_manifest,
    "pickled_class_as_state": pickle_state,
}
