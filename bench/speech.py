"""Speech pretraining side by side: selfsup's wav2vec 2.0 against Hugging Face transformers'
`Wav2Vec2ForPreTraining`, same config, same clips, same run.

What is compared, per precision (fp32 always — the headline row —, and bf16 autocast as its own row
where the CPU has bf16 units, `selfsup.train.runtime.cpu_has_fast_bf16`):

- **selfsup**: `build_method({"name": "wav2vec2", ...}, build_encoder("wav2vec2_tiny"))` — span
  masking, distractor sampling, Gumbel product quantizer, contrastive + diversity + feature-penalty
  loss, all inside `method(batch, progress)`;
- **transformers**: `Wav2Vec2ForPreTraining(Wav2Vec2Config(...))` with the same sizes, fed as in
  transformers' examples/pytorch/speech-pretraining/run_wav2vec2_pretraining_no_trainer.py: the
  collator's `_compute_mask_indices` (over the real frames, `sub_attention_mask`) and
  `_sample_negative_indices`, `model(input_values, attention_mask, mask_time_indices,
  sampled_negative_indices).loss` divided by the number of masked frames (the example's
  `multiply_grads(params, 1 / num_losses)`), the Gumbel temperature set before each step.

Config, knob for knob (selfsup -> Wav2Vec2Config): encoder preset `wav2vec2_tiny` conv_channels ->
conv_dim (x7), conv_kernels -> conv_kernel, conv_strides -> conv_stride, conv_bias, dim ->
hidden_size, depth -> num_hidden_layers, heads -> num_attention_heads, dim * mlp_ratio ->
intermediate_size, pos_conv_kernel / pos_conv_groups -> num_conv_pos_embeddings /
num_conv_pos_embedding_groups, LayerNorm eps 1e-5 -> layer_norm_eps, exact GELU -> hidden_act /
feat_extract_activation "gelu", the LARGE layout -> feat_extract_norm "layer" +
do_stable_layer_norm True, no dropout -> every *_dropout, layerdrop and feat_quantizer_dropout 0;
method `wav2vec2` codebook_groups G -> num_codevector_groups, codebook_entries V ->
num_codevectors_per_group, code_dim -> codevector_dim, proj_dim -> proj_codevector_dim,
num_distractors K -> num_negatives, logit_temp -> contrastive_logits_temperature, diversity_weight
-> diversity_loss_weight, mask_prob / mask_length / min_masks -> mask_time_prob /
mask_time_length / mask_time_min_masks (fed to `_compute_mask_indices`), the Gumbel schedule
(`selfsup.nn.quantizer.gumbel_temperature` of the step's progress) -> `set_gumbel_temperature`.

How it is kept fair:

- Same weights at step 0: the selfsup model is built (seeded), and transformers' model is loaded
  with its weights, renamed as `selfsup export --format hf` renames them (`selfsup.export.
  hf_audio._state_dict`, plus the quantizer and the two projections); before training the script
  checks that both encoders give the same hidden states (the JSON's `init_max_abs_diff`).
- Same clips: the built-in KLettres (`load_audio_source("klettres")`), the clips of at least
  `--min-seconds` (transformers' negative sampler needs two masked frames per utterance; KLettres
  has clips of 0.2 s), cropped to at most `--seconds` at a seeded random start and normalised per
  clip by selfsup's `AudioBatches`, padded to the batch's longest crop (`attention_mask` on the HF
  side), drawn in `BatchOrder`'s seeded order. The batches are made once, before timing, and both
  sides train on the very same tensors, step for step (the crops are excluded from both timings).
- Same batch, steps, threads (`torch.set_num_threads(--threads)`, OMP_WAIT_POLICY=PASSIVE set
  before torch loads), optimizer (selfsup's `build_optimizer` on both models: AdamW foreach, lr
  `--lr` constant, betas (0.9, 0.999), weight decay `--weight-decay` except on 1-d parameters and
  biases, the global gradient norm clipped at `--grad-clip`) and precision (`torch.autocast("cpu",
  torch.bfloat16)` around both forwards in the bf16 row, nothing in the fp32 row).
- One process, one plain loop for both (forward in autocast, backward, clip, step, zero_grad):
  selfsup's `fit` bookkeeping (metrics, checkpoints) is not in its time, and the HF example's
  Accelerate/DataLoader machinery is not in HF's. Each side's timed step runs from the batch's
  masking (selfsup: inside the method, from the batch's generator; HF: the collator's numpy
  `_compute_mask_indices` + `_sample_negative_indices` and their tensors) to the end of the
  optimizer step, with `time.perf_counter`. Warm-up steps run first for both; then the timed steps
  alternate selfsup, HF, selfsup, ... so that load from elsewhere on the machine hits both alike.

Known differences (the implementations differ; the knobs do not):

- Loss terms: selfsup = contrastive + alpha diversity (+ the paper's L2 feature penalty when its
  weight is set; off by default, since it collapsed the codebook on KLettres), HF = contrastive +
  alpha diversity with the same alpha (per masked frame after the division above). The JSON reports each term, and
  `contrastive_plus_diversity` on both sides as the comparable number.
- Distractors: selfsup draws min(K, masked frames - 1) distinct other masked frames of the
  utterance; transformers (as fairseq) draws exactly K with replacement, so with K = 100 and about
  40 masked frames per clip here its denominator holds ~100 terms with repeats, ours ~40 distinct:
  the contrastive loss at chance is ln(K + 1) for HF and ln(masked frames) for selfsup
  (`contrastive_chance` in the JSON), so compare each side's loss with its own chance level.
- Masks: selfsup draws span starts as independent Bernoulli(p) per real frame and keeps each
  utterance's own count; transformers draws floor(p * frames + U) starts without replacement where a
  whole span fits (the same expected count). The draws differ (torch generator vs numpy), so the
  losses agree statistically, not bit for bit.
- Work: transformers quantizes and scores every frame (masked or not) against K + 1 targets and
  drops the unmasked ones in the loss, and builds its codevectors as a [frames, G*V, d] product;
  selfsup quantizes only the masked frames and scores them with one [M, M] cosine matrix per
  utterance. Attention: HF's SDPA; selfsup's SDPA in fp32, two matmuls under CPU bf16.

Metric: samples/s = batch x timed steps / the timed steps' summed seconds (`ratio` = selfsup / HF);
quality: the mean of each loss term over the last 5 steps of each side.

    .venv/bin/python bench/speech.py [--steps 25] [--warmup 5] [--batch-size 16] [--seconds 2]
        [--threads 2] [--no-bf16] [--lr 2e-4] [--negatives 100] [--min-seconds 0.5] [--seed 0]

The learning rate is low on purpose: at 5e-4 or 1e-3 without warm-up both implementations' codebooks
collapse (perplexity G = 2, every distractor equal to the positive, contrastive loss 0) within
15-30 steps, and a collapsed loss says nothing about either side.

Prints one JSON line per precision (DESIGN.md, "Benchmarks") and a table on stderr. Nothing else may
run meanwhile (shared/MACHINE.md).
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when torch's OpenMP starts: before `import torch`

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cpu_model, median, peak_rss_mb  # noqa: E402

sys.path.insert(0, str(REPO))

SAMPLE_RATE = 16000
PRESET = "wav2vec2_tiny"


# ------------------------------------------------------------------------------------------ data


def make_batches(args: argparse.Namespace):
    """(batches: [steps] dicts of audio [B, T] + lengths [B], generator states after the crops, data info)."""
    import torch

    from selfsup.data.audio import AudioBatches, load_audio_source
    from selfsup.data.sampler import BatchOrder
    from selfsup.errors import SelfsupError

    try:
        data = load_audio_source("klettres")
    except SelfsupError as err:
        raise SystemExit(f"bench/speech.py: the KLettres clips are not available ({err}); "
                         "`selfsup data prepare klettres` makes them") from err
    keep = [i for i, w in enumerate(data.waves) if len(w) >= args.min_seconds * SAMPLE_RATE]
    data = data.subset(keep)
    batches = AudioBatches(data, int(args.seconds * SAMPLE_RATE), torch.device("cpu"))
    order = BatchOrder(len(data), args.batch_size, args.seed)
    out, states = [], []
    for step in range(1, args.steps + 1):
        # selfsup's fit seeds each step's generator this way (train/loop.step_generator, rank 0).
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step * 104_729) % 2**63)
        batch = batches(order.next(), generator)
        out.append({"audio": batch["audio"], "lengths": batch["lengths"]})
        states.append(generator.get_state())  # what the method's masks draw from next
    real = sum(int(b["lengths"].sum()) for b in out)
    padded = sum(b["audio"].numel() for b in out)
    info = {"source": "klettres", "clips": len(data), "min_seconds": args.min_seconds, "crop_seconds": args.seconds,
            "mean_clip_seconds": round(real / (len(out) * args.batch_size * SAMPLE_RATE), 3),
            "padding_fraction": round(1 - real / padded, 3)}
    return out, states, info


# ------------------------------------------------------------------------------------------ models


def build_pair(args: argparse.Namespace):
    """(selfsup method, HF Wav2Vec2ForPreTraining with the same weights, the HF config)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    from selfsup.encoders import build_encoder
    from selfsup.export.hf_audio import _state_dict
    from selfsup.methods import build_method

    torch.manual_seed(args.seed)
    encoder = build_encoder(PRESET)
    method = build_method({"name": "wav2vec2", "num_distractors": args.negatives}, encoder)
    ecfg, mcfg = encoder.cfg, method.cfg
    layers = len(ecfg.conv_kernels)
    config = Wav2Vec2Config(
        # encoder (selfsup.encoders.audio.AudioEncoderConfig, preset wav2vec2_tiny)
        conv_dim=[ecfg.conv_channels] * layers, conv_kernel=list(ecfg.conv_kernels),
        conv_stride=list(ecfg.conv_strides), conv_bias=ecfg.conv_bias,
        hidden_size=ecfg.dim, num_hidden_layers=ecfg.depth, num_attention_heads=ecfg.heads,
        intermediate_size=encoder.blocks[0].mlp[0].out_features,
        num_conv_pos_embeddings=ecfg.pos_conv_kernel, num_conv_pos_embedding_groups=ecfg.pos_conv_groups,
        hidden_act="gelu", feat_extract_activation="gelu", layer_norm_eps=1e-5,
        feat_extract_norm="layer", do_stable_layer_norm=True,
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, feat_quantizer_dropout=0.0,
        # objective (selfsup.methods.wav2vec2.Config)
        apply_spec_augment=True, mask_time_prob=mcfg.mask_prob, mask_time_length=mcfg.mask_length,
        mask_time_min_masks=mcfg.min_masks, mask_feature_prob=0.0,
        num_codevector_groups=mcfg.codebook_groups, num_codevectors_per_group=mcfg.codebook_entries,
        codevector_dim=mcfg.code_dim, proj_codevector_dim=mcfg.proj_dim, num_negatives=mcfg.num_distractors,
        contrastive_logits_temperature=mcfg.logit_temp, diversity_loss_weight=mcfg.diversity_weight,
        attn_implementation="sdpa",
    )
    peer = Wav2Vec2ForPreTraining(config)
    G, V, d = method.quantizer.codevectors.shape
    state = {f"wav2vec2.{k}": v for k, v in _state_dict(encoder).items()}
    state.update({
        "quantizer.weight_proj.weight": method.quantizer.logits.weight.detach().clone(),
        "quantizer.weight_proj.bias": method.quantizer.logits.bias.detach().clone(),
        "quantizer.codevectors": method.quantizer.codevectors.detach().reshape(1, G * V, d).clone(),
        "project_q.weight": method.project_q.weight.detach().clone(),
        "project_q.bias": method.project_q.bias.detach().clone(),
        "project_hid.weight": method.project_c.weight.detach().clone(),
        "project_hid.bias": method.project_c.bias.detach().clone(),
    })
    peer.load_state_dict(state, strict=True)
    return method, peer, config


