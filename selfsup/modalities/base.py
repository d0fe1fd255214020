"""The modality contract: everything that differs between images, text, audio and image–text pairs.

A modality is one module with one `Modality` subclass, registered with one line in
`selfsup/modalities/__init__.py`. Nothing outside the modality modules asks which modality it holds
(a test greps for it): the rest of selfsup handles a modality's data only through this interface.

A modality owns
- **data**: loading a source (`load`: built-in name, folder, manifest, npz, ...) into a dataset
  with `ids`, `labels`, `classes`, `groups`, `source`, `__len__` and `subset`; the stratified
  hold-out split (`split`, shared); joining a source's two splits back (`join`);
- **pretraining** (`assemble`): the batches a method trains on (their kind, `batch_kind`, must be
  the method's `inputs`: "views" or "tokens"), the encoder inputs and preprocessing recorded with
  each tower (`encoder.json`'s `preprocess`, which always names the modality), the held-out
  monitor, the data a method's fitted targets come from, what is saved beside a tower (a
  tokenizer), and what is written after training (image previews);
- **reading** (`reader`): given an encoder's description, how that encoder reads the modality:
  frozen features for probes, adapt, select, leverage and evaluate (pooling, chunking), the
  task inputs adapt trains on, the positive pairs of the representation diagnostics, and what a
  report shows of an example (a thumbnail, the opening words);
- **tests** (`contract_batch`, `contract_inputs`, `contract_fit_data`): a tiny batch and encoder
  inputs, so the method contract test sweeps every method over every modality it accepts.

Layering: modalities use `data/`, `encoders/`, `nn/` and `train/runtime.py`; `adapt/`,
`evaluate/`, `report/` and the `pretrain` orchestration use modalities; nothing below imports them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from selfsup.data.split import split_holdout
from selfsup.errors import SelfsupError

if TYPE_CHECKING:
    from selfsup.config import RunConfig
    from selfsup.data.shards import ShardIndex, ShardSummary
    from selfsup.methods import MethodSpec
    from selfsup.train.runtime import Runtime


class Dataset(Protocol):
    """What every modality's dataset offers (ImageSet, TextSet, ...)."""

    ids: list[str]
    labels: Tensor | None  # int64 [N] indexing `classes`, -1 = unlabelled; None = no labels at all
    classes: list[str] | None
    groups: dict[str, list[str]]  # subgroup column -> one string per row
    source: str

    def __len__(self) -> int: ...

    def subset(self, index: Tensor | list[int]) -> Any: ...


@dataclass
class FitData:
    """What a method's `fit_targets(data, generator)` hook receives (BEiT's visual tokens,
    colourisation's colour bins, HuBERT's cluster ids): the training split's items, how a batch of
    them becomes the encoder's input, and a loader for targets that come from another run."""

    items: Any  # the training split's raw items, e.g. uint8 images [N, C, H, W]
    prepare: Callable[[Tensor], Tensor]  # a batch of items (on the device) -> normalised encoder inputs
    device: torch.device
    load_run: Callable[[str], tuple[nn.Module, dict[str, Any]]] | None = None  # RUN[:tower] -> (encoder, meta)


class Batches(Protocol):
    """The data side of the training loop: dataset indices -> a batch dict on the device."""

    num_items: int

    def __call__(self, indices: Tensor, generator: torch.Generator) -> dict[str, Any]: ...


Monitor = Callable[[nn.Module], dict[str, float]]


@dataclass
class Assembly:
    """What a modality hands the `pretrain` orchestration for one run."""

    batches: Batches
    # Per tower modality (a single-modality run has one key, its own name): what build_encoder needs
    # besides the config, and the preprocessing written to each tower's encoder.json.
    encoder_inputs: dict[str, dict[str, int]]
    preprocess: dict[str, dict[str, Any]]
    method_section: dict[str, Any]  # the method config, with fields filled from the data (a tokenizer's ids)
    # The held-out monitor (kNN accuracy, perplexity), given the runtime and how to find the encoder
    # it watches in the method (its first tower of this modality).
    monitor: Callable[["Runtime", Callable[[nn.Module], nn.Module]], Monitor | None]
    fit_data: FitData | None = None  # for methods with data-fitted targets; None = this modality has none
    # Files a tower of this modality needs beside its weights (name -> writer), e.g. the tokenizer.
    tower_files: dict[str, dict[str, Callable[[Path], None]]] = field(default_factory=dict)
    # Written after the last step (rank 0), e.g. the reconstructions of held-out images.
    after_training: Callable[[nn.Module, "Runtime", Path], None] | None = None


