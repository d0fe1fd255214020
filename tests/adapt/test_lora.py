"""LoRA adapters: fresh adapters are the identity, merged == unmerged, only adapters train, state round-trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfsup.adapt.lora import LoRALinear, add_lora, load_lora, lora_parameters, lora_state_dict, merge_lora
from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError

DEPTH = 2


def tiny_vit() -> nn.Module:
    return build_encoder("vit_tiny", in_channels=3, image_size=8, dim=16, depth=DEPTH, heads=2, mlp_ratio=2.0)


def tiny_text() -> nn.Module:
    # text_encoder preset: embed_norm and lm_transform on, so it has a Linear (lm_transform.0) LoRA must skip.
    return build_encoder("text_encoder", vocab_size=50, max_len=12, dim=16, depth=DEPTH, heads=2, mlp_ratio=2.0)


def inputs_for(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "vit":
        return torch.randn(3, 3, 8, 8, generator=gen)
    return torch.randint(0, 50, (3, 12), generator=gen)


BUILD = {"vit": tiny_vit, "text": tiny_text}


def randomise_b(module: nn.Module, seed: int = 2) -> None:
    """Non-zero B everywhere, large enough to move outputs well beyond the tolerances tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_fresh_adapters_leave_outputs_unchanged(kind: str) -> None:
    torch.manual_seed(0)
    encoder = BUILD[kind]().eval()
    x = inputs_for(kind)
    before = encoder(x)
    add_lora(encoder)
    after = encoder(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # Not vacuous: A is random (Kaiming-uniform) and B receives a gradient, so the adapters can learn.
    adapters = [m for m in encoder.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 4 * DEPTH
    assert all(float(m.lora_a.detach().abs().sum()) > 0 and float(m.lora_b.detach().abs().sum()) == 0 for m in adapters)
    after.square().mean().backward()
    assert all(m.lora_b.grad is not None and float(m.lora_b.grad.abs().sum()) > 0 for m in adapters)


def test_forward_matches_the_paper_formula() -> None:
    """h = W x + b + (alpha / r) B A x (Hu et al. 2021, eq. 3), computed naively in float64."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=12.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.lora_a, layer.lora_b))
    expected = x.double() @ W.T + b + (12.0 / 3) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in), as nn.Linear and PEFT.
    assert float(layer.lora_a.detach().abs().max()) <= 6 ** -0.5


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_merged_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    torch.manual_seed(0)
    encoder = BUILD[kind]().eval()
    x = inputs_for(kind)
    plain = encoder(x)
    add_lora(encoder)
    randomise_b(encoder)
    base_weights = {n: p.clone() for n, p in encoder.named_parameters() if n.endswith("base.weight")}
    unmerged = encoder(x)
    assert (unmerged - plain).abs().max() > 1e-2  # the adapters change the function, so the checks below can fail

    adapters = [m for m in encoder.modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.merge()
        m.merge()  # a second merge must not add the update twice
    assert all(m.merged for m in adapters)
    torch.testing.assert_close(encoder(x), unmerged, rtol=0, atol=1e-5)

    for m in adapters:
        m.unmerge()
    assert not any(m.merged for m in adapters)
    for name, p in encoder.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder(x), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_merge_lora_gives_the_plain_architecture(kind: str) -> None:
    torch.manual_seed(0)
    encoder = BUILD[kind]().eval()
    x = inputs_for(kind)
    add_lora(encoder)
    randomise_b(encoder)
    unmerged = encoder(x)
    merged_names = merge_lora(encoder)
    assert len(merged_names) == 4 * DEPTH
    assert not any(isinstance(m, LoRALinear) for m in encoder.modules())
    assert all(type(encoder.get_submodule(name)) is nn.Linear for name in merged_names)
    torch.testing.assert_close(encoder(x), unmerged, rtol=0, atol=1e-5)
    # The merged encoder's weights load into a freshly built one (what export and build_encoder need).
    fresh = BUILD[kind]().eval()
    assert set(fresh.state_dict()) == set(encoder.state_dict())
    fresh.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(fresh(x), unmerged, rtol=0, atol=1e-5)


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit().eval()
    add_lora(encoder)
    randomise_b(encoder)
    x = inputs_for("vit")
    reference = encoder(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(x)  # fp32: the final LayerNorm runs in fp32 under autocast
        out.square().mean().backward()
        projected = encoder.blocks[0].attn.qkv(torch.randn(2, 5, 16))
    assert projected.dtype == torch.bfloat16  # both the base and the adapter path ran in bf16
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.1)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(encoder))
    # Merging inside an autocast region still folds the update in fp32.
    layer = encoder.blocks[0].attn.qkv
    expected = layer.base.weight + layer.delta_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
    torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-7)


def test_only_adapters_and_head_train() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit()
    add_lora(encoder, dropout=0.1)
    head = nn.Linear(encoder.dim, 3)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n in lora_state_dict(encoder)}
    frozen_before = {n: p.clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    adapters_before = {n: t.clone() for n, t in lora_state_dict(encoder).items()}
    head_before = {n: p.clone() for n, p in head.named_parameters()}
    # Every parameter goes to AdamW, with weight decay: requires_grad=False alone must keep the base still.
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-2, weight_decay=0.1)
    x, y = inputs_for("vit"), torch.tensor([0, 1, 2])
    for _ in range(3):
        loss = nn.functional.cross_entropy(head(encoder.embed(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in encoder.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    for name, t in lora_state_dict(encoder).items():
        assert not torch.equal(t, adapters_before[name]), name
    for name, p in head.named_parameters():
        assert not torch.equal(p, head_before[name]), name


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    pretrained = tiny_vit().state_dict()
    encoder = tiny_vit().eval()
    encoder.load_state_dict(pretrained)
    add_lora(encoder, rank=4)
    randomise_b(encoder)
    x = inputs_for("vit")
    expected = encoder(x)

    state = lora_state_dict(encoder)
    assert len(state) == 2 * 4 * DEPTH
    assert all(key.endswith((".lora_a", ".lora_b")) for key in state)
    assert state["blocks.0.attn.qkv.lora_a"].shape == (4, 16) and state["blocks.0.attn.qkv.lora_b"].shape == (48, 4)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    loaded = load_file(str(tmp_path / "adapter.safetensors"))

    fresh = tiny_vit().eval()
    fresh.load_state_dict(pretrained)
    add_lora(fresh, rank=4)
    assert not torch.allclose(fresh(x), expected, atol=1e-3)
    load_lora(fresh, loaded)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-6)


def test_load_lora_is_strict() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit()
    add_lora(encoder, rank=4)
    state = lora_state_dict(encoder)

    wrong_rank = tiny_vit()
    add_lora(wrong_rank, rank=8)
    with pytest.raises(SelfsupError, match=r"blocks\.0\.attn\.qkv\.lora_a.*shape \(4, 16\).*\(8, 16\).*rank"):
        load_lora(wrong_rank, state)

    fewer_targets = tiny_vit()
    add_lora(fewer_targets, targets=("qkv",), rank=4)
    with pytest.raises(SelfsupError, match="unexpected 12"):
        load_lora(fewer_targets, state)

    same = tiny_vit()
    add_lora(same, rank=4)
    with pytest.raises(SelfsupError, match=r"missing 1 \(e\.g\. blocks\.1\.mlp\.2\.lora_b\)"):
        load_lora(same, {k: v for k, v in state.items() if k != "blocks.1.mlp.2.lora_b"})
    same.blocks[0].attn.qkv.merge()
    with pytest.raises(SelfsupError, match="unmerge first"):
        load_lora(same, state)
    with pytest.raises(SelfsupError, match="call add_lora first"):
        load_lora(tiny_vit(), state)


def test_targets_match_name_suffixes() -> None:
    encoder = tiny_vit()
    replaced = add_lora(encoder)
    parts = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    assert replaced == [f"blocks.{i}.{part}" for i in range(DEPTH) for part in parts]

    only_proj = add_lora(tiny_vit(), targets=("proj",))
    assert only_proj == [f"blocks.{i}.attn.proj" for i in range(DEPTH)]
    assert add_lora(tiny_vit(), targets="attn.qkv") == [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]

    # Whole name components: "proj" is not a suffix of "out_proj".
    layers = nn.ModuleDict({"attn": nn.ModuleDict({"proj": nn.Linear(2, 2), "out_proj": nn.Linear(2, 2)})})
    assert add_lora(layers, targets=("proj",)) == ["attn.proj"]

    text = tiny_text()
    assert "lm_transform.0" not in add_lora(text)  # the MLM head is no target: classification never uses it
    assert type(text.lm_transform[0]) is nn.Linear


def test_add_lora_errors_say_what_to_do() -> None:
    resnet = build_encoder("resnet10", in_channels=3, image_size=8, width=4)
    with pytest.raises(SelfsupError, match=r"no nn\.Linear.*ResNet.*--mode head.*--mode finetune"):
        add_lora(resnet)
    with pytest.raises(SelfsupError, match=r"'qvk' match no nn\.Linear.*blocks\.0\.attn\.qkv"):
        add_lora(tiny_vit(), targets=("qkv", "qvk"))
    encoder = tiny_vit()
    add_lora(encoder)
    with pytest.raises(SelfsupError, match="already has LoRA adapters"):
        add_lora(encoder)
    with pytest.raises(SelfsupError, match="rank"):
        add_lora(tiny_vit(), rank=0)
    with pytest.raises(SelfsupError, match="dropout"):
        add_lora(tiny_vit(), dropout=1.0)
