"""`selfsup adapt` / `selfsup predict`: a pretrained encoder turned into a classifier with few labels.

Three modes, the usual ladder of cost and capacity:
- `head`: the encoder is frozen, so its features are computed once and a linear (or one-hidden-
  layer MLP) head is trained on them — seconds even on a CPU. The linear head is `selfsup probe`'s
  linear probe (`adapt/probes.py`): logistic regression on standardised features, solved to
  convergence on every label of the budget, its L2 strength C chosen by 3-fold cross-validation on
  those labels (C=1 when a class has fewer than 3). Early stopping on a validation tenth of a few
  labels stopped heads short of the probe on the same labels: 38 % vs 44 % when 25 labels
  validated, the validation loss rising after two epochs of an over-confident head;
- `lora`: low-rank adapters on the encoder's attention and MLP projections (`adapt/lora.py`) plus
  the head; the base weights stay frozen;
- `finetune`: every weight, with layer-wise learning-rate decay (`adapt/finetune_groups.py`).
The MLP head, `lora` and `finetune` train with plain supervised cross-entropy, AdamW and a cosine
schedule, validated every epoch on a held-out part of the labelled training rows; the weights of
the best validation epoch are kept and training stops after `patience` epochs without improvement.

The splits are the pretraining run's: the same `data.holdout_fraction` and seed give the same
test rows, which pretraining never saw. The label budget (a fraction or k per class) is then drawn
from the training rows (`adapt/sampling.py`: stratified, seeded, nested: the probe's labels at the
same fraction and seed), and, except for the linear head, a tenth of those (at least one per class)
validate. A text document is cut into blocks of the base's `seq_len`
tokens (pretraining's block length) and its feature is the mean of the embeddings of its first
`text_chunks` blocks (4, as `selfsup probe`: a man page's first block is little more than its
header); images are prepared as `encoder.json` says. Bases are resolved in `adapt/bases.py`.

A task run directory holds `task.safetensors` (the whole classifier, LoRA merged in, so it loads
with no adapter code), `adapter.safetensors` for `lora` runs (only the adapter and head tensors —
the head is saved *with* the adapter), `task.json` (how to rebuild and feed it) and `metrics.json`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.adapt.sampling import k_shot, stratified_fraction
from selfsup.data.split import holdout_mask
from selfsup.train.progress import format_duration
from selfsup.errors import SelfsupError
from selfsup.modalities.base import EncoderBatch, TaskInputs
from selfsup.train.optim import param_groups
from selfsup.train.runtime import Runtime

log = logging.getLogger("selfsup")

_MIN_EPOCH_STEPS = 20  # at least this many optimizer steps per epoch (several passes over few labels)
TASK_WEIGHTS, ADAPTER_WEIGHTS, TASK_META, METRICS = "task.safetensors", "adapter.safetensors", "task.json", "metrics.json"


@dataclass
class AdaptConfig:
    mode: Literal["head", "lora", "finetune"] = "head"
    head: Literal["linear", "mlp"] = "linear"  # mlp = one hidden layer of the encoder's width, GELU
    label_fraction: float = 1.0  # of the training rows' labels (stratified); ignored when k_shot is set
    k_shot: int | None = None  # examples per class instead of a fraction
    # epochs, patience, batch_size, lr, weight_decay: the gradient-trained modes (mlp head, lora, finetune)
    epochs: int = 50  # at most this many epochs (an epoch is at least 20 steps: a few labels are passed over several times)
    patience: int = 5  # stop after this many epochs without a lower validation loss
    batch_size: int = 64
    lr: float | None = None  # None = 1e-3 for head, 5e-4 for lora, 1e-4 for finetune
    weight_decay: float = 1e-4
    layer_decay: float = 0.75  # finetune: each layer below the top gets this factor more of the lr
    lora_rank: int = 8
    lora_alpha: float = 16.0
    val_fraction: float = 0.1  # of the labelled training rows, for early stopping
    text_chunks: int = 4  # text: a document is the mean of its first this many blocks
    max_iter: int = 1000  # linear head: L-BFGS iterations of its logistic regression (as probe.max_iter)
    seed: int = 0

    def validate(self) -> None:
        """Errors a user can act on, before any data is read."""
        if not 0 < self.label_fraction <= 1:
            raise SelfsupError(f"label fraction must be in (0, 1], got {self.label_fraction}")
        if self.k_shot is not None and self.k_shot < 2:
            raise SelfsupError(f"k-shot must be at least 2 (one example per class also has to validate), got {self.k_shot}")
        for key in ("epochs", "patience", "batch_size", "lora_rank", "text_chunks", "max_iter"):
            if getattr(self, key) < 1:
                raise SelfsupError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.lr is not None and self.lr <= 0:
            raise SelfsupError(f"lr must be positive, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise SelfsupError(f"layer decay must be in (0, 1], got {self.layer_decay}")

    def fits_probe(self) -> bool:
        """The linear head on frozen features: fitted as the linear probe is, on every budget label."""
        return self.mode == "head" and self.head == "linear"

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else {"head": 1e-3, "lora": 5e-4, "finetune": 1e-4}[self.mode]


# ---------------------------------------------------------------------------------------------
# The model


class FeatureNorm(nn.Module):
    """Standardises frozen features with the training features' statistics (buffers, saved with the
    head; `head` mode only — identity otherwise). MAE's linear probe does the same with an
    affine-free BatchNorm: a pretrained encoder's features can sit on any scale, and an unnormalised
    head would then need its own learning rate per encoder."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, features: Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class TaskModel(nn.Module):
    """encoder.embed -> standardise -> head; `forward(*inputs)` gives class logits [B, num_classes]."""

    def __init__(self, encoder: nn.Module, num_classes: int, head: str):
        super().__init__()
        self.encoder = encoder
        D = encoder.dim
        self.norm = FeatureNorm(D)
        self.head = nn.Linear(D, num_classes) if head == "linear" else nn.Sequential(
            nn.Linear(D, D), nn.GELU(), nn.Linear(D, num_classes))

    def classify(self, features: Tensor) -> Tensor:
        # In float32 under any autocast: the head is tiny, and bf16 logits would round a fitted head's.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(self.norm(features.float()))

    def pool(self, batch: EncoderBatch) -> Tensor:
        """Features [B, D] of a `TaskInputs.batch` (the modality's reader says how an item is embedded:
        a whole image, or the mean of a document's blocks)."""
        return batch.embed(self.encoder)

    def forward(self, batch: EncoderBatch) -> Tensor:
        return self.classify(self.pool(batch))


