"""Readers for each kind of file-based image source: a folder tree, a .csv/.jsonl manifest, a .npz.

Each returns an `ImageSet`; `images.load_image_source` picks the reader. Folders and manifests are
decoded through `decode._decode_all` (with its bad-file policy); array files are checked and converted
to uint8 here, then resized by `images.images_from_array`.

The rules every file-based source follows are here too, shared with audio (`audio.py`) and text:
listing a folder (`walk_files`) and labelling it by class sub-folder (`_folder_labels`), reading a
manifest's rows (`_read_manifest_rows`, `_cell`), keeping its paths inside its folder
(`_manifest_items`), and its labels and subgroup columns (`check_label_column`, `_manifest_labels`,
`_manifest_group_columns`, `_manifest_groups`). A row with an empty label is unlabelled; a row with an
empty group value is kept, and how many there are is reported (`report_empty_groups`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfsup.data.decode import _BadFilePolicy, _decode_all
from selfsup.data.images import IMAGE_EXTENSIONS, ImageSet, images_from_array
from selfsup.errors import SelfsupError

DEFAULT_LABEL_COLUMN = "label"  # a manifest without it is unlabelled; any other label column must exist
MISSING_GROUP = "(missing)"  # how the subgroup audit shows an empty group value (evaluate/subgroups.MISSING)

logger = logging.getLogger("selfsup")

# ---------------------------------------------------------------------------------------------
# Folders


def walk_files(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Sorted posix paths, relative to `root`, of the files with these (lower-case) extensions;
    hidden files and folders (".name") are skipped and symlinked folders are not followed."""
    relative: list[str] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(extensions):
                relative.append((Path(folder) / filename).relative_to(root).as_posix())
    return sorted(relative)


@dataclass
class FileListing:
    """The files a folder or a manifest names, before any is read: (path, display name) per row and
    what the kept rows' ids, labels, classes and groups will be. Image and audio sources decode
    `items` and call `rows(kept)`; `data shard` lists a source this way, checks its files, splits
    the kept rows and only then copies their bytes."""

    items: list[tuple[Path, str]]
    rows: Callable[[list[int]], tuple[list[str], torch.Tensor | None, list[str] | None, dict[str, list[str]]]]
    source: str


def list_file_source(path: Path, extensions: tuple[str, ...], what: str, label_column: str = DEFAULT_LABEL_COLUMN,
                     group_columns: list[str] | None = None) -> FileListing:
    """A folder tree (files with `extensions`; class sub-folders become labels) or a .csv/.jsonl
    manifest (`path` column, labels from `label_column`, subgroups from `group_columns`) as a
    `FileListing`; `what` names its files in errors ("image files", "audio files")."""
    if path.is_dir():
        relative = walk_files(path, extensions)
        if not relative:
            raise SelfsupError(f"{path}: no {what} found (looked for {', '.join(extensions)})")

        def folder_rows(kept: list[int]):
            labels, classes = _folder_labels(relative, kept)
            return [relative[row] for row in kept], labels, classes, {}

        return FileListing([(path / rel, str(path / rel)) for rel in relative], folder_rows, str(path))
    rows, columns = _read_manifest_rows(path)
    if not rows:
        raise SelfsupError(f"{path}: the manifest lists no {what}")
    return manifest_listing(path, rows, columns, label_column, group_columns)


def manifest_listing(manifest: Path, rows: list[tuple[int, dict]], columns: list[str], label_column: str,
                     group_columns: list[str] | None) -> FileListing:
    """The files a manifest's rows name (each row's `path` cell, kept inside the manifest's folder) as a
    `FileListing`: ids, labels from `label_column` and subgroups from `group_columns` of the kept rows.
    Shared by image and audio manifests and image–text pairs (whose rows are one per image)."""
    check_label_column(manifest, columns, label_column)
    groups = _manifest_group_columns(manifest, columns, group_columns)
    items, ids = _manifest_items(manifest, rows)

    def manifest_rows(kept: list[int]):
        kept_rows = [rows[row] for row in kept]
        labels, classes = _manifest_labels(kept_rows, columns, label_column)
        return [ids[row] for row in kept], labels, classes, _manifest_groups(manifest, kept_rows, groups)

    return FileListing(items, manifest_rows, str(manifest))


def _load_folder(root: Path, image_size: int, channels: int, policy: _BadFilePolicy,
                 progress: bool) -> ImageSet:
    """A folder tree; hidden files and folders (".name") are ignored, symlinked folders not followed."""
    return _load_listed(list_file_source(root, IMAGE_EXTENSIONS, "image files"), image_size, channels, policy,
                        progress)


