"""Each objective's forward on its shard of a global batch, 2 gloo ranks (run by test_ddp_methods.py
under torchrun), and the same code in one process on the whole batch (imported by the test).

`run_family(name, rank, world)` builds the method (same seed everywhere), the global batch, and takes
this rank's rows; the randomness of the objective (masks, distractors, Gumbel noise) is drawn once
for the global batch and each rank reads its rows of it, because the loop seeds each rank's
generator apart (`train/loop.step_generator`): what is compared is the cross-rank arithmetic, not
which tokens a rank masks. The masks are uneven on purpose (ranks hide different numbers of
tokens / patches / frames), which is where a plain average of per-rank means goes wrong.

Gradients are averaged over the ranks as DDP does (all_reduce / world).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import Tensor, nn

FAMILIES = ("mae", "beit", "colorize", "mlm", "next_token", "wav2vec2", "hubert")
B = 8  # the global batch
S, P = 16, 4  # image size, ViT patch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vit() -> nn.Module:
    from selfsup.encoders import build_encoder

    return build_encoder("vit_tiny", in_channels=3, image_size=S, dim=32, depth=1, heads=2)


def tiny_audio() -> nn.Module:
    from selfsup.encoders import build_encoder

    return build_encoder("wav2vec2_tiny", conv_channels=32, dim=32, depth=2, heads=2, pos_conv_kernel=8, pos_conv_groups=4)


def uneven_mask(valid: Tensor, seed: int, min_count: int = 1) -> Tensor:
    """bool like `valid` [B, L]: row b masks each valid position with probability 0.2 + 0.5 * b / B
    (so the later rows, rank 1's, mask more), at least `min_count` per row."""
    rows, _ = valid.shape
    prob = 0.2 + 0.5 * torch.arange(rows).float().unsqueeze(1) / rows
    mask = (torch.rand(valid.shape, generator=gen(seed)) < prob) & valid
    for b in range(rows):
        real = valid[b].nonzero().flatten()
        mask[b, real[:min_count]] = True
    return mask


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _images(seed: int) -> Tensor:
    return torch.randn(B, 3, S, S, generator=gen(seed))


def family(name: str, rows: slice) -> tuple[nn.Module, dict, list, int]:
    """(method in train mode, this rank's batch, patches to hold during forward, this rank's count)."""
    import selfsup.methods.beit as beit_module
    import selfsup.methods.hubert as hubert_module
    import selfsup.methods.mae as mae_module
    import selfsup.methods.mlm as mlm_module
    import selfsup.methods.wav2vec2 as w2v_module
    from selfsup.methods import build_method
    from selfsup.nn.masking import random_mask

    torch.manual_seed(0)
    if name == "mae":
        method = build_method({"name": "mae", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}, tiny_vit())
        mask = random_mask(B, (S // P) ** 2, 0.75, gen(1))
        return (method, {"views": [_images(2)[rows]], "generator": gen(3)},
                [(mae_module, "random_mask", lambda *a: mask[rows])], int(mask[rows].sum()))
    if name == "beit":
        method = build_method({"name": "beit", "num_tokens": 16}, tiny_vit())
        mask = uneven_mask(torch.ones(B, (S // P) ** 2, dtype=torch.bool), 1)
        targets = torch.randint(16, (B, (S // P) ** 2), generator=gen(4))
        method.tokenizer.assign = lambda patches: targets[rows]
        return (method, {"views": [_images(2)[rows]], "generator": gen(3)},
                [(beit_module, "blockwise_mask", lambda *a, **k: mask[rows])], int(mask[rows].sum()))
    if name == "colorize":
        from selfsup.encoders import build_encoder

        method = build_method({"name": "colorize", "decoder_dim": 16},
                              build_encoder("resnet10", in_channels=3, image_size=S, width=8))
        method.weights.copy_(torch.rand(method.weights.shape, generator=gen(5)) + 0.5)  # a rebalancing to weigh by
        # Batch statistics are per rank without SyncBatchNorm (GPU only): hold the running ones here.
        for module in method.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        mean, std = torch.tensor([0.5, 0.45, 0.4]), torch.tensor([0.25, 0.25, 0.3])
        return (method, {"views": [_images(2)[rows].clamp(-1.8, 1.8)], "pixel_mean": mean, "pixel_std": std,
                         "generator": gen(3)}, [], 0)
    if name == "mlm":
        from selfsup.encoders import build_encoder

        V = 64
        method = build_method({"name": "mlm"}, build_encoder("text_encoder", vocab_size=V, max_len=16, dim=32, depth=1, heads=2))
        ids = torch.randint(5, V, (B, 16), generator=gen(1))
        lengths = torch.tensor([16, 9, 12, 16, 16, 14, 11, 16])
        real = torch.arange(16) < lengths.unsqueeze(1)
        ids = ids.masked_fill(~real, 0)  # [PAD]
        selected = uneven_mask(real, 2)
        corrupted = torch.where(selected, torch.full_like(ids, 4), ids)
        return (method, {"input_ids": ids[rows], "attention_mask": real[rows], "generator": gen(3)},
                [(mlm_module, "mask_tokens", lambda *a: (corrupted[rows], selected[rows]))], int(selected[rows].sum()))
    if name == "next_token":
        from selfsup.encoders import build_encoder

        method = build_method({"name": "next_token"}, build_encoder("text_decoder", vocab_size=64, max_len=16, dim=32,
                                                                     depth=1, heads=2))
        ids = torch.randint(0, 64, (B, 16), generator=gen(1))
        # Rank 0's blocks hold several documents and padding (-1), rank 1's one document each.
        docs = torch.tensor([[0] * 5 + [1] * 6 + [2] * 5, [3] * 3 + [4] * 9 + [-1] * 4, [5] * 8 + [6] * 8,
                             [7] * 2 + [8] * 2 + [9] * 12] + [[10 + b] * 16 for b in range(4)])
        valid = (docs[:, 1:] >= 0) & (docs[:, 1:] == docs[:, :-1])
        return method, {"input_ids": ids[rows], "document_ids": docs[rows], "generator": gen(3)}, [], int(valid[rows].sum())
    if name in ("wav2vec2", "hubert"):
        encoder = tiny_audio()
        T = 4000
        lengths = torch.tensor([4000, 2600, 3300, 1800, 4000, 4000, 3700, 4000])  # rank 0's clips are shorter
        audio = torch.randn(B, T, generator=gen(1)) * (torch.arange(T) < lengths.unsqueeze(1))
        frames = encoder.frame_lengths(lengths)
        frame_mask = torch.arange(int(frames.max())) < frames.unsqueeze(1)
        mask = uneven_mask(frame_mask, 2, min_count=2)
        batch = {"audio": audio[rows], "lengths": lengths[rows], "generator": gen(3)}
        if name == "wav2vec2":
            method = build_method({"name": "wav2vec2", "num_distractors": 3, "feature_penalty": 1.0,
                                   "codebook_entries": 8, "code_dim": 16, "proj_dim": 16}, encoder)
            patches = [(w2v_module, "span_mask", lambda *a, **k: mask[rows]),
                       (w2v_module, "sample_distractors", next_slots),
                       (torch, "rand", lambda shape, **k: torch.full(tuple(shape), 0.5))]  # the Gumbel noise
            return method, batch, patches, int(mask[rows].sum())
        method = build_method({"name": "hubert", "num_clusters": 8, "proj_dim": 16, "unmasked_weight": 0.5,
                               "feature_penalty": 1.0}, encoder)
        targets = torch.randint(8, frame_mask.shape, generator=gen(4)).masked_fill(~frame_mask, -1)
        method.assign_targets = lambda audio, lengths, frame_mask: targets[rows]
        return method, batch, [(hubert_module, "span_mask", lambda *a, **k: mask[rows])], int(mask[rows].sum())
    raise ValueError(name)


def next_slots(counts: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """A deterministic stand-in for `sample_distractors`: slot i of utterance b takes the next
    min(num, counts[b] - 1) slots after it, cyclically; -1 elsewhere."""
    M = int(counts.max())
    K = max(min(num, M - 1), 0)
    i = torch.arange(M).view(1, M, 1)
    k = torch.arange(K).view(1, 1, K)
    c = counts.view(-1, 1, 1)
    slots = (i + 1 + k) % c.clamp(min=1)
    keep = (k < c - 1) & (i < c)
    return torch.where(keep, slots, torch.full_like(slots, -1))


def run_family(name: str, rank: int, world: int) -> dict:
    """This rank's loss and logged values, its count, and the gradients averaged over ranks."""
    rows = slice(rank * B // world, (rank + 1) * B // world)
    method, batch, patches, count = family(name, rows)  # in training mode, as built
    with contextlib.ExitStack() as stack:
        for obj, attr, value in patches:
            stack.enter_context(patched(obj, attr, value))
        out = method(batch, 0.3)
    out["loss"].backward()
    grads = {}
    for n, p in method.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if world > 1:
            g = g.clone()
            torch.distributed.all_reduce(g)
            g /= world
        grads[n] = g
    return {"out": {k: v.detach().float() for k, v in out.items()}, "grads": grads, "count": count}


def main(out_path: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for name in names:
        results[name] = run_family(name, rank, world)
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(FAMILIES))