def init_check(method, peer, batch) -> float:
    """Max |selfsup - HF| of the encoders' outputs at the real frames of one batch, before training."""
    import torch

    audio, lengths = batch["audio"], batch["lengths"]
    mask = (torch.arange(audio.shape[1])[None, :] < lengths[:, None]).long()
    method.eval(), peer.eval()
    with torch.no_grad():
        ours = method.encoder(audio, lengths=lengths)
        theirs = peer.wav2vec2(audio, attention_mask=mask).last_hidden_state
    method.train(), peer.train()
    real = torch.arange(ours.shape[1])[None, :] < method.encoder.frame_lengths(lengths)[:, None]
    return float((ours - theirs).abs()[real].max())


# ------------------------------------------------------------------------------------------ the two sides


class Side:
    """One model's training: `step(i)` runs optimizer step i on batch i and records its seconds and losses."""

    def __init__(self, name: str, model, args: argparse.Namespace, precision: str, forward) -> None:
        import torch

        from selfsup.train.optim import build_optimizer

        self.name, self.model, self.args, self.forward = name, model, args, forward
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay, (0.9, 0.999))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        self.seconds: list[float] = []
        self.parts: list[dict[str, float]] = []

    def step(self, i: int) -> None:
        import torch

        tic = time.perf_counter()
        with self.autocast():
            loss, parts = self.forward(i)
        loss.backward()
        if self.args.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        self.seconds.append(time.perf_counter() - tic)
        self.parts.append({"loss": value, **{k: float(v) for k, v in parts.items()}})
        if not math.isfinite(value):
            raise RuntimeError(f"{self.name}: non-finite loss {value} at step {i + 1}")


