"""BERT masking statistics and the loss on selected positions only (Devlin et al. 2018, sec. 3.1)."""

import torch
import torch.nn.functional as F

from selfsup.encoders import build_encoder
from selfsup.methods.mlm import MLM, Config, mask_tokens

V = 50


def test_masking_statistics_on_a_large_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (256, 128), generator=gen)
    cfg = Config()
    corrupted, selected = mask_tokens(ids, cfg, V, torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(cfg.special_ids))
    assert not selected[special].any(), "special tokens are never selected"
    eligible = (~special).sum().item()
    frac = selected.sum().item() / eligible
    assert abs(frac - 0.15) < 0.005
    sel_orig, sel_new = ids[selected], corrupted[selected]
    masked = (sel_new == cfg.mask_id).float().mean().item()
    unchanged = (sel_new == sel_orig).float().mean().item()
    assert abs(masked - 0.8) < 0.01
    # 10 % left as is, plus random draws that happen to hit the original token (1 / 45 of 10 %).
    assert abs(unchanged - (0.1 + 0.1 / (V - 5))) < 0.01
    assert not torch.isin(sel_new[(sel_new != cfg.mask_id) & (sel_new != sel_orig)], torch.tensor(cfg.special_ids)).any()
    assert torch.equal(corrupted[~selected], ids[~selected]), "unselected tokens are untouched"


def test_masking_is_reproducible_from_the_generator():
    ids = torch.randint(5, V, (4, 32), generator=torch.Generator().manual_seed(0))
    a = mask_tokens(ids, Config(), V, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, Config(), V, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_loss_is_cross_entropy_on_selected_positions_only():
    torch.manual_seed(0)
    encoder = build_encoder("text_encoder", vocab_size=V, max_len=32, dim=32, depth=2, heads=2)
    method = MLM(Config(mask_prob=0.3), encoder)
    ids = torch.randint(5, V, (3, 32), generator=torch.Generator().manual_seed(0))
    out = method({"input_ids": ids, "generator": torch.Generator().manual_seed(3)}, 0.0)
    corrupted, selected = mask_tokens(ids, method.cfg, V, torch.Generator().manual_seed(3))
    logits = encoder.lm_head(encoder(corrupted))  # all positions, the naive way
    expected = F.cross_entropy(logits[selected], ids[selected])
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert encoder.token_embed.weight.grad.abs().sum() > 0
