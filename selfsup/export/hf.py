"""Hugging Face export of a text run: a folder `transformers` loads with `from_pretrained`.

`selfsup export --format hf` turns a text run directory (`encoder.safetensors` + `encoder.json` +
`tokenizer.json`) into `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json` (GPT-2 only) and a `README.md` model card, loadable with
`AutoModelForMaskedLM` / `AutoModelForCausalLM` and `AutoTokenizer`, with no selfsup code and no
`trust_remote_code`. Rather than a custom architecture, each preset maps weight for weight onto an
architecture `transformers` already ships, so every tool built on it (pipelines, PEFT, TGI, ONNX
export, ...) works on our models unchanged:

| selfsup `TextTransformer` config                          | Hugging Face model (model_type)                        |
|-----------------------------------------------------------|--------------------------------------------------------|
| `text_decoder`: causal, learned positions, no embed_norm,  | `GPT2LMHeadModel` ("gpt2")                             |
|   no lm_transform                                          |                                                        |
| `text_encoder`: bidirectional, learned positions,          | `RobertaPreLayerNormForMaskedLM`                       |
|   embed_norm, lm_transform                                 |   ("roberta-prelayernorm")                             |

Why these two: both are pre-norm (`x + attn(ln(x))`, `x + mlp(ln(x))`, a final LayerNorm), use
learned absolute positions added to the token embeddings and an exact-GELU MLP with biases, as our
blocks do. GPT-2 has no embedding LayerNorm and a bias-free LM head tied to `wte` (our decoder
preset); RoBERTa-PreLayerNorm has an embedding LayerNorm and BERT's dense -> GELU -> LayerNorm ->
vocabulary projection + bias head (our encoder preset). Per weight:

- GPT-2: `token_embed` -> `wte`, `pos_embed` -> `wpe`, block i -> `h.i` (`norm1` -> `ln_1`,
  `attn.qkv` -> `attn.c_attn`, `attn.proj` -> `attn.c_proj`, `norm2` -> `ln_2`, `mlp.0` ->
  `mlp.c_fc`, `mlp.2` -> `mlp.c_proj`), `norm` -> `ln_f`, `lm_weight` -> `lm_head` when untied.
  GPT-2's `Conv1D` stores weights as [in, out], so every linear weight is transposed. Its fused
  c_attn splits its output as [q | k | v], each then cut into heads, exactly as our `attn.qkv`.
- RoBERTa-PreLayerNorm: `token_embed` -> `embeddings.word_embeddings`, `pos_embed` ->
  `embeddings.position_embeddings` (shifted, see below), `embed_norm` -> `embeddings.LayerNorm`,
  block i -> `encoder.layer.i` (`norm1` -> `attention.LayerNorm`, `attn.qkv` split into
  `attention.self.{query,key,value}`, `attn.proj` -> `attention.output.dense`, `norm2` ->
  `intermediate.LayerNorm`, `mlp.0` -> `intermediate.dense`, `mlp.2` -> `output.dense`), `norm` ->
  the model's final `LayerNorm`, `lm_transform` -> `lm_head.{dense,layer_norm}`, `lm_bias` ->
  `lm_head.bias` and `lm_head.decoder.bias`, `lm_weight` -> `lm_head.decoder.weight` when untied.

Where `transformers` differs, and how the export compensates (read from transformers 5.x source):
- RoBERTa numbers positions from the input ids: a real token's position is padding_idx + 1 + (its
  index among the non-pad tokens) and a pad token's is padding_idx. Our position p is therefore
  written at row pad_id + 1 + p, rows 0..pad_id are zero, and max_position_embeddings = max_len +
  pad_id + 1. Real tokens of right-padded batches see exactly our positions. (With left padding
  RoBERTa still starts real tokens at our position 0, where selfsup would count the pads; a pad id
  inside the text would also shift later positions, which our tokenizers never produce.)
- RoBERTa adds token-type (segment) embeddings; ours has none, so the table is zero. It has two rows
  (type_vocab_size=2, not RoBERTa's 1) because the exported WordPiece tokenizer marks a pair's
  second segment with type id 1 (returned on `return_token_type_ids=True`), which would index past
  a one-row table.
- RoBERTa ties `lm_head.decoder.bias` to `lm_head.bias` only while `tie_word_embeddings` is set
  (transformers drops every tie otherwise), so both keys are written.
- GPT-2's default activation is the tanh approximation ("gelu_new"); ours is exact ("gelu"), and the
  LayerNorm eps defaults differ (1e-5, 1e-12) from ours (1e-6): all are set explicitly. Dropouts
  are zero, as in selfsup; a fine-tuner may raise them in config.json.
- The RoBERTa LM head applies exact GELU whatever `hidden_act` says; ours is exact too.

Tokenizer: `tokenizer.json` is copied (for WordPiece with a `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B
[SEP]` post-processor added, as BERT users expect from `tokenizer(text)`; byte-level BPE adds
nothing, as GPT-2) and `tokenizer_config.json` names the special tokens and `model_max_length`.
One behaviour differs on purpose: selfsup encodes special-token strings found in the text as plain
text, while `transformers` recognises them (so `fill-mask` finds "[MASK]"); pass
`split_special_tokens=True` to the tokenizer for selfsup's behaviour.

Audio runs (an `AudioEncoder`) are handed to `selfsup.export.hf_audio` (Wav2Vec2Model / HubertModel).

Limits: only these two layouts map. Rotary positions, a causal model with embed_norm or
lm_transform, a bidirectional model without them (or with only one), and non-text encoders raise a
`SelfsupError` naming the config keys at fault; the run's `encoder.safetensors` + `encoder.json`
remain the way to use those.

Position limit: sequences are limited to max_len tokens, as in selfsup. It is stated where
transformers reads it: `model_max_length` in tokenizer_config.json (`truncation=True` and the
text-generation pipeline's `handle_long_generation="hole"` cut to it), `max_length` in
generation_config.json (`generate()` and the pipeline stop there unless given `max_new_tokens`), and
the README. transformers 5 does not check an explicit `max_new_tokens` against the position table: past
it a stock GPT-2 fails with an IndexError, as the README says; `selfsup generate` slides its window.

The folder: built under a temporary name next to `out` (selfsup.files.temp_dir), its files given the
umask's mode (safetensors writes 0600) and fsynced, marked as a selfsup "export"
(selfsup.files.mark) and swapped in whole (selfsup.files.swap_dir). `overwrite` replaces only an
export selfsup made that holds nothing but EXPORT_FILES; a failed write (a full disk) raises a
SelfsupError naming `out` and leaves the previous export as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from tokenizers import Tokenizer, processors
from torch import Tensor

from selfsup import files
from selfsup.data.tokenizer import TextTokenizer
from selfsup.encoders.audio import AudioEncoder
from selfsup.encoders.hf import HF_SEQ_LEN, HFLanguageModel
from selfsup.encoders.text import TextTransformer
from selfsup.errors import SelfsupError
from selfsup.export.encoder import META, WEIGHTS, block_state, load_encoder
from selfsup.export.hf_audio import export_hf_audio

# The two layouts that map onto a Hugging Face architecture: the config values each one requires.
_GPT2_LAYOUT: dict[str, Any] = {"positions": "learned", "causal": True, "embed_norm": False, "lm_transform": False}
_ROBERTA_LAYOUT: dict[str, Any] = {"positions": "learned", "causal": False, "embed_norm": True, "lm_transform": True}

# Every file an export folder holds besides selfsup's marker: exactly what `overwrite` may delete.
# (generation_config.json: GPT-2 only; save_pretrained shards model.safetensors only past 50 GB.)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md")
_KIND = "export"  # the marker kind (selfsup.files) of an export folder


def export_hf(run_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Writes a folder that transformers.AutoModelForMaskedLM / AutoModelForCausalLM.from_pretrained
    loads (and AutoTokenizer.from_pretrained), from the text run in `run_dir`; returns `out`.

    The folder is written next to `out` under a temporary name and renamed into place, so a crash or
    a full disk never leaves a half export (the previous one stays whole). An existing non-empty `out`
    is replaced only with `overwrite`, and only when it is an export selfsup made holding nothing but
    its files (selfsup.files.check_owned): a user's folder, or a file they added, is never deleted.
    """
    run_dir, out = Path(run_dir), Path(out)
    from selfsup.export.hf_clip import export_hf_clip, is_clip_run  # it imports this module's publishing step

    if is_clip_run(run_dir):  # an image and a text tower: a CLIPModel folder (selfsup.export.hf_clip)
        return export_hf_clip(run_dir, out, overwrite=overwrite)
    for name in (META, WEIGHTS):
        if not (run_dir / name).is_file():
            raise SelfsupError(f"{run_dir / name}: not found; is {run_dir} a finished selfsup run directory?")
    encoder, meta = load_encoder(run_dir)
    if isinstance(encoder, AudioEncoder):  # a Wav2Vec2Model / HubertModel folder: selfsup.export.hf_audio
        return export_hf_audio(run_dir, out, overwrite=overwrite)
    preprocess = meta.get("preprocess", {})
    if isinstance(encoder, HFLanguageModel):  # continued from a Hugging Face folder: that model, trained on
        return _export_continued(run_dir, encoder, meta, out, overwrite)
    if not isinstance(encoder, TextTransformer):
        from selfsup.modalities import modality_of

        raise SelfsupError(
            f"{run_dir / META}: encoder '{meta.get('encoder', {}).get('name')}' is not a text transformer "
            f"(a {modality_of(meta, str(run_dir / META)).name} encoder); only text and audio runs export to Hugging Face "
            "(--format hf): use --format encoder for selfsup's own files (selfsup.export.encoder.load_encoder)"
        )
    architecture = _architecture(encoder, run_dir / META)
    tokenizer_path = run_dir / str(preprocess.get("tokenizer") or "tokenizer.json")
    if not tokenizer_path.is_file():
        raise SelfsupError(
            f"{tokenizer_path}: not found; a Hugging Face export ships the tokenizer the run trained with "
            f"(named in {run_dir / META} under preprocess.tokenizer); copy it back into the run directory"
        )
    tokenizer = TextTokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > encoder.vocab_size:
        raise SelfsupError(
            f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the encoder in {run_dir / WEIGHTS} only "
            f"{encoder.vocab_size} embedding rows; this tokenizer does not belong to this run"
        )
    _check_replaceable(out, overwrite)

    try:
        import transformers
    except ImportError:
        raise SelfsupError(
            "the Hugging Face export needs the optional dependency transformers: pip install 'selfsup[hf]'"
        ) from None

    if architecture == "gpt2":
        config, state = _gpt2(transformers, encoder, tokenizer)
        model = transformers.GPT2LMHeadModel(config)
        # max_length = the position limit: `generate` (and the text-generation pipeline, whose own
        # default of 256 new tokens yields to a max_length the model sets) stops there instead of
        # indexing past the position table. A fresh config, not one `_from_model_config`, so
        # transformers keeps it as written.
        model.generation_config = transformers.GenerationConfig(max_length=encoder.max_len, **_special_ids(tokenizer))
    else:
        config, state = _roberta_prelayernorm(transformers, encoder, tokenizer)
        model = transformers.RobertaPreLayerNormForMaskedLM(config)
    expected = set(model.state_dict())
    assert set(state) == expected, f"mapping mismatch: {sorted(set(state) ^ expected)[:8]}"
    model.load_state_dict(state, strict=True)
    model.eval()

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        _write_tokenizer(folder, tokenizer_path, tokenizer, encoder.max_len)
        _write_readme(folder, out.name, architecture, encoder.max_len, str(meta.get("method", {}).get("name") or "?"))

    return publish_export(transformers, out, write, lambda: _check_replaceable(out, overwrite))


