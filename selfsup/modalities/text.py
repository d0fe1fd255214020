"""Text: documents held in memory, tokenized by the run's tokenizer and packed into blocks.

- data: `manpages` (built-in), a folder of .txt files, a .txt file (a document per line), or a
  .jsonl/.csv with a text field (`data/text.py` reads them, naming file and line of bad UTF-8);
- pretraining: the run's tokenizer (kept on resume, copied from `tokenizer.path`, else trained on
  the training split) saved as `tokenizer.json`; the training split packed into full blocks of
  `data.seq_len` tokens; the held-out monitor scores the method's own objective on held-out blocks;
- reading: a document is cut into chunks of the encoder's `seq_len` tokens, each wrapped with the
  tokenizer's bounds as in training, and its feature is the mean of its first `chunks` chunk
  embeddings (man pages run to thousands of tokens; the first block alone sees only the header);
  positive pairs are a document's first two blocks; a report shows a document's opening words.
"""

from __future__ import annotations

import array
import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selfsup.config import HF_TOWER_PREFIX, RunConfig
from selfsup.data.builtins.prepared import ProgressBar
from selfsup.data.decode import _BadFile, _BadFilePolicy, _FileKind
from selfsup.data.packing import PackedBlocks, pack_documents
from selfsup.data.pipeline import (TOKEN_IDS, BlocksIn, PackDocuments, TextBatches, TextStreamBatches,
                                   collate_blocks)
from selfsup.data.shards import (ShardIndex, ShardReader, ShardSplit, ShardSummary, StreamParts, encode_meta,
                                 is_shard_folder, payload_member, read_rows, write_shard_folder)
from selfsup.data.sources import _sorted_classes
from selfsup.data.split import holdout_mask
from selfsup.data.text import TEXT_BUILTINS, TextRecord, TextSet, iter_text_source, load_text_source
from selfsup.data.tokenizer import TextTokenizer, load_or_train_tokenizer, train_tokenizer
from selfsup.encoders import TEXT_INPUTS
from selfsup.errors import SelfsupError
from selfsup.modalities.base import Assembly, EncoderBatch, Modality, Pairs, Reader, TaskInputs
from selfsup.train.runtime import Runtime

log = logging.getLogger("selfsup")

TOKENIZER_FILE = "tokenizer.json"  # the tokenizer the weights were trained with, beside them
_VOCAB, _SEQ = 50, 12  # contract-test sizes


def document_chunks(tokenizer: TextTokenizer, texts: list[str], seq_len: int,
                    max_chunks: int) -> tuple[list[list[int]], list[int]]:
    """(chunks, owner): each document's first `max_chunks` chunks of at most `seq_len` token ids,
    wrapped with the tokenizer's bounds as in training (an empty document gives one chunk of bounds),
    and the index of the document each chunk belongs to; a document's chunks are consecutive."""
    if max_chunks < 1:
        raise SelfsupError(f"max_chunks must be at least 1, got {max_chunks}")
    bos, eos = tokenizer.packing_bounds
    head, tail = [] if bos is None else [bos], [] if eos is None else [eos]
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise SelfsupError(f"seq_len={seq_len} leaves no room for text between the tokenizer's bounds")
    chunks: list[list[int]] = []
    owner: list[int] = []
    for index, ids in enumerate(tokenizer.encode_batch(texts)):
        for start in range(0, max(len(ids), 1), body)[:max_chunks]:
            chunks.append(head + ids[start : start + body] + tail)
            owner.append(index)
    return chunks, owner


def pad_chunks(chunks: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids [K, L], real-token mask [K, L]) of right-padded chunks, L the longest chunk."""
    L = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), L), pad_id, dtype=torch.long)
    real = torch.zeros(len(chunks), L, dtype=torch.bool)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk)] = torch.tensor(chunk)
        real[row, : len(chunk)] = True
    return ids, real


class TextTaskInputs(TaskInputs):
    """Documents as token blocks: `batch` gives the blocks of the batch's documents and their owners."""

    batch_size = 64  # documents per inference batch: each is up to `chunks` blocks

    def __init__(self, data: TextSet, rows: Tensor, tokenizer: TextTokenizer, seq_len: int, chunks: int):
        if len(rows) == 0:
            raise SelfsupError(f"{data.source}: no documents to read (the dataset or split is empty)")
        self.rows, self.chunks = rows, chunks
        pieces, owner = document_chunks(tokenizer, [data.texts[i] for i in rows.tolist()], seq_len, chunks)
        self.input_ids, self.mask = pad_chunks(pieces, tokenizer.pad_id)  # [K, L] over all documents
        counts = torch.bincount(torch.tensor(owner), minlength=len(rows))
        self.first_chunk = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # [N + 1]
        self.labels = None if data.labels is None else data.labels[rows]

    def batch(self, index: Tensor, device: torch.device) -> EncoderBatch:
        starts, ends = self.first_chunk[index], self.first_chunk[index + 1]
        blocks = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends)])
        owner = torch.repeat_interleave(torch.arange(len(index)), ends - starts)
        mask = self.mask[blocks]
        width = int(mask.sum(dim=1).max())  # trim the batch's common padding
        return EncoderBatch((self.input_ids[blocks, :width].to(device), mask[:, :width].to(device)), len(index),
                            owner.to(device))


