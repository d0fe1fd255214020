"""LoRA adapters on an encoder's linear projections (Hu et al. 2021, arXiv:2106.09685).

A frozen projection W (out x in) gets a trainable low-rank update: y = W x + b + (alpha / r) B A x,
with A [r, in] and B [out, r]. B starts at zero, so an encoder with fresh adapters computes exactly
what the pretrained one did and training starts from the pretrained function; only A and B (and the
task head) train, a few percent of the weights. For export the update is folded into W (`merge_lora`),
which leaves a plain encoder of the original architecture and speed.

Why here rather than PEFT: PEFT would pull `accelerate` and `transformers` into the core install
(they are optional extras here, for the Hugging Face export), and it would buy us little: every
projection we adapt is a plain `nn.Linear` (the shared block's `qkv`, `proj`, `mlp.0`, `mlp.2`), so
the wrapper is the ~100 lines below. The trade-off: none of PEFT's other adapters (DoRA, IA3, prompt
tuning, quantised bases) and no PEFT-format adapter files; one of those becomes a reason to add the
`peft` extra. Saving the task head with the adapter, which PEFT users most often trip over
(`modules_to_save`), is the adapt command's job: `lora_state_dict` returns the adapter tensors only,
under their module names, so they sit beside the head's tensors in one safetensors file.

Choices, each as PEFT's defaults: A is initialised Kaiming-uniform (a = sqrt(5), nn.Linear's own
init; the paper says "random Gaussian", which differs only in shape of the distribution), B zeros,
scaling alpha / r, dropout on the adapter's input only (default 0). Adapters take the dtype and
device of the weight they adapt; under bf16 autocast both paths run in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import SelfsupError

DEFAULT_TARGETS = ("qkv", "proj", "mlp.0", "mlp.2")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the low-rank update scale * B A; `merge()` folds it into the weight."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        _check_settings(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> Tensor:
        """The update scale * B A [out, in] in fp32, so merging a bf16 weight rounds once, not twice."""
        with torch.autocast(self.lora_a.device.type, enabled=False):  # merge() inside an autocast region stays fp32
            return self.scaling * (self.lora_b.float() @ self.lora_a.float())

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:  # the update already sits in base.weight (inference / export)
            return out
        # Two thin matmuls (in -> r -> out), never the [out, in] product: cheaper for r << in, out.
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return out + (self.scaling * update).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward then costs one matmul. No-op when merged."""
        if not self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to rounding). No-op when not merged."""
        if self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _check_settings(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SelfsupError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise SelfsupError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SelfsupError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _matches(name: str, target: str) -> bool:
    """Suffix match on whole name components: "proj" matches "attn.proj", not "attn.out_proj"."""
    return name == target or name.endswith("." + target)


def _linear_names(module: nn.Module) -> list[str]:
    """Qualified names of the plain nn.Linear layers, skipping those already inside a LoRALinear."""
    inside = {f"{name}.base" if name else "base" for name, m in module.named_modules() if isinstance(m, LoRALinear)}
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name and name not in inside]


def add_lora(
    module: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every nn.Linear whose qualified name ends with one of `targets` in a LoRALinear, in place,
    and freeze every other parameter of `module`; returns the wrapped names in module order.

    Each target must match at least one layer, so a misspelt target is an error rather than an
    adapter silently missing from every block.
    """
    _check_settings(rank, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise SelfsupError("add_lora needs at least one target suffix, e.g. ('qkv', 'proj', 'mlp.0', 'mlp.2')")
    linears = _linear_names(module)
    if not linears:
        already = [name for name, m in module.named_modules() if isinstance(m, LoRALinear)]
        if already:
            raise SelfsupError(f"{type(module).__name__} already has LoRA adapters on all its linear layers "
                               f"({', '.join(already[:4])}, ...); add_lora once per module")
        kinds = sorted({type(m).__name__ for m in module.modules()
                        if next(m.parameters(recurse=False), None) is not None})
        raise SelfsupError(
            f"{type(module).__name__} has no nn.Linear layers for LoRA to adapt (its weighted layers are "
            f"{', '.join(kinds) or 'none'}; a ResNet's are convolutions, GPT-2's projections are transformers' "
            f"Conv1D); LoRA adapts the attention and MLP projections of transformer encoders such as vit_tiny, "
            f"text_encoder or a BERT-style hf: folder: adapt it with --mode head (frozen encoder + head) or "
            f"--mode finetune instead"
        )
    chosen = [name for name in linears if any(_matches(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unmatched:
        shown = ", ".join(linears[:8]) + (f", ... ({len(linears)} in all)" if len(linears) > 8 else "")
        raise SelfsupError(
            f"LoRA target(s) {', '.join(repr(t) for t in unmatched)} match no nn.Linear of "
            f"{type(module).__name__}; targets are suffixes of layer names, and its linear layers are: {shown}"
        )
    module.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank=rank, alpha=alpha, dropout=dropout))
    return chosen


def _adapters(module: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices, the only encoder weights LoRA trains."""
    return [p for _, m in _adapters(module) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only, as `<layer>.lora_a` / `<layer>.lora_b` (a few percent of the encoder)."""
    state: dict[str, Tensor] = {}
    for name, m in _adapters(module):
        prefix = f"{name}." if name else ""
        state[prefix + "lora_a"] = m.lora_a.detach()
        state[prefix + "lora_b"] = m.lora_b.detach()
    return state


def load_lora(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors into `module`'s adapters (add_lora'd with the same targets and rank).

    Strict: every adapter must be given, nothing else may be, and shapes must agree. Adapters must be
    unmerged, or their merged weights would keep the old update.
    """
    own = lora_state_dict(module)
    if not own:
        raise SelfsupError(f"{type(module).__name__} has no LoRA adapters to load into; call add_lora first")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise SelfsupError(f"the LoRA state does not fit this model's adapters: {'; '.join(parts)}; "
                           f"add_lora must use the targets the adapter was trained with")
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SelfsupError(
                f"LoRA tensor '{key}' has shape {tuple(state[key].shape)} but this model's is {tuple(tensor.shape)}; "
                f"build the adapters with the rank the adapter was trained with (and the same encoder config)"
            )
    merged = [name for name, m in _adapters(module) if m.merged]
    if merged:
        raise SelfsupError(f"cannot load LoRA weights into merged adapters ({', '.join(merged[:3])}); unmerge first")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


def merge_lora(module: nn.Module) -> list[str]:
    """Replace every LoRALinear by its base nn.Linear with the update folded in, in place; returns the names.

    The module then has the original architecture and state-dict names again (what export and
    `build_encoder` expect). The merged weights stay frozen as the base weights were.
    """
    adapters = _adapters(module)
    if any(name == "" for name, _ in adapters):
        raise SelfsupError("merge_lora replaces adapters inside a module; call .merge() on a bare LoRALinear")
    for name, m in adapters:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, m.base)
    return [name for name, _ in adapters]


__all__ = ["DEFAULT_TARGETS", "LoRALinear", "add_lora", "load_lora", "lora_parameters", "lora_state_dict",
           "merge_lora"]
