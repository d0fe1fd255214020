"""Tokenizer training on a tiny corpus: round trips (BPE exact, WordPiece up to its normaliser),
special ids, save/load, corrupt files named, bad input refused, and which trainer is reproducible."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from selfsup.data.tokenizer import TextTokenizer, load_or_train_tokenizer, train_tokenizer
from selfsup.errors import SelfsupError

WORDS = ("the quick brown fox jumps over a lazy dog while the manual page lists every command option "
         "for reading and writing files in the system").split()


def corpus(num_lines: int = 300, seed: int = 0) -> list[str]:
    """Sentences over a small vocabulary, with capitals, punctuation and a few accented words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(["café", "Über", "naïve", "résumé"]))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ": (see below)"]))
    return lines


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return train_tokenizer(corpus(), "bpe", vocab_size=400)


@pytest.fixture(scope="module")
def wordpiece() -> TextTokenizer:
    return train_tokenizer(corpus(), "wordpiece", vocab_size=200)


def test_bpe_round_trip_is_exact_even_for_unseen_text(bpe):
    texts = corpus(20, seed=1) + [
        "", " leading space", "trailing  spaces  ", "Tabs\tand\nnewlines\r\n", "Ünïcödé — 🦊 字 emoji",
        "literal specials: <|endoftext|> <|pad|> [MASK]", "x" * 300,
    ]
    ids = bpe.encode_batch(texts)
    assert [bpe.decode(row) for row in ids] == texts
    assert all(0 <= i < bpe.vocab_size for row in ids for i in row)
    # Special-token strings in the text are text, not document boundaries.
    assert not ({bpe.eos_id, bpe.pad_id} & set(ids[-2]))


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_wordpiece_round_trip_equals_text_up_to_the_bert_uncased_normaliser(wordpiece):
    texts = corpus(20, seed=1) + ["CAFÉ  Über\tNAÏVE résumé!"]
    ids = wordpiece.encode_batch(texts)
    assert wordpiece.unk_id not in {i for row in ids for i in row}  # every character was seen in training
    for text, row in zip(texts, ids):
        decoded = wordpiece.decode(row)
        assert decoded == decoded.lower() and "##" not in decoded
        # Same characters as the normalised text; only the spacing around punctuation differs.
        assert squeeze(decoded) == squeeze(wordpiece.normalize(text))
    assert wordpiece.normalize("CAFÉ  Über") == "cafe  uber"
    # An unseen character makes its word [UNK]; special-token strings are text, never the special id.
    unseen, literal = wordpiece.encode_batch(["the 字 dog", "the [MASK] [SEP] dog"])
    assert wordpiece.unk_id in unseen
    assert not ({wordpiece.mask_id, wordpiece.sep_id} & set(literal))


