"""FSDP2 (`train.parallel=fsdp`): the method's parameters, gradients and optimizer state sharded over
the ranks, and checkpoints that every rank writes through `torch.distributed.checkpoint` (DCP).

Sharding (`shard`). PyTorch's own `fully_shard` (FSDP2) is applied to every repeated layer of every
stack in the method — each element of a ModuleList/Sequential named `blocks`, `*_blocks`, `stages`,
`layer` or `layers` (a ViT's, text or audio transformer's blocks, a ResNet's stages, MAE's decoder
blocks, a Hugging Face model's layers) — and then to the method itself, whose group holds the rest
(embeddings, final norms, heads). A layer's parameters are gathered for its forward, freed after it
and gathered again for its backward; the root's stay gathered from the method's forward to the end
of its backward, so a method may call its encoder's `embed`, `latents` or heads freely inside
`forward`. Each rank keeps 1/N of every parameter, of its gradient and of the AdamW moments.

- EMA teachers (BYOL, DINO: `nn/ema.py`) are copies of the student made with the method, so their
  layers are found and sharded the same way: a teacher parameter and its student parameter hold
  the same rows on every rank, and the EMA update is a lerp of the local shards, with no collective.
- Buffers are not sharded (FSDP2 leaves them whole on every rank). As DDP does, rank 0's buffers are
  broadcast before every training forward that synchronises gradients (BatchNorm statistics follow
  rank 0's, exactly as under DDP), and before each checkpoint, so the saved copy is rank 0's.
- Precision: parameters, gradients and their reduce-scatters stay fp32; the runtime's autocast
  runs the products in bf16 where it is on, as under DDP (no MixedPrecisionPolicy), so a step
  equals DDP's up to the order of floating-point sums.
- Gradient accumulation: every micro-step reduce-scatters its gradients (FSDP2's
  `set_requires_gradient_sync(False)` would keep a whole unsharded gradient per rank between
  micro-steps, which is what FSDP is there to avoid); the sum is the same.
- The loop's clipping and non-finite guard read the global gradient norm, which
  `torch.nn.utils.get_total_norm` computes over the DTensor shards (one all-reduce).
- In one process (no torchrun, or torchrun with one worker) nothing is sharded: the method trains
  whole, and only its checkpoints are in the sharded format, so that a run moves between 1 and N
  ranks in both directions.

Whole copies (`whole`). Rank 0 alone runs the held-out monitor and writes the encoder files and the
previews. Under FSDP it gets an unsharded copy for that: a parameter-free template of the method
(kept on the meta device since `shard`) filled with the full state dict that every rank's shards
are gathered into (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), and rank 0's
buffers. The saved `encoder.safetensors` is therefore the same single file of plain tensors as a
DDP run's.

Checkpoints (`save_checkpoint`, `resume_latest`). `checkpoints/step-N/` holds DCP's files — `.metadata`
and `__R_0.distcp` from each rank R that wrote it —, `state.pt` (step, data order, seed, CPU GEMM
choice; `torch.load(weights_only=True)` reads it) and `manifest.json` (format 2, every file with its
sha256 and size), written last. Every rank writes its shards into `.step-N.tmp-sharded` (files
fsynced) and hashes them; after they have all finished, rank 0 writes `state.pt` and the manifest,
renames the folder into place and prunes, exactly as `checkpoint.py` does for one writer. A folder
without a valid manifest is no checkpoint (`checkpoint.verify`, which knows both formats).
Resuming reads DCP's metadata, refuses weights that do not fit the model (a changed config), loads
the shards into fresh tensors and only then into the method and optimizer, so a checkpoint that
fails to load leaves both untouched and the one before it is tried. DCP reshards on load, so a
checkpoint of N ranks resumes on M; the data order's position is global (`data/sampler.py`), so the
resumed run continues the same sequence of global batches.

Nothing is unpickled beyond tensors and plain values: DCP reads tensors with
`torch.load(weights_only=True)`; its other values (the optimizer's hyperparameters) are read the
same way here (DCP's default planner would use `weights_only=False`), and its `.metadata` (a
pickle) through an unpickler that admits only DCP's metadata classes and torch's sizes and dtypes.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import pickle
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfsup.errors import SelfsupError
from selfsup.files import fsync_path, swap_dir
from selfsup.train import checkpoint
from selfsup.train.checkpoint import SHARDED_FORMAT, STATE_FILE, UnusableCheckpoint
from selfsup.train.runtime import Runtime

if TYPE_CHECKING:  # torch.distributed.checkpoint and FSDP take a second to import: only runs that shard load them
    from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger("selfsup")

STACK_NAMES = ("blocks", "stages", "layer", "layers")  # and any name ending in "_blocks"
DCP_METADATA = ".metadata"  # DCP's own name for its index of the shards

# Method -> its parameter-free template (meta device), for `whole`; weak, so a probe copy is freed.
_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------- sharding


def layer_units(method: nn.Module) -> list[nn.Module]:
    """The repeated layers that become FSDP units of their own, innermost first (the order
    `fully_shard` needs): each element, holding parameters, of every stack named in STACK_NAMES or
    ending in `_blocks`, teachers' copies included."""
    units: list[nn.Module] = []
    for name, module in method.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and (last in STACK_NAMES or last.endswith("_blocks")):
            units.extend(layer for layer in module if next(layer.parameters(), None) is not None)
    return units[::-1]


