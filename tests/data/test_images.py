"""Image sources: folders, manifests, .npz arrays, bad files, path safety and holdout splits."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.images import ImageSet, load_image_source
from selfsup.data.split import split_holdout
from selfsup.errors import SelfsupError


def write_image(path: Path, size: tuple[int, int] = (12, 10), seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """A random image of (width, height) saved with Pillow; returns its pixels [H, W(, C)]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    write_image(root / "cats" / "a.png", seed=1)
    write_image(root / "cats" / "deep" / "b.JPG", seed=2)
    write_image(root / "dogs" / "c.bmp", seed=3, mode="L")
    (root / "README.txt").write_text("not an image, ignored")
    (root / "dogs" / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


def test_folder_with_class_subfolders_gives_labels(class_folder: Path) -> None:
    data = load_image_source(str(class_folder), image_size=8)
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.ids == ["cats/a.png", "cats/deep/b.JPG", "dogs/c.bmp"]
    assert data.classes == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.num_skipped == 0 and data.groups == {}


def test_folder_with_loose_images_is_unlabelled(tmp_path: Path) -> None:
    write_image(tmp_path / "top.png")
    write_image(tmp_path / "sub" / "x.png", seed=1)
    write_image(tmp_path / "sub" / "y.webp", seed=2)
    data = load_image_source(str(tmp_path), image_size=6, channels=1)
    assert data.labels is None and data.classes is None
    assert data.ids == ["sub/x.png", "sub/y.webp", "top.png"]
    assert data.images.shape == (3, 1, 6, 6)


def test_single_subfolder_is_not_a_labelling(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "x.png")
    write_image(tmp_path / "images" / "y.png", seed=1)
    assert load_image_source(str(tmp_path), image_size=4).labels is None


def test_resize_keeps_aspect_by_centre_crop(tmp_path: Path) -> None:
    # 40x20: a red centre square between blue margins; a squash would keep blue, a crop must not
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 10:30] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = load_image_source(str(tmp_path), image_size=10).images[0]
    assert image[:, :, 1:9].tolist() == torch.tensor([255, 0, 0]).view(3, 1, 1).expand(3, 10, 8).tolist()
    assert image[2].float().mean() < 40  # at most a blend at the crop edges


def test_colour_conversion_matches_pillow(tmp_path: Path) -> None:
    Image.new("RGB", (5, 5), (200, 40, 90)).save(tmp_path / "rgb.png")
    Image.new("L", (5, 5), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 5), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    grey = load_image_source(str(tmp_path), image_size=5, channels=1)
    rgb = load_image_source(str(tmp_path), image_size=5, channels=3)
    assert grey.ids == ["clear.png", "grey.png", "rgb.png"]
    luma = Image.new("RGB", (1, 1), (200, 40, 90)).convert("L").getpixel((0, 0))
    assert (grey.images[2] == luma).all() and (grey.images[1] == 77).all()
    assert (rgb.images[1] == 77).all()  # greyscale replicated to three channels
    assert (rgb.images[0] == 255).all()  # fully transparent composites onto white
    assert (rgb.images[2] == torch.tensor([200, 40, 90]).view(3, 1, 1)).all()


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    data = load_image_source(str(tmp_path), image_size=4, channels=1)
    assert (data.images == 128).all()


@pytest.mark.parametrize("height, width", [(20, 20), (20, 31), (31, 20)])
def test_files_and_arrays_decode_alike(tmp_path: Path, height: int, width: int) -> None:
    # two implementations of the same geometry (Pillow per file, torch per batch) must agree
    x = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    for i, pixels in enumerate(x):
        write_image_array(tmp_path / "files" / f"{i}.png", pixels)
    np.savez(tmp_path / "x.npz", x=x)
    for size in (7, 32):
        for channels in (1, 3):
            from_files = load_image_source(str(tmp_path / "files"), size, channels).images.int()
            from_array = load_image_source(str(tmp_path / "x.npz"), size, channels).images.int()
            assert (from_files - from_array).abs().max() <= 1


