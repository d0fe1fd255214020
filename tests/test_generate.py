"""Sampling from a next-token model: greedy parity with a naive loop, seeding, top-k, banned ids, eos,
the context window, input checks and the text round trip.

Tiny decoders (vocab 64, max_len 16, dim 32, depth 2) and "Markov" models whose forward and lm_head
are replaced so the next-token logits are a fixed function of the last token, which makes the
sampling rules checkable exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from selfsup.data.tokenizer import train_tokenizer
from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.generate import SamplingConfig, generate_text, sample_tokens

VOCAB, MAX_LEN = 64, 16
TINY = {"vocab_size": VOCAB, "max_len": MAX_LEN, "dim": 32, "depth": 2, "heads": 2}
GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0)


def decoder(seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder("text_decoder", **{**TINY, **extra})


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def markov(monkeypatch: pytest.MonkeyPatch, table: Tensor) -> tuple[nn.Module, list[Tensor]]:
    """A decoder whose next-token logits are table[last token] ([VOCAB, VOCAB]); also returns the
    list of every context it was run on."""
    model = decoder()
    contexts: list[Tensor] = []

    def forward(input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        contexts.append(input_ids.clone())
        return input_ids[..., None].float()  # [B, L, 1]: the "hidden state" is the token id

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "lm_head", lambda hidden: table[hidden[..., 0].long()])
    return model, contexts


def naive_greedy(model: nn.Module, prompt: list[int], num_new: int, banned: list[int] = ()) -> list[int]:
    """Argmax of the full forward's last logits, one token at a time, on the last max_len tokens."""
    ids = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(num_new):
            context = torch.tensor([ids[-model.max_len:]])
            logits = model.lm_head(model(context))[0, -1]
            logits[list(banned)] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# -- greedy and seeding ---------------------------------------------------------------------------


def test_greedy_matches_a_naive_loop():
    model = decoder()
    prompt = [3, 14, 15, 9, 2]
    expected = naive_greedy(model, prompt, GREEDY.max_new_tokens)
    assert sample_tokens(model, prompt, GREEDY, gen(0)) == [expected]
    # Batched continuations of one prompt are all the greedy one, whatever the seed.
    assert sample_tokens(model, prompt, GREEDY, gen(1), num_samples=3) == [expected] * 3
    # Banned ids are masked before the argmax too.
    banned = [expected[0], expected[1]]
    assert sample_tokens(model, prompt, GREEDY, gen(0), banned_ids=banned) == [
        naive_greedy(model, prompt, GREEDY.max_new_tokens, banned)]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = decoder()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=None)
    first = sample_tokens(model, [1, 2, 3], cfg, gen(0), num_samples=2)
    assert first == sample_tokens(model, [1, 2, 3], cfg, gen(0), num_samples=2)
    assert first != sample_tokens(model, [1, 2, 3], cfg, gen(1), num_samples=2)
    assert first[0] != first[1]  # the batched samples are independent draws
    assert all(len(ids) == 12 and all(0 <= i < VOCAB for i in ids) for ids in first)


def test_top_k_one_is_greedy():
    model = decoder()
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=1)
    assert sample_tokens(model, [5, 6], cfg, gen(7), num_samples=2) == [naive_greedy(model, [5, 6], 10)] * 2


def test_eval_mode_during_sampling_and_restored(monkeypatch):
    model = decoder()
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    sample_tokens(model, [1], SamplingConfig(max_new_tokens=3), gen(0))
    assert modes == [False] * 3 and model.training
    model.eval()
    sample_tokens(model, [1], SamplingConfig(max_new_tokens=1), gen(0))
    assert not model.training


# -- top-k, banned ids, eos -----------------------------------------------------------------------