def _load_listed(listing: FileListing, image_size: int, channels: int, policy: _BadFilePolicy,
                 progress: bool) -> ImageSet:
    kept, pixels, bad = _decode_all(listing.items, image_size, channels, policy, progress)
    ids, labels, classes, groups = listing.rows(kept)
    return ImageSet(images=torch.from_numpy(pixels), ids=ids, labels=labels, classes=classes, groups=groups,
                    source=listing.source, num_skipped=len(bad))


def _folder_labels(relative: list[str], kept: list[int]) -> tuple[torch.Tensor | None, list[str] | None]:
    """(labels int64 [len(kept)], classes) of the kept files of a folder tree, or (None, None).

    Labelled only when the files all sit in >= 2 class sub-folders: one sub-folder is a way of
    storing files, not a labelling. Classes come from every file listed, kept or not, so that a
    skipped file never changes the class numbering. Shared by the image and audio folders.
    """
    tops = [rel.split("/")[0] if "/" in rel else None for rel in relative]
    classes = sorted({top for top in tops if top is not None})
    if None in tops or len(classes) < 2:
        return None, None
    class_index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([class_index[tops[row]] for row in kept], dtype=torch.long), classes


# ---------------------------------------------------------------------------------------------
# Manifests


def _read_manifest_rows(manifest: Path, required: str | None = "path") -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and the column names, from a .csv or .jsonl manifest (which must have
    the column `required`, when given)."""
    rows: list[tuple[int, dict]] = []
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as fh:
            if manifest.suffix.lower() == ".csv":
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = columns
                for row in reader:
                    rows.append((reader.line_num, row))
            else:
                columns = []
                for line_number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SelfsupError(f"{manifest}:{line_number}: not valid JSON ({err})") from None
                    if not isinstance(row, dict):
                        raise SelfsupError(f"{manifest}:{line_number}: expected a JSON object "
                                           f"like {{\"path\": ...}}, got {type(row).__name__}")
                    columns += [key for key in row if key not in columns]
                    rows.append((line_number, row))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SelfsupError(f"{manifest}: cannot read manifest ({err})") from None
    if required is not None and required not in columns:
        raise SelfsupError(f"{manifest}: no '{required}' column; columns are: {', '.join(columns) or '(none)'}")
    return rows, columns


def _cell(row: dict, column: str) -> str:
    """A cell as text; missing and null cells are empty, integers are written out."""
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _sorted_classes(names: set[str]) -> list[str]:
    """Class names in sorted order: numerically when every name is an integer, so "10" follows "9"."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _load_manifest(manifest: Path, image_size: int, channels: int, policy: _BadFilePolicy,
                   label_column: str, group_columns: list[str] | None, progress: bool) -> ImageSet:
    listing = list_file_source(manifest, IMAGE_EXTENSIONS, "images", label_column, group_columns)
    return _load_listed(listing, image_size, channels, policy, progress)


def _manifest_group_columns(manifest: Path, columns: list[str], group_columns: list[str] | None) -> list[str]:
    """The subgroup columns to read: those asked for (each must exist), else "group" when present."""
    if group_columns is None:
        group_columns = ["group"] if "group" in columns else []
    missing = [c for c in group_columns if c not in columns]
    if missing:
        raise SelfsupError(f"{manifest}: no group column {', '.join(missing)}; "
                           f"columns are: {', '.join(columns)}")
    return group_columns


def _manifest_groups(manifest: Path, rows: list[tuple[int, dict]], group_columns: list[str]) -> dict[str, list[str]]:
    """Each group column's value per row ("" for an empty cell or a missing JSONL field), empty ones reported."""
    groups = {column: [_cell(row, column) for _, row in rows] for column in group_columns}
    report_empty_groups(manifest, groups, [f"{manifest.name}:{line_number}" for line_number, _ in rows])
    return groups


def report_empty_groups(source: str | Path, groups: dict[str, list[str]], where: list[str]) -> None:
    """Warns, per group column, how many rows have an empty value and where the first ones are.

    Such rows are kept, as rows with an empty label are (unlabelled): dropping them would change what is
    trained on, and the subgroup audit shows them as the group "(missing)" so a column's counts still sum
    to the rows evaluated. Saying so at load keeps a half-empty column from passing unnoticed."""
    for column, values in groups.items():
        empty = [where[i] for i, value in enumerate(values) if not value]
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            logger.warning("%s: %d of %d rows have an empty '%s' (%s); they are kept and audited as the group %s",
                           source, len(empty), len(values), column, shown, MISSING_GROUP)