def selfsup_forward(method, batches, states, args):
    import torch

    from selfsup.nn.quantizer import gumbel_temperature

    cfg = method.cfg
    generators = []
    for state in states:  # fresh generators in the state the crops left them (made before timing)
        g = torch.Generator()
        g.set_state(state)
        generators.append(g)

    def forward(i: int):
        progress = i / args.steps  # selfsup's fit: (step - 1) / steps
        out = method({**batches[i], "generator": generators[i]}, progress)
        parts = {"contrastive": out["contrastive"], "diversity": out["diversity"],
                 "feature_penalty": out.get("feature_penalty", torch.zeros(())),
                 "prob_perplexity": out["prob_perplexity"], "masked_fraction": out["masked_fraction"],
                 "temperature": gumbel_temperature(progress, cfg.temp_start, cfg.temp_end, cfg.temp_anneal_until)}
        parts["contrastive_plus_diversity"] = parts["contrastive"] + cfg.diversity_weight * parts["diversity"]
        return out["loss"], parts

    return forward


def hf_forward(peer, config, batches, method_cfg, args):
    import torch
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from selfsup.nn.quantizer import gumbel_temperature

    collate_s: list[float] = []  # seconds of the collator's work (masks, negatives) in each step

    def forward(i: int):
        tic = time.perf_counter()
        progress = i / args.steps
        audio, lengths = batches[i]["audio"], batches[i]["lengths"]
        B, T = audio.shape
        # The example's DataCollatorForWav2Vec2Pretraining (padding/normalisation already done).
        attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        frames = int(peer._get_feat_extract_output_lengths(T))
        sub_attention_mask = peer._get_feature_vector_attention_mask(frames, attention_mask)
        mask = _compute_mask_indices((B, frames), config.mask_time_prob, config.mask_time_length,
                                     attention_mask=sub_attention_mask, min_masks=config.mask_time_min_masks)
        negatives = _sample_negative_indices((B, frames), config.num_negatives, mask_time_indices=mask)
        mask_time_indices = torch.tensor(mask, dtype=torch.long)
        sampled_negative_indices = torch.tensor(negatives, dtype=torch.long)
        num_losses = mask_time_indices.sum()
        collate_s.append(time.perf_counter() - tic)
        temperature = gumbel_temperature(progress, method_cfg.temp_start, method_cfg.temp_end,
                                         method_cfg.temp_anneal_until)
        peer.set_gumbel_temperature(temperature)
        out = peer(audio, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                   sampled_negative_indices=sampled_negative_indices)
        contrastive = out.contrastive_loss.detach() / num_losses
        diversity = out.diversity_loss.detach() / num_losses  # HF multiplies L_d by the masked frames
        parts = {"contrastive": contrastive, "diversity": diversity,
                 "prob_perplexity": out.codevector_perplexity.detach(),
                 "masked_fraction": num_losses / sub_attention_mask.sum(), "temperature": temperature,
                 "contrastive_plus_diversity": contrastive + config.diversity_loss_weight * diversity}
        return out.loss / num_losses, parts  # = the example's multiply_grads(params, 1 / num_losses)

    forward.collate_s = collate_s
    return forward