def test_sampling_keeps_to_the_top_k_and_never_produces_banned_ids(monkeypatch):
    # Every step draws from the same logits, descending in the token id; at temperature 5 the
    # softmax is nearly flat, so a draw outside the top k would show up over 2,000 draws.
    logits = torch.linspace(3.0, 0.0, VOCAB)
    model, _ = markov(monkeypatch, logits.expand(VOCAB, VOCAB))
    cfg = SamplingConfig(max_new_tokens=20, temperature=5.0, top_k=4)
    drawn = {i for ids in sample_tokens(model, [0], cfg, gen(0), num_samples=100) for i in ids}
    assert drawn == {0, 1, 2, 3}
    # Banning the two most likely ids moves the top 4 down by two.
    drawn = {i for ids in sample_tokens(model, [0], cfg, gen(0), num_samples=100, banned_ids={0, 1}) for i in ids}
    assert drawn == {2, 3, 4, 5}
    # Without top-k every id can come up; the banned ones still never do.
    cfg = SamplingConfig(max_new_tokens=20, temperature=100.0, top_k=None)
    drawn = {i for ids in sample_tokens(model, [0], cfg, gen(0), num_samples=100, banned_ids={0, 7}) for i in ids}
    assert drawn == set(range(VOCAB)) - {0, 7}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(monkeypatch, temperature):
    # Two live tokens whose logits differ by 1: token 0 comes up with probability sigmoid(1 / T).
    table = torch.full((VOCAB, VOCAB), -1e4)
    table[:, 0], table[:, 1] = 1.0, 0.0
    model, _ = markov(monkeypatch, table)
    cfg = SamplingConfig(max_new_tokens=20, temperature=temperature, top_k=None)
    draws = torch.tensor(sample_tokens(model, [0], cfg, gen(0), num_samples=200))  # [200, 20]
    expected = torch.sigmoid(torch.tensor(1.0 / temperature))
    # 4,000 draws: the standard error is under 0.008; the three temperatures are >= 0.1 apart.
    assert abs((draws == 0).float().mean() - expected) < 0.03


def test_an_overwhelming_banned_token_is_never_produced(monkeypatch):
    table = torch.zeros(VOCAB, VOCAB)
    table[:, 9] = 1e4  # token 9 would win every draw
    model, _ = markov(monkeypatch, table)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=None)
    samples = sample_tokens(model, [0], cfg, gen(0), num_samples=20, banned_ids=[9])
    assert all(len(ids) == 10 and 9 not in ids for ids in samples)
    assert all(ids == [9] * 10 for ids in sample_tokens(model, [0], cfg, gen(0), num_samples=3))


def test_eos_stops_its_sequence_only_and_is_excluded(monkeypatch):
    eos = 1
    table = torch.full((VOCAB, VOCAB), -1e4)
    table[0, [2, 3]] = 0.0  # from the prompt: 2 or 3, evenly
    table[2, eos] = 0.0  # after 2: eos
    table[3, 4] = table[4, 4] = 0.0  # after 3: 4 forever
    model, contexts = markov(monkeypatch, table)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=None)
    samples = sample_tokens(model, [0], cfg, gen(0), num_samples=32, eos_id=eos)
    assert set(map(tuple, samples)) == {(2,), (3, 4, 4, 4, 4, 4)}
    # Finished rows leave the batch; the model is not run once every row is finished.
    num_long = sum(len(ids) == 6 for ids in samples)
    assert [len(c) for c in contexts] == [32, 32] + [num_long] * 4
    # stop_at_eos=False keeps eos as an ordinary token.
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    table[0, 3] = -1e4
    table[eos, 2] = 0.0
    assert sample_tokens(model, [0], cfg, gen(0), eos_id=eos) == [[2, eos, 2]]


def test_empty_prompt_starts_from_eos(monkeypatch):
    table = torch.full((VOCAB, VOCAB), -1e4)
    table[1, 5] = 0.0
    table[5, 6] = table[6, 6] = 0.0
    model, contexts = markov(monkeypatch, table)
    assert sample_tokens(model, [], GREEDY, gen(0), eos_id=1) == [[5] + [6] * 9]
    assert contexts[0].tolist() == [[1]]
    with pytest.raises(SelfsupError, match="empty prompt needs an eos id"):
        sample_tokens(model, [], GREEDY, gen(0))


# -- context window -------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_context_window_is_the_last_max_len_tokens(positions):
    model = decoder(positions=positions)
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    prompt = [(7 * i) % VOCAB for i in range(40)]  # 2.5 x max_len
    samples = sample_tokens(model, prompt, GREEDY, gen(0))
    assert lengths == [MAX_LEN] * GREEDY.max_new_tokens
    assert samples == [naive_greedy(model, prompt, GREEDY.max_new_tokens)]
    # A short prompt's context grows up to the window and then slides.
    lengths.clear()
    sample_tokens(model, [1, 2], SamplingConfig(max_new_tokens=20, temperature=0.0), gen(0))
    assert lengths == [min(2 + step, MAX_LEN) for step in range(20)]