class TextReader(Reader):
    modality = "text"

    def __init__(self, preprocess: dict[str, Any], tokenizer: TextTokenizer):
        super().__init__(preprocess)
        self.tokenizer = tokenizer

    def task_inputs(self, data: TextSet, rows: Tensor, chunks: int = 1) -> TextTaskInputs:
        return TextTaskInputs(data, rows, self.tokenizer, int(self.preprocess["seq_len"]), chunks)

    @torch.no_grad()
    def positive_pairs(self, encoder: nn.Module, data: TextSet, inputs: TaskInputs, rows: Tensor, runtime: Runtime,
                       generator: torch.Generator) -> Pairs:
        first_chunk = inputs.first_chunk  # documents' block ranges in the task inputs
        two = [int(i) for i in rows if int(first_chunk[i + 1] - first_chunk[i]) >= 2]
        if len(two) < 2:
            hint = (" (this task reads one block per document; adapt with --text-chunks 2 or more)"
                    if inputs.chunks < 2 else "")
            return Pairs(None, None, "no alignment: no document spans two blocks" + hint)
        views: list[list[Tensor]] = [[], []]
        for start in range(0, len(two), 64):
            first = torch.tensor([int(first_chunk[i]) for i in two[start : start + 64]])
            for v in range(2):
                mask = inputs.mask[first + v]
                width = int(mask.sum(dim=1).max())
                with runtime.autocast():
                    views[v].append(encoder.embed(inputs.input_ids[first + v, :width].to(runtime.device),
                                                  mask[:, :width].to(runtime.device)).float().cpu())
        return Pairs(torch.cat(views[0]), torch.cat(views[1]),
                     "the first two blocks of each document of two or more blocks")

    def examples(self, data: TextSet, rows: Tensor) -> dict[str, Any]:
        return {"snippets": [" ".join(data.texts[int(i)].split())[:120] for i in rows[:3]]}

    def save(self, folder: Path) -> dict[str, Any]:
        self.tokenizer.save(folder / TOKENIZER_FILE)
        return {**self.preprocess, "tokenizer": TOKENIZER_FILE}