def selfsup_chance(method, batches, states, K: int) -> float:
    """Mean over selfsup's masked frames of ln(1 + its distractors): the contrastive loss at chance.
    Replays the method's span masks from the same generator states (outside any timing)."""
    import torch

    from selfsup.nn.masking import span_mask

    cfg, total, count = method.cfg, 0.0, 0
    for batch, state in zip(batches, states):
        g = torch.Generator()
        g.set_state(state)
        frame_mask = torch.arange(int(method.encoder.frame_lengths(torch.tensor([batch["audio"].shape[1]]))))[None, :] \
            < method.encoder.frame_lengths(batch["lengths"])[:, None]
        masked = span_mask(frame_mask, g, mask_prob=cfg.mask_prob, span=cfg.mask_length,
                           min_masks=cfg.min_masks).sum(dim=1)
        for m in masked.tolist():
            total += m * math.log(1 + min(K, max(m - 1, 0)))
            count += m
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ one row


def run_precision(precision: str, batches, states, args: argparse.Namespace, data_info: dict) -> dict:
    import numpy as np
    import torch
    import transformers

    from selfsup.train.runtime import cpu_has_fast_bf16

    tic_all = time.perf_counter()
    method, peer, config = build_pair(args)
    init_diff = init_check(method, peer, batches[0])
    method.train(), peer.train()
    torch.manual_seed(args.seed)  # HF's Gumbel noise draws from the global generator
    np.random.seed(args.seed)  # HF's masks and negatives draw from numpy's global generator
    ours = Side("selfsup", method, args, precision, selfsup_forward(method, batches, states, args))
    peer_forward = hf_forward(peer, config, batches, method.cfg, args)
    theirs = Side("transformers", peer, args, precision, peer_forward)
    for i in range(args.steps):  # warm-up steps, then the timed ones, alternating sides
        ours.step(i)
        theirs.step(i)
        a, b = ours.parts[-1], theirs.parts[-1]
        print(f"bench/speech.py: {precision} step {i + 1:>3} ({'timed' if i >= args.warmup else 'warm-up'}): "
              f"selfsup {ours.seconds[-1]:.2f}s loss {a['loss']:.3f} contrastive {a['contrastive']:.3f} "
              f"perplexity {a['prob_perplexity']:.1f} | HF {theirs.seconds[-1]:.2f}s loss {b['loss']:.3f} "
              f"contrastive {b['contrastive']:.3f} perplexity {b['prob_perplexity']:.1f}", file=sys.stderr)
    timed = slice(args.warmup, args.steps)
    B = args.batch_size

    def rate(side: Side) -> float:
        return B * len(side.seconds[timed]) / sum(side.seconds[timed])

    def last5(side: Side, key: str) -> float | None:
        values = [p[key] for p in side.parts[-5:] if key in p]
        return round(sum(values) / len(values), 4) if values else None

    terms = ["loss", "contrastive", "diversity", "contrastive_plus_diversity", "prob_perplexity"]
    quality = {key: {"selfsup": last5(ours, key), "peer": last5(theirs, key)} for key in terms}
    quality["feature_penalty"] = {"selfsup": last5(ours, "feature_penalty"), "peer": None}
    quality["loss_first_step"] = {"selfsup": round(ours.parts[0]["loss"], 4), "peer": round(theirs.parts[0]["loss"], 4)}
    quality["contrastive_chance"] = {"selfsup": round(selfsup_chance(method, batches, states, args.negatives), 4),
                                     "peer": round(math.log(1 + args.negatives), 4)}
    quality["loss_terms"] = {
        "selfsup": f"contrastive + {method.cfg.diversity_weight} diversity "
                   f"+ {method.cfg.feature_penalty} feature_penalty "
                   f"(min(K, masked - 1) distinct distractors)",
        "peer": f"contrastive + {config.diversity_loss_weight} diversity, per masked frame "
                f"(Wav2Vec2ForPreTraining's summed loss / masked frames; K = {config.num_negatives} distractors "
                "drawn with replacement; no feature penalty)",
    }
    ours_v, peer_v = rate(ours), rate(theirs)
    version = transformers.__version__
    line = {
        "bench": "speech",
        "task": f"wav2vec2 {PRESET} {args.seconds:g}s b{B} {precision}",
        "metric": "samples_per_s",
        "selfsup": round(ours_v, 2),
        "peer": f"transformers {version} Wav2Vec2ForPreTraining",
        "peer_value": round(peer_v, 2),
        "ratio": round(ours_v / peer_v, 3),
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "quality": quality,
        "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": {"selfsup": torch.__version__, "peer": torch.__version__},
        "cpu_bf16": cpu_has_fast_bf16(), "cpu_model": cpu_model(),
        "step_s_median": {"selfsup": round(median(ours.seconds[timed]), 4),
                          "peer": round(median(theirs.seconds[timed]), 4)},
        # of the peer's step: the example collator's numpy masks + negatives and their tensors
        "peer_collate_s_median": round(median(peer_forward.collate_s[timed]), 4),
        "params": {"selfsup": sum(p.numel() for p in method.parameters()),
                   "peer": sum(p.numel() for p in peer.parameters())},
        "init_max_abs_diff": float(f"{init_diff:.3g}"),
        "peak_rss_mb_process": round(peak_rss_mb()),
        "notes": (f"same initial weights; AdamW lr {args.lr} wd {args.weight_decay} constant, clip "
                  f"{args.grad_clip or 'none'}; same cropped clips in the same order; masks/negatives inside "
                  "both timed steps; timed steps alternate between the sides; attn_implementation "
                  f"{peer.config._attn_implementation}"),
        "data": data_info,
        "wall_s": round(time.perf_counter() - tic_all, 1),
    }
    return line


