"""Sharded datasets: a folder of WebDataset-layout tar shards written by `selfsup data shard`, read as a stream.

```
DIR/.selfsup.json          marker {"kind": "shards"} (selfsup/files.py): --overwrite replaces only such a folder
DIR/shards.json            the index (below)
DIR/train-000000.tar ...   the training split, `--shard-items` samples per shard (the last may hold fewer)
DIR/holdout-000000.tar ... the held-out split, written in source order
DIR/tokenizer.json         text: the tokenizer the token ids were made with; image–text: the captions' tokenizer
```

**Why tar (WebDataset's layout), not Parquet.** A sample is a few binary blobs (an encoded image or
clip, a document's token ids) plus a little metadata, and training reads every sample of a shard in
order: a tar is exactly that — members one after another, read front to back with nothing to seek —
and Python's standard `tarfile` writes and reads it, so no dependency is added. A columnar format
pays for column pruning and predicate pushdown that a sample stream never uses. Other tools that
read WebDataset (webdataset, torchdata, Hugging Face `datasets`) read these shards as they are.

**Samples.** A sample is the consecutive members `KEY.EXT` sharing one KEY (WebDataset's rule: the
key is the member name up to the first dot of its last path component): `KEY.json` holds
{"id": the source's id, "label": class index into shards.json's classes or -1, "groups": {column:
value}}; the payload is the original file's bytes under its own extension (`KEY.jpg`, `KEY.flac`),
an array source's pixels as `KEY.png` or clips as `KEY.wav`, or a document's `KEY.txt` (its text,
UTF-8, for probes and reports) and `KEY.ids.npy` (its token ids, uint16 when the vocabulary fits,
else int32, as the tokenizer gives them: no bounds, no padding). An image–text sample is an image's
payload plus `KEY.captions.json` (all its captions, a JSON list of strings: text, which a run tokenizes).
Keys are the sample's running number in its split (`000000123`).

**Reading never extracts.** `read_shard` streams a tar (`tarfile.open(path, "r|*")`) and reads each
member into memory; a member that is not a regular file (a link, a folder, a device), whose name is
absolute or climbs with `..`, or that is larger than `_MAX_MEMBER_BYTES`, is refused with an error
naming the shard and the member. A shard whose tar is corrupt or truncated — including one that
ends early, which `tarfile` reads as a clean end: the sample count is checked against the index — is
an error naming the shard and the last member read; under `data.on_bad_file=skip` the rest of that
shard is skipped instead, with a warning naming both and counting the samples lost. A member whose
content cannot be decoded (an image, a clip, token ids) is the reading modality's business, under
the same rule (`BadSamples`).

**The index** (`shards.json`): `format`, `modality`, `source`, `seed` and `holdout_fraction` of the
split, `classes` (null when unlabelled), `label_column`, `group_columns`, `num_skipped` (bad source
files left out), per split its `items` and its `shards` ([{"name", "items", "bytes"} + "tokens" for
text]), and the modality's `settings` (images: channel statistics; text: the tokenizer's file and
kind; audio: the rate clips were checked at; image–text: channel statistics, the captions' tokenizer
and the training captions' count). What a run may choose is not baked in: images keep
their encoded bytes (a run decodes them at its `data.image_size`/`data.channels`), text keeps whole
documents (a run packs them into its `data.seq_len` blocks), audio keeps the original file (a run
resamples to its `data.sample_rate`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from selfsup.errors import SelfsupError
from selfsup.files import build_dir, claim_output, fsync_path, read_marker

if TYPE_CHECKING:
    from selfsup.data.decode import _BadFilePolicy, _FileKind
    from selfsup.data.sources import FileListing

log = logging.getLogger("selfsup")

KIND = "shards"  # the folder's marker kind
INDEX_FILE = "shards.json"
TOKENIZER_FILE = "tokenizer.json"  # text: the tokenizer the ids were made with
FORMAT_VERSION = 1
SPLITS = ("train", "holdout")
META = "json"  # each sample's metadata member: KEY.json
_SHARD_NAME = re.compile(r"(train|holdout)-\d{6}\.tar")
# A member is read into memory whole; a larger one is refused rather than allowed to exhaust it.
_MAX_MEMBER_BYTES = 1 << 30
# Under on_bad_file=skip, a reader fails once more than data.max_bad_fraction of the samples it has
# decoded are bad, judged from this many on (the first bad sample alone is no fraction).
_MIN_JUDGED = 200

Sample = tuple[str, dict[str, bytes]]  # ("SHARD:KEY", {extension without the dot, "png", "ids.npy": bytes})


def shard_name(split: str, number: int) -> str:
    """The file name of shard `number` of `split`: train-000000.tar."""
    return f"{split}-{number:06d}.tar"


def shard_files(name: str) -> bool:
    """What a shards folder may hold besides its marker (for `--overwrite`, files.check_owned): the
    index, the tokenizer, the shards, and the hidden temporaries selfsup leaves while writing them."""
    return name in (INDEX_FILE, TOKENIZER_FILE) or bool(_SHARD_NAME.fullmatch(name)) or (
        name.startswith(".") and name.endswith(".tmp"))


def is_shard_folder(path: object) -> bool:
    """Whether `path` is a folder `selfsup data shard` wrote (its marker says so and it has an index)."""
    if path is None:
        return False
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return False
    marker = read_marker(folder)
    return marker is not None and marker["kind"] == KIND and (folder / INDEX_FILE).is_file()


# ---- reading -------------------------------------------------------------------------------------


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's rule: the key ends at the first dot of the last
    path component ("a/000001.ids.npy" -> ("a/000001", "ids.npy")); ("", "") when there is no dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why a member may not be read (None when it may)."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        return "has an absolute name"
    if ".." in path.parts or "\\" in member.name:
        return "has a name that climbs out of its folder (`..`)"
    if not member.isreg():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
                "a folder" if member.isdir() else "not a regular file")
        return f"is {kind}"
    if member.size > _MAX_MEMBER_BYTES:
        return f"is {member.size:,} bytes, over the {_MAX_MEMBER_BYTES:,} one member may hold"
    return None


def read_shard(path: Path, expected: int | None = None, on_bad: str = "error") -> Iterator[Sample]:
    """The samples of one shard, streamed and grouped by key: ("PATH:KEY", {extension: bytes}).

    Nothing is written to disk. Unsafe members are refused (module docstring), always; a corrupt or
    truncated tar, or one holding another number of samples than `expected` (the index's count), is
    an error naming the shard and the member, or under `on_bad="skip"` the end of this shard (logged)."""
    path = Path(path)
    count, last = 0, None
    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                why = _unsafe(member)
                if why is not None:
                    raise SelfsupError(f"{path}: member {member.name!r} {why}; selfsup reads only regular files "
                                       "named KEY.EXT inside a shard. Refusing to read this shard: write it again "
                                       "with `selfsup data shard`")
                this, ext = member_key(member.name)
                if not this:
                    raise SelfsupError(f"{path}: member {member.name!r} is not named KEY.EXT as a shard's members are; "
                                       "write the shard again with `selfsup data shard`")
                if this != key:
                    if key is not None:
                        count += 1
                        yield f"{path}:{key}", files
                    key, files = this, {}
                if ext in files:
                    raise _Corrupt(f"member {member.name!r} appears twice in one sample")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file
                data = handle.read()
                if len(data) != member.size:
                    raise _Corrupt(f"member {member.name!r} holds {len(data)} of its {member.size} bytes")
                files[ext] = data
                last = member.name
            if key is not None:
                count += 1
                yield f"{path}:{key}", files
                key = None
        if expected is not None and count != expected:
            after = f"after member {last!r}" if last else "before its first member"
            raise _Corrupt(f"it ends {after}, with {count} samples where {INDEX_FILE} records {expected}")
    except SelfsupError:
        raise
    except (tarfile.TarError, EOFError, OSError, _Corrupt) as err:
        if isinstance(err, FileNotFoundError):
            raise SelfsupError(f"{path}: shard not found; the folder is incomplete: write it again with "
                               "`selfsup data shard`") from None
        at = f"after member {last!r}" if last else "at its first member"
        reason = str(err) if isinstance(err, _Corrupt) else f"corrupt or truncated {at} ({type(err).__name__}: {err})"
        if on_bad != "skip":
            raise SelfsupError(f"{path}: {reason}; write the shard again with `selfsup data shard`, or pass "
                               "data.on_bad_file=skip to skip the rest of a damaged shard") from None
        lost = f"{expected - count} of its {expected} samples" if expected is not None else "the rest of it"
        log.warning("%s: %s; skipping %s (data.on_bad_file=skip)", path, reason, lost)


class _Corrupt(Exception):
    """A shard whose tar reads but whose content breaks the layout (a repeated member, a short count)."""


@dataclass(frozen=True)
class ShardReader:
    """`read_shard` with each shard's expected count (from the index) and the bad-file rule: the
    picklable `read` a stream hands its DataLoader workers."""

    counts: dict[str, int]
    on_bad: str = "error"

    def __call__(self, path: Path) -> Iterator[Sample]:
        return read_shard(path, self.counts.get(Path(path).name), self.on_bad)


def json_member(key: str, files: dict[str, bytes], member: str, what: str) -> Any:
    """A sample's JSON member KEY.`member` parsed; an error naming the sample when it is missing (holding
    `what`) or is not valid JSON."""
    raw = files.get(member)
    if raw is None:
        raise SelfsupError(f"{key}: the sample has no {member} member ({what}); write the shard again with "
                           "`selfsup data shard` (of this folder's modality)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SelfsupError(f"{key}.{member}: not valid JSON ({err}); write the shard again with "
                           "`selfsup data shard`") from None


def sample_meta(key: str, files: dict[str, bytes]) -> dict[str, Any]:
    """A sample's KEY.json: {"id": str, "label": int (-1 = none), "groups": {column: str}}; an error
    naming the member when it is missing or malformed."""
    meta = json_member(key, files, META, "its id and label")
    raw = files[META]
    if (not isinstance(meta, dict) or not isinstance(meta.get("id"), str) or isinstance(meta.get("label"), bool)
            or not isinstance(meta.get("label"), int) or not isinstance(meta.get("groups", {}), dict)):
        raise SelfsupError(f"{key}.{META}: expected {{\"id\": str, \"label\": int, \"groups\": {{...}}}}, "
                           f"got {raw[:120]!r}")
    return meta


def encode_meta(id: str, label: int, groups: dict[str, str]) -> bytes:
    return json.dumps({"id": id, "label": int(label), "groups": groups}, ensure_ascii=False).encode("utf-8")


@dataclass
class BadSamples:
    """The bad-file rule for samples decoded from shards (`data.on_bad_file`, `data.max_bad_fraction`):
    under "error" a bad member stops with its shard and member named; under "skip" it is dropped,
    logged and counted, and the reader fails once more than `max_bad_fraction` of what it decoded is
    bad (judged from `_MIN_JUDGED` samples on)."""

    on_bad: str = "error"
    max_bad_fraction: float = 0.01
    seen: int = 0
    bad: int = 0

    def ok(self) -> None:
        self.seen += 1

    def failed(self, member: str, reason: object) -> None:
        """`member` ("PATH:KEY.EXT") could not be decoded, for `reason`."""
        self.seen += 1
        if self.on_bad != "skip":
            raise SelfsupError(f"{member}: {reason}; write the shard again from a fixed source, or pass "
                               "data.on_bad_file=skip")
        self.bad += 1
        log.warning("skipped %s (%s): %d bad of %d samples read so far (data.on_bad_file=skip)",
                    member, reason, self.bad, self.seen)
        if self.seen >= _MIN_JUDGED and self.bad > self.max_bad_fraction * self.seen:
            raise SelfsupError(f"{self.bad} of the {self.seen} samples read ({self.bad / self.seen:.1%}) cannot be "
                               f"decoded, over data.max_bad_fraction={self.max_bad_fraction:g}; last: {member} "
                               f"({reason}). Write the shards again from a fixed source")


# ---- the index -----------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """A shards folder's `shards.json`, checked (module docstring)."""

    folder: Path
    modality: str
    meta: dict[str, Any]

    def entries(self, split: str) -> list[dict[str, Any]]:
        return self.meta["splits"][split]["shards"]

    def shards(self, split: str) -> list[tuple[Path, int]]:
        """(path, items) of each shard of `split`, in the index's order."""
        return [(self.folder / e["name"], int(e["items"])) for e in self.entries(split)]

    def shards_tokens(self, split: str) -> list[int]:
        """Text: the token ids each shard of `split` holds (documents' ids, without bounds)."""
        return [int(e["tokens"]) for e in self.entries(split)]

    def items(self, split: str) -> int:
        return int(self.meta["splits"][split]["items"])

    def counts(self) -> dict[str, int]:
        """Shard name -> samples, over both splits (what `ShardReader` checks)."""
        return {e["name"]: int(e["items"]) for split in SPLITS for e in self.entries(split)}

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    @property
    def group_columns(self) -> list[str]:
        return list(self.meta.get("group_columns") or [])

    @property
    def settings(self) -> dict[str, Any]:
        return self.meta.get("settings") or {}

    @property
    def source(self) -> str:
        return str(self.folder)

    def samples(self, split: str, on_bad: str = "error") -> Iterator[Sample]:
        """Every sample of `split`, shard after shard."""
        reader = ShardReader(self.counts(), on_bad)
        for path, _ in self.shards(split):
            yield from reader(path)


