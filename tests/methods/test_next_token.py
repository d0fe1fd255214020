"""GPT next-token loss: shifted targets, no loss across documents or on padding."""

import torch
import torch.nn.functional as F

from selfsup.encoders import build_encoder
from selfsup.methods.next_token import Config, NextToken, next_token_targets

V = 40


def test_targets_are_shifted_and_boundaries_excluded():
    ids = torch.tensor([[10, 11, 12, 20, 21, 0]])
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    targets, valid = next_token_targets(ids, docs, None, ignore_cross_document=True)
    assert targets.tolist() == [[11, 12, 20, 21, 0]]
    assert valid.tolist() == [[True, True, False, True, False]]  # 12 -> 20 crosses documents; 21 -> pad


def test_loss_matches_a_naive_loop():
    torch.manual_seed(0)
    encoder = build_encoder("text_decoder", vocab_size=V, max_len=16, dim=32, depth=2, heads=2)
    method = NextToken(Config(), encoder)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 9 + [1] * 7, [2] * 16])
    out = method({"input_ids": ids, "document_ids": docs}, 0.0)
    logits = encoder.lm_head(encoder(ids))
    terms = [F.cross_entropy(logits[b, t], ids[b, t + 1], reduction="sum")
             for b in range(2) for t in range(15) if docs[b, t] == docs[b, t + 1]]
    torch.testing.assert_close(out["loss"], torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_causal_model_cannot_see_the_target():
    torch.manual_seed(0)
    encoder = build_encoder("text_decoder", vocab_size=V, max_len=8, dim=32, depth=2, heads=2)
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V
    # The prediction for the last token depends only on the tokens before it.
    torch.testing.assert_close(encoder(ids)[:, :-1], encoder(changed)[:, :-1])
