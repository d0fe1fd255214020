"""`selfsup` with one fault planted at an exact moment, for tests/faults (the package knows nothing of it).

    SELFSUP_FAULTS_HOOK=ACTION@WHERE[#N] python tests/faults/hooked_cli.py pretrain --out DIR ...

WHERE picks the calls watched, N (default 1) which of them fires:
- `checkpoint`: a file written into the run's checkpoints/ folder (safetensors or torch.save);
  a checkpoint is three of them (weights, optimizer, state), so #5 is the optimizer of the second;
- `encoder`:    the write of encoder.safetensors (the final export);
- `report`:     a figure drawn for report.html (matplotlib's savefig).
ACTION is what happens at that call:
- `kill`: the file is written, cut to half its size (a torn write), then the process SIGKILLs itself;
- `term`: the process sends itself SIGTERM just before the write, then carries on (as a scheduler would);
- `enospc`: the call writes a few bytes and raises OSError(ENOSPC), as a full disk does.

The libraries' functions are replaced before selfsup is imported, so the package's own
`from safetensors.torch import save_model` picks up the watched version.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path


def _plan() -> tuple[str, str, int]:
    spec = os.environ.get("SELFSUP_FAULTS_HOOK", "")
    action, _, where = spec.partition("@")
    where, _, nth = where.partition("#")
    if action not in ("kill", "term", "enospc") or where not in ("checkpoint", "encoder", "report"):
        raise SystemExit(f"hooked_cli: bad SELFSUP_FAULTS_HOOK={spec!r} (ACTION@WHERE[#N])")
    return action, where, int(nth or 1)


ACTION, WHERE, NTH = _plan()
_seen = 0


def _path_of(target: object) -> object:
    """The file a library call writes: a path, or the name of an open file object (torch.save(obj, f))."""
    if isinstance(target, (str, os.PathLike)):
        return target
    name = getattr(target, "name", None)
    return name if isinstance(name, (str, os.PathLike)) else target


def _is_watched(path: object) -> bool:
    if WHERE == "report":
        return True
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = Path(path)
    if WHERE == "checkpoint":
        return "checkpoints" in path.parts
    return "encoder.safetensors" in path.name and "checkpoints" not in path.parts


def _fire_before(target: object) -> bool:
    """Counts a watched call; True when this is the one. `term` and `enospc` act here, before the write."""
    global _seen
    path = _path_of(target)
    if not _is_watched(path):
        return False
    _seen += 1
    if _seen != NTH:
        return False
    sys.stderr.write(f"hooked_cli: {ACTION} at {WHERE} #{NTH} ({path})\n")
    sys.stderr.flush()
    if ACTION == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif ACTION == "enospc":
        if callable(getattr(target, "write", None)):
            target.write(b"\0" * 100)  # an open file: what fitted before the disk was full
        elif isinstance(path, (str, os.PathLike)):
            Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return True


def _fire_after(target: object) -> None:
    if ACTION != "kill":
        return
    flush = getattr(target, "flush", None)
    if callable(flush):
        flush()
    path = _path_of(target)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        size = Path(path).stat().st_size
        os.truncate(path, size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


_depth = 0  # save_model calls save_file: only the outermost watched call counts


def _watch(function, path_arg: int):
    def watched(*args, **kwargs):
        global _depth
        if _depth:
            return function(*args, **kwargs)
        target = kwargs.get("filename", kwargs.get("f", args[path_arg] if len(args) > path_arg else None))
        _depth += 1
        try:
            fire = _fire_before(target)
            result = function(*args, **kwargs)
        finally:
            _depth -= 1
        if fire:
            _fire_after(target)
        return result

    watched.__wrapped__ = function
    return watched


def _install() -> None:
    if WHERE == "report":
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        original = Figure.savefig

        def savefig(self, fname, *args, **kwargs):
            fire = _fire_before(fname)
            result = original(self, fname, *args, **kwargs)
            if fire:
                _fire_after(None)
            return result

        Figure.savefig = savefig
        return
    import safetensors.torch
    import torch

    torch.save = _watch(torch.save, 1)
    safetensors.torch.save_model = _watch(safetensors.torch.save_model, 1)
    safetensors.torch.save_file = _watch(safetensors.torch.save_file, 1)


if __name__ == "__main__":
    _install()
    from selfsup.cli import main

    sys.exit(main(sys.argv[1:]))