def _export_continued(run_dir: Path, encoder: HFLanguageModel, meta: dict[str, Any], out: Path,
                      overwrite: bool) -> Path:
    """A run continued from a Hugging Face folder (`encoder.name=hf:DIR`): its transformers model with
    the trained weights and LM head (`save_pretrained`), and the folder's tokenizer the run read with."""
    import transformers

    tokenizer_path = run_dir / str(meta.get("preprocess", {}).get("tokenizer") or "tokenizer.json")
    if not tokenizer_path.is_file():
        raise SelfsupError(f"{tokenizer_path}: not found; a Hugging Face export ships the tokenizer the run read with")
    tokenizer = TextTokenizer.load(tokenizer_path)
    config = encoder.transformers_model.config
    max_len = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                  or meta["preprocess"].get("seq_len", HF_SEQ_LEN))
    _check_replaceable(out, overwrite)

    def write(folder: Path) -> None:
        encoder.transformers_model.eval().save_pretrained(folder)
        _write_tokenizer(folder, tokenizer_path, tokenizer, max_len)

    return publish_export(transformers, out, write, lambda: _check_replaceable(out, overwrite))


def publish_export(transformers: Any, out: Path, write: Callable[[Path], None], recheck: Callable[[], None]) -> Path:
    """Builds an export with `write(folder)` in a temporary folder beside `out` and swaps it in.

    Every file gets the umask's mode and is on disk before the rename makes it the export; `recheck`
    runs just before the swap (a file may have been added to `out` meanwhile). A full disk, a
    read-only or vanished parent is an error naming `out`: swap_dir has not touched it, or put it back.
    """
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one small file: a "Writing shards" bar is noise
    replacing = out.is_dir() and any(out.iterdir())
    tmp: Path | None = None
    try:
        tmp = files.temp_dir(out.parent, prefix=f".{out.name}.")  # the umask's mode, not mkdtemp's 0700
        write(tmp)
        files.mark(tmp, _KIND)
        for path in tmp.iterdir():
            # safetensors (0.8) writes model.safetensors 0600 like mkstemp: give every file the
            # umask's mode, and get it on disk before the rename makes it the export.
            files.follow_umask(path)
            files.fsync_path(path)
        recheck()
        files.swap_dir(tmp, out)
    except (OSError, SafetensorError) as err:
        # safetensors reports its I/O errors as SafetensorError ("... I/O error: No space left on
        # device (os error 28)"), not OSError. A file is named without the temporary folder's path,
        # which no longer exists.
        filename = getattr(err, "filename", None)
        what = f"{getattr(err, 'strerror', None) or err}" + (f" writing {Path(filename).name}" if filename else "")
        kept = "the previous export there is unchanged" if replacing else "nothing was written"
        raise SelfsupError(f"{out}: cannot write the Hugging Face export ({what}); {kept}") from err
    finally:
        if tmp is not None and tmp.exists():  # gone once swapped in
            shutil.rmtree(tmp, ignore_errors=True)
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Raises SelfsupError unless `out` is absent, empty, or (with `overwrite`) an export selfsup made."""
    if out.exists() and not out.is_dir():
        raise SelfsupError(f"{out}: exists and is not a folder; choose another output path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SelfsupError(
            f"{out}: exists and is not empty; replace it with overwrite (--overwrite), or choose another path"
        )
    files.check_owned(out, _KIND, files.names_in(*EXPORT_FILES))


def _architecture(encoder: TextTransformer, meta_path: Path) -> str:
    """"gpt2" or "roberta-prelayernorm" for a config that maps exactly, else an error naming the keys."""
    cfg = encoder.cfg
    values = {key: getattr(cfg, key) for key in _GPT2_LAYOUT}
    if values == _GPT2_LAYOUT:
        return "gpt2"
    if values == _ROBERTA_LAYOUT:
        return "roberta-prelayernorm"
    # Name the keys that stand between this config and the nearest layout (the one with its `causal`).
    target = _GPT2_LAYOUT if cfg.causal else _ROBERTA_LAYOUT
    wrong = {key: values[key] for key in target if values[key] != target[key]}
    need = ", ".join(f"{key}={value!r}" for key, value in target.items() if key in wrong)
    reason = (
        " (GPT-2 and RoBERTa-PreLayerNorm add learned position vectors to the embeddings; rotary positions "
        "turn q and k inside attention instead)"
        if "positions" in wrong else ""
    )
    preset = "text_decoder (GPT-2)" if cfg.causal else "text_encoder (RoBERTa-PreLayerNorm)"
    raise SelfsupError(
        f"{meta_path}: encoder config {', '.join(f'{k}={v!r}' for k, v in wrong.items())} has no Hugging Face "
        f"equivalent{reason}; a {'causal' if cfg.causal else 'bidirectional'} model exports when it has {need}, "
        f"as the {preset} preset does. Use the run's encoder.safetensors + encoder.json with selfsup "
        "(selfsup.export.encoder.load_encoder) instead, or pretrain with the preset's settings"
    )


def _special_ids(tokenizer: TextTokenizer) -> dict[str, int | None]:
    """pad/bos/eos ids for the model config: [CLS]/[SEP] for WordPiece, <|endoftext|> for both in BPE (GPT-2)."""
    if tokenizer.kind == "wordpiece":
        return {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.cls_id, "eos_token_id": tokenizer.sep_id}
    return {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}


def _gpt2(transformers: Any, encoder: TextTransformer, tokenizer: TextTokenizer) -> tuple[Any, dict[str, Tensor]]:
    """GPT2Config and the GPT2LMHeadModel state dict of a causal, learned-position encoder."""
    cfg = encoder.cfg
    assert encoder.pos_embed is not None
    hidden = encoder.blocks[0].mlp[0].out_features
    config = transformers.GPT2Config(
        vocab_size=encoder.vocab_size, n_positions=encoder.max_len, n_embd=cfg.dim, n_layer=cfg.depth,
        n_head=cfg.heads, n_inner=hidden,
        activation_function="gelu",  # exact erf GELU as nn.GELU(); GPT-2's default "gelu_new" is the tanh fit
        layer_norm_epsilon=1e-6, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings, **_special_ids(tokenizer),
    )
    config.architectures = ["GPT2LMHeadModel"]
    src = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    state: dict[str, Tensor] = {
        "transformer.wte.weight": src["token_embed.weight"],
        "transformer.wpe.weight": src["pos_embed.weight"],
        "transformer.ln_f.weight": src["norm.weight"],
        "transformer.ln_f.bias": src["norm.bias"],
        # Tied: the same matrix under both names (load_state_dict fills one shared parameter).
        "lm_head.weight": src["token_embed.weight"] if cfg.tie_embeddings else src["lm_weight"],
    }
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[f"{theirs}{b}.weight"] = src[f"{ours}{a}.weight"]
            state[f"{theirs}{b}.bias"] = src[f"{ours}{a}.bias"]
        # Conv1D computes x @ W + b with W stored [in, out]: the transpose of nn.Linear's [out, in].
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.0", "mlp.c_fc"),
                     ("mlp.2", "mlp.c_proj")):
            state[f"{theirs}{b}.weight"] = src[f"{ours}{a}.weight"].t().contiguous()
            state[f"{theirs}{b}.bias"] = src[f"{ours}{a}.bias"]
    return config, state


def _roberta_prelayernorm(
    transformers: Any, encoder: TextTransformer, tokenizer: TextTokenizer,
) -> tuple[Any, dict[str, Tensor]]:
    """RobertaPreLayerNormConfig and the ...ForMaskedLM state dict of a bidirectional BERT-style encoder."""
    cfg = encoder.cfg
    D, L, pad = cfg.dim, encoder.max_len, tokenizer.pad_id
    hidden = encoder.blocks[0].mlp[0].out_features
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=encoder.vocab_size, hidden_size=D, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
        intermediate_size=hidden, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        # RoBERTa's positions start at pad_id + 1 (module docstring); the rows below stay zero.
        max_position_embeddings=L + pad + 1, type_vocab_size=2, layer_norm_eps=1e-6,
        tie_word_embeddings=cfg.tie_embeddings, **_special_ids(tokenizer),
    )
    config.architectures = ["RobertaPreLayerNormForMaskedLM"]
    src = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    positions = src["pos_embed.weight"].new_zeros(L + pad + 1, D)  # [L + pad + 1, D]
    positions[pad + 1:] = src["pos_embed.weight"]
    p, e = "roberta_prelayernorm.", "roberta_prelayernorm.embeddings."
    output = src["token_embed.weight"] if cfg.tie_embeddings else src["lm_weight"]
    state: dict[str, Tensor] = {
        f"{e}word_embeddings.weight": src["token_embed.weight"],
        f"{e}position_embeddings.weight": positions,
        f"{e}token_type_embeddings.weight": src["token_embed.weight"].new_zeros(2, D),  # no segments in selfsup
        f"{e}LayerNorm.weight": src["embed_norm.weight"],
        f"{e}LayerNorm.bias": src["embed_norm.bias"],
        f"{p}LayerNorm.weight": src["norm.weight"],
        f"{p}LayerNorm.bias": src["norm.bias"],
        "lm_head.dense.weight": src["lm_transform.0.weight"],
        "lm_head.dense.bias": src["lm_transform.0.bias"],
        "lm_head.layer_norm.weight": src["lm_transform.2.weight"],
        "lm_head.layer_norm.bias": src["lm_transform.2.bias"],
        "lm_head.decoder.weight": output,
        # Both names: transformers ties them only while tie_word_embeddings is set.
        "lm_head.decoder.bias": src["lm_bias"],
        "lm_head.bias": src["lm_bias"],
    }
    state.update(block_state(src, D, cfg.depth, f"{p}encoder.layer.",
                             ("attention.self.query", "attention.self.key", "attention.self.value"),
                             (("norm1", "attention.LayerNorm"), ("attn.proj", "attention.output.dense"),
                              ("norm2", "intermediate.LayerNorm"), ("mlp.0", "intermediate.dense"),
                              ("mlp.2", "output.dense"))))
    return config, state


def _write_tokenizer(folder: Path, tokenizer_path: Path, tokenizer: TextTokenizer, max_len: int) -> None:
    """tokenizer.json (with BERT's [CLS]/[SEP] template for WordPiece) and tokenizer_config.json into `folder`."""
    backend = Tokenizer.from_file(str(tokenizer_path))
    config: dict[str, Any] = {
        # The generic fast tokenizer runs tokenizer.json as is; GPT2Tokenizer or RobertaTokenizer
        # (what the model types would pick) rebuild their own pre-tokenizers and prefix spaces.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,  # decode as selfsup does (no " do n't" -> " don't" rewrite)
    }
    if tokenizer.kind == "wordpiece":
        # selfsup wraps each document as [CLS] ... [SEP] when packing (packing_bounds), so the model
        # was trained on what this template writes.
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id)],
        )
        config.update(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        # GPT-2's convention: <|endoftext|> both starts and ends documents; nothing is added on encode.
        config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
    # Written by Python rather than backend.save, whose I/O errors are plain Exceptions: a full disk
    # must arrive as the OSError export_hf reports.
    (folder / "tokenizer.json").write_text(backend.to_str(pretty=True), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")



def _write_readme(folder: Path, name: str, architecture: str, max_len: int, method: str) -> None:
    """README.md (the model card on the Hub): the architecture, how to load it and the position limit,
    which transformers only partly enforces (see the text-generation notes)."""
    limit = (
        f"**Position limit: {max_len} tokens.** The model learned one position vector per token up to "
        f"{max_len}; it cannot read a longer sequence"
    )
    if architecture == "gpt2":
        body = f"""\
Architecture: `GPT2LMHeadModel` (model_type `gpt2`), a causal language model.

{limit}: prompt and generated text together must fit in {max_len} tokens.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

folder = "{name}"  # this folder's path, or its Hub repo id
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
generator = pipeline("text-generation", model=folder)
print(generator("The", do_sample=False)[0]["generated_text"])
```

At the limit (transformers 5):

- `generation_config.json` sets `max_length={max_len}`, so `generate()` and the pipeline stop there by default.
- An explicit `max_new_tokens` (or `max_length`) that carries prompt + output past {max_len} tokens
  fails inside the model (`IndexError: index out of range`): transformers does not check it. Pass
  `handle_long_generation="hole"` to the pipeline to keep the end of the prompt and leave room for the
  new tokens, or keep prompt tokens + `max_new_tokens` <= {max_len}.
- A prompt of {max_len} tokens or more is refused by `generate()` (`ValueError`).
- `selfsup generate` on the original run slides a {max_len}-token window instead (the model then sees
  only the last {max_len} tokens), so its output has no such limit.
"""
        tag = "text-generation"
    else:
        body = f"""\
Architecture: `RobertaPreLayerNormForMaskedLM` (model_type `roberta-prelayernorm`), a masked language model.

{limit}, `[CLS]` and `[SEP]` included (`model_max_length` in `tokenizer_config.json`).

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

folder = "{name}"  # this folder's path, or its Hub repo id
model = AutoModelForMaskedLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
batch = tokenizer(["a text"], truncation=True, return_tensors="pt")  # truncation: cut at {max_len} tokens
fill = pipeline("fill-mask", model=folder)
print(fill("The [MASK] sat.", tokenizer_kwargs={{"truncation": True}}))
```

A longer input without `truncation=True` fails inside the model (`IndexError: index out of range`).
The tokenizer recognises special-token strings such as `[MASK]` in the text; selfsup encodes them as
plain text (`split_special_tokens=True` does the same here).
"""
        tag = "fill-mask"
    text = f"""\
---
library_name: transformers
pipeline_tag: {tag}
---

# {name}

A text model pretrained with selfsup (method `{method}`) and exported by `selfsup export --format hf`.
It loads with plain `transformers`: no selfsup code and no `trust_remote_code`.

{body}"""
    (folder / "README.md").write_text(text, encoding="utf-8")
