"""Hugging Face encoders behind the selfsup Encoder contract (`forward`, `embed`, `dim`).

A local folder that `transformers.AutoModel` loads (config.json, the weights, and tokenizer.json for
text or preprocessor_config.json for speech) becomes an encoder: `HFTextEncoder` pools the last
hidden states by a masked mean (the pooling all-MiniLM-L6-v2 was trained with), `HFAudioEncoder`
by the mean over real frames (as selfsup's own audio encoder does). Their description in an
encoder.json or task.json is {"name": "hf" | "hf_audio", "config": the model's config dict} (plus
"source", the folder a pretraining tower started from: `build_seeded` gives the tower its weights
again), which `build_encoder` rebuilds.
transformers is imported lazily: it is an optional dependency (`selfsup[hf]`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")

HF_AUDIO_MAX_SECONDS = 4.0  # an hf: speech encoder reads a clip's opening seconds, as our audio runs by default
# LoRA targets of transformers' speech encoders (wav2vec 2.0, HuBERT, WavLM): attention and feed-forward.
HF_AUDIO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")
HF_SEQ_LEN = 128
# LoRA targets in BERT-style layouts (BERT, RoBERTa, MiniLM): q/k/v, the attention output and both
# MLP projections are nn.Linear modules whose names end so.
HF_LORA_TARGETS = ("query", "key", "value", "dense")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SelfsupError("an hf: base needs the `transformers` package: pip install 'selfsup[hf]'") from None
    return transformers


class HFTextEncoder(nn.Module):
    """A `transformers.AutoModel` text encoder behind the selfsup Encoder contract:
    `forward(input_ids, attention_mask)` -> last hidden states [B, L, D], `embed` -> masked mean [B, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if getattr(model, "pooler", None) is not None:  # BERT's [CLS] pooler: unused, and LoRA would adapt it
            model.pooler = None
        self.dim: int = int(model.config.hidden_size)
        self.lora_targets = HF_LORA_TARGETS

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        tokens = self.forward(input_ids, attention_mask)  # [B, L, D]
        if attention_mask is None:
            return tokens.mean(dim=1)
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)

    def lr_layers(self) -> tuple[dict[str, int], int]:
        """Each parameter's layer for layer-wise learning rates (`hf_layer_ids`)."""
        return hf_layer_ids(self)


# What a text objective needs on top of the encoder (`lm_head`), by the method's `causal` flag: MLM a
# masked-LM head, next-token a causal-LM head; transformers' Auto class that builds the model with it.
HF_HEADS = {"masked_lm": "AutoModelForMaskedLM", "causal_lm": "AutoModelForCausalLM"}


def lm_head_kind(causal: bool | None) -> str | None:
    """The head a method that trains its text encoder's own outputs needs (None: the method only embeds)."""
    return None if causal is None else ("causal_lm" if causal else "masked_lm")


def _head_module(lm: nn.Module, folder: str) -> tuple[str, nn.Module]:
    """The one module of a transformers `*ForMaskedLM` / `*ForCausalLM` model besides its base model."""
    rest = [(name, module) for name, module in lm.named_children()
            if name != lm.base_model_prefix and any(True for _ in module.parameters())]
    if len(rest) != 1:
        raise SelfsupError(f"{folder}: {type(lm).__name__}'s language-model head is not one module "
                           f"({', '.join(name for name, _ in rest) or 'none'}), which selfsup cannot call on its own; "
                           "continue pretraining from a BERT/RoBERTa-style (masked) or GPT-2-style (causal) folder")
    return rest[0]