def write_image_array(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------
# Manifests


@pytest.fixture
def manifest_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for i in range(4):
        write_image(root / "img" / f"{i}.png", seed=i)
    return root


def test_csv_manifest_with_labels_and_groups(manifest_folder: Path) -> None:
    (manifest_folder / "m.csv").write_text(
        "path,label,group,site\nimg/0.png,dog,a,x\nimg/1.png,cat,b,y\nimg/2.png,,a,x\n"
        f"{(manifest_folder / 'img' / '3.png').resolve()},dog,b,y\n"
    )
    data = load_image_source(str(manifest_folder / "m.csv"), image_size=4)
    assert data.ids == ["img/0.png", "img/1.png", "img/2.png", "img/3.png"]
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [1, 0, -1, 1]
    assert data.groups == {"group": ["a", "b", "a", "b"]}
    sites = load_image_source(str(manifest_folder / "m.csv"), image_size=4, group_columns=["site", "group"])
    assert sites.groups == {"site": ["x", "y", "x", "y"], "group": ["a", "b", "a", "b"]}


def test_jsonl_manifest_with_numeric_labels(manifest_folder: Path) -> None:
    rows = [{"path": "img/0.png", "y": 10, "sex": "f"}, {"path": "img/1.png", "y": 9},
            {"path": "img/2.png", "y": None, "sex": "m"}, {"path": "./img/../img/3.png", "y": 2}]
    (manifest_folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_image_source(str(manifest_folder / "m.jsonl"), image_size=4, label_column="y",
                             group_columns=["sex"])
    assert data.classes == ["2", "9", "10"]  # integer names sort numerically
    assert data.labels.tolist() == [2, 1, -1, 0]
    assert data.groups == {"sex": ["f", "", "m", ""]}
    assert data.ids[3] == "img/3.png"


def test_a_label_column_asked_for_by_name_must_exist(manifest_folder: Path) -> None:
    """A manifest without `label` is unlabelled data, but a missing `data.label_column=letter` (a run's
    label column applied to another source by `probe --data`) is a mistake: named, before decoding."""
    (manifest_folder / "m.csv").write_text("path,label\nimg/0.png,a\nimg/1.png,b\n")
    with pytest.raises(SelfsupError, match=r"m\.csv: no label column 'letter'.*path, label"):
        load_image_source(str(manifest_folder / "m.csv"), image_size=4, label_column="letter")
    (manifest_folder / "u.csv").write_text("path\nimg/0.png\n")
    assert load_image_source(str(manifest_folder / "u.csv"), image_size=4).labels is None


def test_empty_group_cells_are_kept_counted_and_reported(manifest_folder: Path, caplog) -> None:
    """An empty group cell is kept (as an empty label is) and audited as "(missing)"; the load says how many."""
    import logging

    (manifest_folder / "m.csv").write_text("path,site\nimg/0.png,x\nimg/1.png,\nimg/2.png,y\nimg/3.png,\n")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        data = load_image_source(str(manifest_folder / "m.csv"), image_size=4, group_columns=["site"])
    assert data.groups == {"site": ["x", "", "y", ""]}
    assert "m.csv" in caplog.text and "2 of 4" in caplog.text and "'site'" in caplog.text
    assert "m.csv:3" in caplog.text and "m.csv:5" in caplog.text and "(missing)" in caplog.text


def test_manifest_without_path_column_lists_columns(manifest_folder: Path) -> None:
    (manifest_folder / "m.csv").write_text("file,label\nimg/0.png,a\n")
    with pytest.raises(SelfsupError, match=r"m\.csv.*no 'path' column.*file, label"):
        load_image_source(str(manifest_folder / "m.csv"), image_size=4)


def test_malformed_jsonl_names_file_and_line(manifest_folder: Path) -> None:
    (manifest_folder / "m.jsonl").write_text('{"path": "img/0.png"}\n{"path": "img/1.png",\n')
    with pytest.raises(SelfsupError, match=r"m\.jsonl:2: not valid JSON"):
        load_image_source(str(manifest_folder / "m.jsonl"), image_size=4)


def test_missing_group_column_is_an_error(manifest_folder: Path) -> None:
    (manifest_folder / "m.csv").write_text("path\nimg/0.png\n")
    with pytest.raises(SelfsupError, match=r"m\.csv.*no group column site"):
        load_image_source(str(manifest_folder / "m.csv"), image_size=4, group_columns=["site"])


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_path_escaping_the_folder_is_refused(manifest_folder: Path, how: str) -> None:
    outside = manifest_folder.parent / "secret.png"
    write_image(outside)
    if how == "dotdot":
        written = "../secret.png"
    elif how == "absolute":
        written = str(outside.resolve())
    else:
        (manifest_folder / "img" / "link.png").symlink_to(outside)
        written = "img/link.png"
    (manifest_folder / "m.csv").write_text(f"path\nimg/0.png\n{written}\n")
    with pytest.raises(SelfsupError) as err:
        load_image_source(str(manifest_folder / "m.csv"), image_size=4)
    assert f"m.csv:3: path '{written}'" in str(err.value) and "outside" in str(err.value)


def test_symlink_staying_inside_is_allowed(manifest_folder: Path) -> None:
    (manifest_folder / "img" / "link.png").symlink_to(manifest_folder / "img" / "0.png")
    (manifest_folder / "m.csv").write_text("path\nimg/link.png\n")
    data = load_image_source(str(manifest_folder / "m.csv"), image_size=4)
    assert data.ids == ["img/link.png"]


# ---------------------------------------------------------------------------------------------
# .npz arrays


@pytest.fixture
def base_pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)  # [N, H, W, C]


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float01", "nhwc_float255", "nchw_int64"])
def test_npz_layouts_agree(tmp_path: Path, base_pixels: np.ndarray, layout: str) -> None:
    x = {
        "nhwc_uint8": base_pixels,
        "nchw_float01": base_pixels.transpose(0, 3, 1, 2) / 255.0,
        "nhwc_float255": base_pixels.astype(np.float32),
        "nchw_int64": base_pixels.transpose(0, 3, 1, 2).astype(np.int64),
    }[layout]
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 2, 1, 2, -1]))
    data = load_image_source(str(tmp_path / "d.npz"), image_size=6)
    assert torch.equal(data.images, torch.from_numpy(base_pixels.transpose(0, 3, 1, 2).copy()))
    assert data.labels.tolist() == [0, 2, 1, 2, -1] and data.classes == ["0", "1", "2"]
    assert data.ids[4] == "d:4"