def load_index(folder: Path) -> ShardIndex:
    """The index of a shards folder; an error naming the file when it is missing, unreadable or of
    another format version."""
    folder = Path(folder).expanduser()
    path = folder / INDEX_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfsupError(f"{path}: not found; {folder} is not a folder written by `selfsup data shard`") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SelfsupError(f"{path}: cannot read the shard index ({err}); write the folder again with "
                           "`selfsup data shard`") from None
    try:
        if meta["format"] != FORMAT_VERSION:
            raise SelfsupError(f"{path}: shard format {meta['format']}, where this selfsup reads format "
                               f"{FORMAT_VERSION}; write the folder again with `selfsup data shard`")
        for split in SPLITS:
            for entry in meta["splits"][split]["shards"]:
                if not _SHARD_NAME.fullmatch(entry["name"]) or int(entry["items"]) < 0:
                    raise ValueError(f"bad shard entry {entry!r}")
        modality = str(meta["modality"])
    except SelfsupError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise SelfsupError(f"{path}: not a valid shard index ({type(err).__name__}: {err}); write the folder again "
                           "with `selfsup data shard`") from None
    return ShardIndex(folder, modality, meta)


# ---- the train split as a stream -----------------------------------------------------------------


@dataclass
class ShardSplit:
    """The training split of a shards folder as a pretraining run sees it: never loaded, only
    described (its length, its source); the modality's stream reads it (`StreamBatches`)."""

    index: ShardIndex
    split: str = "train"
    ids: list[str] = field(default_factory=list)  # unknown until read: the Dataset protocol's fields stay empty
    labels: None = None
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str] | None:
        return self.index.classes

    @property
    def source(self) -> str:
        return self.index.source

    def __len__(self) -> int:
        return self.index.items(self.split)

    def subset(self, index: Any) -> Any:
        raise SelfsupError(f"{self.source}: a streamed split has no rows to pick; load the shards in memory instead")