class ShardedModel:
    """What the loop calls under FSDP in place of `DistributedDataParallel(method)`: the sharded method
    itself, plus DDP's broadcast of rank 0's buffers before a training forward that synchronises
    gradients, and a `no_sync()` that only skips that broadcast (see the module docstring)."""

    def __init__(self, method: nn.Module):
        self.method = method
        self._sync = True

    def __call__(self, batch: dict, progress: float) -> dict[str, Tensor]:
        if self._sync and torch.is_grad_enabled():
            broadcast_buffers(self.method)
        return self.method(batch, progress)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self._sync = False
        try:
            yield
        finally:
            self._sync = True


def shard(method: nn.Module, runtime: Runtime) -> nn.Module | ShardedModel:
    """Shards `method` in place over the torchrun ranks (FSDP2) and returns what the loop calls; in one
    process, `method` itself (nothing to shard). Call it after moving the method to its device and
    before building its optimizer, which must see the sharded parameters."""
    if runtime.world_size == 1:
        log.info("train.parallel=fsdp in one process: nothing to shard; checkpoints are written in the sharded "
                 "format, so the run can continue under torchrun on any number of ranks")
        return method
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _TEMPLATES[method] = _meta_copy(method)
    # As DDP does when it wraps a model: every rank starts from rank 0's weights (each keeps its shard of them).
    _broadcast_from_rank0([*method.parameters(), *method.buffers()])
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    units = layer_units(method)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(method, mesh=mesh)
    total = sum(p.numel() for p in method.parameters())
    log.info("train.parallel=fsdp: %d layers and the method's root sharded over %d ranks (%.2fM parameters, "
             "about %.2fM per rank)", len(units), runtime.world_size, total / 1e6, total / runtime.world_size / 1e6)
    return ShardedModel(method)


def _meta_copy(method: nn.Module) -> nn.Module:
    """A deep copy of `method` whose parameters and buffers live on the meta device (no memory): its
    structure and Python state, for `whole`. Ties between parameters are kept."""
    memo: dict[int, Any] = {}
    for param in method.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in method.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(method, memo)


def broadcast_buffers(method: nn.Module) -> None:
    """Every rank's buffers set to rank 0's, as DDP does before a forward (a no-op in one process)."""
    _broadcast_from_rank0(list(method.buffers()))


@torch.no_grad()
def _broadcast_from_rank0(tensors: list[Tensor], bucket_bytes: int = 32 << 20) -> None:
    """`tensors` (plain, the same list on every rank) overwritten with rank 0's, in buckets of one dtype."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for i, tensor in enumerate(group):
            bucket.append(tensor)
            size += tensor.numel() * tensor.element_size()
            if i == len(group) - 1 or size >= bucket_bytes:
                flat = torch.cat([t.detach().reshape(-1) for t in bucket])
                dist.broadcast(flat, src=0)
                at = 0
                for t in bucket:
                    t.detach().copy_(flat[at: at + t.numel()].view_as(t))
                    at += t.numel()
                bucket, size = [], 0


def whole(method: nn.Module, runtime: Runtime) -> nn.Module | None:
    """The method with whole (unsharded) weights on rank 0, None on the other ranks.

    Under FSDP this is a collective (every rank must call it) that gathers the shards into a fresh
    copy, in the mode `method` is in; otherwise it is `method` itself. What rank 0 does with the copy
    (the monitor, the encoder files, previews) does not change the training method.
    """
    template = _TEMPLATES.get(method)
    if template is None:
        return method if runtime.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not runtime.is_main:
        return None
    gathered = copy.deepcopy(template).to_empty(device=runtime.device)
    gathered.load_state_dict(full)
    with torch.no_grad():
        for name, buffer in method.named_buffers():  # FSDP2 keeps buffers whole: non-persistent ones too
            gathered.get_buffer(name).copy_(buffer)
    return gathered.train(method.training)


# ------------------------------------------------------------------------------------- checkpoints


class _Failed(Exception):
    """Some rank failed a step of a checkpoint's write or load; every rank raises it together."""