def test_npz_greyscale_layouts(tmp_path: Path, base_pixels: np.ndarray) -> None:
    grey = base_pixels[..., 0]  # [N, H, W]
    np.savez(tmp_path / "a.npz", x=grey)
    np.savez(tmp_path / "b.npz", x=grey[..., None])  # [N, H, W, 1]
    a = load_image_source(str(tmp_path / "a.npz"), image_size=6, channels=3)
    b = load_image_source(str(tmp_path / "b.npz"), image_size=6, channels=1)
    assert a.labels is None
    assert torch.equal(a.images, torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1))
    assert torch.equal(b.images[:, 0], torch.from_numpy(grey))


def test_npz_group_column(tmp_path: Path, base_pixels: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", x=base_pixels, group=np.array(list("aabba")))
    assert load_image_source(str(tmp_path / "d.npz"), image_size=6).groups == {"group": list("aabba")}


def test_npz_without_x_names_keys(tmp_path: Path, base_pixels: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", images=base_pixels, labels=np.zeros(5))
    with pytest.raises(SelfsupError, match=r"d\.npz: no array 'x'.*images, labels"):
        load_image_source(str(tmp_path / "d.npz"), image_size=6)


@pytest.mark.parametrize("x, message", [
    (np.full((2, 4, 4), 300.0), r"\[0, 1\] or \[0, 255\]"),
    (np.full((2, 4, 4), np.nan), "NaN"),
    (np.zeros((2, 16)), "shape"),
    (np.full((2, 4, 4), -1, dtype=np.int16), "0-255"),
])
def test_npz_bad_values_are_explained(tmp_path: Path, x: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(SelfsupError, match=r"d\.npz.*" + message):
        load_image_source(str(tmp_path / "d.npz"), image_size=4)


# ---------------------------------------------------------------------------------------------
# Bad files


def make_bad(path: Path, kind: str) -> None:
    if kind == "truncated":
        write_image(path, size=(40, 40))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a picture")
    elif kind == "oversize":
        write_image(path, size=(20, 20))  # 400 pixels; the test lowers the limit below that


@pytest.mark.parametrize("kind, reason, limit", [
    ("truncated", "truncated", None),
    ("empty", "empty file", None),
    ("text", "not an image", None),
    ("oversize", "pixel", 300),   # between the limit and twice it: Pillow only warns
    ("oversize", "pixel", 100),   # beyond twice the limit: Pillow raises
])
def test_bad_file_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        kind: str, reason: str, limit: int | None) -> None:
    write_image(tmp_path / "good.png", size=(10, 10))
    make_bad(tmp_path / "bad.png", kind)
    if limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters_before = list(warnings.filters)
    with pytest.raises(SelfsupError) as err:
        load_image_source(str(tmp_path), image_size=4)
    message = str(err.value)
    assert str(tmp_path / "bad.png") in message and reason in message and "on_bad_file=skip" in message
    assert warnings.filters == filters_before  # no global warning state left behind


def test_skip_counts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(9):
        write_image(tmp_path / f"{i}.png", size=(6, 6), seed=i)
    make_bad(tmp_path / "7bad.png", "truncated")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        data = load_image_source(str(tmp_path), image_size=4, on_bad="skip", max_bad_fraction=0.1)
    assert len(data) == 9 and data.num_skipped == 1 and "7bad.png" not in data.ids
    assert "skipped 1 of 10" in caplog.text and "7bad.png" in caplog.text


def test_skip_keeps_labels_aligned(class_folder: Path) -> None:
    make_bad(class_folder / "cats" / "broken.png", "empty")
    data = load_image_source(str(class_folder), image_size=4, on_bad="skip", max_bad_fraction=0.5)
    assert data.ids == ["cats/a.png", "cats/deep/b.JPG", "dogs/c.bmp"]
    assert data.labels.tolist() == [0, 0, 1]


def test_skip_aborts_above_the_bad_fraction(tmp_path: Path) -> None:
    for i in range(8):
        write_image(tmp_path / f"{i}.png", size=(6, 6), seed=i)
    make_bad(tmp_path / "a.png", "text")
    make_bad(tmp_path / "b.png", "empty")
    with pytest.raises(SelfsupError, match=r"2 of 10 .*20\.0%.*max_bad_fraction=0\.1.*a\.png"):
        load_image_source(str(tmp_path), image_size=4, on_bad="skip", max_bad_fraction=0.1)


def test_no_usable_images_is_an_error(tmp_path: Path) -> None:
    make_bad(tmp_path / "a.png", "empty")
    with pytest.raises(SelfsupError, match="no usable images"):
        load_image_source(str(tmp_path), image_size=4, on_bad="skip", max_bad_fraction=1.0)
    (tmp_path / "a.png").unlink()
    with pytest.raises(SelfsupError, match="no image files"):
        load_image_source(str(tmp_path), image_size=4)


def test_missing_manifest_file_follows_the_policy(manifest_folder: Path) -> None:
    (manifest_folder / "m.csv").write_text("path\nimg/0.png\nimg/gone.png\n")
    with pytest.raises(SelfsupError, match=r"img/gone\.png.*m\.csv:3.*file not found"):
        load_image_source(str(manifest_folder / "m.csv"), image_size=4)
    data = load_image_source(str(manifest_folder / "m.csv"), image_size=4, on_bad="skip",
                             max_bad_fraction=0.5)
    assert data.ids == ["img/0.png"] and data.num_skipped == 1


def test_unknown_source_lists_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(SelfsupError, match=r"mnsit: no such file.*did you mean 'mnist'.*digits.*\.jsonl"):
        load_image_source("mnsit", image_size=8)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SelfsupError, match=r"notes\.txt: unsupported kind of file '\.txt'"):
        load_image_source(str(tmp_path / "notes.txt"), image_size=8)


def test_progress_bar_does_not_change_the_result(class_folder: Path) -> None:
    quiet = load_image_source(str(class_folder), image_size=4)
    shown = load_image_source(str(class_folder), image_size=4, progress=True)
    assert torch.equal(quiet.images, shown.images)


# ---------------------------------------------------------------------------------------------
# Subsets and holdout splits


def fake_set(labels: list[int] | None, num_rows: int | None = None) -> ImageSet:
    N = len(labels) if labels is not None else num_rows
    return ImageSet(images=torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 2, 2).clone(),
                    ids=[f"t:{i}" for i in range(N)],
                    labels=None if labels is None else torch.tensor(labels),
                    classes=None, groups={"g": [str(i % 3) for i in range(N)]}, source="test")


