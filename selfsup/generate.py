"""Sampling text from a next-token model (`selfsup generate`): temperature, top-k, greedy.

Each step runs the causal `TextTransformer` on the context, takes the logits at the last position
only, removes banned ids (the pad id and other special tokens that are never content), then either
takes the argmax (temperature 0) or divides by the temperature, keeps the `top_k` most likely ids and
draws one with `torch.multinomial` (top-k sampling: Fan et al. 2018, "Hierarchical Neural Story
Generation"; it cuts the long tail of unlikely tokens that plain sampling keeps stumbling into).
The `num_samples` continuations of one prompt run as one batch; a continuation that produces the
end-of-text id stops (the id itself is not returned) and leaves the batch, the others go on.

Limits:
- No KV cache: every step recomputes the whole context, O(max_len) tokens per new token. The models
  this toolkit trains are small enough (max_len in the hundreds) for that to take well under a
  second per token on a CPU, and it keeps generation to the encoder's plain `forward`.
- The context is a sliding window of the last `encoder.max_len` tokens: learned positions stop
  there, and rotary models, which have no hard limit, never saw longer sequences in training. Text
  beyond the window is forgotten, so long generations may drift or repeat.
- Draws come from `generator`, on the generator's device (a CPU generator even for a GPU model), so
  a seed gives the same text on CPU and GPU as long as the logits agree; across devices they agree
  only up to rounding, which can flip a near-tie.
- An empty prompt starts from the end-of-text id, as GPT-2 samples unconditionally: the model has
  seen it before every document start in packed training.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfsup.errors import SelfsupError

if TYPE_CHECKING:  # the tokenizers library loads only when a tokenizer is passed in
    from selfsup.data.tokenizer import TextTokenizer


@dataclass
class SamplingConfig:
    """How to pick each new token."""

    max_new_tokens: int = 100  # most tokens added to each continuation (fewer when it produces eos)
    temperature: float = 1.0  # divides the logits: below 1 sharper, above 1 flatter; 0 = greedy (argmax)
    top_k: int | None = 50  # keep the k most likely tokens before sampling; None = all
    stop_at_eos: bool = True  # stop a sequence when it produces the eos id

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a SelfsupError naming the bad setting (also called by `sample_tokens`, as fields can change)."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise SelfsupError(f"sampling 'max_new_tokens' must be a positive integer, got {self.max_new_tokens!r}")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not self.temperature >= 0 or self.temperature == float("inf")):
            raise SelfsupError(f"sampling 'temperature' must be a finite number >= 0 (0 = greedy, 1 = the model's "
                               f"own distribution), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise SelfsupError(f"sampling 'top_k' must be a positive integer (1 = greedy) or None to keep every "
                               f"token, got {self.top_k!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise SelfsupError(f"sampling 'stop_at_eos' must be true or false, got {self.stop_at_eos!r}")


def check_generator_model(encoder: nn.Module) -> None:
    """Raise unless `encoder` is a causal text model with an `lm_head` (what `sample_tokens` needs)."""
    cfg = getattr(encoder, "cfg", None)
    if not all(hasattr(encoder, key) for key in ("lm_head", "max_len", "vocab_size")) or not hasattr(cfg, "causal"):
        raise SelfsupError(f"generate needs a next_token (causal) text model; this run's encoder is a "
                           f"{type(encoder).__name__}, which does not predict tokens. Pretrain with "
                           f"method.name=next_token and encoder.name=text_decoder")
    if not cfg.causal:
        raise SelfsupError("generate needs a next_token (causal) model; this run's encoder is bidirectional (mlm), "
                           "which predicts masked tokens from both sides and cannot continue a text. Pretrain with "
                           "method.name=next_token and encoder.name=text_decoder")


@torch.no_grad()
def sample_tokens(
    encoder: nn.Module, prompt_ids: list[int], cfg: SamplingConfig, generator: torch.Generator,
    num_samples: int = 1, eos_id: int | None = None, banned_ids: Collection[int] = (),
) -> list[list[int]]:
    """New token ids (prompt excluded) for each of num_samples continuations.

    `encoder`: a causal `TextTransformer`, on any device; put in eval mode for the call and restored.
    `eos_id`: ends a continuation when `cfg.stop_at_eos` (and is left out of its ids), and is the
    start token for an empty prompt. `banned_ids` are never produced (pass the pad id and the other
    special tokens; not eos, or nothing ever stops). Recomputes the whole context window each step
    (no KV cache; see the module docstring).
    """
    check_generator_model(encoder)
    cfg.validate()
    vocab_size: int = encoder.vocab_size
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise SelfsupError(f"generate 'num_samples' must be a positive integer, got {num_samples!r}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise SelfsupError(f"eos id {eos_id} is outside the model's vocabulary [0, {vocab_size}); "
                           f"use the tokenizer the model was trained with")
    bad = sorted(i for i in banned_ids if not 0 <= i < vocab_size)
    if bad:
        raise SelfsupError(f"banned token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}); "
                           f"use the tokenizer the model was trained with")
    bad = list(dict.fromkeys(i for i in prompt_ids if not isinstance(i, int) or not 0 <= i < vocab_size))
    if bad:
        raise SelfsupError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}); the "
                           f"prompt was encoded with another tokenizer than the model's (use the run's tokenizer.json)")
    if not prompt_ids:
        if eos_id is None:
            raise SelfsupError("an empty prompt needs an eos id to start from; give a prompt or the eos id")
        prompt_ids = [eos_id]
    if len(set(banned_ids)) >= vocab_size:
        raise SelfsupError(f"every one of the {vocab_size} token ids is banned; nothing is left to sample")

    device = next(encoder.parameters()).device
    banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    banned[list(banned_ids)] = True
    stop_id = eos_id if cfg.stop_at_eos else None
    top_k = None if cfg.top_k is None else min(cfg.top_k, vocab_size)

    # Every live row has the same length (all start from the prompt and grow one token a step), so
    # finished rows are dropped from the batch rather than padded; `rows` maps live rows to samples.
    tokens = torch.tensor(prompt_ids, dtype=torch.long, device=device).expand(num_samples, -1)  # [B, P]
    rows = torch.arange(num_samples, device=device)  # [B]
    new_ids: list[list[int]] = [[] for _ in range(num_samples)]
    was_training = encoder.training
    encoder.eval()
    try:
        for _ in range(cfg.max_new_tokens):
            context = tokens[:, -encoder.max_len:]  # [B, min(L, max_len)]
            hidden = encoder(context)  # [B, L', D]
            logits = encoder.lm_head(hidden[:, -1]).float()  # [B, V]; fp32 so bf16 models sample the same way
            logits = logits.masked_fill(banned, float("-inf"))
            next_ids = _pick(logits, cfg.temperature, top_k, generator).to(device)  # [B]
            for row, token in zip(rows.tolist(), next_ids.tolist()):
                if token != stop_id:
                    new_ids[row].append(token)
            live = next_ids != stop_id if stop_id is not None else torch.ones_like(next_ids, dtype=torch.bool)
            tokens = torch.cat([tokens[live], next_ids[live, None]], dim=1)  # [B', L + 1]
            rows = rows[live]
            if rows.numel() == 0:
                break
    finally:
        encoder.train(was_training)
    return new_ids


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> Tensor:
    """One id per row of `logits` [B, V] (banned ids already -inf): argmax at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # [B]
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1], the k-th largest logit
        # Ties at the k-th value all stay, so "top k" may keep a few more than k; never fewer.
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    # Drawn on the generator's device so a CPU generator seeds a GPU model's samples too.
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1)  # [B]