def _manifest_items(manifest: Path, rows: list[tuple[int, dict]]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(resolved path, display name) per row and each row's id (its path relative to the manifest's
    folder); a path that is empty or leaves the manifest's folder is an error naming the line."""
    root = manifest.parent.resolve()
    items: list[tuple[Path, str]] = []
    ids: list[str] = []
    for line_number, row in rows:
        written = _cell(row, "path")
        where = f"{manifest}:{line_number}"
        if not written:
            raise SelfsupError(f"{where}: empty 'path'")
        candidate = Path(written) if Path(written).is_absolute() else manifest.parent / written
        # resolve() follows symlinks, so a link inside the folder pointing elsewhere is caught too
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise SelfsupError(f"{where}: path '{written}' resolves to {resolved}, outside the "
                               f"manifest's folder {root}; manifest paths must stay inside it")
        if Path(written).is_absolute():
            ids.append(resolved.relative_to(root).as_posix())
        else:
            ids.append(Path(os.path.normpath(written)).as_posix())
        items.append((resolved, f"{manifest.parent / written} (listed at {where})"))
    return items, ids


def check_label_column(manifest: Path, columns: list[str], label_column: str) -> None:
    """A manifest without a `label` column is unlabelled data; any other label column was asked for by
    name (data.label_column, or a run's when probing another source), so its absence is an error."""
    if label_column not in columns and label_column != DEFAULT_LABEL_COLUMN:
        raise SelfsupError(f"{manifest}: no label column {label_column!r} (data.label_column); the columns are: "
                           f"{', '.join(columns)}")


def _manifest_labels(rows: list[tuple[int, dict]], columns: list[str],
                     label_column: str) -> tuple[torch.Tensor | None, list[str] | None]:
    """(labels int64 [N], classes) from `label_column` (an empty cell is -1, unlabelled), or (None, None)
    when the manifest has no such column (`check_label_column` has refused a missing non-default one)."""
    if label_column not in columns:
        return None, None
    names = [_cell(row, label_column) for _, row in rows]
    classes = _sorted_classes({name for name in names if name})
    class_index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([class_index[name] if name else -1 for name in names], dtype=torch.long), classes


# ---------------------------------------------------------------------------------------------
# Array files


def _load_npz(path: Path, image_size: int, channels: int, label_column: str,
              group_columns: list[str] | None) -> ImageSet:
    """A .npz with images `x`, optional int labels `y` (or an array named `label_column`; -1 marks
    an unlabelled row) and optional 1-D group arrays named in `group_columns` (default: `group`).

    `x` is [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3) (channels-last is assumed when
    the last axis could be either). Accepted values: uint8; other integers within 0-255; floats
    within [0, 1] (scaled by 255; an array whose values all lie in [0, 1] is read this way) or
    within [0, 255].
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # zip, pickle and header errors all mean "not a usable .npz"
        raise SelfsupError(f"{path}: cannot read as a .npz archive ({type(err).__name__}: {err})") from None
    if "x" not in arrays:
        raise SelfsupError(f"{path}: no array 'x' holding the images; arrays present: "
                           f"{', '.join(arrays) or '(none)'}")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]  # [N, 1, H, W]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # [N, C, H, W]
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise SelfsupError(f"{path}: 'x' has shape {list(arrays['x'].shape)}; expected [N, H, W], "
                           "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
    N = x.shape[0]
    if N == 0:
        raise SelfsupError(f"{path}: 'x' holds no images")
    x = np.ascontiguousarray(_to_uint8(x, path))

    labels, classes = None, None
    y_key = "y" if "y" in arrays else (label_column if label_column in arrays else None)
    if y_key is not None:
        y = arrays[y_key]
        if y.shape != (N,) or not np.issubdtype(y.dtype, np.integer) or (y < -1).any():
            raise SelfsupError(f"{path}: '{y_key}' must be {N} integer labels >= 0 (-1 = unlabelled), "
                               f"got shape {list(y.shape)} of {y.dtype}")
        labels = torch.from_numpy(y.astype(np.int64))
        classes = [str(i) for i in range(int(y.max()) + 1)]
    if group_columns is None:
        group_columns = ["group"] if "group" in arrays else []
    groups: dict[str, list[str]] = {}
    for column in group_columns:
        if column not in arrays or arrays[column].shape != (N,):
            raise SelfsupError(f"{path}: group column '{column}' must be an array of {N} values; "
                               f"arrays present: {', '.join(arrays)}")
        groups[column] = [str(value) for value in arrays[column].tolist()]
    return ImageSet(images=images_from_array(x, image_size, channels),
                    ids=[f"{path.stem}:{i}" for i in range(N)], labels=labels, classes=classes,
                    groups=groups, source=str(path))


def _to_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise SelfsupError(f"{path}: integer 'x' must lie in 0-255, found {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise SelfsupError(f"{path}: 'x' contains NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 255:
            raise SelfsupError(f"{path}: float 'x' must lie in [0, 1] or [0, 255], found {low:g}..{high:g}")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.round(x.astype(np.float32) * scale).astype(np.uint8)
    raise SelfsupError(f"{path}: 'x' has dtype {x.dtype}; use uint8, integers in 0-255 or floats")