def test_subset_takes_rows_in_the_order_given() -> None:
    data = fake_set([0, 1, 2, 0, 1])
    part = data.subset([3, 0, 4])
    assert part.ids == ["t:3", "t:0", "t:4"] and part.labels.tolist() == [0, 0, 1]
    assert part.images[:, 0, 0, 0].tolist() == [3, 0, 4] and part.groups == {"g": ["0", "0", "1"]}
    assert len(data.subset([])) == 0


def test_split_holdout_is_stratified() -> None:
    labels = [0] * 50 + [1] * 20 + [2] * 3 + [3] * 1 + [4] * 2 + [-1] * 10
    data = fake_set(labels)
    train, holdout = split_holdout(data, 0.2, seed=0)
    held = torch.bincount(holdout.labels + 1, minlength=6).tolist()
    # unlabelled, then classes 0..4: a pair still gives one, a singleton stays in train
    assert held == [2, 10, 4, 1, 0, 1]
    assert sorted(train.ids + holdout.ids, key=lambda s: int(s[2:])) == data.ids
    assert not set(train.ids) & set(holdout.ids)
    assert train.ids == sorted(train.ids, key=lambda s: int(s[2:]))  # source order kept


def test_split_holdout_is_seeded() -> None:
    data = fake_set([i % 4 for i in range(80)])
    first = split_holdout(data, 0.25, seed=3)[1].ids
    assert split_holdout(data, 0.25, seed=3)[1].ids == first
    assert split_holdout(data, 0.25, seed=4)[1].ids != first


def test_split_holdout_unlabelled_and_zero() -> None:
    data = fake_set(None, num_rows=30)
    train, holdout = split_holdout(data, 0.1, seed=0)
    assert len(holdout) == 3 and len(train) == 27 and holdout.labels is None
    train, holdout = split_holdout(data, 0.0, seed=0)
    assert train is data and len(holdout) == 0
    with pytest.raises(SelfsupError, match="fraction"):
        split_holdout(data, 1.0, seed=0)
    train, holdout = split_holdout(fake_set([0, 1, 2]), 0.5, seed=0)  # singletons all stay in train
    assert len(train) == 3 and len(holdout) == 0
