"""Layer-wise learning-rate decay groups: the lr each parameter gets, exactly-once coverage, no-decay rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.adapt.finetune_groups import layerwise_lr_groups
from selfsup.adapt.lora import add_lora
from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError

BASE, DECAY, WD = 1e-3, 0.5, 0.05


def tiny_vit(depth: int = 3) -> nn.Module:
    return build_encoder("vit_tiny", in_channels=3, image_size=8, dim=16, depth=depth, heads=2, mlp_ratio=2.0)


def by_name(groups: list[dict]) -> dict[str, tuple[float, float]]:
    """{name: (lr, weight_decay)}; fails if a name shows up in two groups."""
    seen: dict[str, tuple[float, float]] = {}
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        assert group["lr"] == pytest.approx(BASE * group["lr_scale"])
        for name in group["param_names"]:
            assert name not in seen, f"{name} in two groups"
            seen[name] = (group["lr"], group["weight_decay"])
    return seen


def assert_exactly_once(groups: list[dict], *modules: nn.Module) -> None:
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for m in modules for p in m.parameters()}


def test_vit_lr_per_parameter() -> None:
    depth = 3
    encoder, head = tiny_vit(depth), nn.Linear(16, 4)
    got = by_name(layerwise_lr_groups(encoder, BASE, DECAY, WD, head_params=head))
    # Written out from the convention (BEiT): layer i gets BASE * DECAY ** (depth + 1 - i).
    expected_lr = {
        "cls_token": BASE * 0.5**4, "mask_token": BASE * 0.5**4, "pos_embed": BASE * 0.5**4,
        "patch_embed.weight": BASE * 0.5**4, "patch_embed.bias": BASE * 0.5**4,
        "norm.weight": BASE, "norm.bias": BASE, "head.weight": BASE, "head.bias": BASE,
    }
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.0", "mlp.2"):
            for kind in ("weight", "bias"):
                expected_lr[f"blocks.{i}.{part}.{kind}"] = BASE * 0.5 ** (depth - i)
    assert set(got) == set(expected_lr)
    for name, lr in expected_lr.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name
    decayed = {name for name, (_, wd) in got.items() if wd == WD}
    assert {name for name, (_, wd) in got.items() if wd not in (0.0, WD)} == set()
    assert decayed == {"patch_embed.weight", "head.weight"} | {
        f"blocks.{i}.{part}.weight" for i in range(depth) for part in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    }  # norms, biases and the 1-d/token parameters are not decayed


def test_every_parameter_exactly_once_and_adamw_takes_the_groups() -> None:
    encoder, head = tiny_vit(), nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 4))
    groups = layerwise_lr_groups(encoder, BASE, DECAY, WD, head_params=head)
    assert_exactly_once(groups, encoder, head)
    optimizer = torch.optim.AdamW(groups, lr=123.0)  # the default lr must not override a group's
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([BASE * 0.5**k for k in (4, 3, 2, 1, 0)])
    loss = head(encoder.embed(torch.randn(2, 3, 8, 8))).square().mean()
    loss.backward()
    optimizer.step()  # runs with the extra keys (layer, lr_scale, param_names) in the groups


def test_head_as_parameters_and_overlap_error() -> None:
    encoder, head = tiny_vit(), nn.Linear(16, 4)
    got = by_name(layerwise_lr_groups(encoder, BASE, DECAY, WD, head_params=list(head.parameters())))
    assert got["head.0"] == (BASE, WD) and got["head.1"] == (BASE, 0.0)  # weight decays, bias doesn't
    with pytest.raises(SelfsupError, match="appears twice"):
        layerwise_lr_groups(encoder, BASE, DECAY, WD, head_params=[encoder.norm.weight])


def test_text_encoder_layers() -> None:
    encoder = build_encoder("text_encoder", vocab_size=50, max_len=12, dim=16, depth=2, heads=2, mlp_ratio=2.0)
    got = by_name(layerwise_lr_groups(encoder, BASE, DECAY, WD))
    for name in ("token_embed.weight", "pos_embed.weight", "embed_norm.weight", "embed_norm.bias"):
        assert got[name][0] == pytest.approx(BASE * 0.5**3), name
    assert got["blocks.0.attn.qkv.weight"][0] == pytest.approx(BASE * 0.5**2)
    assert got["blocks.1.mlp.2.bias"][0] == pytest.approx(BASE * 0.5)
    for name in ("norm.weight", "lm_transform.0.weight", "lm_bias"):
        assert got[name][0] == pytest.approx(BASE), name
    assert got["token_embed.weight"][1] == WD and got["lm_bias"][1] == 0.0
    assert_exactly_once(layerwise_lr_groups(encoder, BASE, DECAY, WD), encoder)


def test_resnet_stages() -> None:
    encoder = build_encoder("resnet10", in_channels=3, image_size=8, width=4)  # 4 stages of one block
    groups = layerwise_lr_groups(encoder, BASE, DECAY, WD)
    assert_exactly_once(groups, encoder)
    got = by_name(groups)
    for name, (lr, wd) in got.items():
        top, _, rest = name.partition(".")
        layer = 0 if top == "stem" else int(rest.partition(".")[0]) + 1
        assert lr == pytest.approx(BASE * 0.5 ** (5 - layer)), name
        is_conv = encoder.get_parameter(name).ndim == 4
        assert wd == (WD if is_conv else 0.0), name  # BatchNorm scales and shifts are not decayed
    assert got["stem.0.weight"][0] == pytest.approx(BASE / 32)
    assert got["stages.3.0.conv1.weight"][0] == pytest.approx(BASE / 2)


def test_frozen_parameters_are_left_out() -> None:
    encoder = tiny_vit(depth=2)
    add_lora(encoder, rank=2)
    got = by_name(layerwise_lr_groups(encoder, BASE, DECAY, WD))
    assert set(got) == {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert got["blocks.0.attn.qkv.lora_a"][0] == pytest.approx(BASE * 0.5**2)


def test_bad_arguments() -> None:
    with pytest.raises(SelfsupError, match=r"decay must be in \(0, 1\]"):
        layerwise_lr_groups(tiny_vit(), BASE, 0.0, WD)
    with pytest.raises(SelfsupError, match="learning rate"):
        layerwise_lr_groups(tiny_vit(), -1.0, DECAY, WD)
    with pytest.raises(SelfsupError, match="blocks, stages"):
        layerwise_lr_groups(nn.Linear(3, 3), BASE, DECAY, WD)


def test_an_encoder_of_unknown_layout_fine_tunes_with_decay_one() -> None:
    """Decay 1 puts every layer at base_lr, so the layout is not needed (leverage's from-scratch side);
    with another decay the error names the flag that exists."""
    linear = nn.Linear(3, 3)
    got = by_name(layerwise_lr_groups(linear, BASE, 1.0, WD))
    assert set(got) == {"weight", "bias"} and all(lr == pytest.approx(BASE) for lr, _ in got.values())
    with pytest.raises(SelfsupError, match="--layer-decay 1"):
        layerwise_lr_groups(linear, BASE, DECAY, WD)


def _hf(kind: str, **extra) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from selfsup.encoders.hf import HFAudioEncoder, HFTextEncoder

    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if kind == "bert":
        return HFTextEncoder(transformers.BertModel(transformers.BertConfig(vocab_size=40, **small)))
    if kind == "gpt2":
        return HFTextEncoder(transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)))
    # two conv layers and two transformer layers: the stack is the heavier list of two
    config = transformers.Wav2Vec2Config(conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2, **small, **extra)
    return HFAudioEncoder(transformers.Wav2Vec2Model(config))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "wav2vec2", "wav2vec2-stable"])
def test_hugging_face_encoders_layers(kind: str) -> None:
    """Issue 17: transformers encoders (the hf: wrappers) get layer-wise learning rates: embeddings
    (or a speech model's feature encoder) lowest, block i at decay ** (depth - i), the final norm at base_lr."""
    encoder = _hf(kind.partition("-")[0], **({"do_stable_layer_norm": True} if kind.endswith("stable") else {}))
    groups = layerwise_lr_groups(encoder, BASE, DECAY, WD, head_params=nn.Linear(16, 3))
    got = by_name(groups)
    assert set(got) == {n for n, _ in encoder.named_parameters()} | {"head.weight", "head.bias"}
    lowest, block0, block1, top = BASE * 0.5**3, BASE * 0.5**2, BASE * 0.5, BASE
    expect = {
        "bert": {"model.embeddings.word_embeddings.weight": lowest, "model.encoder.layer.0.attention.self.query.weight": block0,
                 "model.encoder.layer.1.output.LayerNorm.bias": block1},
        "gpt2": {"model.wte.weight": lowest, "model.wpe.weight": lowest, "model.h.0.attn.c_attn.weight": block0,
                 "model.h.1.mlp.c_proj.bias": block1, "model.ln_f.weight": top},
        "wav2vec2": {"model.feature_extractor.conv_layers.0.conv.weight": lowest, "model.masked_spec_embed": lowest,
                     "model.feature_projection.projection.weight": lowest, "model.encoder.layer_norm.weight": lowest,
                     "model.encoder.layers.0.attention.q_proj.weight": block0,
                     "model.encoder.layers.1.feed_forward.output_dense.weight": block1},
        "wav2vec2-stable": {"model.feature_extractor.conv_layers.1.conv.weight": lowest,
                            "model.encoder.layers.0.attention.q_proj.weight": block0, "model.encoder.layer_norm.weight": top},
    }[kind]
    for name, lr in expect.items():
        assert got[name][0] == pytest.approx(lr), name
    assert got["head.weight"][0] == pytest.approx(BASE)