# -- input checks ---------------------------------------------------------------------------------


def test_a_bidirectional_encoder_is_refused():
    torch.manual_seed(0)
    model = build_encoder("text_encoder", **TINY)
    with pytest.raises(SelfsupError, match=r"needs a next_token \(causal\) model.*bidirectional \(mlm\)"):
        sample_tokens(model, [1, 2], SamplingConfig(), gen(0))
    with pytest.raises(SelfsupError, match="does not predict tokens"):
        sample_tokens(nn.Linear(2, 2), [1, 2], SamplingConfig(), gen(0))


@pytest.mark.parametrize("key, value, message", [
    ("temperature", -0.5, "'temperature' must be a finite number >= 0"),
    ("temperature", float("nan"), "'temperature' must be a finite number >= 0"),
    ("top_k", 0, "'top_k' must be a positive integer"),
    ("top_k", 2.5, "'top_k' must be a positive integer"),
    ("max_new_tokens", 0, "'max_new_tokens' must be a positive integer"),
])
def test_bad_sampling_settings_are_refused(key, value, message):
    with pytest.raises(SelfsupError, match=message):
        SamplingConfig(**{key: value})
    cfg = SamplingConfig()
    setattr(cfg, key, value)  # changed after construction: sample_tokens checks again
    with pytest.raises(SelfsupError, match=message):
        sample_tokens(decoder(), [1], cfg, gen(0))


def test_bad_ids_are_refused():
    model = decoder()
    with pytest.raises(SelfsupError, match=r"prompt token ids \[64, -1\] are outside .* \[0, 64\)"):
        sample_tokens(model, [1, 64, -1, 64], GREEDY, gen(0))
    with pytest.raises(SelfsupError, match="banned token ids"):
        sample_tokens(model, [1], GREEDY, gen(0), banned_ids=[100])
    with pytest.raises(SelfsupError, match="eos id 64"):
        sample_tokens(model, [1], GREEDY, gen(0), eos_id=64)
    with pytest.raises(SelfsupError, match="every one of the 64 token ids is banned"):
        sample_tokens(model, [1], GREEDY, gen(0), banned_ids=range(VOCAB))
    with pytest.raises(SelfsupError, match="'num_samples' must be a positive integer"):
        sample_tokens(model, [1], GREEDY, gen(0), num_samples=0)


# -- text -----------------------------------------------------------------------------------------

TEXTS = [f"the {animal} jumps over the {thing} number {i}." for i in range(40)
         for animal, thing in [("fox", "dog"), ("cat", "fence")]]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(TEXTS, "bpe", vocab_size=300)


def test_generate_text_round_trip(bpe):
    torch.manual_seed(0)
    model = build_encoder("text_decoder", vocab_size=bpe.vocab_size, max_len=MAX_LEN, dim=32, depth=2, heads=2)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20)
    texts = generate_text(model, bpe, "the fox", cfg, seed=3, num_samples=2)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert texts == generate_text(model, bpe, "the fox", cfg, seed=3, num_samples=2)
    # Each text is the decoding of the sampled ids, which never include a special token.
    prompt_ids = bpe.encode_batch(["the fox"])[0]
    banned = bpe.special_ids - {bpe.eos_id}
    ids = sample_tokens(model, prompt_ids, cfg, gen(3), num_samples=2, eos_id=bpe.eos_id, banned_ids=banned)
    assert texts == [bpe.decode(i) for i in ids]
    assert not any(set(i) & bpe.special_ids for i in ids)
    # An unconditional sample (empty prompt) works too.
    assert isinstance(generate_text(model, bpe, "", cfg)[0], str)


def test_generate_text_needs_a_bpe_tokenizer_of_the_models_size(bpe):
    model = build_encoder("text_decoder", vocab_size=bpe.vocab_size - 1, max_len=MAX_LEN, dim=32, depth=2, heads=2)
    with pytest.raises(SelfsupError, match="tokenizer.json saved with the model's run"):
        generate_text(model, bpe, "the fox", GREEDY)
    wordpiece = train_tokenizer(TEXTS, "wordpiece", vocab_size=100)
    model = build_encoder("text_decoder", vocab_size=wordpiece.vocab_size, max_len=MAX_LEN, dim=32, depth=2, heads=2)
    with pytest.raises(SelfsupError, match="needs the byte-level BPE tokenizer"):
        generate_text(model, wordpiece, "the fox", GREEDY)