def _agree(runtime: Runtime, error: str | None) -> None:
    """Every rank learns whether any rank failed (each rank passes its own error or None); raises
    `_Failed` with the first error on every rank, so no rank waits in a collective another left."""
    errors = [error]
    if runtime.world_size > 1:
        errors = [None] * runtime.world_size
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise _Failed(first)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(fn(), None), or (None, what went wrong) for the errors a checkpoint's I/O raises."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        return fn(), None
    # Broad on purpose: a rank that raised alone would leave the others waiting in the next collective.
    except (Exception, CheckpointException) as err:  # DCP's own error is a BaseException
        if isinstance(err, CheckpointException) and err.failures:  # {rank: (its error, traceback)}
            err = next(iter(err.failures.values()))[0]
        if isinstance(err, OSError) and err.strerror:
            return None, f"{err.strerror} (errno {err.errno})"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return None, f"{type(err).__name__}: {lines[0] if lines else ''}"


def _own_shards(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """sha256 and size of the DCP files rank `rank` wrote into `folder`."""
    prefix = f"__{rank}_"
    return {p.name: {"sha256": checkpoint.sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.name.startswith(prefix) and p.name.endswith(".distcp")}


def save_checkpoint(root: Path, step: int, method: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int, runtime: Runtime) -> Path | None:
    """Writes `root/step-<step>` in the sharded format (module docstring); a collective: every rank calls
    it. Returns the path on rank 0, None on the others. A write that fails on any rank leaves no trace of
    the new checkpoint and raises SelfsupError on every rank naming the error and the intact checkpoint."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-sharded"
    main, world_size = runtime.is_main, runtime.world_size

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def write_shards() -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        broadcast_buffers(method)  # the saved buffers are rank 0's, whichever rank DCP picks to write them
        model_state = get_model_state_dict(method)
        optim_state = get_optimizer_state_dict(method, optimizer)
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        with _no_single_process_warning():
            dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer, no_dist=world_size == 1)

    def finish(shards: list[dict[str, dict[str, Any]]]) -> None:
        checkpoint.torch_save({**state, "step": step, "format": SHARDED_FORMAT}, tmp / STATE_FILE)
        fsync_path(tmp / STATE_FILE)
        files = {name: entry for part in shards for name, entry in part.items()}
        for name in (DCP_METADATA, STATE_FILE):
            files[name] = {"sha256": checkpoint.sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        checkpoint.write_manifest(tmp, step, SHARDED_FORMAT, files)
        # The same step written again after a resume replaces the old copy whole; a failed rename puts it back.
        swap_dir(tmp, final)

    try:
        _agree(runtime, _attempt(prepare)[1] if main else None)
        _agree(runtime, _attempt(write_shards)[1])
        shards, error = _attempt(lambda: _own_shards(tmp, runtime.rank))
        _agree(runtime, error)
        gathered = [shards]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, shards)
        _agree(runtime, _attempt(lambda: finish(gathered))[1] if main else None)
    except _Failed as failed:
        kept = "rank 0 names the checkpoint that is intact"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = checkpoint.latest_valid(root, quiet=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise SelfsupError(f"{final}: could not write the checkpoint: {failed}; nothing of it was kept and {kept}. "
                           f"Free space (or fix the error) and continue with --resume") from None
    if not main:
        return None
    fsync_path(root)  # makes the rename itself durable
    checkpoint.prune(root, keep_last, newest=step)
    return final


@contextmanager
def _no_single_process_warning() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# What a DCP `.metadata` pickle may name: DCP's metadata classes and what they hold (found by recording
# what torch 2.13 writes). Anything else, a dotted name included (it would reach further attributes),
# is refused: unpickling a class can run code.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def read_metadata(folder: Path) -> Metadata:
    """DCP's index of a checkpoint's shards, unpickled with only DCP's own classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(folder / DCP_METADATA, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{DCP_METADATA} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


@functools.cache
def _reader_and_planner() -> tuple[type, type]:
    """DCP's file reader with its `.metadata` read by `read_metadata`, and DCP's default load planner
    reading non-tensor values with `weights_only=True` (classes made on first use: see the imports)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._nested_dict import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return Reader, Planner


def load_shards(path: Path, target: dict[str, Any], world_size: int) -> None:
    """DCP's load of the checkpoint at `path` into `target` (in place), with the readers above; a
    collective unless `world_size` is 1."""
    import torch.distributed.checkpoint as dcp

    reader, planner = _reader_and_planner()
    with _no_single_process_warning():
        dcp.load(target, storage_reader=reader(path), planner=planner(), no_dist=world_size == 1)


def _global_shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)  # a DTensor's shape is the whole tensor's


def _check_fits(path: Path, metadata: Metadata, model_state: dict[str, Tensor],
                optim_state: dict[str, Any] | None) -> None:
    """SelfsupError when the saved weights do not fit the model (a changed config: an older checkpoint
    would not fit either); UnusableCheckpoint when the optimizer state does not fit (fall back)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = metadata.state_dict_metadata
    shapes = {k.removeprefix("model."): tuple(v.size) for k, v in saved.items()
              if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    missing = sorted(set(model_state) - set(shapes))
    unexpected = sorted(set(shapes) - set(model_state))
    if missing or unexpected:
        raise SelfsupError(f"{path}: weights do not match this model (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}); was the config changed?")
    for name, tensor in model_state.items():
        if shapes[name] != _global_shape(tensor):
            raise SelfsupError(f"{path}: weights do not match this model (size mismatch for {name}: "
                               f"{shapes[name]} in the checkpoint, {_global_shape(tensor)} in this model); "
                               f"was the config changed?")
    if optim_state is None:
        return
    params = {name for group in optim_state["param_groups"] for name in group["params"]}
    unknown = sorted(_stated_params(metadata) - params)
    if unknown:
        raise UnusableCheckpoint(f"{path}: optimizer state for unknown parameters ({', '.join(unknown[:3])})")
    for param, entry in optim_state["state"].items():
        for key, value in entry.items():
            meta = saved.get(f"optim.state.{param}.{key}")
            if not isinstance(value, Tensor):
                continue
            if not isinstance(meta, TensorStorageMetadata):
                raise UnusableCheckpoint(f"{path}: no optimizer state {key!r} for {param}")
            if tuple(meta.size) != _global_shape(value):
                raise UnusableCheckpoint(f"{path}: optimizer state {key!r} of shape {tuple(meta.size)} for a "
                                         f"parameter {param} of shape {_global_shape(value)}")


def _stated_params(metadata: Metadata) -> set[str]:
    """The parameters a checkpoint holds optimizer state for (keys `optim.state.<name>.<what>`)."""
    return {key.removeprefix("optim.state.").rsplit(".", 1)[0] for key in metadata.state_dict_metadata
            if key.startswith("optim.state.")}


def _fresh_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of the same kind over the same parameters, whose state the loader may fill
    without touching `optimizer`'s (DCP needs a state dict shaped like the saved one to load into)."""
    return type(optimizer)([{**group, "params": list(group["params"])} for group in optimizer.param_groups])


def load_checkpoint(path: Path, method: nn.Module, optimizer: torch.optim.Optimizer | None,
                    runtime: Runtime) -> dict[str, Any]:
    """Restores a sharded checkpoint into the (sharded or whole) method and optimizer; returns its state.

    A collective. Rank 0 verifies the manifest; every rank then reads `state.pt` and DCP's metadata,
    and loads its part of the shards into fresh tensors before the method or the optimizer is
    touched, so a checkpoint that fails anywhere leaves both as they were on every rank.
    UnusableCheckpoint when the checkpoint is unfinished, corrupt or does not load (the caller tries
    the one before); SelfsupError when its weights do not fit the model or it is of the other format.
    """
    world_size = runtime.world_size

    def verified() -> int:
        manifest = checkpoint.verify(path)
        if manifest["format"] != SHARDED_FORMAT:
            raise SelfsupError(f"{path}: written by `train.parallel=ddp` (model.safetensors); this run has "
                               f"`train.parallel=fsdp`. Resume it with the parallelism it was written with")
        return manifest["step"]

    step = _decide(runtime, verified)

    def read() -> tuple[dict[str, Any], Metadata]:
        try:
            state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        except Exception as err:  # UnpicklingError for anything but tensors and plain values, a bad archive, ...
            raise checkpoint.load_error(path / STATE_FILE, err) from None
        if not isinstance(state, dict) or state.get("step") != step:
            raise UnusableCheckpoint(f"{path / STATE_FILE}: does not hold the step of its manifest ({step})")
        try:
            return state, read_metadata(path)
        except Exception as err:
            raise checkpoint.load_error(path / DCP_METADATA, err) from None

    state, metadata = _decide(runtime, read, everywhere=True)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    live = get_model_state_dict(method)
    target: dict[str, Any] = {"model": {name: torch.empty_like(value) for name, value in live.items()}}
    scratch = _fresh_optimizer(optimizer) if optimizer is not None else None
    if scratch is not None:
        target["optim"] = optim = get_optimizer_state_dict(method, scratch)
        # Parameters that never had a gradient have no state in the checkpoint: they start without one,
        # as they would have in the run that wrote it.
        stated = _stated_params(metadata)
        optim["state"] = {name: entry for name, entry in optim["state"].items() if name in stated}
    _decide(runtime, lambda: _check_fits(path, metadata, live, target.get("optim")))

    try:
        _agree(runtime, _attempt(lambda: load_shards(path, target, world_size))[1])
    except _Failed as failed:
        raise UnusableCheckpoint(f"{path}: cannot be loaded ({str(failed)[:300]})") from None
    set_model_state_dict(method, target["model"])  # every key was checked against the checkpoint above
    if optimizer is not None:  # not strict: parameters without state in the checkpoint (see above) get none
        set_optimizer_state_dict(method, optimizer, target["optim"], options=StateDictOptions(strict=False))
    return state


def _decide(runtime: Runtime, fn: Callable[[], Any], everywhere: bool = False) -> Any:
    """fn() on rank 0 (every rank with `everywhere`), its verdict shared: UnusableCheckpoint or
    SelfsupError raised on every rank alike. Returns fn()'s value (rank 0's, broadcast, unless
    `everywhere`)."""
    value, verdict = None, None
    if everywhere or runtime.is_main:
        try:
            value = fn()
        except UnusableCheckpoint as err:
            verdict = ("unusable", str(err))
        except SelfsupError as err:
            verdict = ("config", str(err))
        except Exception as err:  # an unreadable file, ...: every rank must still reach the collective below
            verdict = ("unusable", f"{type(err).__name__}: {err}")
    if runtime.world_size > 1:
        if everywhere:
            verdicts: list[Any] = [None] * runtime.world_size
            dist.all_gather_object(verdicts, verdict)
            verdict = next((v for v in verdicts if v is not None), None)
        else:
            shared = [(value, verdict)]
            dist.broadcast_object_list(shared, src=0)
            value, verdict = shared[0]
    if verdict is not None:
        kind, message = verdict
        raise (SelfsupError if kind == "config" else UnusableCheckpoint)(message)
    return value


def resume_latest(root: Path, method: nn.Module, optimizer: torch.optim.Optimizer | None,
                  runtime: Runtime) -> tuple[Path, dict[str, Any]] | None:
    """`checkpoint.resume_latest` for sharded checkpoints (a collective): the newest that verifies and
    loads, passing over the others with a warning; None (start from step 0) when none loads."""
    found = [[(step, str(p)) for step, p in checkpoint.list_checkpoints(root)]]
    if runtime.world_size > 1:
        dist.broadcast_object_list(found, src=0)  # rank 0's listing, so that every rank tries the same ones
    for _, name in found[0]:
        path = Path(name)
        try:
            return path, load_checkpoint(path, method, optimizer, runtime)
        except UnusableCheckpoint as err:
            if runtime.is_main:
                log.warning("skipping checkpoint %s: %s", path.name, err)
    if runtime.is_main:
        if found[0]:
            log.warning("no checkpoint in %s could be loaded (%d passed over, see above): starting from step 0",
                        root, len(found[0]))
        else:
            log.info("no checkpoint in %s: starting from step 0", root)
    return None

