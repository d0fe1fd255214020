"""Subword tokenizers trained on the user's own corpus with Hugging Face `tokenizers`.

Two kinds, one per text objective:

- **wordpiece** (BERT-style, for `mlm`): BERT-uncased normaliser (`BertNormalizer`: control
  characters removed, every whitespace run becomes one space, accents stripped, lower-cased,
  spaces around CJK ideographs), `BertPreTokenizer` (splits on whitespace and around each
  punctuation character), WordPiece with the `##` continuation prefix. Special tokens, ids 0..4
  in this order: [PAD] [UNK] [CLS] [SEP] [MASK]. `decode` joins words with one space and drops the
  decoder's "cleanup" step (which would also rewrite " do not" as " don't"), so decode(encode(x))
  equals x *up to the normaliser*: the same characters as `normalize(x)`, with a space between
  every word and punctuation piece. A word with a character never seen in training becomes [UNK].
- **bpe** (GPT-2-style, for `next_token`): byte-level BPE, no normaliser, no prefix space, all 256
  byte symbols in the vocabulary, so any string encodes without [UNK] and decode(encode(x)) == x
  exactly. Special tokens: <|pad|> (id 0) and <|endoftext|> (id 1, the document separator, as in
  GPT-2); there is no mask, CLS or SEP token.

`encode_batch` adds no special tokens and neither pads nor truncates: `data/packing.py` wraps
documents and cuts blocks (`packing_bounds` says with which ids). Special-token strings that occur
in the text itself ("[MASK]", "<|endoftext|>" in a man page about tokenizers) are encoded as plain
text, never as the special id, so a corpus cannot forge document boundaries or mask positions.

Reproducibility, measured here with tokenizers 0.23.3 (4 trainings in each of 4 processes, with and
without TOKENIZERS_PARALLELISM=false, on a 300-line toy corpus and on 120 stdlib modules): the
byte-level BPE trainer wrote a byte-identical tokenizer.json every time (test_bpe_training_is_
reproducible keeps that true); the WordPiece trainer never did — ids of 24/151 and 77/2000 tokens
moved between runs, and on the toy corpus even the token set differed (ties at the vocabulary
cutoff are broken in hash-map order). Hence the rule `load_or_train_tokenizer` enforces: train once,
save tokenizer.json with the run, reuse the saved file — never retrain on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, get_args

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from selfsup.errors import SelfsupError
from selfsup.files import write_atomic

TokenizerKind = Literal["wordpiece", "bpe"]
KINDS: tuple[str, ...] = get_args(TokenizerKind)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # WordPiece, ids 0..4 in this order
BPE_SPECIAL = ["<|pad|>", "<|endoftext|>"]  # byte-level BPE, ids 0..1 in this order
_WORDPIECE_PREFIX = "##"
# tokenizer.json's model.type for each kind, to recognise a loaded file.
_MODEL_TYPES: dict[str, TokenizerKind] = {"WordPiece": "wordpiece", "BPE": "bpe"}
_NUM_BYTE_SYMBOLS = 256


class TextTokenizer:
    """A trained tokenizer: WordPiece (BERT-style, for MLM) or byte-level BPE (GPT-style, for next-token).

    Wraps a `tokenizers.Tokenizer`; build one with `train_tokenizer` or `TextTokenizer.load`. The
    special ids are looked up by token string, so a BERT- or GPT-2-style tokenizer.json from elsewhere
    loads too, as long as it holds the special tokens of its kind.
    """

    kind: TokenizerKind

    def __init__(self, tokenizer: Tokenizer, kind: TokenizerKind, source: str = "<trained>") -> None:
        self._tokenizer = tokenizer
        self.kind = kind
        # Special-token strings inside the text stay text (see the module docstring).
        self._tokenizer.encode_special_tokens = True
        # A tokenizer.json from elsewhere may pad or truncate every encoding (all-MiniLM-L6-v2's pads to
        # 128): selfsup blocks and pads documents itself, and `encode_batch` promises neither.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        required = SPECIAL if kind == "wordpiece" else BPE_SPECIAL
        missing = [token for token in required if tokenizer.token_to_id(token) is None]
        if missing:
            raise SelfsupError(f"{source}: this {kind} tokenizer lacks the special token(s) {missing}; "
                               f"selfsup needs {required} (train one with `selfsup tokenizer train`)")
        self._ids = {token: tokenizer.token_to_id(token) for token in required}

    # -- ids -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Embedding rows a model needs: every id `encode_batch` can return, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["[PAD]" if self.kind == "wordpiece" else "<|pad|>"]

    @property
    def unk_id(self) -> int | None:
        """None for byte-level BPE, which never needs one."""
        return self._ids["[UNK]"] if self.kind == "wordpiece" else None

    @property
    def mask_id(self) -> int | None:
        return self._ids["[MASK]"] if self.kind == "wordpiece" else None

    @property
    def cls_id(self) -> int | None:
        return self._ids["[CLS]"] if self.kind == "wordpiece" else None

    @property
    def sep_id(self) -> int | None:
        return self._ids["[SEP]"] if self.kind == "wordpiece" else None

    @property
    def eos_id(self) -> int | None:
        """<|endoftext|> for BPE; None for WordPiece, whose documents end with [SEP] instead."""
        return self._ids["<|endoftext|>"] if self.kind == "bpe" else None

    @property
    def special_ids(self) -> set[int]:
        """Ids that are never masked, never predicted as content, and skipped by `decode`."""
        return set(self._ids.values())

    @property
    def packing_bounds(self) -> tuple[int | None, int | None]:
        """(bos_id, eos_id) to wrap each document with in `pack_documents`: [CLS] ... [SEP] for
        WordPiece as in BERT; only <|endoftext|> after each document for BPE as in GPT-2."""
        if self.kind == "wordpiece":
            return self.cls_id, self.sep_id
        return None, self.eos_id

    # -- text ----------------------------------------------------------------------------------

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens, padding or truncation."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; exact inverse of `encode_batch` for BPE, up to `normalize` for WordPiece."""
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def normalize(self, text: str) -> str:
        """`text` as the tokenizer sees it before splitting (identity for byte-level BPE)."""
        normalizer = self._tokenizer.normalizer
        return text if normalizer is None else normalizer.normalize_str(text)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write `path` (a tokenizer.json any Hugging Face tokenizer loads) atomically: a temporary
        file in the same folder, then a rename, so a crash never leaves half a tokenizer behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self._tokenizer.to_str(pretty=True))

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        """Read a tokenizer.json written by `save` (or a BERT/GPT-2-style one from elsewhere)."""
        path = Path(path)
        if not path.is_file():
            raise SelfsupError(f"{path}: tokenizer file not found (train one with `selfsup tokenizer train`, "
                               "or point to the run's tokenizer.json)")
        try:
            text = path.read_text(encoding="utf-8")
            model_type = json.loads(text)["model"]["type"]
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:
            # Bad UTF-8, bad JSON, a missing "model" key, or tokenizers' own bare Exception for a
            # malformed file: every failure here means the file is corrupt.
            raise SelfsupError(f"{path}: not a readable tokenizer.json ({type(err).__name__}: {err}); "
                               "delete it and train the tokenizer again") from err
        if model_type not in _MODEL_TYPES:
            raise SelfsupError(f"{path}: tokenizer model type {model_type!r} is not supported; "
                               f"selfsup reads {sorted(_MODEL_TYPES)}")
        return cls(tokenizer, _MODEL_TYPES[model_type], source=str(path))


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a `kind` tokenizer of at most `vocab_size` tokens on `texts` (streamed, read once).

    `min_frequency`: a merge must occur at least this often to enter the vocabulary, so typos and
    one-off strings do not spend vocabulary rows. The vocabulary can end up smaller than `vocab_size`
    on a small corpus. Trainers run quietly (no progress bar on stdout).
    """
    if kind not in KINDS:
        raise SelfsupError(f"tokenizer kind {kind!r} is unknown; use 'wordpiece' (for mlm) or 'bpe' (for next_token)")
    num_fixed = len(SPECIAL) if kind == "wordpiece" else len(BPE_SPECIAL) + _NUM_BYTE_SYMBOLS
    if not isinstance(vocab_size, int) or vocab_size <= num_fixed:
        fixed = "special tokens" if kind == "wordpiece" else "special tokens and the 256 byte symbols"
        raise SelfsupError(f"tokenizer vocab_size must be an integer above {num_fixed} for {kind} ({fixed}), "
                           f"got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise SelfsupError(f"tokenizer min_frequency must be a positive integer, got {min_frequency!r}")

    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=_WORDPIECE_PREFIX))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix=_WORDPIECE_PREFIX, cleanup=False)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL, continuing_subword_prefix=_WORDPIECE_PREFIX,
                                            show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE())
        # No prefix space: a leading space would be added on encode and kept on decode, breaking
        # the exact round trip.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BPE_SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    counter = _CountingIterator(texts)
    tokenizer.train_from_iterator(counter, trainer=trainer)
    if counter.num_nonblank == 0:
        raise SelfsupError(f"cannot train a tokenizer on an empty corpus ({counter.num_texts} texts, all blank); "
                           "check the data source")
    return TextTokenizer(tokenizer, kind)  # type: ignore[arg-type]  # checked against KINDS above


def load_or_train_tokenizer(path: Path, texts: Callable[[], Iterable[str]], kind: str, vocab_size: int,
                            min_frequency: int = 2) -> TextTokenizer:
    """The tokenizer saved at `path` (a run's tokenizer.json), or a new one trained on `texts()` and
    saved there first.

    A resumed run must see the very token ids its checkpoint was trained with, and a trainer may not
    reproduce them (see the module docstring), so an existing file always wins and the corpus is not
    even read (`texts` is called only to train). Asking for another kind than the file holds is an
    error rather than a silent retrain.
    """
    path = Path(path)
    if path.exists():
        tokenizer = TextTokenizer.load(path)
        if tokenizer.kind != kind:
            raise SelfsupError(f"{path} holds a {tokenizer.kind} tokenizer but this run asks for {kind}; "
                               "use a new run directory, or delete the file to train a new tokenizer")
        return tokenizer
    tokenizer = train_tokenizer(texts(), kind, vocab_size, min_frequency)
    tokenizer.save(path)
    return tokenizer


class _CountingIterator(Iterator[str]):
    """Passes texts through to the trainer and counts them, so an empty corpus is reported by name
    instead of silently yielding a tokenizer of special tokens only."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = iter(texts)
        self.num_texts = 0
        self.num_nonblank = 0

    def __next__(self) -> str:
        text = next(self._texts)
        if not isinstance(text, str):
            raise SelfsupError(f"tokenizer training text #{self.num_texts} is a {type(text).__name__}, not a str")
        self.num_texts += 1
        self.num_nonblank += bool(text.strip())
        return text
