"""AdamW parameter groups with layer-wise learning-rate decay, for fine-tuning a whole encoder.

Layers near the input hold the most general features, which a few labels should move least; so the
learning rate falls geometrically from the head down to the embeddings. The convention is BEiT's
(Bao et al. 2021, arXiv:2106.08254, fine-tuning recipe; from ELECTRA, Clark et al. 2020,
arXiv:2003.10555, appendix "layer-wise learning-rate decay"): with `depth` blocks,

    layer 0            embeddings: patch/token/position embeddings, [CLS]/mask tokens, embed_norm,
                       a ResNet's stem
    layer 1..depth     transformer block i-1 (`blocks.{i-1}`), or ResNet stage i-1 (`stages.{i-1}`)
    layer depth + 1    the final norm and everything else the encoder holds (e.g. a text encoder's
                       unused MLM head)

and layer i trains at base_lr * decay ** (depth + 1 - i): the final norm and the task head at base_lr,
the embeddings at base_lr * decay ** (depth + 1). An encoder whose embedding part has another name
(a new front-end) adds it to EMBEDDING_NAMES; until then it would train at base_lr. An encoder laid
out otherwise says itself: a method `lr_layers() -> ({parameter name: layer id}, depth)` (the Hugging
Face wrappers in `encoders/hf.py` find transformers' stack of layers). With decay 1 every layer
trains at base_lr, so an encoder whose layers are unknown is fine-tuned then too.

Weight decay follows `selfsup.train.optim.param_groups` (its groups are reused, not re-derived), so
norms, biases, 1-d parameters and embedding tokens are not decayed. Frozen parameters are left out,
as there.

Each group carries `lr_scale` (its lr / base_lr) beside `lr`: a schedule must set
`group["lr"] = schedule_lr * group["lr_scale"]`, as BEiT's loop does; setting every group to one lr
would undo the decay.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from selfsup.errors import SelfsupError
from selfsup.train.optim import param_groups

# Top-level attributes of an encoder that form its layer 0 (ViT, TextTransformer, ResNet names).
EMBEDDING_NAMES = ("patch_embed", "cls_token", "mask_token", "pos_embed", "token_embed", "embed_norm", "stem")
# The attribute holding the encoder's stack of layers, in the order they are looked for.
STACK_NAMES = ("blocks", "stages")


def encoder_layers(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id} for every parameter, depth): ids 0..depth + 1 as in the module docstring."""
    own = getattr(encoder, "lr_layers", None)
    if callable(own):  # an encoder that knows its own layout (a Hugging Face model)
        return own()
    stack_name = next((name for name in STACK_NAMES if isinstance(getattr(encoder, name, None), nn.Module)), None)
    if stack_name is None:
        raise SelfsupError(
            f"layer-wise learning rates need to know {type(encoder).__name__}'s layers: it has none of the "
            f"attributes {', '.join(STACK_NAMES)} (a ViT's or text transformer's blocks, a ResNet's stages) and "
            f"no lr_layers(); fine-tune it with one learning rate (--layer-decay 1)"
        )
    depth = len(getattr(encoder, stack_name))
    layers: dict[str, int] = {}
    for name, _ in encoder.named_parameters():
        top, _, rest = name.partition(".")
        if top in EMBEDDING_NAMES:
            layers[name] = 0
        elif top == stack_name:
            layers[name] = int(rest.partition(".")[0]) + 1
        else:
            layers[name] = depth + 1
    return layers, depth


def layerwise_lr_groups(
    encoder: nn.Module, base_lr: float, decay: float, weight_decay: float,
    head_params: nn.Module | Iterable[nn.Parameter] = (),
) -> list[dict]:
    """AdamW parameter groups: one per (layer, decayed or not), then the head's at base_lr.

    `head_params`: the task head (a module, or its parameters), trained at the full base_lr; as a
    plain iterable its 1-d parameters (biases, norm scales) get no weight decay. Every trainable
    parameter lands in exactly one group; groups hold `param_names` (the encoder's names, `head.*`
    for the head), `lr`, `lr_scale`, `weight_decay` and `layer` (depth + 2 for the head).
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or base_lr <= 0:
        raise SelfsupError(f"the fine-tuning learning rate must be a positive number, got {base_lr!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise SelfsupError(f"the layer-wise learning-rate decay must be in (0, 1] (1 = no decay), got {decay!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise SelfsupError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if decay == 1 and not _knows_layers(encoder):
        # Every layer trains at base_lr anyway: the layout is not needed (leverage's from-scratch side).
        layers, depth = {name: 0 for name, _ in encoder.named_parameters()}, -1
    else:
        layers, depth = encoder_layers(encoder)
    no_decay = {id(p) for p in param_groups(encoder, weight_decay)[1]["params"]}

    # (layer, decays) -> (names, params), filled in the encoder's parameter order.
    buckets: dict[tuple[int, bool], tuple[list[str], list[nn.Parameter]]] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        names, params = buckets.setdefault((layers[name], id(param) not in no_decay), ([], []))
        names.append(name)
        params.append(param)

    groups = []
    for (layer, decays), (names, params) in sorted(buckets.items(), key=lambda item: (item[0][0], not item[0][1])):
        scale = decay ** (depth + 1 - layer)
        groups.append({"params": params, "param_names": names, "lr": base_lr * scale, "lr_scale": scale,
                       "weight_decay": weight_decay if decays else 0.0, "layer": layer})
    groups += _head_groups(head_params, base_lr, weight_decay, depth + 2)

    seen: set[int] = set()
    for group in groups:
        for name, param in zip(group["param_names"], group["params"]):
            if id(param) in seen:
                raise SelfsupError(f"parameter '{name}' appears twice: the head's parameters must not include "
                                   f"the encoder's (pass the head module, or only its parameters)")
            seen.add(id(param))
    return groups


def _knows_layers(encoder: nn.Module) -> bool:
    return callable(getattr(encoder, "lr_layers", None)) or any(
        isinstance(getattr(encoder, name, None), nn.Module) for name in STACK_NAMES)


def _head_groups(head: nn.Module | Iterable[nn.Parameter], base_lr: float, weight_decay: float,
                 layer: int) -> list[dict]:
    """The head's decayed and undecayed groups at the full base_lr (empty groups left out)."""
    if isinstance(head, nn.Module):
        split = param_groups(head, weight_decay)
        decayed, undecayed = {id(p) for p in split[0]["params"]}, {id(p) for p in split[1]["params"]}
        named = [(f"head.{name}", p) for name, p in head.named_parameters() if id(p) in decayed | undecayed]
        decays = {id(p): id(p) in decayed for _, p in named}
    else:
        named = [(f"head.{i}", p) for i, p in enumerate(head) if p.requires_grad]
        decays = {id(p): p.ndim > 1 for _, p in named}
    groups = []
    for want in (True, False):
        chosen = [(name, p) for name, p in named if decays[id(p)] == want]
        if chosen:
            groups.append({"params": [p for _, p in chosen], "param_names": [name for name, _ in chosen],
                           "lr": base_lr, "lr_scale": 1.0, "weight_decay": weight_decay if want else 0.0,
                           "layer": layer})
    return groups


__all__ = ["EMBEDDING_NAMES", "STACK_NAMES", "encoder_layers", "layerwise_lr_groups"]