def build_task_model(encoder: nn.Module, num_classes: int, cfg: AdaptConfig) -> TaskModel:
    """The classifier for `cfg.mode`: LoRA adapters are added (and the base frozen) for `lora`."""
    if cfg.mode == "lora":
        from selfsup.adapt.lora import DEFAULT_TARGETS, add_lora

        targets = getattr(encoder, "lora_targets", DEFAULT_TARGETS)  # Hugging Face bases name theirs
        replaced = add_lora(encoder, targets=targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        log.info("LoRA rank %d on %d projections", cfg.lora_rank, len(replaced))
    return TaskModel(encoder, num_classes, cfg.head)


# ---------------------------------------------------------------------------------------------
# Splits and training


def budget_rows(labels: Tensor, cfg: AdaptConfig) -> Tensor:
    """The label budget among the labelled training rows (sorted): `selfsup probe`'s rows at the same
    fraction and seed."""
    if cfg.k_shot is not None:
        chosen = k_shot(labels, cfg.k_shot, cfg.seed)
    else:
        chosen = stratified_fraction(labels, cfg.label_fraction, cfg.seed)
    return torch.from_numpy(np.asarray(chosen)).long()


def label_budget(labels: Tensor, cfg: AdaptConfig) -> tuple[Tensor, Tensor]:
    """(train rows, validation rows) among the labelled training rows: the budget, then a tenth for validation."""
    chosen = budget_rows(labels, cfg)
    is_val = holdout_mask(labels[chosen], len(chosen), cfg.val_fraction, cfg.seed + 1)
    return chosen[~is_val], chosen[is_val]


@torch.no_grad()
def _batched(fn: Callable[..., Tensor], inputs: TaskInputs, runtime: Runtime) -> Tensor:
    """fn(batch) over every row in batches, as float32 on the CPU."""
    out = []
    for start in range(0, len(inputs), inputs.batch_size):
        index = torch.arange(start, min(start + inputs.batch_size, len(inputs)))
        with runtime.autocast():
            out.append(fn(inputs.batch(index, runtime.device)).float().cpu())
    return torch.cat(out)


def _features(model: TaskModel, inputs: TaskInputs, runtime: Runtime) -> Tensor:
    model.encoder.eval()
    return _batched(model.pool, inputs, runtime)


def predict_logits(model: TaskModel, inputs: TaskInputs, runtime: Runtime) -> Tensor:
    return _batched(model.eval(), inputs, runtime)


def test_metrics(predicted: Tensor, labels: Tensor) -> dict[str, float]:
    """{"test_acc", "test_balanced_acc", "test_macro_f1"} of class predictions [N] against labels [N].

    Balanced accuracy (the mean recall over the classes present) and macro-F1 (over classes present
    in labels or predictions) matter on imbalanced tasks, where predicting the majority class alone
    scores a high accuracy (56 % on the man-page sections) while knowing nothing.
    """
    num_classes = int(max(predicted.max(), labels.max())) + 1
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)
    true_pos = confusion.diag().double()
    support, guessed = confusion.sum(dim=1).double(), confusion.sum(dim=0).double()
    present = support > 0
    seen = present | (guessed > 0)
    f1 = 2 * true_pos / (support + guessed).clamp_min(1)
    return {"test_acc": float(true_pos.sum() / len(labels)),
            "test_balanced_acc": float((true_pos[present] / support[present]).mean()),
            "test_macro_f1": float(f1[seen].mean())}


