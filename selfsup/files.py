"""How selfsup writes and replaces files and folders, so that nothing a user owns is ever lost.

- **Ownership.** Every folder selfsup creates for a user (a run, a task, an export, an evaluation,
  a leverage or select output, a prepared dataset) holds a marker file, `.selfsup.json`, naming
  what kind of folder it is. A folder is replaced (`--overwrite`, `--force`) only when it carries
  the marker of the expected kind *and* holds nothing but the files that kind writes; anything else
  is refused with the names of what is there. A file merely *named* like ours (a `config.yaml`)
  never makes a folder ours.
- **Atomicity.** Files are written under a temporary name in their own folder, fsynced and renamed
  into place; folders are built under a temporary name and swapped in, the old one moved aside and
  deleted last.
- **Modes.** Output follows the user's umask like any other tool's (0644/0755 under umask 022):
  `mkstemp`/`mkdtemp` make private 0600/0700 entries, which a model server or a colleague could
  not read, so every temporary entry is given the umask's mode before it is renamed into place.
- **One writer.** `DirLock` holds an advisory `flock` on a run folder for the life of the process;
  the kernel releases it when the process ends, however it ends, so a stale lock never blocks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from selfsup.errors import SelfsupError

MARKER = ".selfsup.json"
LOCK = ".selfsup.lock"


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Gives `path` the mode a plain `open`/`mkdir` would have: 0666 or 0777 less the umask."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~current_umask())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Writes `data` to `path` whole or not at all (temporary file, fsync, umask mode, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomic write of a file produced by a library that takes a path (`safetensors`, `torch.save`):
    `writer(tmp)` writes the temporary file, which is then fsynced, given the umask mode and renamed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        fsync_path(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` to build into, with the umask's mode (mkdtemp's 0700 would stay)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    follow_umask(folder)
    return folder


def swap_dir(built: Path, out: Path) -> None:
    """Renames the finished folder `built` to `out`; an existing `out` is moved aside first and deleted
    last, so `out` is always one whole folder, and a failed rename puts the old one back."""
    if not out.exists():
        os.replace(built, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, aside / "old")
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(aside / "old", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def build_dir(out: Path, kind: str, write: Callable[[Path], None], what: str) -> None:
    """Builds a `kind` folder beside `out` with `write(folder)`, marks it and swaps it in, so `out`
    is one whole folder, old or new; a failed write (a full disk) is an error naming `out`, and the
    previous folder stays."""
    built = temp_dir(Path(out).parent, f".{Path(out).name}.")
    try:
        write(built)
        mark(built, kind)
        swap_dir(built, Path(out))
    except OSError as err:
        raise SelfsupError(f"{out}: could not write the {what} ({err.strerror or err}); "
                           f"any previous {what} there is unchanged") from None
    finally:
        shutil.rmtree(built, ignore_errors=True)


# ---- ownership markers -------------------------------------------------------------------------


def mark(folder: Path, kind: str, **extra: Any) -> None:
    """Writes the marker that says selfsup made `folder` as a `kind` (run, task, export, ...)."""
    from selfsup import __version__

    write_atomic(Path(folder) / MARKER, json.dumps({"kind": kind, "selfsup": __version__, **extra}, indent=1) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (or an unreadable one: then it is not ours)."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def update_marker(folder: Path, **fields: Any) -> None:
    marker = read_marker(folder)
    assert marker is not None, folder
    write_atomic(Path(folder) / MARKER, json.dumps({**marker, **fields}, indent=1) + "\n")


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_owned(folder: Path, kind: str, known: Callable[[str], bool], *, flag: str = "--overwrite",
                require_marker: bool = True) -> None:
    """Raises SelfsupError unless `folder` is a `kind` folder selfsup made and holds only the entries
    `known(name)` accepts (plus the marker and lock). The message names what is in the way.
    `require_marker=False` is for folders inside one selfsup made, written before markers existed."""
    folder = Path(folder)
    marker = read_marker(folder)
    entries = [p.name for p in folder.iterdir()]
    if marker is None and not require_marker:
        marker = {"kind": kind}
    if marker is None:
        raise SelfsupError(
            f"{folder}: not a folder selfsup made (no {MARKER} marker); it holds {_listing(entries)}. "
            f"Refusing to delete it with {flag}: choose another output path, or delete it yourself"
        )
    if marker["kind"] != kind:
        raise SelfsupError(
            f"{folder}: a selfsup {marker['kind']} folder, where this command replaces only its own kind "
            f"({kind}); refusing to replace it with {flag}"
        )
    foreign = [name for name in entries if name not in (MARKER, LOCK) and not known(name)]
    if foreign:
        raise SelfsupError(
            f"{folder}: holds files selfsup did not write ({_listing(foreign)}); refusing to delete them with {flag}. "
            "Move them out, or choose another output path"
        )


def remove_owned(folder: Path, kind: str, known: Callable[[str], bool], *, flag: str = "--overwrite") -> None:
    """Deletes `folder` after `check_owned` accepted it."""
    check_owned(folder, kind, known, flag=flag)
    shutil.rmtree(folder)


def claim_output(out: Path, kind: str, known: Callable[[str], bool], *, overwrite: bool) -> None:
    """Checks an output folder before a command spends time on it: a missing or empty one is fine;
    a non-empty one needs `--overwrite`, and then must be a `kind` folder selfsup made (`check_owned`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SelfsupError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SelfsupError(f"{out}: directory is not empty; pass --overwrite to replace it, or choose another --out")
        check_owned(out, kind, known)


def names_in(*names: str) -> Callable[[str], bool]:
    """A `known` predicate: exact names, or hidden temporaries selfsup leaves while writing them."""
    exact = frozenset(names)
    return lambda name: name in exact or (name.startswith(".") and any(name.startswith(f".{n}") for n in exact))


# ---- one writer per folder ---------------------------------------------------------------------


class DirLock:
    """An advisory lock on a folder, held until `release()` or the end of the process.

    `flock` locks die with their process (kill -9 included), so a lock left by a dead run is never
    seen as held: there is nothing stale to clean up. The holder's pid is written for the message.
    """

    def __init__(self, folder: Path, what: str = "run"):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise SelfsupError(
                    f"{folder}: another selfsup process (pid {holder}) is writing this {what}; "
                    "wait for it to end (or stop it), then run again"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