class HFLanguageModel(HFTextEncoder):
    """A transformers masked- or causal-LM (`HF_HEADS`) as a text objective's encoder: the base model
    (`model`, what `embed` pools, so probes, adapt and export see a plain HFTextEncoder) plus its
    language-model head (`head`), which `lm_head(hidden)` applies as selfsup's TextTransformer does.
    A head tied to the input embedding stays tied (the same parameter)."""

    def __init__(self, lm: nn.Module, head_kind: str, folder: str = "the Hugging Face model"):
        head_name, head = _head_module(lm, folder)
        super().__init__(lm.base_model)
        self.head = head
        self.head_kind = head_kind
        self.head_name = head_name  # the head's name inside the transformers model (`cls`, `lm_head`)
        self.base_name = lm.base_model_prefix  # the base model's (`bert`, `transformer`)
        self.vocab_size: int = int(lm.config.vocab_size)
        # next_token's fast bf16 path projects with `output_embedding()` + `lm_bias` when the head is one
        # linear map (GPT-2's tied lm_head); anything more is applied whole through `lm_head`.
        self.lm_transform: bool | None = None if isinstance(head, nn.Linear) else True
        self.lm_bias = head.bias if isinstance(head, nn.Linear) else None
        object.__setattr__(self, "transformers_model", lm)  # the whole model (not a submodule): for save_pretrained

    def output_embedding(self) -> Tensor:
        assert isinstance(self.head, nn.Linear)
        return self.head.weight

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits [..., vocab_size] of hidden states [..., dim]."""
        return self.head(hidden)


class HFAudioEncoder(nn.Module):
    """A `transformers.AutoModel` speech encoder (wav2vec 2.0, HuBERT, ...) behind the selfsup Encoder
    contract: `forward(audio [B, T], lengths [B])` -> last hidden states [B, F, D], `embed` -> the mean
    over real frames [B, D] (the pooling selfsup's own audio encoder uses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim: int = int(model.config.hidden_size)
        self.lora_targets = HF_AUDIO_LORA_TARGETS

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        B, T = audio.shape
        mask = None if lengths is None else torch.arange(T, device=audio.device)[None, :] < lengths[:, None]  # [B, T]
        return self.model(input_values=audio, attention_mask=mask).last_hidden_state

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        frames = self.forward(audio, lengths)  # [B, F, D]
        if lengths is None:
            return frames.mean(dim=1)
        counts = self.model._get_feat_extract_output_lengths(lengths).clamp(1, frames.shape[1])  # [B]
        real = (torch.arange(frames.shape[1], device=frames.device)[None, :] < counts[:, None]).to(frames.dtype)
        return (frames * real.unsqueeze(-1)).sum(dim=1) / counts.unsqueeze(1).to(frames.dtype)

    def lr_layers(self) -> tuple[dict[str, int], int]:
        """Each parameter's layer for layer-wise learning rates (`hf_layer_ids`)."""
        return hf_layer_ids(self)


def hf_layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, depth) of a wrapped transformers model, for layer-wise learning rates
    (`adapt/finetune_groups.py`'s convention: 0 embeddings, 1..depth the blocks, depth + 1 the top).

    The stack is the nn.ModuleList of `config.num_hidden_layers` modules holding the most parameters
    (BERT's and RoBERTa's `encoder.layer`, GPT-2's `h`, wav2vec 2.0's and HuBERT's `encoder.layers`;
    a speech model's convolutional feature encoder is a shorter or lighter list). What the model
    registers before the stack (token and position embeddings, a speech model's feature encoder,
    feature projection, position convolution and mask embedding) is layer 0; what it registers after
    (a final norm) is the top. A stable-layer-norm speech model (`do_stable_layer_norm`) applies its
    `encoder.layer_norm` after the blocks, so that norm is the top too."""
    model = encoder.model
    wanted = getattr(model.config, "num_hidden_layers", None)
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) > 0 and wanted in (None, len(module))]
    if not stacks:
        raise SelfsupError(f"layer-wise learning rates need to know {type(model).__name__}'s layers, and it holds no "
                           f"list of its {wanted} hidden layers; fine-tune it with one learning rate (--layer-decay 1)")
    stack_name, stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    depth = len(stack)
    parent = stack_name.rpartition(".")[0]
    final_norm = f"{parent}.layer_norm." if parent and getattr(model.config, "do_stable_layer_norm", False) else None
    layers: dict[str, int] = {}
    after_stack = False
    for name, _ in encoder.named_parameters():
        inner = name.removeprefix("model.")
        if inner.startswith(stack_name + "."):
            layers[name] = int(inner[len(stack_name) + 1 :].partition(".")[0]) + 1
            after_stack = True
        elif after_stack or (final_norm is not None and inner.startswith(final_norm)):
            layers[name] = depth + 1
        else:
            layers[name] = 0
    return layers, depth


_HF_WRAPPERS = {"hf": HFTextEncoder, "hf_audio": HFAudioEncoder}  # encoder description name -> wrapper


def hf_encoder_from_config(config: dict[str, Any], name: str = "hf", head: str | None = None) -> nn.Module:
    """The architecture of a saved `config.json` dict, randomly initialised (weights are loaded after);
    `head` ("masked_lm", "causal_lm") adds that language-model head (`HFLanguageModel`)."""
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise SelfsupError("a Hugging Face encoder description needs its config's model_type")
    built = transformers.AutoConfig.for_model(model_type, **config)
    if head is not None:
        if head not in HF_HEADS:
            raise SelfsupError(f"unknown Hugging Face head {head!r}; known: {', '.join(HF_HEADS)}")
        return HFLanguageModel(getattr(transformers, HF_HEADS[head]).from_config(built), head)
    return _HF_WRAPPERS[name](transformers.AutoModel.from_config(built))


def hf_reads_audio(folder: Path) -> bool:
    """A speech folder holds a feature extractor's preprocessor_config.json and no tokenizer.json."""
    return (folder / "preprocessor_config.json").is_file() and not (folder / "tokenizer.json").is_file()




def load_hf_model(folder: Path, randomise: bool = False) -> nn.Module:
    """The transformers model of a local folder (weights loaded, or `randomise`d under seed 0)."""
    transformers = _transformers()
    # A masked-LM folder also holds its LM head, which the encoder does not use: transformers' report
    # of those "unexpected" keys would only alarm; a real mismatch still raises.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its per-load weight bars: noise in selfsup's log
    try:
        if randomise:
            torch.manual_seed(0)
            return transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(folder))
        return transformers.AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise SelfsupError(f"{folder}: transformers cannot load this folder as a model ({err})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def hf_description(folder: Path, head: str | None = None) -> dict[str, Any]:
    """The description of a pretraining tower `encoders.ROLE.name=hf:DIR` (`encoder.name=hf:DIR`): built
    from the folder's config (consuming the seeded random stream as any tower does), then given the
    folder's weights; `head` (`lm_head_kind`) for a text objective that trains the model's own outputs."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder).to_dict()
    except (OSError, ValueError, KeyError) as err:
        raise SelfsupError(f"{folder}: transformers cannot read its config.json ({err})") from None
    description = {"name": "hf_audio" if hf_reads_audio(folder) else "hf", "config": config, "source": str(folder)}
    if head is not None:
        description["head"] = head
    return description


def hf_head_problem(folder: Path, head: str) -> str | None:
    """Why the folder's architecture cannot take `head` (a sentence saying what to do), or None.

    A masked-LM head needs an architecture transformers has one for (BERT, RoBERTa, ...: not GPT-2);
    a causal-LM head a model that is causal (GPT-2, ...; a BERT only when its config says is_decoder)."""
    transformers = _transformers()
    from transformers.models.auto import modeling_auto

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        return f"transformers cannot read {folder / 'config.json'} ({err}); give a folder a transformers model was saved to"
    masked = config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    causal = config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if head == "masked_lm" and not masked:
        return (f"{folder} holds a `{config.model_type}` model, which has no masked-LM form (a causal model cannot "
                "predict masked tokens from both sides); continue a masked-LM objective from a BERT/RoBERTa-style "
                "folder")
    if head == "causal_lm" and (not causal or (masked and not getattr(config, "is_decoder", False))):
        return (f"{folder} holds a `{config.model_type}` model, which is bidirectional (not a causal decoder); continue "
                "a next-token objective from a GPT-2-style folder")
    return None


def build_hf_encoder(description: dict[str, Any]) -> nn.Module:
    """An "hf"/"hf_audio" description rebuilt from its config, randomly initialised (a saved tower's
    weights are loaded over it; `load_source_weights` gives it the weights it started from)."""
    return hf_encoder_from_config(description["config"], description["name"], description.get("head"))


def load_source_weights(encoder: nn.Module, description: dict[str, Any]) -> nn.Module:
    """The weights of the folder a Hugging Face tower started from (its description's "source")."""
    source = Path(description["source"])
    if not (source / "config.json").is_file():
        raise SelfsupError(f"{source}: the Hugging Face folder this tower started from is gone, so its starting "
                           "weights cannot be rebuilt (the trained tower itself is saved in the run)")
    if isinstance(encoder, HFLanguageModel):
        _load_language_model(encoder, source)
        return encoder
    encoder.model.load_state_dict(load_hf_model(source).state_dict(), strict=False)
    return encoder


def _load_language_model(encoder: HFLanguageModel, source: Path) -> None:
    """The folder's base model and, when it holds one, its language-model head (BertForMaskedLM's `cls`,
    GPT-2's `lm_head`); a head the folder lacks (a BertModel folder such as all-MiniLM-L6-v2) keeps the
    seeded fresh initialisation the tower was built with, and the log says so."""
    transformers = _transformers()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        lm, info = getattr(transformers, HF_HEADS[encoder.head_kind]).from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        raise SelfsupError(f"{source}: transformers cannot load this folder as a model ({err})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    fresh = set(info.get("missing_keys") or ())
    loaded = HFLanguageModel(lm, encoder.head_kind, str(source)).state_dict()
    mine = encoder.state_dict()
    keep = {k for k in mine if _lm_key(encoder, k) in fresh}  # what the folder lacks keeps its fresh init
    # A tied tensor (the head's decoder and the input embedding) is one parameter under two names: it
    # is the folder's as soon as either name was loaded.
    shared: dict[int, set[str]] = {}
    for k, v in mine.items():
        shared.setdefault(v.data_ptr(), set()).add(k)
    keep = {k for k in keep if shared[mine[k].data_ptr()] <= keep}
    with torch.no_grad():
        encoder.load_state_dict({k: (mine[k] if k in keep else v) for k, v in loaded.items()})
    head_fresh = sorted(k for k in keep if k.startswith("head."))
    body_fresh = sorted(k for k in keep if not k.startswith("head."))
    what = "masked-LM" if encoder.head_kind == "masked_lm" else "causal-LM"
    if head_fresh:
        log.info("%s holds no %s head (%d tensors, e.g. %s): the head starts freshly initialised", source, what,
                 len(head_fresh), head_fresh[0].removeprefix("head."))
    else:
        log.info("%s: the %s head starts from the folder's weights", source, what)
    if body_fresh:
        log.warning("%s lacks %d of the model's own weights (e.g. %s): they start freshly initialised", source,
                    len(body_fresh), body_fresh[0].removeprefix("model."))


def _lm_key(encoder: HFLanguageModel, key: str) -> str:
    """The transformers name (in the *ForMaskedLM / *ForCausalLM model) of one of the wrapper's keys."""
    if key.startswith("model."):
        return f"{encoder.base_name}.{key.removeprefix('model.')}"
    return f"{encoder.head_name}.{key.removeprefix('head.')}"