def features_and_logits(model: TaskModel, inputs: TaskInputs, runtime: Runtime) -> tuple[Tensor, Tensor]:
    """(pooled encoder features [N, D], class logits [N, C]) in one pass: what evaluation audits."""
    model.eval()

    def both(batch: EncoderBatch) -> Tensor:
        features = model.pool(batch)
        return torch.cat([features.float(), model.classify(features).float()], dim=1)

    out = _batched(both, inputs, runtime)
    return out[:, : model.encoder.dim], out[:, model.encoder.dim :]


def fit_linear_head(model: TaskModel, train: TaskInputs, train_y: Tensor, cfg: AdaptConfig,
                    runtime: Runtime) -> list[dict[str, float | None]]:
    """The linear head fitted as `selfsup probe`'s linear probe on the frozen features of every budget
    label (module docstring); returns a one-row history: the training loss, and the cross-validated
    loss and accuracy at the chosen C (None when a class had too few labels to cross-validate)."""
    from selfsup.adapt.probes import fit_linear_probe

    model.to(runtime.device)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    x = _features(model, train, runtime)  # float32 [N, D] on the CPU
    fit = fit_linear_probe(x.numpy(), train_y.numpy(), cfg.seed, max_iter=cfg.max_iter, knob="--max-iter")
    coef, intercept = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (fit.model.coef_, fit.model.intercept_))
    classes = torch.from_numpy(fit.model.classes_).long()
    weight = torch.zeros(model.head.out_features, model.encoder.dim, dtype=torch.float64)
    # A class the budget lacks can never be predicted (the probe's fit knows only the classes it saw).
    bias = torch.full((model.head.out_features,), -1e4, dtype=torch.float64)
    if coef.shape[0] == 1:  # two classes: scikit-learn's one row is the second class's logit against 0
        weight[classes[1]], bias[classes[1]], bias[classes[0]] = coef[0], float(intercept[0]), 0.0
    else:
        weight[classes], bias[classes] = coef, intercept
    with torch.no_grad():
        model.norm.mean.copy_(torch.as_tensor(fit.scaler.mean_))
        model.norm.std.copy_(torch.as_tensor(fit.scaler.scale_))
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
        train_loss = float(F.cross_entropy(model.classify(x.to(runtime.device)).float().cpu(), train_y))
    log.info("adapt (head): linear head fitted as the linear probe on %d labels, C=%g%s", len(train_y), fit.c,
             "" if fit.cv_accuracy is None else f" (3-fold cross-validated accuracy {fit.cv_accuracy:.4f})")
    return [{"epoch": 1, "train_loss": train_loss, "val_loss": fit.cv_loss, "val_acc": fit.cv_accuracy, "C": fit.c}]