@dataclass
class EncoderBatch:
    """One batch of task inputs: `encoder.embed(*args)` gives [K, D] for K pieces; with `owner` [K]
    (several pieces per item, e.g. a document's blocks) the pieces of each item are averaged."""

    args: tuple[Tensor, ...]
    num_items: int
    owner: Tensor | None = None

    def embed(self, encoder: nn.Module) -> Tensor:
        """Features [num_items, D]."""
        pieces = encoder.embed(*self.args)  # [K, D]
        if self.owner is None:
            return pieces
        return mean_by_owner(pieces, self.owner, self.num_items)


def mean_by_owner(per_piece: Tensor, owner: Tensor, num_items: int) -> Tensor:
    """[num_items, D]: the mean of each item's piece embeddings [K, D] (owner [K] indexes items)."""
    sums = torch.zeros(num_items, per_piece.shape[1], dtype=per_piece.dtype, device=per_piece.device)
    sums = sums.index_add(0, owner, per_piece)
    counts = torch.bincount(owner, minlength=num_items).clamp_min(1)
    return sums / counts.unsqueeze(1).to(per_piece.dtype)


class TaskInputs(ABC):
    """A split's rows prepared for one encoder: `batch(index, device)` gives an EncoderBatch."""

    rows: Tensor
    labels: Tensor | None
    batch_size: int = 256  # rows per inference batch (a text document is several blocks: fewer)

    def __len__(self) -> int:
        return len(self.rows)

    @abstractmethod
    def batch(self, index: Tensor, device: torch.device) -> EncoderBatch: ...


@dataclass
class Pairs:
    """The representation diagnostics' positive pairs: embeddings [P, D] of two views of P items."""

    first: Tensor | None
    second: Tensor | None
    description: str  # how the views were made, or why there are none