def test_special_ids_and_vocabulary_size(bpe, wordpiece):
    ids = (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id)
    assert ids == (0, 1, 2, 3, 4)
    assert wordpiece.eos_id is None and wordpiece.special_ids == {0, 1, 2, 3, 4}
    assert wordpiece.packing_bounds == (2, 3) and wordpiece.kind == "wordpiece"
    assert (bpe.pad_id, bpe.eos_id) == (0, 1)
    assert bpe.mask_id is None and bpe.cls_id is None and bpe.sep_id is None and bpe.unk_id is None
    assert bpe.special_ids == {0, 1} and bpe.packing_bounds == (None, 1) and bpe.kind == "bpe"
    assert 2 + 256 < bpe.vocab_size <= 400  # specials, all bytes, and some merges
    assert len(WORDS) < wordpiece.vocab_size <= 200
    # Encodings carry no special tokens: packing adds them.
    for tok in (bpe, wordpiece):
        assert not (tok.special_ids & {i for row in tok.encode_batch(corpus(10)) for i in row})


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_save_then_load_gives_identical_encodings(kind, bpe, wordpiece, tmp_path):
    tok = bpe if kind == "bpe" else wordpiece
    path = tmp_path / "run" / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left
    loaded = TextTokenizer.load(path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
    texts = corpus(30, seed=2) + ["literal <|endoftext|> [MASK]"]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    ids = tok.encode_batch(texts)
    assert [loaded.decode(row) for row in ids] == [tok.decode(row) for row in ids]


def test_missing_or_corrupt_tokenizer_file_is_named(bpe, tmp_path):
    good = tmp_path / "good.json"
    bpe.save(good)
    text = good.read_text(encoding="utf-8")
    cases = {
        "missing.json": None,
        "truncated.json": text[: len(text) // 2],
        "not_json.json": "{this is not json",
        "no_model.json": '{"version": "1.0"}',
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(SelfsupError, match=re.escape(str(path))):
            TextTokenizer.load(path)
    bad_bytes = tmp_path / "bad_utf8.json"
    bad_bytes.write_bytes(b'{"model": "\xff\xfe"}')
    with pytest.raises(SelfsupError, match=re.escape(str(bad_bytes))):
        TextTokenizer.load(bad_bytes)
    # A well-formed tokenizer.json without our special tokens is refused, naming what is missing.
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    foreign = tmp_path / "foreign.json"
    foreign.write_text(bare.to_str(), encoding="utf-8")
    with pytest.raises(SelfsupError, match=r"foreign\.json.*<\|endoftext\|>"):
        TextTokenizer.load(foreign)


def test_bad_training_input_is_refused():
    with pytest.raises(SelfsupError, match="empty corpus"):
        train_tokenizer([], "bpe", vocab_size=300)
    with pytest.raises(SelfsupError, match="empty corpus"):
        train_tokenizer(["", "  \n "], "wordpiece", vocab_size=100)
    with pytest.raises(SelfsupError, match="'sentencepiece' is unknown"):
        train_tokenizer(corpus(5), "sentencepiece", vocab_size=300)
    with pytest.raises(SelfsupError, match="above 258"):
        train_tokenizer(corpus(5), "bpe", vocab_size=258)
    with pytest.raises(SelfsupError, match="min_frequency"):
        train_tokenizer(corpus(5), "wordpiece", vocab_size=100, min_frequency=0)
    with pytest.raises(SelfsupError, match="#1 is a bytes"):
        train_tokenizer(["fine", b"raw bytes"], "bpe", vocab_size=300)


def test_an_error_inside_the_text_stream_reaches_the_caller_unchanged():
    """A source that finds invalid UTF-8 mid-corpus raises SelfsupError; training must not swallow it."""

    def texts() -> Iterator[str]:
        yield from corpus(5)
        raise SelfsupError("notes.txt line 6: invalid UTF-8")

    with pytest.raises(SelfsupError, match="notes.txt line 6"):
        train_tokenizer(texts(), "bpe", vocab_size=300)


def test_training_is_quiet(capfd):
    train_tokenizer(corpus(50), "bpe", vocab_size=300)
    train_tokenizer(corpus(50), "wordpiece", vocab_size=100)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bpe_training_is_reproducible(tmp_path):
    """Byte-level BPE gives the identical tokenizer.json from the same corpus (measured; see the
    module docstring of selfsup.data.tokenizer for WordPiece)."""
    files = []
    for run in range(3):
        files.append(tmp_path / f"run{run}.json")
        train_tokenizer(corpus(), "bpe", vocab_size=400).save(files[-1])
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()


def test_load_or_train_trains_once_then_always_reuses_the_saved_file(tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    num_reads = []

    def texts() -> list[str]:
        num_reads.append(1)
        return corpus(100)

    first = load_or_train_tokenizer(path, texts, "wordpiece", vocab_size=150)
    saved = path.read_bytes()
    again = load_or_train_tokenizer(path, texts, "wordpiece", vocab_size=150)  # a resume
    assert len(num_reads) == 1 and path.read_bytes() == saved
    assert again.encode_batch(corpus(10, seed=3)) == first.encode_batch(corpus(10, seed=3))
    with pytest.raises(SelfsupError, match=r"holds a wordpiece tokenizer but this run asks for bpe"):
        load_or_train_tokenizer(path, texts, "bpe", vocab_size=300)


def test_a_foreign_tokenizer_that_pads_and_truncates_encodes_documents_whole(wordpiece, tmp_path):
    """all-MiniLM-L6-v2's tokenizer.json pads every encoding to 128 and truncates: loaded here it must
    do neither, since selfsup cuts documents into blocks and pads batches itself."""
    inner = Tokenizer.from_str(wordpiece._tokenizer.to_str())
    inner.enable_padding(length=32, pad_id=wordpiece.pad_id, pad_token="[PAD]")
    inner.enable_truncation(max_length=8)
    path = tmp_path / "tokenizer.json"
    path.write_text(inner.to_str())
    texts = corpus(5, seed=3) + [" ".join(WORDS)]
    assert TextTokenizer.load(path).encode_batch(texts) == wordpiece.encode_batch(texts)
    assert max(len(ids) for ids in wordpiece.encode_batch(texts)) > 8
