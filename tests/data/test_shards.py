"""The shard format (data/shards.py): writing and streaming tars, unsafe members refused, corrupt and
truncated shards named by shard and member (or skipped and counted), the index, ownership and modes
of the folder, and the stream's decoders (images, token ids) against the in-memory ones."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.packing import pack_documents
from selfsup.data.pipeline import BlocksIn, DecodeImages, PackDocuments, channel_stats, collate_images
from selfsup.data.shards import (INDEX_FILE, BadSamples, ShardReader, ShardWriter, channel_moments,
                                 channel_statistics, encode_meta, is_shard_folder, load_index, read_shard, shard_files,
                                 write_shard_folder)
from selfsup.errors import SelfsupError
from selfsup.files import MARKER, mark


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(i: int, label: int = 0) -> dict[str, bytes]:
    return {"png": png(i * 10), "json": encode_meta(f"img{i}", label, {"site": f"s{i % 2}"})}


def write_split(folder: Path, n: int, shard_items: int = 3) -> dict:
    writer = ShardWriter(folder, "train", shard_items)
    for i in range(n):
        writer.add(sample(i))
    return writer.close()


def test_written_shards_stream_back_grouped_by_key(tmp_path):
    entry = write_split(tmp_path, 7)
    assert [e["items"] for e in entry["shards"]] == [3, 3, 1] and entry["items"] == 7
    assert [e["name"] for e in entry["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = [s for e in entry["shards"] for s in read_shard(tmp_path / e["name"], e["items"])]
    assert [k for k, _ in got[:2]] == [f"{tmp_path / 'train-000000.tar'}:000000000",
                                       f"{tmp_path / 'train-000000.tar'}:000000001"]
    assert [json.loads(f["json"])["id"] for _, f in got] == [f"img{i}" for i in range(7)]
    assert all(set(f) == {"png", "json"} for _, f in got) and got[4][1]["png"] == png(40)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:  # a plain tar any WebDataset reader reads
        assert tar.getnames()[:2] == ["000000000.png", "000000000.json"]
        assert all(m.mtime == 0 and m.isreg() for m in tar.getmembers())


def crafted(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info in members:
            data = b"x" * info.size if info.isreg() else None
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def info(name: str, size: int = 3, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size, member.type, member.linkname = (size if kind == tarfile.REGTYPE else 0), kind, link
    return member


@pytest.mark.parametrize("member, why", [
    (info("../evil.png"), "climbs out"),
    (info("/etc/evil.png"), "absolute"),
    (info("000.png", kind=tarfile.SYMTYPE, link="/etc/passwd"), "symbolic link"),
    (info("000.png", kind=tarfile.LNKTYPE, link="other.png"), "hard link"),
    (info("dir.d", kind=tarfile.DIRTYPE), "folder"),
])
def test_unsafe_members_are_refused_naming_shard_and_member(tmp_path, member, why):
    shard = crafted(tmp_path / "train-000000.tar", [info("000.json"), member])
    for on_bad in ("error", "skip"):  # never merely skipped: an unsafe shard is not a damaged one
        with pytest.raises(SelfsupError, match=why) as err:
            list(read_shard(shard, on_bad=on_bad))
        assert str(shard) in str(err.value) and member.name in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # nothing extracted anywhere
    assert not (tmp_path.parent / "evil.png").exists()


def test_a_member_not_named_key_ext_is_refused(tmp_path):
    shard = crafted(tmp_path / "train-000000.tar", [info("README")])
    with pytest.raises(SelfsupError, match="README.*KEY.EXT"):
        list(read_shard(shard))


def test_a_truncated_member_is_named_or_the_rest_skipped(tmp_path, caplog):
    entry = write_split(tmp_path, 3)
    shard = tmp_path / entry["shards"][0]["name"]
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        third = tar.getmember("000000002.png")
    shard.write_bytes(data[: third.offset_data + 10])  # cut inside the third sample's image
    with pytest.raises(SelfsupError) as err:
        list(read_shard(shard, 3))
    assert str(shard) in str(err.value) and "000000001.json" in str(err.value) and "on_bad_file=skip" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        kept = list(read_shard(shard, 3, on_bad="skip"))
    assert len(kept) == 2 and "skipping 1 of its 3 samples" in caplog.text and str(shard) in caplog.text


def test_a_shard_that_ends_early_is_caught_by_its_count(tmp_path):
    """tarfile reads a tar cut on a header boundary as a clean end: the index's count catches it."""
    entry = write_split(tmp_path, 3)
    shard = tmp_path / entry["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        third = tar.getmember("000000002.png")
    shard.write_bytes(shard.read_bytes()[: third.offset])
    with pytest.raises(SelfsupError, match=r"after member '000000001.json', with 2 samples where shards.json records 3"):
        list(ShardReader({shard.name: 3})(shard))
    assert len(list(read_shard(shard))) == 2  # without a count there is nothing to compare


def test_garbage_is_a_corrupt_shard(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SelfsupError, match="corrupt or truncated"):
        list(read_shard(shard))
    with pytest.raises(SelfsupError, match="shard not found"):
        list(read_shard(tmp_path / "train-000001.tar"))


def test_a_bad_image_member_is_named_or_skipped_and_counted(tmp_path, caplog):
    writer = ShardWriter(tmp_path, "train", 10)
    for i in range(4):
        writer.add(sample(i, label=i % 2) if i != 2 else {"png": b"\x89PNG garbage", "json": encode_meta("bad", 0, {})})
    writer.close()
    shard = tmp_path / "train-000000.tar"
    with pytest.raises(SelfsupError, match=r"train-000000.tar:000000002.png: not an image.*on_bad_file=skip"):
        list(DecodeImages(8, 3)(read_shard(shard)))
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        items = list(DecodeImages(8, 1, on_bad="skip", max_bad_fraction=0.5)(read_shard(shard)))
    assert [id for _, id, _ in items] == ["img0", "img1", "img3"] and "1 bad of 3 samples" in caplog.text
    images, ids, labels = collate_images(items)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 1]
    assert int(images[1, 0, 0, 0]) == 10  # grey 10 stays 10