class Reader(ABC):
    """How one encoder reads a modality, from its `preprocess` (and the files beside it)."""

    modality: ClassVar[str]

    def __init__(self, preprocess: dict[str, Any]):
        self.preprocess = preprocess

    @abstractmethod
    def task_inputs(self, data: Any, rows: Tensor, chunks: int = 1) -> TaskInputs:
        """The rows of `data` as this encoder takes them (`chunks`: a long item's pieces to average)."""

    @torch.no_grad()
    def features(self, encoder: nn.Module, data: Any, rows: Tensor, runtime: "Runtime", chunks: int = 1) -> Tensor:
        """Pooled embeddings [N, D] (float32, CPU) of the rows, the encoder in eval mode."""
        if len(rows) == 0:
            raise SelfsupError(f"{data.source}: no rows to embed (the dataset or split is empty)")
        encoder.eval().to(runtime.device)
        inputs = self.task_inputs(data, rows, chunks)
        out = []
        for start in range(0, len(inputs), inputs.batch_size):
            index = torch.arange(start, min(start + inputs.batch_size, len(inputs)))
            with runtime.autocast():
                out.append(inputs.batch(index, runtime.device).embed(encoder).float().cpu())
        return torch.cat(out)

    @abstractmethod
    def positive_pairs(self, encoder: nn.Module, data: Any, inputs: TaskInputs, rows: Tensor, runtime: "Runtime",
                       generator: torch.Generator) -> Pairs:
        """Embeddings of two views of each of `rows` (indices into `inputs`), for alignment."""

    def raw_features(self, data: Any, rows: Tensor) -> Tensor | None:
        """The raw-input baseline [N, F] of the rows for `probe --compare-raw` (images: their pixels),
        or None when this modality has none."""
        return None

    @abstractmethod
    def examples(self, data: Any, rows: Tensor) -> dict[str, Any]:
        """What a report shows of these rows: {"images": uint8 [K, C, H, W]} or {"snippets": [str]}."""

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the files this reader needs into `folder` (a task or tower folder); returns the
        preprocess to record there (its file names relative to `folder`)."""
        return dict(self.preprocess)


def check_no_tokenizer(tokenizer_kind: str | None, modality: str) -> None:
    """`data shard --tokenizer-kind` is for text; another modality given one is told so."""
    if tokenizer_kind is not None:
        raise SelfsupError(f"--tokenizer-kind is for text shards; {modality} shards hold no token ids (drop it)")


class Modality(ABC):
    """One modality (module docstring). Subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    batch_kind: ClassVar[str]  # what its pretraining batches carry: a method's `inputs` ("views", "tokens")
    default_source: ClassVar[str]  # the built-in a run uses when `data.source` is not given
    unit: ClassVar[str] = "items"  # what one row is called in logs ("images", "documents")

    @abstractmethod
    def load(self, cfg: "RunConfig", progress: bool = True) -> Dataset:
        """The whole of `cfg.data.source`, decoded; errors name the file at fault."""

    def split(self, data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
        """(training, held-out): stratified by label, seeded, both in source order (data/split.py)."""
        return split_holdout(data, fraction, seed)

    @abstractmethod
    def join(self, first: Any, second: Any) -> Any:
        """Every row of a source: `first`'s rows, then `second`'s (a source's two splits)."""

    @abstractmethod
    def assemble(self, cfg: "RunConfig", out: Path, runtime: "Runtime", train: Any, holdout: Any,
                 spec: "MethodSpec", progress: bool = True) -> Assembly:
        """Everything a pretraining run on this modality needs (see Assembly)."""

    @abstractmethod
    def reader(self, preprocess: dict[str, Any], folder: Path | None) -> Reader:
        """How an encoder with this `preprocess` (from the encoder.json in `folder`) reads the data."""

    # -- sharded sources (`selfsup data shard`, data/shards.py) ---------------------------------

    shard_items: ClassVar[int] = 1000  # default samples per shard written by `data shard`

    def write_shards(self, cfg: "RunConfig", out: Path, shard_items: int, overwrite: bool, progress: bool = True,
                     tokenizer_kind: str | None = None) -> "ShardSummary":
        """Writes `cfg.data.source` as a shards folder `out`: both splits (`data.holdout_fraction`,
        `seed`), labels, groups, and what a streamed run cannot compute from the whole training split."""
        raise SelfsupError(f"`selfsup data shard` does not yet write {self.name} data; shard the image, text, audio "
                           "or image_text sources, or train on this source as it is")

    def load_shard_folder(self, cfg: "RunConfig", progress: bool = True) -> Any:
        """Every row of the shards folder `cfg.data.source` in memory (its training rows, then its
        held-out ones): what `load` gives for such a folder."""
        from selfsup.data.shards import load_index

        index = load_index(Path(str(cfg.data.source)))
        return self.join(self.load_shards(cfg, index, "train", progress), self.load_shards(cfg, index, "holdout", progress))

    def load_shards(self, cfg: "RunConfig", index: "ShardIndex", split: str, progress: bool = True) -> Any:
        """One split of a shards folder held in memory as this modality's dataset (the held-out split of a
        streamed run; both splits for probes, adapt and evaluate)."""
        raise SelfsupError(f"{index.folder}: {self.name} cannot yet read a shards folder; point data.source at the "
                           "original source")

    # -- contract tests ---------------------------------------------------------------------

    @abstractmethod
    def contract_inputs(self) -> dict[str, int]:
        """Tiny encoder inputs (build_encoder keywords) matching `contract_batch`."""

    @abstractmethod
    def contract_batch(self, batch_size: int = 6) -> dict[str, Any]:
        """A fresh tiny batch of `batch_kind` (its generator too, so two calls are identical)."""

    def contract_fit_data(self) -> FitData | None:
        """Tiny training items for methods with data-fitted targets; None when the modality has none."""
        return None
