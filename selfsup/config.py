"""Run configuration: a YAML file plus `a.b=c` overrides, validated against typed dataclasses.

Every section is a dataclass whose fields carry their defaults and a one-line comment. The method
and encoder sections are open-ended (their fields depend on `method.name` / `encoder.name`), so
they are validated against the chosen method's / encoder's own `Config` dataclass.

Validation is strict on purpose: an unknown key is an error that names the nearest valid key
(a typo must never silently fall back to a default), and every value is checked for its type;
a float must also be finite (NaN and ±inf pass range checks like `lr <= 0` and fail mid-run).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from selfsup.errors import SelfsupError


@dataclass
class DataConfig:
    modality: str | None = None  # what the source holds: image, text, or a registered modality; None = the method's
    source: str | None = None  # a built-in name (`selfsup data list`), a folder, a manifest (.csv/.jsonl), an .npz (images) or a .txt (text); None = the method's default (mnist, manpages)
    holdout_fraction: float = 0.2  # held out (stratified when labelled) for probes and held-out metrics; never pretrained on
    label_column: str = "label"  # manifest column holding the class label (optional)
    group_columns: list[str] | None = None  # manifest columns holding subgroups; None = "group" when present
    # images
    image_size: int = 32  # images are resized to image_size x image_size once, at load
    channels: int = 3  # 3 = RGB (greyscale sources are replicated), 1 = greyscale
    on_bad_file: Literal["error", "skip"] = "error"  # what an unreadable image or audio file does: stop the run, or be skipped and counted
    max_bad_fraction: float = 0.01  # with on_bad_file=skip, abort when more than this fraction of files is bad
    # sharded sources (a folder written by `selfsup data shard`)
    workers: int = 2  # DataLoader worker processes per rank decoding a shard source; 0 = decode in the training process. 2 keeps one decoding while the other reads, without starving a 2-core machine's training threads
    shuffle_buffer: int = 1000  # items each worker holds and draws from at random (a bigger buffer mixes shards more, costs memory)
    # text
    seq_len: int = 128  # tokens per packed training block (documents are concatenated and cut into blocks)
    document_masks: bool = False  # true = a token attends only to its own document within a block; false = GPT-2/RoBERTa packing (cheaper)
    text_field: str = "text"  # .jsonl key / .csv column holding the document text
    text_unit: Literal["file", "line"] = "file"  # a folder of .txt files: one document per file, or per line
    text_errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8: stop naming file and line, or replace it
    max_line_chars: int = 1_000_000  # a longer line is cut into pieces (never loaded whole)
    # audio
    sample_rate: int = 16000  # clips are decoded, mixed to mono and resampled to this rate (Hz) once, at load
    max_seconds: float = 4.0  # training crops: each clip is cut to at most this long, at a random start
    max_file_seconds: float = 600.0  # a longer file is bad input (checked from its header, before it is read)


@dataclass
class TokenizerConfig:
    path: str | None = None  # a tokenizer.json to use (e.g. from `selfsup tokenizer train`); None = train one on the training split
    vocab_size: int = 8192  # at most this many tokens (special tokens and, for BPE, the 256 bytes included)
    min_frequency: int = 2  # a merge must occur this often in the corpus to enter the vocabulary


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    minutes: float | None = None  # train for about this long instead: a few steps are timed first and `steps` is fixed to fit (written to config.yaml)
    batch_size: int = 256  # samples per optimizer step, over all ranks and accumulation micro-steps
    accum_steps: int = 1  # micro-steps per optimizer step (each sees batch_size / (accum_steps * ranks) samples)
    lr: float = 1e-3  # peak AdamW learning rate, reached after warm-up
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05  # fraction of the steps spent in linear warm-up
    weight_decay: float = 1e-4  # AdamW decoupled decay; never applied to norms and biases
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float | None = 3.0  # clip the global gradient norm to this value; None = no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast where it was measured to help
    device: str = "auto"  # auto = CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    sync_batchnorm: bool = False  # under torchrun on GPUs: BatchNorm statistics over every rank's rows (SyncBatchNorm) instead of each rank's
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp = a whole copy per rank; fsdp = parameters, gradients and optimizer state sharded over the ranks (FSDP2, sharded checkpoints resumable on any number of ranks)
    cpu_gemm: Literal["auto", "torch", "openblas"] = "auto"  # fp32 on the CPU: Linear products on MKL (torch) or OpenBLAS; auto = OpenBLAS on AMD CPUs, where MKL is slow, MKL elsewhere (selfsup/nn/gemm.py)
    threads: int | None = None  # torch intra-op threads; None = leave torch's default
    checkpoint_every: int = 200  # steps between checkpoints (a final one is always written)
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted once a newer one is valid)
    log_every: int = 10  # steps between progress lines (metrics.jsonl gets every step)
    eval_every: int = 0  # steps between held-out evaluations: kNN accuracy (images), loss and perplexity (text); 0 = only at the end
    knn_max_bank: int = 5000  # at most this many labelled training images form the kNN monitor's bank
    eval_max_blocks: int = 128  # at most this many held-out blocks are scored for perplexity (text)
    diagnostics_every: int = 50  # steps between collapse diagnostics (embedding std, effective rank); 0 = never
    tensorboard: bool = False  # also write TensorBoard event files (needs `pip install tensorboard`)


@dataclass
class ProbeConfig:
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # label fractions, stratified
    probes: list[Literal["linear", "knn"]] = field(default_factory=lambda: ["linear", "knn"])  # which probes
    knn_k: int = 20  # neighbours that vote in the kNN probe
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # linear probe: inverse L2 strengths C, one chosen by 3-fold cross-validation on the training labels
    max_iter: int = 1000  # linear probe: L-BFGS iterations per fit; raise it when the probe says it stopped before converging


@dataclass
class RunConfig:
    seed: int = 0  # seeds weights, views, data order and splits
    method: dict[str, Any] = field(default_factory=lambda: {"name": "simclr"})  # name + the method's own knobs
    encoder: dict[str, Any] = field(default_factory=dict)  # name + the encoder's knobs; no name = the method's default encoder
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)  # methods with several towers: per role, e.g. encoders.image.name=vit_tiny
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # text methods only
    views: dict[str, Any] = field(default_factory=dict)  # augmentation knobs (selfsup.data.views.ViewsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# --------------------------------------------------------------------------------------------
# validation


def nearest(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest option, or a list of the options when none is close."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f" (valid: {', '.join(options)})"


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the type hint and returns it coerced (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, value, arg)
            except SelfsupError as err:
                errors.append(str(err))
        raise SelfsupError(errors[0] if len(errors) == 1 else f"`{key}`: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise SelfsupError(f"`{key}` must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SelfsupError(f"`{key}` must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SelfsupError(f"`{key}` must have {len(args)} items, got {value!r}")
            return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        checked = [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise SelfsupError(f"`{key}` must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SelfsupError(f"`{key}` must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SelfsupError(f"`{key}` must be an integer, got {value!r}")
        return value
    if hint is float:
        return _check_float(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise SelfsupError(f"`{key}` must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise SelfsupError(f"`{key}` must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    raise AssertionError(f"unsupported config type {hint} for {key}")


def _check_float(key: str, value: Any) -> float:
    """`value` as a finite float. NaN slips past every range check (`nan <= 0` is false) and ±inf
    past most, then fails deep inside training after the run folder was written, so neither is a
    setting: YAML's `.nan`/`.inf`, an override's `nan`/`inf`/`-inf` and an integer too large for a
    float are all refused here, where every float knob of every section passes."""
    if isinstance(value, str):
        # An override's `nan`/`inf` arrives as a string (YAML spells them `.nan`/`.inf`): say what is
        # wrong with it rather than that it is not a number. Other strings stay errors below.
        try:
            number = float(value)
        except ValueError:
            number = 0.0
        if not math.isfinite(number):
            raise SelfsupError(f"`{key}`: {number} is not a finite number")
        if any(c in value.lower() for c in ".e") and value.strip():
            # YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string; in a config file as on the command
            # line, a user writing `lr: 1e-3` means the number.
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SelfsupError(f"`{key}` must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise SelfsupError(f"`{key}`: {number} is not a finite number")
    return number


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from `values`, checking every key and value; errors name `prefix+key`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise SelfsupError(f"unknown config key `{prefix}{key}`{nearest(key, names)}")
        kwargs[key] = _check_value(prefix + key, value, hints[key])
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML-able values: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is read as YAML (so `[1, 2]`, `null`, `true`)."""
    if "=" not in text:
        raise SelfsupError(f"override `{text}` must look like `section.key=value`, e.g. `train.steps=100`")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise SelfsupError(f"override `{text}` has no key before `=`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads `1e-3` as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return path, value


def _merge(tree: dict[str, Any], other: dict[str, Any]) -> None:
    """Deep-merges `other` into `tree` (mappings merge key by key; anything else replaces)."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SelfsupError(f"`{'.'.join(path)}`: `{part}` is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; errors name the file (and line for syntax errors)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SelfsupError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise SelfsupError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise SelfsupError(f"{path}: a config file must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None) -> RunConfig:
    """The run config from defaults <- `base` <- YAML file <- `a.b=c` overrides, fully validated."""
    # The method section starts from its default name so `method.temperature=0.1` alone works.
    tree: dict[str, Any] = {"method": dict(RunConfig().method)}
    _merge(tree, base or {})
    if path is not None:
        _merge(tree, read_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    _rename_old_keys(tree)
    cfg = from_dict(RunConfig, tree)
    _apply_method_defaults(cfg)
    validate(cfg)
    return cfg


# Keys renamed since runs were first written: (section, old, new). Old run directories keep loading.
_RENAMED = (("train", "knn_every", "eval_every"),)


def _rename_old_keys(tree: dict[str, Any]) -> None:
    for section, old, new in _RENAMED:
        values = tree.get(section)
        if isinstance(values, dict) and old in values:
            if new in values:
                raise SelfsupError(f"`{section}.{old}` is the old name of `{section}.{new}`; give only `{section}.{new}`")
            values[new] = values.pop(old)


def _apply_method_defaults(cfg: RunConfig) -> None:
    """What the method implies unless the user said otherwise: its encoder, its default dataset, and
    its view recipe (BYOL's asymmetric blur, DINO's multi-crop) under the user's `views:` keys."""
    from selfsup.methods import method_spec

    name = cfg.method.get("name")
    if not isinstance(name, str):
        return
    spec = method_spec(name)
    if spec.towers is None:
        cfg.encoder = {"name": spec.encoder, **cfg.encoder}
    else:
        # Unknown roles are kept, so validation names them rather than dropping a typo.
        cfg.encoders = {**cfg.encoders, **{role: {"name": default, **cfg.encoders.get(role, {})}
                                           for role, default in spec.towers.items()}}
    if cfg.data.modality is None:
        cfg.data.modality = spec.modality
    if cfg.data.source is None:
        from selfsup.modalities import get_modality

        cfg.data.source = get_modality(cfg.data.modality, "data.modality").default_source
    if spec.inputs == "views":
        cfg.views = {**spec.views, **cfg.views}


def validate(cfg: RunConfig) -> None:
    """Range checks and the open-ended sections (method, encoder, views), resolved against their registries."""
    # Imported here: the registries import torch, which must not load before the CLI sets threads.
    from selfsup.data.views import ViewsConfig, validate_views_config
    from selfsup.methods import method_config, method_spec
    from selfsup.modalities import MODALITIES, get_modality

    t = cfg.train
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.accum_steps": t.accum_steps,
                "train.checkpoint_every": t.checkpoint_every, "train.keep_last": t.keep_last,
                "train.log_every": t.log_every, "data.image_size": cfg.data.image_size, "probe.knn_k": cfg.probe.knn_k,
                "data.seq_len": cfg.data.seq_len, "data.max_line_chars": cfg.data.max_line_chars,
                "train.eval_max_blocks": t.eval_max_blocks, "tokenizer.min_frequency": cfg.tokenizer.min_frequency,
                "data.sample_rate": cfg.data.sample_rate, "probe.max_iter": cfg.probe.max_iter}
    for key, value in positive.items():
        if value < 1:
            raise SelfsupError(f"`{key}` must be at least 1, got {value}")
    if t.lr <= 0:
        raise SelfsupError(f"`train.lr` must be positive, got {t.lr}")
    if t.minutes is not None and not t.minutes > 0:
        raise SelfsupError(f"`train.minutes` must be positive (or null: train for `train.steps`), got {t.minutes}")
    if t.batch_size % t.accum_steps:
        raise SelfsupError(f"`train.batch_size` ({t.batch_size}) must be divisible by `train.accum_steps` ({t.accum_steps})")
    if not 0 <= t.warmup_fraction < 1:
        raise SelfsupError(f"`train.warmup_fraction` must be in [0, 1), got {t.warmup_fraction}")
    if t.diagnostics_every < 0:
        raise SelfsupError(f"`train.diagnostics_every` must be 0 (never) or positive, got {t.diagnostics_every}")
    if t.eval_every < 0:
        raise SelfsupError(f"`train.eval_every` must be 0 (only at the end) or positive, got {t.eval_every}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise SelfsupError(f"`train.grad_clip` must be positive or null, got {t.grad_clip}")
    if cfg.data.channels not in (1, 3):
        raise SelfsupError(f"`data.channels` must be 1 or 3, got {cfg.data.channels}")
    for key, value in {"data.max_seconds": cfg.data.max_seconds, "data.max_file_seconds": cfg.data.max_file_seconds}.items():
        if not value > 0:
            raise SelfsupError(f"`{key}` must be positive (seconds), got {value}")
    for key, value in {"data.workers": cfg.data.workers, "data.shuffle_buffer": cfg.data.shuffle_buffer}.items():
        if value < 0:
            raise SelfsupError(f"`{key}` must be 0 or more, got {value}")
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise SelfsupError(f"`data.holdout_fraction` must be in [0, 1), got {cfg.data.holdout_fraction}")
    for frac in cfg.probe.fractions:
        if not 0 < frac <= 1:
            raise SelfsupError(f"`probe.fractions` must be in (0, 1], got {frac}")
    if not cfg.probe.c_grid or not all(c > 0 for c in cfg.probe.c_grid):
        raise SelfsupError(f"`probe.c_grid` must list positive numbers (inverse L2 strengths), got {cfg.probe.c_grid}")
    method_config(cfg.method)
    spec = method_spec(cfg.method["name"])
    modality = get_modality(cfg.data.modality, "data.modality")
    if modality.batch_kind != spec.inputs:
        fitting = sorted(n for n, m in MODALITIES.items() if m.batch_kind == spec.inputs)
        raise SelfsupError(f"method `{cfg.method['name']}` trains on {spec.inputs}, which `data.modality={modality.name}` "
                           f"does not make; use one of {', '.join(fitting)}")
    if spec.towers is None:
        if cfg.encoders:
            raise SelfsupError(f"method `{cfg.method['name']}` has one encoder: set it with `encoder.*`, not "
                               f"`encoders.{next(iter(cfg.encoders))}.*`")
        towers = {"encoder": ("encoder", cfg.encoder, modality.name)}
    else:
        if cfg.encoder:
            raise SelfsupError(f"method `{cfg.method['name']}` has towers {', '.join(spec.towers)}: set each with "
                               f"`encoders.<tower>.*` (e.g. `encoders.{next(iter(spec.towers))}.name=...`), not `encoder.*`")
        unknown = set(cfg.encoders) - set(spec.towers)
        if unknown:
            raise SelfsupError(f"`encoders.{sorted(unknown)[0]}`: method `{cfg.method['name']}` has no such tower; "
                               f"its towers are {', '.join(spec.towers)}")
        towers = {role: (f"encoders.{role}", cfg.encoders[role], spec.tower_modalities.get(role, modality.name))
                  for role in spec.towers}
    for role, (key, section, tower_modality) in towers.items():
        _validate_tower(cfg, spec, key, section, tower_modality)
    validate_views_config(from_dict(ViewsConfig, cfg.views, prefix="views."))


def _validate_tower(cfg: RunConfig, spec: Any, key: str, section: dict[str, Any], modality: str) -> None:
    """One tower's encoder section: its knobs, and that it reads the tower's modality and suits the method."""
    from selfsup.encoders import ENCODERS, encoder_config

    encoder_name = _name(section, key)
    encoder_knobs = {k: v for k, v in section.items() if k not in ("name", INIT_KEY)}
    method = cfg.method["name"]
    init = section.get(INIT_KEY)
    if init is not None and (not isinstance(init, str) or not init.strip() or init.startswith(HF_TOWER_PREFIX)):
        raise SelfsupError(f"`{key}.{INIT_KEY}` must name a run, RUN or RUN:TOWER (got {init!r}); for a Hugging "
                           f"Face model use `{key}.name=hf:DIR`")
    if encoder_name.startswith(HF_TOWER_PREFIX):
        _validate_hf_tower(key, encoder_name, encoder_knobs, modality, spec)
        if spec.causal is not None and cfg.data.document_masks:
            raise SelfsupError(f"`{key}.name={encoder_name}` with `data.document_masks=true`: a Hugging Face model "
                               "takes a [batch, tokens] attention mask only; drop data.document_masks")
        return
    if encoder_name in ENCODERS and ENCODERS[encoder_name].modality != modality:
        fitting = sorted(n for n, e in ENCODERS.items() if e.modality == modality)
        raise SelfsupError(f"method `{method}` trains a {modality} encoder, but `{key}.name={encoder_name}` "
                           f"is a {ENCODERS[encoder_name].modality} encoder; use one of {', '.join(fitting)}")
    # The values' types (and finiteness: a NaN mlp_ratio passes `<= 0`) are checked against the
    # encoder Config's hints like every other section, before the encoder's own rules see them;
    # encoder_config then checks the names and those rules.
    if encoder_name in ENCODERS:
        encoder_hints = typing.get_type_hints(ENCODERS[encoder_name].config_type)
        for knob, value in encoder_knobs.items():
            if knob in encoder_hints:
                _check_value(f"{key}.{knob}", value, encoder_hints[knob])
    encoder_cfg = encoder_config(encoder_name, encoder_knobs)
    if spec.vit_only and ENCODERS[encoder_name].module_type.__name__ != "ViT":
        vits = sorted(n for n, e in ENCODERS.items() if e.module_type.__name__ == "ViT")
        raise SelfsupError(f"method `{method}` masks ViT patch tokens; `{key}.name={encoder_name}` is not "
                           f"a ViT: use one of {', '.join(vits)}")
    if spec.causal is not None and getattr(encoder_cfg, "causal", None) != spec.causal:
        need = "causal (each token sees only earlier tokens)" if spec.causal else "bidirectional"
        raise SelfsupError(f"method `{method}` needs a {need} encoder: set `{key}.causal={str(spec.causal).lower()}` "
                           f"or use `{key}.name={spec.encoder}`")


HF_TOWER_PREFIX = "hf:"  # `encoders.ROLE.name=hf:DIR`: a tower that starts from a local Hugging Face model
INIT_KEY = "init"  # `encoder.init=RUN` / `encoders.ROLE.init=RUN:TOWER`: a tower that starts from another run's


def _validate_hf_tower(key: str, name: str, knobs: dict[str, Any], modality: str, spec: Any) -> None:
    """A tower from a Hugging Face folder: it exists, holds what that modality reads, takes no knobs."""
    from selfsup.encoders.hf import hf_reads_audio

    folder = Path(name.removeprefix(HF_TOWER_PREFIX)).expanduser()
    if not (folder / "config.json").is_file():
        what = "is not a transformers model folder: " if folder.is_dir() else "does not exist: "
        raise SelfsupError(f"`{key}.name={name}`: {folder} {what}{folder / 'config.json'} not found; give a local "
                           "folder that transformers' AutoModel loads (config.json, model.safetensors, tokenizer.json)")
    if knobs:
        raise SelfsupError(f"`{key}.{next(iter(knobs))}`: a Hugging Face tower's architecture is its config.json; "
                           f"drop the `{key}.*` knobs")
    reads = "audio" if hf_reads_audio(folder) else "text"
    if reads != modality:
        raise SelfsupError(f"`{key}.name={name}` is a {reads} model, but this tower reads {modality}")
    if spec.causal is not None:
        if spec.towers is not None:
            raise SelfsupError(f"`{key}.name={name}`: this method trains its text tower's own outputs (masked or "
                               "next tokens); a Hugging Face tower of several is for methods that only embed, such as "
                               "CLIP's text tower")
        # MLM / next-token continued from the folder: its architecture must have that language-model head
        from selfsup.encoders.hf import hf_head_problem, lm_head_kind

        problem = hf_head_problem(folder, lm_head_kind(spec.causal))
        if problem is not None:
            from selfsup.methods import METHODS

            other = [n for n, s in METHODS.items() if s.towers is None and s.causal is (not spec.causal)]
            hint = f", or train this folder with method.name={other[0]}" if other else ""
            raise SelfsupError(f"`{key}.name={name}`: {problem}{hint}")
        if not (folder / "tokenizer.json").is_file():
            raise SelfsupError(f"`{key}.name={name}`: {folder / 'tokenizer.json'} not found; continued pretraining "
                               "reads the text with the folder's own tokenizer (a fast tokenizer's tokenizer.json: "
                               "save one with transformers' AutoTokenizer(...).save_pretrained into the folder)")


def _name(section: dict[str, Any], key: str) -> str:
    name = section.get("name")
    if not isinstance(name, str):
        raise SelfsupError(f"`{key}.name` is required, e.g. `{key}.name=...`")
    return name


def dump_config(cfg: RunConfig, every_key: bool = False) -> str:
    """The config as YAML. `every_key` (`pretrain --print-config`) also lists every key the method,
    each encoder and the views take, at its default: the sections otherwise hold only the given keys.
    Keys the run fills from its tokenizer (MLM's mask_id) stay out, so feeding the output back as
    --config changes nothing."""
    tree = to_dict(cfg)
    notes = []
    if every_key:
        notes = _fill_defaults(cfg, tree)
    return yaml.safe_dump(tree, sort_keys=False) + "".join(f"# {note}\n" for note in notes)


def _fill_defaults(cfg: RunConfig, tree: dict[str, Any]) -> list[str]:
    """Fills `tree` (cfg as a dict) with the method's, encoders' and views' default knobs; returns notes."""
    from selfsup.data.views import ViewsConfig
    from selfsup.encoders import ENCODERS, encoder_config
    from selfsup.methods import method_config, method_spec

    spec = method_spec(cfg.method["name"])
    method = to_dict(method_config(cfg.method))
    notes = []
    for key in spec.tokenizer_fields:
        if key not in cfg.method:
            method.pop(key, None)
            notes.append(f"method.{key}: filled from the run's tokenizer unless given")
    tree["method"] = {"name": cfg.method["name"], **method}

    def filled(section: dict[str, Any]) -> dict[str, Any]:
        name = section.get("name")
        if name not in ENCODERS:  # an hf: tower: its architecture is its config.json
            return section
        knobs = {k: v for k, v in section.items() if k not in ("name", INIT_KEY)}
        rest = {k: v for k, v in section.items() if k == INIT_KEY}
        return {"name": name, **to_dict(encoder_config(name, knobs)), **rest}

    if spec.towers is None:
        tree["encoder"] = filled(tree["encoder"])
    else:
        tree["encoders"] = {role: filled(section) for role, section in tree["encoders"].items()}
    if spec.inputs == "views":
        tree["views"] = to_dict(from_dict(ViewsConfig, cfg.views, prefix="views."))
    return notes