# ---- writing -------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one split's samples into `split-NNNNNN.tar` shards of `shard_items` samples each."""

    def __init__(self, folder: Path, split: str, shard_items: int):
        self.folder, self.split, self.shard_items = Path(folder), split, shard_items
        self.entries: list[dict[str, Any]] = []
        self.items = 0
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._entry: dict[str, Any] = {}

    def add(self, files: dict[str, bytes], tokens: int | None = None) -> None:
        """Appends one sample: its members {extension: bytes} (the metadata under "json"), in that
        order after its key; `tokens` (text) is added to the shard's token count."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        key = f"{self.items:09d}"
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: a shard depends on its samples alone
            self._tar.addfile(info, io.BytesIO(data))
        self.items += 1
        self._entry["items"] += 1
        if tokens is not None:
            self._entry["tokens"] = self._entry.get("tokens", 0) + int(tokens)
        if self._entry["items"] == self.shard_items:
            self._close_shard()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.entries))
        self._path = self.folder / name
        self._entry = {"name": name, "items": 0}
        self._tar = tarfile.open(self._path, "w", format=tarfile.PAX_FORMAT)

    def _close_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        fsync_path(self._path)
        self._entry["bytes"] = self._path.stat().st_size
        self.entries.append(self._entry)
        self._tar, self._path = None, None

    def close(self) -> dict[str, Any]:
        """Finishes the last shard; returns the split's index entry {"items", "shards"}."""
        if self._tar is not None:
            self._close_shard()
        return {"items": self.items, "shards": self.entries}