def table(lines: list[dict]) -> str:
    head = (f"{'task':<36} {'selfsup/s':>9} {'HF/s':>7} {'ratio':>6} {'c+d ours':>9} {'c+d HF':>7} "
            f"{'chance ours/HF':>15}")
    rows = [head, "-" * len(head)]
    for line in lines:
        q = line["quality"]
        cd = q["contrastive_plus_diversity"]
        rows.append(f"{line['task']:<36} {line['selfsup']:>9.2f} {line['peer_value']:>7.2f} {line['ratio']:>6.2f} "
                    f"{cd['selfsup']:>9.3f} {cd['peer']:>7.3f} "
                    f"{q['contrastive_chance']['selfsup']:>7.2f}/{q['contrastive_chance']['peer']:<7.2f}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per step")
    parser.add_argument("--seconds", type=float, default=2.0, help="crop length: each clip cut to at most this long")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="clips shorter than this are left out (HF's negative sampler needs 2+ masked frames)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 row only, even where the CPU has bf16 units")
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="AdamW learning rate, constant (at 5e-4 both codebooks collapse within ~30 steps)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--grad-clip", type=float, default=3.0,
                        help="global gradient-norm clip on both sides (selfsup's train default); 0 = none")
    parser.add_argument("--negatives", type=int, default=100, help="K distractors (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")

    import torch

    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    from selfsup.train.runtime import cpu_has_fast_bf16

    tic = time.perf_counter()
    batches, states, info = make_batches(args)
    print(f"bench/speech.py: data {info} in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
    precisions = ["fp32"] + (["bf16"] if cpu_has_fast_bf16() and not args.no_bf16 else [])
    lines = []
    for precision in precisions:
        tic = time.perf_counter()
        line = run_precision(precision, batches, states, args, info)
        lines.append(line)
        print(json.dumps(line), flush=True)
        print(f"bench/speech.py: {precision} took {time.perf_counter() - tic:.0f}s", file=sys.stderr)
    print("\n" + table(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