class TextModality(Modality):
    name = "text"
    batch_kind = "tokens"
    default_source = "manpages"
    unit = "documents"

    def load(self, cfg: RunConfig, progress: bool = True) -> TextSet:
        d = cfg.data
        if is_shard_folder(d.source):  # written by `data shard`: both splits, read into memory
            return self.load_shard_folder(cfg, progress)
        return load_text_source(d.source, text_field=d.text_field, label_column=d.label_column,
                                group_columns=d.group_columns, unit=d.text_unit, errors=d.text_errors,
                                max_line_chars=d.max_line_chars)

    def join(self, first: TextSet, second: TextSet) -> TextSet:
        groups = {g: list(first.groups[g]) + list(second.groups.get(g, [""] * len(second))) for g in first.groups}
        labels = None if first.labels is None else torch.cat([first.labels, second.labels])
        return TextSet(first.texts + second.texts, first.ids + second.ids, labels, first.classes, groups, first.source)

    def assemble(self, cfg: RunConfig, out: Path, runtime: Runtime, train: TextSet | ShardSplit, holdout: TextSet,
                 spec: Any, progress: bool = True) -> Assembly:
        d = cfg.data
        folder = hf_folder(cfg)
        streamed = isinstance(train, ShardSplit)
        if folder is not None:  # continued from a Hugging Face model: its own tokenizer, never a new one
            tokenizer = folder_tokenizer(cfg, folder, out, runtime, spec.tokenizer)
            if streamed:
                _check_same_tokenizer(folder / TOKENIZER_FILE, train.index)
        elif streamed:
            tokenizer = shard_tokenizer(cfg, out, train.index, runtime, spec.tokenizer)
        else:
            tokenizer = run_tokenizer(cfg, out, train, runtime, spec.tokenizer)
        # Training blocks are all full (the tail is dropped, so no step pays for padding); held-out
        # blocks keep the tail, padded.
        batches: Any
        if isinstance(train, ShardSplit):  # streamed: the workers pack the shards' token ids into blocks
            index = train.index
            bos, eos = tokenizer.packing_bounds
            bounds = (bos is not None) + (eos is not None)
            counts = [tokens + items * bounds for tokens, (_, items) in zip(index.shards_tokens("train"),
                                                                              index.shards("train"))]
            parts = StreamParts([(path, count) for (path, _), count in zip(index.shards("train"), counts)],
                                ShardReader(index.counts(), d.on_bad_file),
                                PackDocuments(d.seq_len, bos, eos, d.on_bad_file, d.max_bad_fraction),
                                BlocksIn(d.seq_len), collate_blocks, d.workers, d.shuffle_buffer)
            batches = TextStreamBatches(parts, runtime.device, d.document_masks, sum(counts) // d.seq_len)
        else:
            batches = TextBatches(pack_split(train, tokenizer, d.seq_len, drop_last=True), train.ids, runtime.device,
                                  d.document_masks)
        if batches.num_items == 0:
            raise SelfsupError(f"{train.source}: the training split holds fewer than data.seq_len={d.seq_len} tokens; "
                               "add documents or lower data.seq_len")
        holdout_blocks = pack_split(holdout, tokenizer, d.seq_len, drop_last=False)
        log.info("text: %d training blocks of %d tokens (%d documents%s), %d held-out blocks; vocabulary %d",
                 batches.num_items, d.seq_len, len(train), ", streamed" if streamed else "", holdout_blocks.num_blocks,
                 tokenizer.vocab_size)
        section = dict(cfg.method)
        filled = {"mask_id": tokenizer.mask_id, "special_ids": sorted(tokenizer.special_ids)}
        for key in spec.tokenizer_fields:
            section.setdefault(key, filled[key])
        preprocess = {"modality": self.name, "tokenizer": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind,
                      "seq_len": d.seq_len}
        heldout = TextBatches(holdout_blocks, holdout.ids, runtime.device, d.document_masks)
        micro_batch = max(1, cfg.train.batch_size // (cfg.train.accum_steps * runtime.world_size))
        return Assembly(
            batches, {self.name: {"vocab_size": tokenizer.vocab_size, "max_len": d.seq_len}}, {self.name: preprocess},
            section, lambda rt, encoder_of: heldout_monitor(heldout, rt, cfg.train.eval_max_blocks, micro_batch, cfg.seed),
            tower_files={self.name: {TOKENIZER_FILE: lambda folder: tokenizer.save(folder / TOKENIZER_FILE)}},
        )

    # -- sharded sources ------------------------------------------------------------------------

    shard_items = 4000  # documents per shard

    def write_shards(self, cfg: RunConfig, out: Path, shard_items: int, overwrite: bool, progress: bool = True,
                     tokenizer_kind: str | None = None) -> ShardSummary:
        """Three streamed passes over the source, none holding the corpus: the documents' labels (one
        small integer each) for the split, made as a run makes it (stratified, `split.holdout_mask`);
        the tokenizer trained on the training documents (or `tokenizer.path` copied) and saved as
        tokenizer.json; each document's text and token ids written to its split's shards, in source
        order. A built-in corpus is loaded in memory as a run loads it."""
        d = cfg.data
        if is_shard_folder(d.source):
            raise SelfsupError(f"{d.source}: already a shards folder; train on it with data.source={d.source}")
        given = None
        if cfg.tokenizer.path is not None:
            given = TextTokenizer.load(Path(cfg.tokenizer.path))
            if tokenizer_kind is not None and given.kind != tokenizer_kind:
                raise SelfsupError(f"tokenizer.path={cfg.tokenizer.path} is a {given.kind} tokenizer, not "
                                   f"--tokenizer-kind {tokenizer_kind}; drop one of them")
        kind = given.kind if given is not None else (tokenizer_kind or DEFAULT_SHARD_TOKENIZER)
        records, labels, classes, columns, num_documents = _text_split_labels(cfg)  # the first pass
        class_index = {name: i for i, name in enumerate(classes or [])}
        is_held = holdout_mask(labels, num_documents, d.holdout_fraction, cfg.seed).tolist()
        log.info("text: %d documents, %d held out; %s", num_documents, is_held.count(True),
                 "tokenizing them with " + str(cfg.tokenizer.path) if given is not None else
                 "training the tokenizer on the others, then tokenizing them")

        def write(writers: dict[str, Any], folder: Path) -> dict[str, Any]:
            if given is not None:
                tokenizer = given
            else:
                log.info("training a %s tokenizer (vocab %d)", kind, cfg.tokenizer.vocab_size)
                tokenizer = train_tokenizer((r.text for r, held in zip(records(), is_held) if not held), kind,
                                            cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
            tokenizer.save(folder / TOKENIZER_FILE)
            dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
            bar = ProgressBar(progress, "writing shards", num_documents)
            try:
                for batch in _batched(zip(records(), is_held), 256):
                    for (record, held), ids in zip(batch, tokenizer.encode_batch([r.text for r, _ in batch])):
                        label = -1 if record.label is None else class_index[record.label]
                        buffer = io.BytesIO()
                        np.save(buffer, np.asarray(ids, dtype=dtype), allow_pickle=False)
                        writers["holdout" if held else "train"].add(
                            {"txt": record.text.encode("utf-8"), TOKEN_IDS: buffer.getvalue(),
                             "json": encode_meta(record.id, label, record.groups)}, tokens=len(ids))
                    bar.update(writers["train"].items + writers["holdout"].items)
            finally:
                bar.close()
            return {"classes": classes, "group_columns": columns, "num_skipped": 0, "seed": cfg.seed,
                    "holdout_fraction": d.holdout_fraction, "label_column": d.label_column,
                    "settings": {"tokenizer": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind,
                                 "vocab_size": tokenizer.vocab_size, "ids_dtype": np.dtype(dtype).name}}

        return write_shard_folder(out, overwrite, self.name, shard_items, str(d.source), write)

    def load_shards(self, cfg: RunConfig, index: ShardIndex, split: str, progress: bool = True) -> TextSet:
        rows = read_rows(index, split, payload_member(("txt",), "text"), _utf8,
                         _BadFilePolicy(cfg.data.on_bad_file, cfg.data.max_bad_fraction), _DOCUMENTS, progress)
        return TextSet(rows.values, rows.ids, rows.labels, rows.classes, rows.groups, index.source)

    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> TextReader:
        if folder is None or "tokenizer" not in preprocess:
            raise SelfsupError("a text encoder's description names its tokenizer file (preprocess.tokenizer), "
                               "and it is read from the encoder's folder")
        return TextReader(preprocess, TextTokenizer.load(Path(folder) / preprocess["tokenizer"]))

    def contract_inputs(self) -> dict[str, int]:
        return dict(zip(TEXT_INPUTS, (_VOCAB, _SEQ)))

    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        B, L = batch_size, _SEQ
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, _VOCAB, (B, L), generator=gen)
        ids[:, 0] = 2  # a [CLS]-like special token that must never be a target of masking
        documents = (torch.arange(L) >= L // 2).long().expand(B, L).clone()  # two documents per block
        return {"input_ids": ids, "token_mask": torch.ones(B, L, dtype=torch.bool), "document_ids": documents,
                "generator": torch.Generator().manual_seed(1), "id": [str(i) for i in range(B)]}


def run_tokenizer(cfg: RunConfig, out: Path, train: TextSet, runtime: Runtime, kind: str | None) -> TextTokenizer:
    """The run's tokenizer.json: kept from an earlier start of this run (resume), else copied from
    `tokenizer.path`, else trained on the training split. Rank 0 writes it; the others read it."""
    if kind is None:
        raise SelfsupError(f"method `{cfg.method['name']}` names no tokenizer kind, so it cannot train on text")
    path = out / TOKENIZER_FILE
    tokenizer = None
    if runtime.is_main:
        if not path.exists() and cfg.tokenizer.path is not None:
            given = TextTokenizer.load(Path(cfg.tokenizer.path))
            if given.kind != kind:
                raise SelfsupError(f"{cfg.tokenizer.path}: a {given.kind} tokenizer, but method `{cfg.method['name']}` "
                                   f"needs {kind}; train one with `selfsup tokenizer train --kind {kind}`")
            given.save(path)
        elif not path.exists():
            log.info("training a %s tokenizer (vocab %d) on %d documents", kind, cfg.tokenizer.vocab_size, len(train))
        tokenizer = load_or_train_tokenizer(path, lambda: train.texts, kind, cfg.tokenizer.vocab_size,
                                            cfg.tokenizer.min_frequency)
    runtime.barrier()
    return tokenizer if tokenizer is not None else TextTokenizer.load(path)


DEFAULT_SHARD_TOKENIZER = "wordpiece"  # `data shard` on text without --tokenizer-kind: mlm's tokenizer
_DOCUMENTS = _FileKind("documents", "no usable documents", "reading documents")


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadFile(f"not UTF-8 ({err})") from None


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _text_split_labels(cfg: RunConfig) -> tuple[Callable[[], Iterator[TextRecord]], torch.Tensor | None,
                                                list[str] | None, list[str], int]:
    """(records() restarting the source's stream, labels int64 [N] or None, classes, group columns, N) as
    a run loading the source would number them (`text.texts_from_records`), read without holding a
    document: one pass over the source, keeping one small integer per document."""
    d = cfg.data
    source = str(d.source)
    if source in TEXT_BUILTINS:  # a built-in corpus: in memory, its labels exactly the run's
        data = load_text_source(source)

        def held_records() -> Iterator[TextRecord]:
            for i, (text, id) in enumerate(zip(data.texts, data.ids)):
                label = None if data.labels is None or int(data.labels[i]) < 0 else data.classes[int(data.labels[i])]
                yield TextRecord(text, id, label, {c: data.groups[c][i] for c in data.groups})

        return held_records, data.labels, data.classes, list(data.groups), len(data)

    def records() -> Iterator[TextRecord]:
        return iter_text_source(source, text_field=d.text_field, label_column=d.label_column,
                                group_columns=d.group_columns, unit=d.text_unit, errors=d.text_errors,
                                max_line_chars=d.max_line_chars)

    codes = array.array("i")
    names: dict[str, int] = {}
    columns: dict[str, None] = {}
    for record in records():
        codes.append(-1 if record.label is None else names.setdefault(record.label, len(names)))
        columns.update(dict.fromkeys(record.groups))
    if not names:
        return records, None, None, list(columns), len(codes)
    classes = _sorted_classes(set(names))
    to_class = torch.tensor([classes.index(name) for name in names] + [-1], dtype=torch.long)  # code -1 -> -1
    labels = to_class[torch.tensor(np.frombuffer(codes, dtype=np.int32).astype(np.int64))]
    return records, labels, classes, list(columns), len(codes)


def shard_tokenizer(cfg: RunConfig, out: Path, index: ShardIndex, runtime: Runtime, kind: str | None) -> TextTokenizer:
    """A streamed run's tokenizer: the one the shards' token ids were made with (DIR/tokenizer.json),
    saved as the run's tokenizer.json (a resume reuses the run's copy). `tokenizer.path` cannot apply."""
    if cfg.tokenizer.path is not None:
        raise SelfsupError(f"tokenizer.path={cfg.tokenizer.path}: {index.folder} holds token ids made with its own "
                           f"tokenizer ({index.folder / TOKENIZER_FILE}); drop tokenizer.path, or shard the source "
                           "again with `selfsup data shard ... tokenizer.path=FILE`")
    path = out / TOKENIZER_FILE
    tokenizer = TextTokenizer.load(path if path.exists() else index.folder / TOKENIZER_FILE)
    if kind is not None and tokenizer.kind != kind:
        raise SelfsupError(f"{index.folder}: its token ids were made with a {tokenizer.kind} tokenizer, but method "
                           f"`{cfg.method['name']}` reads {kind}; shard the source again with "
                           f"`selfsup data shard ... --tokenizer-kind {kind}`")
    if runtime.is_main and not path.exists():
        tokenizer.save(path)
    runtime.barrier()
    return tokenizer


def _check_same_tokenizer(folder_file: Path, index: ShardIndex) -> None:
    """A run continued from a Hugging Face folder reads with the folder's tokenizer: shards made with
    another vocabulary cannot feed it."""
    import json

    def model(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["model"]
        except (OSError, ValueError, KeyError) as err:
            raise SelfsupError(f"{path}: cannot read the tokenizer ({err})") from None

    if model(folder_file) != model(index.folder / TOKENIZER_FILE):
        raise SelfsupError(f"{index.folder}: its token ids were made with another tokenizer than {folder_file}, which "
                           f"this run reads with; shard the source again with tokenizer.path={folder_file}")


def hf_folder(cfg: RunConfig) -> Path | None:
    """The Hugging Face folder a single-tower text run continues from (`encoder.name=hf:DIR`), or None."""
    name = str((cfg.encoder or {}).get("name", ""))
    return Path(name.removeprefix(HF_TOWER_PREFIX)).expanduser() if name.startswith(HF_TOWER_PREFIX) else None


def folder_tokenizer(cfg: RunConfig, folder: Path, out: Path, runtime: Runtime, kind: str | None) -> TextTokenizer:
    """The tokenizer of the Hugging Face folder a run continues from, saved as the run's tokenizer.json
    (a resume reuses the run's copy); `tokenizer.*` settings do not apply. Its vocabulary and the
    model's, and the block length and the model's positions, are checked and reported."""
    import json

    path = out / TOKENIZER_FILE
    source = path if path.exists() else folder / TOKENIZER_FILE
    tokenizer = TextTokenizer.load(source)
    if kind is not None and tokenizer.kind != kind:
        raise SelfsupError(f"{folder / TOKENIZER_FILE}: a {tokenizer.kind} tokenizer, but method `{cfg.method['name']}` "
                           f"reads {kind} ({'[MASK]' if kind == 'wordpiece' else 'byte-level'} tokens); continue this "
                           "method from a folder whose tokenizer is of that kind")
    if cfg.tokenizer.path is not None:
        log.warning("tokenizer.path=%s is ignored: a run continued from %s reads with that folder's tokenizer",
                    cfg.tokenizer.path, folder)
    config = json.loads((folder / "config.json").read_text())
    model_vocab = int(config.get("vocab_size") or 0)
    if tokenizer.vocab_size > model_vocab:
        raise SelfsupError(f"{folder}: its tokenizer.json has {tokenizer.vocab_size} tokens but the model only "
                           f"{model_vocab} embedding rows (config.json vocab_size); the tokenizer does not belong to "
                           "this model: put the model's own tokenizer.json in the folder")
    if tokenizer.vocab_size < model_vocab:
        log.info("%s: the tokenizer has %d tokens, the model %d embedding rows; the other %d rows are never read "
                 "(MLM's random replacements draw from the model's vocabulary)", folder, tokenizer.vocab_size,
                 model_vocab, model_vocab - tokenizer.vocab_size)
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if positions is not None and cfg.data.seq_len > int(positions):
        raise SelfsupError(f"data.seq_len={cfg.data.seq_len}: {folder}'s model reads at most {positions} positions "
                           f"(config.json); set data.seq_len={positions} or less")
    log.info("text: reading with %s's %s tokenizer (vocabulary %d, [MASK] id %s), not training one", folder,
             tokenizer.kind, tokenizer.vocab_size, tokenizer.mask_id)
    if runtime.is_main and not path.exists():
        tokenizer.save(path)
    runtime.barrier()
    return tokenizer


def pack_split(data: TextSet, tokenizer: TextTokenizer, seq_len: int, *, drop_last: bool) -> PackedBlocks:
    """The split's documents tokenized, wrapped with the tokenizer's bounds and packed into blocks."""
    bos, eos = tokenizer.packing_bounds
    return pack_documents(tokenizer.encode_batch(data.texts), seq_len, bos_id=bos, eos_id=eos,
                          pad_id=tokenizer.pad_id, drop_last=drop_last)


def heldout_monitor(holdout: TextBatches, runtime: Runtime, max_blocks: int, batch_size: int, seed: int):
    """Held-out loss of the method's own objective, its perplexity exp(loss), and the method's
    accuracy (masked-token or next-token), on the first `max_blocks` held-out blocks.

    The held-out randomness (which tokens MLM masks) comes from a generator seeded the same way at
    every evaluation, so the curve moves only because the weights do. Batches are weighted by their
    number of blocks; a partial final block counts as a whole one.
    """
    num_blocks = min(holdout.num_items, max_blocks)
    if num_blocks == 0:
        return None

    def monitor(method: nn.Module) -> dict[str, float]:
        generator = torch.Generator(device=runtime.device).manual_seed(seed)
        sums: dict[str, float] = {}
        for start in range(0, num_blocks, batch_size):
            indices = torch.arange(start, min(start + batch_size, num_blocks))
            with runtime.autocast():
                out = method(holdout(indices, generator), 1.0)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
        means = {f"heldout_{key}": value / num_blocks for key, value in sums.items()}
        means["heldout_ppl"] = math.exp(min(means["heldout_loss"], 50.0))  # capped: a diverged run still logs a number
        return means

    return monitor