@dataclass
class ShardSummary:
    """What `data shard` wrote, for its closing line."""

    out: Path
    modality: str
    items: dict[str, int]
    shards: dict[str, int]
    bytes: int
    skipped: int

    def describe(self) -> str:
        splits = ", ".join(f"{split} {self.items[split]:,} items in {self.shards[split]} shard"
                           f"{'s' if self.shards[split] != 1 else ''}" for split in SPLITS)
        skipped = f"; {self.skipped} bad source file(s) skipped" if self.skipped else ""
        return (f"wrote {self.out}: {self.modality} shards, {splits}, {self.bytes / 1e6:,.1f} MB{skipped}; "
                f"train on it with data.source={self.out}")


def write_shard_folder(out: Path, overwrite: bool, modality: str, shard_items: int, source: str,
                       write: Callable[[dict[str, ShardWriter], Path], dict[str, Any]]) -> ShardSummary:
    """Builds a shards folder beside `out` and swaps it in (`files.build_dir`): `write(writers, folder)`
    adds every sample to the writers of both splits (and files such as the tokenizer into `folder`)
    and returns the index's other fields (classes, group_columns, settings, ...). `out` must be empty,
    missing, or (with `overwrite`) a shards folder holding nothing selfsup did not write."""
    out = Path(out).expanduser()
    if isinstance(shard_items, bool) or not isinstance(shard_items, int) or shard_items < 1:
        raise SelfsupError(f"--shard-items must be a positive integer, got {shard_items!r}")
    claim_output(out, KIND, shard_files, overwrite=overwrite)
    summary: dict[str, Any] = {}

    def build(folder: Path) -> None:
        writers = {split: ShardWriter(folder, split, shard_items) for split in SPLITS}
        fields = write(writers, folder)
        splits = {split: writer.close() for split, writer in writers.items()}
        meta = {"format": FORMAT_VERSION, "modality": modality, "source": source, **fields, "splits": splits}
        (folder / INDEX_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_path(folder / INDEX_FILE)
        summary["meta"] = meta

    build_dir(out, KIND, build, "shards")
    meta = summary["meta"]
    return ShardSummary(out, modality, {s: meta["splits"][s]["items"] for s in SPLITS},
                        {s: len(meta["splits"][s]["shards"]) for s in SPLITS},
                        sum(e["bytes"] for s in SPLITS for e in meta["splits"][s]["shards"]),
                        int(meta.get("num_skipped", 0)))


def write_order(num_items: int, seed: int) -> list[int]:
    """The order the training samples are written in: a permutation seeded by `seed`, so that each
    shard is a random draw of the split (a source sorted by class would otherwise give shards of one
    class, and a stream's micro-batches of few classes however its buffer shuffles)."""
    import random

    order = list(range(num_items))
    random.Random(f"selfsup-shard-order:{seed}").shuffle(order)
    return order


def channel_moments(images: Any) -> Any:
    """Per image, the sums a channel mean and std are made of: float64 [N, 13] = (pixels, sum of r, g, b,
    and the 3x3 sums of their products) of uint8 images [N, C, H, W] scaled to [0, 1], grey (C = 1)
    counted as r = g = b. Kept per image so that the statistics of any subset (the training split)
    come out at the end, as `pipeline.channel_stats` computes them on the images themselves."""
    import numpy as np

    x = np.asarray(images, dtype=np.float64) / 255.0  # [N, C, H, W]
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    N = x.shape[0]
    flat = x.reshape(N, 3, -1)  # [N, 3, P]
    sums = flat.sum(axis=2)  # [N, 3]
    products = np.einsum("ncp,ndp->ncd", flat, flat).reshape(N, 9)  # [N, 9]
    pixels = np.full((N, 1), flat.shape[2], dtype=np.float64)
    return np.concatenate([pixels, sums, products], axis=1)


_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow's "L" conversion


def channel_statistics(moments: Any, max_items: int = 10_000) -> dict[str, dict[str, list[float]]]:
    """{"rgb": {"mean", "std"}, "grey": {...}} from per-image `channel_moments` [N, 13], taking every
    step-th image of at most `max_items` as `pipeline.channel_stats` does (std unbiased, at least 1e-3);
    grey from the RGB sums through the luma weights (Pillow rounds each grey pixel: within 1e-3)."""
    import numpy as np

    m = np.asarray(moments, dtype=np.float64)
    step = max(1, len(m) // max_items)
    total = m[::step].sum(axis=0)
    n, sums, products = total[0], total[1:4], total[4:].reshape(3, 3)
    mean = sums / n
    var = (np.diag(products) - n * mean**2) / max(n - 1, 1)
    w = np.array(_GREY)
    grey_mean = float(w @ mean)
    grey_var = (float(w @ products @ w) - n * grey_mean**2) / max(n - 1, 1)

    def std(v: Any) -> list[float]:
        return [max(math.sqrt(max(float(x), 0.0)), 1e-3) for x in np.atleast_1d(v)]

    return {"rgb": {"mean": [float(v) for v in mean], "std": std(var)},
            "grey": {"mean": [grey_mean], "std": std(grey_var)}}


# ---- writing a source's rows (shared by the modalities) ------------------------------------------


def _progress(enabled: bool, title: str, total: int) -> Any:
    from selfsup.data.builtins.prepared import ProgressBar  # rich only when asked for

    return ProgressBar(enabled, title, total)


def write_listed(writers: dict[str, ShardWriter], listing: "FileListing", check: Callable[[Path], Any],
                 policy: "_BadFilePolicy", kind: "_FileKind", holdout_fraction: float, seed: int, progress: bool,
                 checked: Callable[[int, Any], None] | None = None,
                 after_check: Callable[[list[int]], None] | None = None,
                 members: Callable[[int], dict[str, bytes]] | None = None) -> dict[str, Any]:
    """Shards the files a folder or manifest lists, in two passes. First every file is decoded by
    `check` (raising `_BadFile`) under the bad-file policy — the rows a run loading the source would
    keep — and `checked(kept_number, value)` sees each kept value (image statistics); `after_check(kept)`
    (the kept rows' numbers in the listing) may still refuse the source. The kept rows are split as a
    run splits them (`split.holdout_mask`, stratified by label), then each file's original bytes are
    copied into its split's shards, with `members(listing row)`'s members beside them (image–text: the
    captions): the training rows in a seeded order (`write_order`), the held-out rows in source order.
    Files are thus read twice, and the split equals an in-memory run's. Returns the index's fields, and
    `train_rows` (the training rows' numbers among the kept ones, in source order: for statistics of
    the training split; the caller takes it out)."""
    from selfsup.data.decode import DecodedStream
    from selfsup.data.split import holdout_mask

    decoded = DecodedStream(listing.items, len(listing.items), check, policy, progress, kind)
    kept: list[int] = []
    for row, value in decoded:
        if checked is not None:
            checked(len(kept), value)
        kept.append(row)
    if after_check is not None:
        after_check(kept)
    ids, labels, classes, groups = listing.rows(kept)
    is_held = holdout_mask(labels, len(kept), holdout_fraction, seed).tolist()
    train = [i for i, held in enumerate(is_held) if not held]
    holdout = [i for i, held in enumerate(is_held) if held]
    bar = _progress(progress, "writing shards", len(kept))
    try:
        for split, rows in (("train", [train[j] for j in write_order(len(train), seed)]), ("holdout", holdout)):
            for i in rows:
                path, name = listing.items[kept[i]]
                try:
                    data = Path(path).read_bytes()
                except OSError as err:
                    raise SelfsupError(f"{name}: cannot read it any more ({err.strerror or err}); it was readable "
                                       "when checked a moment ago: run `selfsup data shard` again") from None
                label = -1 if labels is None else int(labels[i])
                writers[split].add({Path(path).suffix.lower().lstrip(".") or "bin": data,
                                    **(members(kept[i]) if members is not None else {}),
                                    META: encode_meta(ids[i], label, {c: v[i] for c, v in groups.items()})})
                bar.update(writers["train"].items + writers["holdout"].items)
    finally:
        bar.close()
    return {"classes": classes, "group_columns": list(groups), "num_skipped": len(decoded.bad),
            "train_rows": train}


def write_dataset(writers: dict[str, ShardWriter], data: Any, encode: Callable[[int], dict[str, bytes]],
                  holdout_fraction: float, seed: int, progress: bool) -> dict[str, Any]:
    """Shards a dataset loaded in memory (a built-in, an .npz): split as a run splits it, then each
    row's members `encode(row)` ({extension: bytes}) written with its metadata, the training rows in a
    seeded order, the held-out rows in source order. Returns the index's fields and `train_rows`, as
    `write_listed` does."""
    from selfsup.data.split import holdout_mask

    is_held = holdout_mask(data.labels, len(data), holdout_fraction, seed).tolist()
    train = [i for i, held in enumerate(is_held) if not held]
    holdout = [i for i, held in enumerate(is_held) if held]
    bar = _progress(progress, "writing shards", len(data))
    try:
        for split, rows in (("train", [train[j] for j in write_order(len(train), seed)]), ("holdout", holdout)):
            for i in rows:
                label = -1 if data.labels is None else int(data.labels[i])
                meta = encode_meta(data.ids[i], label, {c: v[i] for c, v in data.groups.items()})
                writers[split].add({**encode(i), META: meta})
                bar.update(writers["train"].items + writers["holdout"].items)
    finally:
        bar.close()
    return {"classes": data.classes, "group_columns": list(data.groups),
            "num_skipped": int(getattr(data, "num_skipped", 0)), "train_rows": train}


# ---- reading a split into memory -----------------------------------------------------------------


@dataclass
class Rows:
    """Decoded samples of a split with their ids, labels (None when the folder is unlabelled), classes
    and groups, in shard order."""

    values: list[Any]
    ids: list[str]
    labels: Any  # int64 [N] or None
    classes: list[str] | None
    groups: dict[str, list[str]]
    extras: list[Any] = field(default_factory=list)  # per row, what `read_rows`' `extra` read of it (if given)


def read_rows(index: ShardIndex, split: str, payload: Callable[[str, dict[str, bytes]], str],
              decode: Callable[[bytes], Any], policy: "_BadFilePolicy", kind: "_FileKind", progress: bool,
              limit: int | None = None, labelled_only: bool = False,
              extra: Callable[[str, dict[str, bytes]], Any] | None = None) -> Rows:
    """The samples of `split` decoded in memory (decoding on a few threads, under the bad-file policy,
    errors naming shard and member): `payload(key, files)` names the member to decode, `decode(bytes)`
    decodes it (raising `_BadFile`). `limit`: only the first samples (the first labelled ones with
    `labelled_only`) — a kNN bank or a fitting sample read from the first shards. `extra(key, files)`:
    what else to keep of each sample (image–text: its captions), in `Rows.extras`."""
    import torch

    from selfsup.data.decode import DecodedStream

    metas: list[dict[str, Any]] = []
    extras: list[Any] = []

    def items() -> Iterator[tuple[bytes, str]]:
        taken = 0
        for key, files in index.samples(split, policy.on_bad):
            if limit is not None and taken >= limit:
                return
            meta = sample_meta(key, files)
            if labelled_only and meta["label"] < 0:
                continue
            ext = payload(key, files)
            metas.append(meta)
            if extra is not None:
                extras.append(extra(key, files))
            taken += 1
            yield files[ext], f"{key}.{ext}"

    total = index.items(split) if limit is None else min(limit, index.items(split))
    values: list[Any] = []
    kept: list[int] = []
    if total > 0:
        for row, value in DecodedStream(items(), total, decode, policy, progress, kind):
            kept.append(row)
            values.append(value)
    chosen = [metas[row] for row in kept]
    classes = index.classes
    labels = None if classes is None else torch.tensor([int(m["label"]) for m in chosen], dtype=torch.long)
    groups = {c: [str(m.get("groups", {}).get(c, "")) for m in chosen] for c in index.group_columns}
    return Rows(values, [m["id"] for m in chosen], labels, classes, groups,
                [extras[row] for row in kept] if extra is not None else [])


def payload_member(extensions: tuple[str, ...], what: str,
                   besides: tuple[str, ...] = ()) -> Callable[[str, dict[str, bytes]], str]:
    """A `payload` for `read_rows` and the stream decoders: the sample's member whose extension is one of
    `extensions` (lower-case, without the dot), else its only member besides KEY.json and the members
    `besides` (image–text: the captions); an error naming the sample when there is none."""
    return _Payload(tuple(e.lstrip(".").lower() for e in extensions), what, (META, *besides))


@dataclass(frozen=True)
class _Payload:
    extensions: tuple[str, ...]
    what: str
    besides: tuple[str, ...] = (META,)

    def __call__(self, key: str, files: dict[str, bytes]) -> str:
        for ext in files:
            if ext.lower() in self.extensions:
                return ext
        others = [ext for ext in files if ext not in self.besides]
        if len(others) == 1:  # a manifest's file of another extension (`x.image`): its bytes all the same
            return others[0]
        raise SelfsupError(f"{key}: the sample holds no {self.what} member ({', '.join(self.extensions)}); its members "
                           f"are {', '.join(files) or '(none)'}. Is this folder of another modality?")


@dataclass
class StreamParts:
    """What `data/stream.py`'s ShardStream needs from a modality besides the run's seed, rank, world
    size and micro-batch: the shards (path, count in `items_in`'s unit), how a shard is read, how its
    samples become items in a worker, how items are counted, collated, and the workers and buffer."""

    shards: list[tuple[Path, int]]
    read: Callable[[Path], Iterator[Sample]]
    to_items: Callable[[Iterator[Sample]], Iterator[Any]]
    items_in: Callable[[list[int]], int]
    collate: Callable[[list[Any]], Any]
    workers: int
    shuffle_buffer: int