def test_bad_samples_fail_past_the_fraction():
    bad = BadSamples("skip", 0.1)
    for _ in range(190):
        bad.ok()
    for i in range(20):
        bad.failed(f"s:{i}.png", "broken")  # 20 of 210 judged from 200 samples on: 9.5 %, then over 10 %
    with pytest.raises(SelfsupError, match="over data.max_bad_fraction=0.1"):
        for i in range(5):
            bad.failed("s:x.png", "broken")


def test_packing_in_a_worker_matches_packing_a_split():
    gen = np.random.default_rng(0)
    documents = [gen.integers(5, 90, size=n).tolist() for n in (3, 17, 0, 9, 30, 4)]

    def samples():
        for i, ids in enumerate(documents):
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(ids, dtype=np.uint16))
            yield f"s.tar:{i:09d}", {"ids.npy": buffer.getvalue(), "json": encode_meta(f"doc{i}", -1, {})}

    blocks = list(PackDocuments(8, 2, 3)(samples()))
    packed = pack_documents(documents, 8, bos_id=2, eos_id=3, pad_id=0, drop_last=True)
    assert len(blocks) == packed.num_blocks == BlocksIn(8)([sum(len(d) + 2 for d in documents)])
    assert torch.equal(torch.stack([b[0] for b in blocks]), packed.input_ids)
    assert torch.equal(torch.stack([b[1] for b in blocks]), packed.document_ids)  # same numbering from 0
    assert [b[2] for b in blocks[:4]] == ["doc0+doc1", "doc1", "doc1", "doc2+doc3"]