def generate_text(
    encoder: nn.Module, tokenizer: TextTokenizer, prompt: str, cfg: SamplingConfig, seed: int = 0, num_samples: int = 1,
) -> list[str]:
    """`num_samples` continuations of `prompt` (the prompt itself not included), decoded to text.

    `tokenizer`: the run's BPE `TextTokenizer`; its end-of-text id stops a continuation and starts an
    empty prompt, and its other special ids are never sampled. The same seed gives the same texts.
    """
    check_generator_model(encoder)
    if tokenizer.kind != "bpe" or tokenizer.eos_id is None:
        raise SelfsupError(f"generate needs the byte-level BPE tokenizer of a next_token run; this one is "
                           f"{tokenizer.kind}, which has no end-of-text token (use the run's tokenizer.json)")
    if tokenizer.vocab_size > encoder.vocab_size:
        raise SelfsupError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{encoder.vocab_size}; use the tokenizer.json saved with the model's run")
    prompt_ids = tokenizer.encode_batch([prompt])[0]
    generator = torch.Generator().manual_seed(seed)
    banned = tokenizer.special_ids - {tokenizer.eos_id}
    samples = sample_tokens(encoder, prompt_ids, cfg, generator, num_samples=num_samples,
                            eos_id=tokenizer.eos_id, banned_ids=banned)
    return [tokenizer.decode(ids) for ids in samples]
