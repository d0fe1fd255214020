"""The shard stream (data/stream.py): exactly once per epoch across ranks and readers, for item streams
shaped like each modality, resume mid-epoch, refusals, a short reader, worker processes."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from selfsup.data.stream import ShardStream, assign_shards
from selfsup.errors import SelfsupError

# ------------------------------------------------------------------ fake shards (no tar needed)
# A shard is named "NAME-N" and holds N samples; read() makes them from the name alone. The functions
# are module-level, so worker processes can run them however they are started.

BAD: set[str] = set()  # keys a to_items skips as bad (set before a stream starts)
DECODED: list[str] = []  # keys the per-sample to_items decoded in this process


def read(path: Path):
    name, n = path.name.rsplit("-", 1)
    if name.startswith("corrupt"):
        raise SelfsupError(f"{path}: member 0.img is not a regular file")
    for j in range(int(n)):
        key = f"{name}/{j}"
        yield key, {"img": key.encode()}


def decode(samples):
    """Images/audio: one item per sample, bad samples skipped."""
    for key, files in samples:
        if key in BAD:
            continue
        DECODED.append(key)
        yield files["img"].decode()


decode.per_sample = True


def read_documents(path: Path):
    """Text: shard NAME-N holds documents of 5, 11 and 8 tokens (N = 24), tokens named doc:pos."""
    name, _ = path.name.rsplit("-", 1)
    for d, length in enumerate((5, 11, 8)):
        yield f"{name}/{d}", {"txt": " ".join(f"{name}/{d}:{p}" for p in range(length)).encode()}


BLOCK = 4


def pack(samples):
    """Text: documents concatenated and cut into blocks of BLOCK tokens (a block spans documents)."""
    pending: list[str] = []
    for _, files in samples:
        pending.extend(files["txt"].decode().split())
        while len(pending) >= BLOCK:
            yield tuple(pending[:BLOCK])
            del pending[:BLOCK]


def blocks_in(counts: list[int]) -> int:
    return sum(counts) // BLOCK


def shards(n: int, size: int, prefix: str = "s") -> list[tuple[Path, int]]:
    return [(Path(f"/shards/{prefix}{i}-{size}"), size) for i in range(n)]


def make(shard_list, *, rank=0, world_size=1, workers=2, micro_batch=3, shuffle_buffer=4, seed=0, text=False,
         in_process=True, accum_steps=1) -> ShardStream:
    return ShardStream(shard_list, read=read_documents if text else read, to_items=pack if text else decode,
                       items_in=blocks_in if text else sum, collate=list, seed=seed, rank=rank,
                       world_size=world_size, workers=workers, micro_batch=micro_batch,
                       shuffle_buffer=shuffle_buffer, accum_steps=accum_steps, in_process=in_process)


def draw(stream: ShardStream, n: int) -> list[list]:
    return [stream.next() for _ in range(n)]


@pytest.fixture(autouse=True)
def _clean():
    BAD.clear()
    DECODED.clear()
    yield
    BAD.clear()


# ------------------------------------------------------------------------------- layout


def test_equal_shards_go_round_robin_and_unequal_ones_are_balanced():
    assignment = assign_shards([6] * 8, 4, seed=0, epoch=0)
    order = [i for group in zip(*assignment) for i in group]  # positions 0, 1, 2, ... in the permutation
    assert [order.index(i) % 4 for group in assignment for i in group] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(order) == list(range(8)) and assign_shards([6] * 8, 4, 0, 1) != assignment
    loads = [sum([10, 10, 10, 10, 10, 3][i] for i in group) for group in assign_shards([10] * 5 + [3], 2, 0, 0)]
    assert max(loads) - min(loads) <= 10


# ----------------------------------------------------------------------- exactly once per epoch


@pytest.mark.parametrize("text", [False, True], ids=["items", "packed-text"])
def test_each_item_is_seen_once_per_epoch_across_2_ranks_x_2_workers(text):
    # 8 shards to 4 readers: 2 shards each = 12 items (text: 48 tokens = 12 blocks) = 4 micro-batches.
    shard_list = shards(8, 24 if text else 6)
    ranks = [make(shard_list, rank=r, world_size=2, text=text) for r in range(2)]
    assert [s.steps_per_epoch for s in ranks] == [8, 8]
    orders = []
    for epoch in range(3):
        seen = [x for s in ranks for batch in draw(s, 8) for x in batch]
        units = [token for block in seen for token in block] if text else seen
        assert len(units) == len(set(units)) == (8 * 24 if text else 8 * 6), f"epoch {epoch}"
        assert all(s.epoch == epoch for s in ranks)
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2], "each epoch has its own order"
    again = [make(shard_list, rank=r, world_size=2, text=text) for r in range(2)]
    assert [x for s in again for batch in draw(s, 8) for x in batch] == orders[0], "same seed, same order"
    other = [make(shard_list, rank=r, world_size=2, text=text, seed=1) for r in range(2)]
    assert [x for s in other for batch in draw(s, 8) for x in batch] != orders[0]


def test_accumulation_ends_the_epoch_at_a_step_boundary():
    # 5 shards of 6 to 2 readers: 18 and 12 items -> 6 + 4 = 10 micro-batches; accum 4 -> 2 steps.
    stream = make(shards(5, 6), accum_steps=4)
    assert stream.steps_per_epoch == 2
    first = draw(stream, 8)
    assert stream.epoch == 0 and len({x for b in first for x in b}) == 24
    stream.next()
    assert stream.epoch == 1 and stream.consumed == 1


def test_too_few_items_for_a_step_is_an_error_that_says_what_to_do():
    with pytest.raises(SelfsupError, match="2 shards for 4 readers.*lower `data.workers`"):
        make(shards(2, 6), world_size=2)
    with pytest.raises(SelfsupError, match="lower `train.batch_size`"):
        make(shards(2, 6), micro_batch=7)


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("text", [False, True], ids=["items", "packed-text"])
@pytest.mark.parametrize("stop", [1, 5, 8, 11])
def test_resume_mid_epoch_continues_the_stream_exactly(text, stop):
    shard_list = shards(6, 24 if text else 6)  # 2 ranks x 2 readers: unequal readers (2, 1, 2, 1 shards)
    for rank in range(2):
        whole = draw(make(shard_list, rank=rank, world_size=2, text=text), 20)
        first = make(shard_list, rank=rank, world_size=2, text=text)
        head = draw(first, stop)
        state = first.state_dict()
        DECODED.clear()
        resumed = make(shard_list, rank=rank, world_size=2, text=text)
        resumed.load_state_dict(state)
        rest_of_epoch = draw(resumed, first.steps_per_epoch - first.consumed)
        if not text:  # per-sample items: the consumed samples are read past, never decoded again
            consumed = {x for b in head[len(head) - first.consumed:] for x in b}
            assert consumed and consumed.isdisjoint(DECODED)
        assert head + rest_of_epoch + draw(resumed, 20 - stop - len(rest_of_epoch)) == whole, f"rank {rank}"


def test_a_resume_with_other_ranks_readers_or_shards_is_refused():
    stream = make(shards(8, 6), rank=1, world_size=2)
    draw(stream, 3)
    state = stream.state_dict()
    with pytest.raises(SelfsupError, match="ranks = 2, this run has 1"):
        make(shards(8, 6)).load_state_dict(state)
    with pytest.raises(SelfsupError, match=r"readers per rank \(`data.workers`.*= 2, this run has 1"):
        make(shards(8, 6), rank=1, world_size=2, workers=1).load_state_dict(state)
    with pytest.raises(SelfsupError, match="micro-batch"):
        make(shards(8, 6), rank=1, world_size=2, micro_batch=2).load_state_dict(state)
    with pytest.raises(SelfsupError, match="shard list"):
        make(shards(8, 6, prefix="t"), rank=1, world_size=2).load_state_dict(state)


# ------------------------------------------------------------------------- a reader runs short


def test_a_skipped_bad_sample_neither_hangs_nor_desynchronises_ranks(caplog):
    shard_list = shards(8, 6)  # every reader gives exactly 4 micro-batches: no slack anywhere
    BAD.update({"s0/1", "s0/2", "s0/3", "s0/4"})  # s0's reader: 8 items, 2 micro-batches short
    ranks = [make(shard_list, rank=r, world_size=2) for r in range(2)]
    epochs, repeated = [], []
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        for _ in range(3):
            epochs.append([draw(s, 8) for s in ranks])
            repeated.append([s.repeated for s in ranks])
    assert all(s.epoch == 2 for s in ranks), "both ranks took 8 micro-batches in every epoch"
    assert all(sorted(counts) == [0, 2] for counts in repeated), "the rank holding s0 repeats 2 micro-batches"
    assert "repeating the epoch's first 2 micro-batches" in caplog.text
    for epoch, counts in zip(epochs, repeated):
        r = counts.index(2)
        assert epoch[r][-2:] == epoch[r][:2], "the missing micro-batches are the epoch's first ones again"
        seen = Counter(x for batch in epoch[1 - r] + epoch[r][:-2] for x in batch)
        assert max(seen.values()) == 1 and len(seen) == 8 * 6 - 6, "the rest is seen once; s0's reader lost 2 batches"

    # A resume inside the repeat pass continues it exactly.
    r = repeated[2].index(2)
    whole = [b for epoch in epochs for b in epoch[r]]
    first = make(shard_list, rank=r, world_size=2)
    head = draw(first, 23)
    assert first.passes == 1 and first.repeated == 1
    resumed = make(shard_list, rank=r, world_size=2)
    resumed.load_state_dict(first.state_dict())
    assert head + draw(resumed, 1) == whole


def test_a_reader_that_gives_nothing_is_an_error():
    BAD.update(f"s{i}/{j}" for i in range(2) for j in range(6))
    with pytest.raises(SelfsupError, match="no micro-batch at all"):
        make(shards(2, 6), workers=1).next()


# ------------------------------------------------------------------------------ worker processes


def test_worker_processes_give_the_in_process_stream_and_resume_it():
    # Unequal readers (one ends first), 2 epochs, and a resume whose next micro-batch is reader 1's.
    shard_list = shards(5, 6)
    expected = draw(make(shard_list), 20)
    with make(shard_list, in_process=False) as stream:
        assert draw(stream, 20) == expected
    head = make(shard_list)
    draw(head, 3)
    assert head.first == 1
    with make(shard_list, in_process=False) as resumed:
        resumed.load_state_dict(head.state_dict())
        assert draw(resumed, 5) == expected[3:8]


def test_starting_workers_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with make(shards(5, 6), in_process=False) as stream:
        draw(stream, 12)  # two epochs: workers started twice
    assert torch.equal(torch.get_rng_state(), state)


def test_a_corrupt_shard_in_a_worker_process_reports_its_own_message():
    with make([(Path("/shards/corrupt0-6"), 6)], workers=1, in_process=False) as stream:
        with pytest.raises(SelfsupError) as info:
            stream.next()
    assert str(info.value) == "/shards/corrupt0-6: member 0.img is not a regular file"


# ------------------------------------------------------------------------- real tar shards


def test_real_tar_shards_through_worker_processes(tmp_path):
    """WebDataset-layout tars (KEY.EXT members) written here, read by data/shards.py's read_shard in 2
    worker processes: every sample once per epoch, bytes intact, and the in-process stream's order."""
    import io
    import tarfile

    shards_module = pytest.importorskip("selfsup.data.shards")
    shard_list = []
    for i in range(4):
        path = tmp_path / f"shard-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(6):
                for ext, data in (("img", f"pixels {i}/{j}".encode()), ("cls", str(j % 3).encode())):
                    info = tarfile.TarInfo(f"{i:02d}{j:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shard_list.append((path, 6))

    def stream(in_process: bool) -> ShardStream:
        return ShardStream(shard_list, read=shards_module.read_shard, to_items=read_pixels, items_in=sum,
                           collate=list, seed=0, rank=0, world_size=1, workers=2, micro_batch=3, shuffle_buffer=4,
                           in_process=in_process)

    with stream(in_process=False) as workers:
        got = draw(workers, 16)  # 2 epochs of 8 micro-batches
    for epoch in (got[:8], got[8:]):
        items = sorted(x for batch in epoch for x in batch)
        assert items == sorted(f"pixels {i}/{j}" for i in range(4) for j in range(6))
    assert got == draw(stream(in_process=True), 16)


def read_pixels(samples):
    for _, files in samples:
        yield files["img"].decode()


read_pixels.per_sample = True


# ----------------------------------------------------------------------- image–text pair shards


@pytest.fixture(scope="module")
def pair_parts(tmp_path_factory):
    """The stream parts a CLIP run assembles from image–text shards (`selfsup data shard --modality
    image_text` of a 16-pair manifest: 12 training pairs in 4 shards of 3), with 2 readers per rank."""
    from selfsup.cli import main
    from selfsup.config import load_config
    from selfsup.methods import method_spec
    from selfsup.modalities import MODALITIES, load_splits
    from selfsup.train.runtime import Runtime
    from tests.modalities.test_shard_sources import PAIR_SHARD, write_pairs

    root = tmp_path_factory.mktemp("pairs")
    assert main(["data", "shard", str(write_pairs(root / "source")), "--out", str(root / "shards"), *PAIR_SHARD]) == 0
    cfg = load_config(None, ["method.name=clip", f"data.source={root / 'shards'}", "data.image_size=8",
                             "data.workers=2", "data.shuffle_buffer=4"])
    train, holdout = load_splits(cfg, progress=False, stream=True)
    (root / "run").mkdir()
    batches = MODALITIES["image_text"].assemble(cfg, root / "run", Runtime(torch.device("cpu"), None), train, holdout,
                                                method_spec("clip"), progress=False).batches
    return batches.stream_parts


def pair_stream(parts, rank: int, in_process: bool = True) -> ShardStream:
    return ShardStream(parts.shards, read=parts.read, to_items=parts.to_items, items_in=parts.items_in,
                       collate=parts.collate, seed=0, rank=rank, world_size=2, workers=parts.workers, micro_batch=3,
                       shuffle_buffer=parts.shuffle_buffer, in_process=in_process)


def test_image_text_pairs_are_seen_once_per_epoch_across_2_ranks_x_2_workers(pair_parts):
    # 4 shards of 3 pairs to 2 ranks x 2 readers: one shard each, one micro-batch of 3 per reader.
    ranks = [pair_stream(pair_parts, r) for r in range(2)]
    assert [s.steps_per_epoch for s in ranks] == [2, 2]
    orders = []
    for epoch in range(3):
        batches = [b for s in ranks for b in draw(s, 2)]
        ids = [id for _, batch_ids, _, _ in batches for id in batch_ids]
        assert len(ids) == len(set(ids)) == 12, f"epoch {epoch}"
        for images, batch_ids, labels, captions in batches:  # decoded pairs: pixels, labels and every caption
            assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and labels.shape == (3,)
            assert all(c and all(isinstance(t, str) and t for t in c) for c in captions)
        orders.append(ids)
    assert orders[0] != orders[1], "each epoch has its own order"
    with pair_stream(pair_parts, 0, in_process=False) as workers:  # 2 DataLoader worker processes
        assert [b[1] for b in draw(workers, 4)] == [b[1] for b in draw(pair_stream(pair_parts, 0), 4)]


@pytest.mark.parametrize("stop", [1, 3])
def test_an_image_text_stream_resumes_mid_epoch_without_repeating_or_skipping(pair_parts, stop):
    for rank in range(2):
        whole = draw(pair_stream(pair_parts, rank), 6)
        first = pair_stream(pair_parts, rank)
        head = draw(first, stop)
        resumed = pair_stream(pair_parts, rank)
        resumed.load_state_dict(first.state_dict())
        rest = draw(resumed, 6 - stop)
        assert [b[1] for b in head + rest] == [b[1] for b in whole], f"rank {rank}"
        assert all(torch.equal(a[0], b[0]) and a[3] == b[3] for a, b in zip(head + rest, whole))