def test_channel_statistics_match_those_of_the_images():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8, generator=gen)
    stats = channel_statistics(channel_moments(images.numpy()))
    mean, std = channel_stats(images)
    assert np.allclose(stats["rgb"]["mean"], mean, atol=1e-6) and np.allclose(stats["rgb"]["std"], std, atol=1e-6)
    grey = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    gmean, gstd = channel_stats(grey.round().to(torch.uint8))
    assert abs(stats["grey"]["mean"][0] - gmean[0]) < 2e-3 and abs(stats["grey"]["std"][0] - gstd[0]) < 2e-3
    # every step-th image of at most max_items, as channel_stats picks them
    few = channel_statistics(channel_moments(images.numpy()), max_items=10)
    assert np.allclose(few["rgb"]["mean"], channel_stats(images, max_items=10)[0], atol=1e-6)


def build(out: Path, n: int = 4, overwrite: bool = False, extra: str | None = None):
    def write(writers, folder):
        for i in range(n):
            writers["holdout" if i == 0 else "train"].add(sample(i))
        if extra:
            (folder / extra).write_text("x")
        return {"classes": None, "group_columns": ["site"], "settings": {}}

    return write_shard_folder(out, overwrite, "image", 2, "somewhere", write)


def test_the_index_and_the_marker(tmp_path):
    summary = build(tmp_path / "sh")
    assert summary.items == {"train": 3, "holdout": 1} and summary.shards == {"train": 2, "holdout": 1}
    assert "train 3 items in 2 shards" in summary.describe()
    assert is_shard_folder(tmp_path / "sh") and not is_shard_folder(tmp_path) and not is_shard_folder("mnist")
    index = load_index(tmp_path / "sh")
    assert index.modality == "image" and index.shards("train") == [(tmp_path / "sh" / "train-000000.tar", 2),
                                                                   (tmp_path / "sh" / "train-000001.tar", 1)]
    assert index.counts() == {"train-000000.tar": 2, "train-000001.tar": 1, "holdout-000000.tar": 1}
    assert [json.loads(f["json"])["id"] for _, f in index.samples("train")] == ["img1", "img2", "img3"]
    (tmp_path / "sh" / INDEX_FILE).write_text("{not json")
    with pytest.raises(SelfsupError, match="shards.json: cannot read the shard index"):
        load_index(tmp_path / "sh")
    (tmp_path / "sh" / INDEX_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(SelfsupError, match="shard format 99"):
        load_index(tmp_path / "sh")
    with pytest.raises(SelfsupError, match="not a folder written by `selfsup data shard`"):
        load_index(tmp_path)


def test_overwrite_replaces_only_a_shards_folder_selfsup_wrote(tmp_path):
    out = tmp_path / "sh"
    build(out)
    with pytest.raises(SelfsupError, match="not empty; pass --overwrite"):
        build(out)
    build(out, n=6, overwrite=True)
    assert load_index(out).items("train") == 5
    (out / "notes.txt").write_text("mine")  # a user's file inside: never deleted
    with pytest.raises(SelfsupError, match="notes.txt"):
        build(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"1")
    with pytest.raises(SelfsupError, match="not a folder selfsup made"):
        build(foreign, overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    with pytest.raises(SelfsupError, match="a selfsup run folder"):
        build(run, overwrite=True)
    assert (foreign / "a.jpg").exists() and (run / MARKER).exists()
    assert shard_files("train-000012.tar") and shard_files("tokenizer.json") and not shard_files("train-12.tar")


def test_a_failed_write_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "sh"
    build(out)
    before = sorted(p.name for p in out.iterdir())

    def failing(writers, folder):
        writers["train"].add(sample(0))
        raise SelfsupError("the source broke")

    with pytest.raises(SelfsupError, match="the source broke"):
        write_shard_folder(out, True, "image", 2, "x", failing)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sh"]  # no half-built folder beside it


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        build(tmp_path / "sh")
    finally:
        os.umask(old)
    folder = tmp_path / "sh"
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        MARKER: 0o640, INDEX_FILE: 0o640, "train-000000.tar": 0o640, "train-000001.tar": 0o640,
        "holdout-000000.tar": 0o640}