def train_task(model: TaskModel, train: TaskInputs, train_y: Tensor, val: TaskInputs, val_y: Tensor, cfg: AdaptConfig,
               runtime: Runtime) -> list[dict[str, float]]:
    """Trains in place, keeps the best validation epoch's weights; returns the per-epoch history
    (`fit_linear_head` fits the linear head of `head` mode instead)."""
    torch.manual_seed(cfg.seed)
    lr = cfg.resolved_lr()
    frozen_features = cfg.mode == "head"
    model.to(runtime.device)
    if frozen_features:  # the encoder never changes: embed once, train the head on the features
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        train_x, val_x = _features(model, train, runtime), _features(model, val, runtime)
        # Fixed statistics suit frozen features only: a trained encoder would move away from them.
        model.norm.fit(train_x.to(runtime.device))
        groups = param_groups(model.head, cfg.weight_decay)
    elif cfg.mode == "lora":
        groups = param_groups(model, cfg.weight_decay)  # add_lora froze the base: only adapters and head train
    else:
        from selfsup.adapt.finetune_groups import layerwise_lr_groups

        groups = layerwise_lr_groups(model.encoder, lr, cfg.layer_decay, cfg.weight_decay,
                                     head_params=list(model.head.parameters()))
    for group in groups:
        group.setdefault("lr", lr)
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    # With a few dozen labels one pass is one or two steps, so "epochs" of single passes would let early
    # stopping judge (and the epoch cap end) a model that has barely trained: 30 epochs of 180 MNIST
    # labels were 90 steps, and a from-scratch ResNet stayed near chance, which inflated the leverage.
    # An epoch is therefore at least _MIN_EPOCH_STEPS steps, of repeated passes, in every mode.
    # Fewer labels than a batch: a batch is every label once, not labels repeated within one step.
    batch_size = min(cfg.batch_size, len(train_y))
    passes = max(1, math.ceil(_MIN_EPOCH_STEPS * batch_size / len(train_y)))
    steps_per_epoch = max(1, math.ceil(passes * len(train_y) / batch_size))
    total = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, history, step = math.inf, None, 0, [], 0
    began = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if frozen_features:
            model.encoder.eval()
        order = torch.cat([torch.randperm(len(train_y), generator=generator) for _ in range(passes)])
        losses = []
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            with runtime.autocast():
                logits = (model.classify(train_x[index].to(runtime.device)) if frozen_features
                          else model(train.batch(index, runtime.device)))
            loss = F.cross_entropy(logits.float(), train_y[index].to(runtime.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        if frozen_features:
            with torch.no_grad():
                val_logits = model.classify(val_x.to(runtime.device)).float().cpu()
        else:
            val_logits = predict_logits(model, val, runtime)
        val_acc = float((val_logits.argmax(1) == val_y).float().mean())
        val_loss = float(F.cross_entropy(val_logits.float(), val_y))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_acc": val_acc})
        if epoch == 1 and cfg.epochs > 1:
            took = time.perf_counter() - began
            log.info("adapt (%s): epoch 1 of at most %d took %s: up to %s more (early stopping usually ends it sooner)",
                     cfg.mode, cfg.epochs, format_duration(took), format_duration(took * (cfg.epochs - 1)))
        # The validation loss, not its accuracy, picks the epoch: with tens of validation labels the
        # accuracy moves in steps of several points and plateaus early, so early stopping on it halted
        # heads after 2-3 epochs, 10 points short of their converged test accuracy (next_token base on
        # the man pages: 71 % vs 82 %). The loss moves with every logit.
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best_epoch >= cfg.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    best = history[best_epoch - 1]
    log.info("adapt (%s): best validation loss %.4f (accuracy %.4f) at epoch %d of %d", cfg.mode, best["val_loss"],
             best["val_acc"], best_epoch, len(history))
    return history
