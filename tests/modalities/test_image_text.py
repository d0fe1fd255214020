"""The image–text modality's parts (`modalities/image_text.py`): retrieval recall on a similarity
matrix worked out by hand, captions turned into end-of-text-terminated, right-padded ids, and the
pair batches (seeded; each image's caption drawn among its own)."""

from __future__ import annotations

import pytest
import torch

from selfsup.data.pairs import PairSet
from selfsup.data.tokenizer import TextTokenizer, train_tokenizer
from selfsup.data.views import ImageViews, ViewsConfig
from selfsup.modalities.image_text import PAIR_VIEWS, PairBatches, caption_ids, retrieval_recall

CAPTIONS = [
    ("a red square", "square in red", "the red block"),
    ("a green dot",),
    ("a blue stripe", "stripe in blue"),
    ("a yellow square", "yellow block"),
    ("two red dots", "red dots, two of them", "a pair of red dots", "dots"),
    ("a green stripe",),
]


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    corpus = [c for captions in CAPTIONS for c in captions] * 4
    return train_tokenizer(corpus, "bpe", vocab_size=300)


def test_retrieval_recall_on_a_hand_made_matrix():
    # rows: images, columns: texts; the diagonal holds the true pairs
    similarity = torch.tensor([
        [0.9, 0.1, 0.2, 0.0],  # image 0: its text is first                    (rank 0)
        [0.5, 0.4, 0.4, 0.3],  # image 1: text 0 above, text 2 ties its own     (rank 2)
        [0.1, 0.8, 0.7, 0.6],  # image 2: text 1 above                         (rank 1)
        [0.6, 0.2, 0.1, 0.6],  # image 3: text 0 ties its own                   (rank 1)
    ])
    # columns (text -> image): text 0: 0.9 vs 0.5, 0.1, 0.6 -> rank 0; text 1: 0.4 vs 0.1, 0.8, 0.2 -> rank 1;
    # text 2: 0.7 vs 0.2, 0.4, 0.1 -> rank 0; text 3: 0.6 vs 0.0, 0.3, 0.6 (a tie) -> rank 1
    recall = retrieval_recall(similarity, (1, 2, 3))
    assert recall == pytest.approx({
        "i2t_r1": 1 / 4, "i2t_r2": 3 / 4, "i2t_r3": 4 / 4,
        "t2i_r1": 2 / 4, "t2i_r2": 4 / 4, "t2i_r3": 4 / 4,
    })
    # a tie with the true pair is a miss at k=1, even when every entry is the same
    assert retrieval_recall(torch.ones(3, 3), (1, 3)) == {"i2t_r1": 0.0, "t2i_r1": 0.0, "i2t_r3": 1.0, "t2i_r3": 1.0}
    assert retrieval_recall(torch.eye(5), (1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_caption_ids_end_with_eos_pad_right_and_truncate(bpe):
    eos, pad = bpe.eos_id, bpe.pad_id
    captions = ["a red square", "dots", "a pair of red dots, two of them in a yellow square"]
    raw = bpe.encode_batch(captions)
    assert len(raw[2]) > 8 > len(raw[0]) + 1 > len(raw[1]) + 1, "the test needs a long and two short captions"
    ids, mask = caption_ids(bpe, captions, seq_len=8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 8)
    lengths = mask.sum(dim=1).tolist()
    assert lengths == [len(raw[0]) + 1, len(raw[1]) + 1, 8]
    for row, tokens, n in zip(range(3), raw, lengths):
        assert mask[row, :n].all() and not mask[row, n:].any(), "real tokens first, padding after"
        assert ids[row, : n - 1].tolist() == tokens[: n - 1]
        assert ids[row, n - 1] == eos, "each caption ends with end-of-text, a truncated one too"
        assert (ids[row, n:] == pad).all()
    # padded to the batch's longest, not to seq_len
    short, short_mask = caption_ids(bpe, captions[:2], seq_len=8)
    assert short.shape == (2, len(raw[0]) + 1) and torch.equal(short, ids[:2, : short.shape[1]])
    assert torch.equal(short_mask, mask[:2, : short.shape[1]])


def test_wordpiece_captions_are_wrapped_as_documents_and_keep_the_end():
    corpus = [c for captions in CAPTIONS for c in captions] * 4
    wordpiece = train_tokenizer(corpus, "wordpiece", vocab_size=120)
    cls, sep = wordpiece.packing_bounds
    captions = ["a red square", "a pair of red dots, two of them in a yellow square"]
    raw = wordpiece.encode_batch(captions)
    assert len(raw[1]) > 6, "the test needs a caption longer than seq_len"
    ids, mask = caption_ids(wordpiece, captions, seq_len=6)
    assert ids.shape == (2, 6) and mask.sum(dim=1).tolist() == [len(raw[0]) + 2, 6]
    assert ids[0, : len(raw[0]) + 2].tolist() == [cls, *raw[0], sep]
    assert ids[1].tolist() == [cls, *raw[1][:4], sep], "cut to seq_len with its end token kept"
    assert (ids[0, len(raw[0]) + 2 :] == wordpiece.pad_id).all()


def pair_set(size: int = 8) -> PairSet:
    n = len(CAPTIONS)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return PairSet(images, list(CAPTIONS), [f"img{i}" for i in range(n)], torch.arange(n) % 2, ["a", "b"])


def batches(bpe: TextTokenizer, seq_len: int = 16) -> PairBatches:
    views = ImageViews(ViewsConfig(**PAIR_VIEWS), 8, [0.5] * 3, [0.25] * 3)
    return PairBatches(pair_set(), views, bpe, seq_len, torch.device("cpu"))


def test_pair_batches_are_seeded(bpe):
    source = batches(bpe)
    indices = torch.tensor([4, 0, 2, 5])
    first = source(indices, torch.Generator().manual_seed(7))
    again = source(indices, torch.Generator().manual_seed(7))
    assert len(first["views"]) == 1 and first["views"][0].shape == (4, 3, 8, 8)
    assert torch.equal(first["views"][0], again["views"][0])
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["caption"], again["caption"])
    assert torch.equal(first["attention_mask"], again["attention_mask"])
    assert first["id"] == ["img4", "img0", "img2", "img5"] and torch.equal(first["index"], indices)
    assert first["label"].tolist() == [0, 0, 0, 1]
    # the common padding is trimmed: some row fills the width
    assert first["attention_mask"].sum(dim=1).max() == first["input_ids"].shape[1]
    seen = {tuple(source(indices, torch.Generator().manual_seed(s))["caption"].tolist()) for s in range(20)}
    assert len(seen) > 1, "another seed draws other captions"


def test_each_image_gets_one_of_its_own_captions_and_every_one_is_drawn(bpe):
    source = batches(bpe)
    data = source.data
    indices = torch.arange(len(data)).repeat(4)  # each image four times per batch
    drawn: dict[int, set[str]] = {i: set() for i in range(len(data))}
    for seed in range(40):
        batch = source(indices, torch.Generator().manual_seed(seed))
        for row, (item, pick) in enumerate(zip(indices.tolist(), batch["caption"].tolist())):
            n = int(batch["attention_mask"][row].sum())
            tokens = batch["input_ids"][row, :n].tolist()
            assert tokens[-1] == bpe.eos_id
            text = bpe.decode(tokens[:-1])
            assert text == data.captions[item][pick], (item, pick, text)
            drawn[item].add(text)
    assert all(drawn[i] == set(data.captions[i]) for i in drawn), "every caption of an image is drawn, no other"
