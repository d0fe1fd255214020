"""Image–text pretraining side by side: selfsup's CLIP against open_clip, same towers, data, batch,
steps, threads and optimizer, in one run with the timed steps alternating between the two.

What is compared, per precision (fp32 always — the headline row —, and bf16 autocast on both sides
as its own row where the CPU has bf16 units, `selfsup.train.runtime.cpu_has_fast_bf16`):

- **selfsup** (this process, selfsup's .venv): `build_method({"name": "clip"}, image=clip_vit,
  text=clip_text)` fed by `PairBatches` with the image–text modality's own view recipe
  (`PAIR_VIEWS`: one random resized crop of 90-100 % of the area, batched, made inside the step) and
  its caption batches (`caption_ids`: ended with end-of-text, right-padded to the batch's longest
  caption). Each step is the body of `selfsup.train.loop.fit`'s step for one rank (lr from `lr_at`,
  the step's generator, the batch, autocast forward, backward, total grad norm, clip, AdamW step,
  `after_optimizer_step`'s logit-scale clamp), minus its metric and checkpoint writes;
- **open_clip** (`bench/peers/open_clip_side.py`, a subprocess in .venv-bench, because open_clip
  needs torchvision and timm): `open_clip.CLIP` from a custom model config, its training transform
  per PIL image in a DataLoader (num_workers 0), `ClipLoss`, each step as `open_clip_train.train.
  train_one_epoch` takes it (see that file).

Config, knob for knob (selfsup preset -> open_clip config): `clip_vit` patch_size, dim, depth,
dim / heads, mlp_ratio -> vision_cfg patch_size, width, layers, head_width (open_clip's heads =
width / head_width), mlp_ratio, image_size = the data's 32 px; `clip_text` dim, heads, depth,
mlp_ratio -> text_cfg width, heads, layers, mlp_ratio, vocab_size = the tokenizer's vocabulary,
context_length = the longest training caption in tokens (end-of-text included; selfsup's
`data.seq_len` is set to it too, so no caption is cut on either side); method `embed_dim` ->
embed_dim; exact GELU on both (open_clip's default, quick_gelu off); LayerNorm eps 1e-6 on both
(open_clip's `norm_kwargs`; its default is PyTorch's 1e-5); text pooling at the end-of-text token:
selfsup's tokenizer puts <|endoftext|> at a low id, not at the highest, so open_clip's default
`pool_type="argmax"` would pool the wrong token; its `pool_type="eos"` with `eos_id` = the
tokenizer's end-of-text id pools the same token selfsup's `pool="last"` does.

How it is kept fair:

- Same weights at step 0: selfsup's towers and head are built (seeded) and open_clip's model is
  loaded with them, renamed (`open_clip_state`; selfsup's patch embedding has a bias, open_clip's
  conv1 has none: it starts at zero and is left out). Before training the peer checks that both
  give the same unit embeddings of a probe batch (`init_max_abs_diff` in the JSON).
- Same data: the built-in emoji pairs (`load_pair_source("emoji", 32)`, CLDR names as captions),
  the run's 80 % training split (`split_holdout`, as `selfsup pretrain` splits), captions tokenized
  once by a BPE tokenizer trained on the training captions as a run trains it (`train_tokenizer`,
  `TokenizerConfig` defaults), the same image rows in the same order at every step (`BatchOrder`)
  and the same caption token ids (selfsup draws a caption per image from the step's generator; the
  draws are replayed here before timing and handed to the peer). open_clip's text batches are
  right-padded to its context length, as its tokenizer pads (`open_clip.CLIP` adds its positional
  table whole, so it needs that length); selfsup trims each batch to its longest caption (the JSON's
  `text_tokens`).
- Same augmentation: a random resized crop of 90-100 % of the area, aspect 3/4-4/3, on both sides
  (selfsup: batched bilinear `grid_sample` in the step; open_clip: torchvision `RandomResizedCrop`,
  bicubic, per PIL image, in the step); the crops themselves differ (different generators).
- Same batch, steps and threads (`torch.set_num_threads(--threads)` in both processes,
  OMP_WAIT_POLICY=PASSIVE set before torch loads in both); same optimizer: AdamW, the lr schedule of
  selfsup's `lr_at` (linear warm-up, cosine; the orchestrator sends each step's lr to the peer),
  betas, eps, weight decay (each side's own rule for which parameters decay: selfsup's
  `param_groups`, open_clip main.py's), foreach on both; the global gradient norm clipped at
  `--grad-clip` on both; the logit scale clamped at ln 100 after every step on both.
- Same precision: nothing in the fp32 row; `torch.autocast("cpu", torch.bfloat16)` around both
  forwards in the bf16 row (selfsup's Runtime; open_clip's `get_autocast("amp_bf16")`), fp32 weights.
- Timing: each side's step runs from the batch (views and captions: selfsup's `PairBatches`; the
  peer's DataLoader with its transforms) to the end of the optimizer step and the clamp, with
  `time.perf_counter` in its own process. Warm-up steps run first, then the timed steps alternate
  selfsup, open_clip, selfsup, ... (each process waits, idle, while the other steps), so that load
  from elsewhere on the machine hits both alike.

Known differences (the implementations differ; the knobs do not): torch versions (selfsup's
.venv has 2.13.0, the peer's 2.14.1: recorded); attention (selfsup's SDPA in fp32 and two matmuls
under CPU bf16; open_clip's `nn.MultiheadAttention`); selfsup's ViT keeps a (zero-gradient) mask
token in its graph and its patch embedding has a bias; open_clip decays its positional embeddings,
selfsup does not; selfsup's text batches are trimmed, open_clip's padded (above).

Metric: samples/s (image–caption pairs per second) = batch x timed steps / the timed steps' summed
seconds (`ratio` = selfsup / open_clip); quality: each side's loss at the last step and the mean of
its last 5 steps (same initial weights, same rows and captions, different crops).

    .venv/bin/python bench/clip.py [--steps 25] [--warmup 5] [--batch 128] [--threads 2] [--no-bf16]
        [--peer-python .venv-bench/bin/python] [--lr 1e-3] [--seed 0]

Prints one JSON line per precision (DESIGN.md, "Benchmarks") and a table on stderr. Nothing else may
run meanwhile (shared/MACHINE.md). The peer environment is built by `make .venv-bench/.stamp-open-clip`
(part of `make bench`).
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when torch's OpenMP starts: before `import torch`

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median, peak_rss_mb  # noqa: E402

sys.path.insert(0, str(REPO))

PEER_SIDE = Path(__file__).resolve().parent / "peers" / "open_clip_side.py"
PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
IMAGE_PRESET, TEXT_PRESET = "clip_vit", "clip_text"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> tuple[str, list[str]]:
    """(model name, the vector-unit flags of CPU_FLAGS it has), from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


# ------------------------------------------------------------------------------------------ data


def make_data(args: argparse.Namespace) -> dict:
    """The training pairs, tokenizer, PairBatches and, per step, the image rows and caption ids."""
    import torch

    from selfsup.config import DataConfig, TokenizerConfig, from_dict
    from selfsup.data.pairs import load_pair_source
    from selfsup.data.pipeline import channel_stats
    from selfsup.data.sampler import BatchOrder
    from selfsup.data.split import split_holdout
    from selfsup.data.tokenizer import train_tokenizer
    from selfsup.data.views import ImageViews, ViewsConfig
    from selfsup.errors import SelfsupError
    from selfsup.modalities.image_text import PAIR_VIEWS, PairBatches
    from selfsup.train.loop import step_generator

    try:
        data = load_pair_source("emoji", args.size)
    except SelfsupError as err:
        raise SystemExit(f"bench/clip.py: the emoji pairs are not available ({err}); "
                         "`selfsup data prepare emoji` makes them") from err
    train, _ = split_holdout(data, DataConfig().holdout_fraction, args.seed)
    captions = [c for cs in train.captions for c in cs]
    tok_cfg = TokenizerConfig()
    tokenizer = train_tokenizer(captions, "bpe", tok_cfg.vocab_size, tok_cfg.min_frequency)
    # the longest caption with its end-of-text token: both sides' context, so nothing is cut
    seq_len = min(max(len(ids) for ids in tokenizer.encode_batch(captions)) + 1, DataConfig().seq_len)
    mean, std = channel_stats(train.images)
    views_cfg = from_dict(ViewsConfig, dict(PAIR_VIEWS), prefix="views.")
    batches = PairBatches(train, ImageViews(views_cfg, args.size, mean, std), tokenizer, seq_len, torch.device("cpu"))
    order = BatchOrder(len(train), args.batch, args.seed)
    indices, ids, widths = [], [], []
    for step in range(1, args.steps + 1):
        rows = order.next()
        # The caption each row gets is drawn inside PairBatches from the step's generator: replay it.
        batch = batches(rows, step_generator(torch.device("cpu"), args.seed, 0, step))
        padded = torch.full((len(rows), seq_len), tokenizer.pad_id, dtype=torch.long)
        padded[:, : batch["input_ids"].shape[1]] = batch["input_ids"]
        indices.append(rows)
        ids.append(padded)
        widths.append(int(batch["input_ids"].shape[1]))
    info = {"source": "emoji", "pairs": len(train), "captions": len(captions), "image_size": args.size,
            "vocab_size": tokenizer.vocab_size, "context_length": seq_len,
            "mean_caption_tokens": round(sum(len(i) + 1 for i in tokenizer.encode_batch(captions)) / len(captions), 2)}
    return {"train": train, "tokenizer": tokenizer, "seq_len": seq_len, "mean": mean, "std": std, "batches": batches,
            "indices": torch.stack(indices), "input_ids": torch.stack(ids), "widths": widths, "info": info}


# ------------------------------------------------------------------------------------------ models


def build_selfsup(data: dict, seed: int):
    import torch

    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method

    torch.manual_seed(seed)
    image = build_encoder(IMAGE_PRESET, in_channels=3, image_size=int(data["train"].images.shape[-1]))
    text = build_encoder(TEXT_PRESET, vocab_size=data["tokenizer"].vocab_size, max_len=data["seq_len"])
    return build_method({"name": "clip"}, image=image, text=text)


def open_clip_config(method, data: dict) -> dict:
    """open_clip's model config (model_configs/*.json format) with selfsup's tower and head sizes."""
    vit, txt = method.image.cfg, method.text.cfg
    assert vit.dim % vit.heads == 0 and vit.pool == "cls" and vit.pre_norm and vit.positions == "learned", vit
    assert txt.causal and txt.pool == "last" and txt.positions == "learned" and not txt.embed_norm, txt
    eps = {"eps": method.image.norm.eps}
    return {
        "embed_dim": method.cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": int(data["train"].images.shape[-1]), "patch_size": vit.patch_size,
                       "width": vit.dim, "layers": vit.depth, "head_width": vit.dim // vit.heads,
                       "mlp_ratio": vit.mlp_ratio, "pool_type": "tok", "norm_kwargs": eps},
        "text_cfg": {"context_length": data["seq_len"], "vocab_size": data["tokenizer"].vocab_size,
                     "width": txt.dim, "heads": txt.heads, "layers": txt.depth, "mlp_ratio": txt.mlp_ratio,
                     "pool_type": "eos", "eos_id": data["tokenizer"].eos_id, "pad_id": data["tokenizer"].pad_id,
                     "norm_kwargs": {"eps": method.text.norm.eps}},
    }


def open_clip_state(method) -> tuple[dict, dict]:
    """(selfsup's weights under open_clip.CLIP's names, what was left out and why)."""
    image, text = method.image, method.text
    state = {}

    def blocks(prefix: str, tower) -> None:
        for i, block in enumerate(tower.blocks):
            p = f"{prefix}transformer.resblocks.{i}."
            state.update({
                p + "ln_1.weight": block.norm1.weight, p + "ln_1.bias": block.norm1.bias,
                p + "attn.in_proj_weight": block.attn.qkv.weight, p + "attn.in_proj_bias": block.attn.qkv.bias,
                p + "attn.out_proj.weight": block.attn.proj.weight, p + "attn.out_proj.bias": block.attn.proj.bias,
                p + "ln_2.weight": block.norm2.weight, p + "ln_2.bias": block.norm2.bias,
                p + "mlp.c_fc.weight": block.mlp[0].weight, p + "mlp.c_fc.bias": block.mlp[0].bias,
                p + "mlp.c_proj.weight": block.mlp[2].weight, p + "mlp.c_proj.bias": block.mlp[2].bias,
            })

    state.update({
        "visual.conv1.weight": image.patch_embed.weight,
        "visual.class_embedding": image.cls_token.reshape(-1),
        "visual.positional_embedding": image.pos_embed[0],
        "visual.ln_pre.weight": image.pre_norm.weight, "visual.ln_pre.bias": image.pre_norm.bias,
        "visual.ln_post.weight": image.norm.weight, "visual.ln_post.bias": image.norm.bias,
        "visual.proj": method.image_proj.weight.T,
        "token_embedding.weight": text.token_embed.weight,
        "positional_embedding": text.pos_embed.weight,
        "ln_final.weight": text.norm.weight, "ln_final.bias": text.norm.bias,
        "text_projection": method.text_proj.weight.T,
        "logit_scale": method.logit_scale,
    })
    blocks("visual.", image)
    blocks("", text)
    left_out = {"image.patch_embed.bias": f"open_clip's conv1 has no bias (selfsup's starts at "
                                          f"{float(image.patch_embed.bias.detach().abs().max()):g})",
                "image.mask_token": "MAE/BEiT's mask token, unused by CLIP"}
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}, left_out


# ------------------------------------------------------------------------------------------ the two sides


class SelfsupSide:
    """selfsup's CLIP, stepped in this process as `fit` steps it."""

    def __init__(self, method, data: dict, args: argparse.Namespace, precision: str, lrs: list[float]) -> None:
        import torch

        from selfsup.config import TrainConfig
        from selfsup.train.optim import build_optimizer
        from selfsup.train.runtime import Runtime

        self.method, self.data, self.args, self.lrs = method, data, args, lrs
        train = TrainConfig()
        self.optimizer = build_optimizer(method, args.lr, args.weight_decay, train.betas)
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.runtime = Runtime(device=torch.device("cpu"),
                               autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.logit_scale: list[float] = []
        self.widths: list[int] = []

    def step(self, i: int) -> None:
        import torch

        from selfsup.train.loop import step_generator

        method, args, step = self.method, self.args, i + 1
        tic = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[i]
        generator = step_generator(torch.device("cpu"), args.seed, 0, step)
        torch.manual_seed(generator.initial_seed())
        batch = self.data["batches"](self.data["indices"][i], generator)
        batch["diagnose"] = False
        with self.runtime.autocast():
            out = method(batch, i / args.steps)
        out["loss"].backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        keys = sorted(out)
        values = torch.stack([out[k].detach().float() for k in keys] + [grad_norm]).tolist()
        if args.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, args.grad_clip, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(step / args.steps)
        self.seconds.append(time.perf_counter() - tic)
        row = dict(zip(keys, values))
        self.losses.append(row["loss"])
        self.logit_scale.append(float(method.logit_scale.detach().exp()))
        self.widths.append(int(batch["input_ids"].shape[1]))
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"selfsup: non-finite loss {row['loss']} at step {step}")


class PeerSide:
    """open_clip in its own process: `step(i)` sends "step i lr" and waits for its reply."""

    def __init__(self, args: argparse.Namespace, work: Path, precision: str, lrs: list[float]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.lrs, self.timeout = lrs, args.peer_timeout
        self.proc = subprocess.Popen(
            [str(args.peer_python), str(PEER_SIDE), "--config", str(work / "config.json"), "--weights",
             str(work / "weights.safetensors"), "--data", str(work / "data.npz"), "--precision", precision,
             "--threads", str(args.threads), "--seed", str(args.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1, env=env)
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.logit_scale: list[float] = []
        self.widths: list[int] = []
        self.ready = self._read("ready")

    def _read(self, event: str) -> dict:
        """The next protocol line (other stdout lines go to stderr); a watchdog kills a hung peer."""
        watchdog = threading.Timer(self.timeout, self.proc.kill)
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    code = self.proc.wait()
                    raise RuntimeError(f"open_clip side exited (code {code}) waiting for {event!r}; its stderr is above")
                if line.startswith("@@ "):
                    reply = json.loads(line[3:])
                    if reply.get("event") != event:
                        raise RuntimeError(f"open_clip side: expected {event!r}, got {reply}")
                    return reply
                sys.stderr.write(line)
        finally:
            watchdog.cancel()

    def step(self, i: int) -> None:
        self.proc.stdin.write(f"step {i} {self.lrs[i]!r}\n")
        self.proc.stdin.flush()
        reply = self._read("step")
        self.seconds.append(reply["seconds"])
        self.losses.append(reply["loss"])
        self.logit_scale.append(reply["logit_scale"])
        self.widths.append(reply["text_len"])

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        done = self._read("done")
        self.proc.wait(timeout=60)
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_peer_inputs(work: Path, method, data: dict) -> dict:
    """config.json, weights.safetensors and data.npz for the peer; returns what was left out of the weights."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from selfsup.config import TrainConfig
    from selfsup.data.views import normalise

    args = data["args"]
    state, left_out = open_clip_state(method)
    save_file(state, str(work / "weights.safetensors"))
    settings = {"model": open_clip_config(method, data),
                "optimizer": {"lr": args.lr, "weight_decay": args.weight_decay, "betas": list(TrainConfig().betas),
                              "eps": 1e-8, "foreach": True},  # selfsup's build_optimizer: torch's eps, foreach
                "grad_clip": args.grad_clip or None}
    (work / "config.json").write_text(json.dumps(settings, indent=1))
    # the probe for the start-up check: the first step's images un-augmented and its captions
    rows = data["indices"][0][: args.probe]
    images = normalise(data["train"].images[rows], data["mean"], data["std"], args.size)
    ids = data["input_ids"][0][: args.probe]
    method.eval()
    with torch.no_grad():
        image_emb = method.embed_images(images)
        text_emb = method.embed_texts(ids, ids != data["tokenizer"].pad_id)
    method.train()
    np.savez(work / "data.npz", x=data["train"].images.numpy(), indices=data["indices"].numpy(),
             input_ids=data["input_ids"].numpy(), mean=np.array(data["mean"], dtype=np.float64),
             std=np.array(data["std"], dtype=np.float64), probe_images=images.numpy(), probe_ids=ids.numpy(),
             probe_image_emb=image_emb.numpy(), probe_text_emb=text_emb.numpy())
    return {"settings": settings, "left_out": left_out}


# ------------------------------------------------------------------------------------------ one row


def run_precision(precision: str, data: dict, args: argparse.Namespace, work: Path) -> dict:
    import torch

    from selfsup.config import TrainConfig
    from selfsup.train.optim import lr_at
    from selfsup.train.runtime import cpu_has_fast_bf16

    tic_all = time.perf_counter()
    train_cfg = TrainConfig()
    lrs = [lr_at(i, args.steps, args.lr, train_cfg.warmup_fraction, train_cfg.min_lr_ratio) for i in range(args.steps)]
    method = build_selfsup(data, args.seed)
    method.train()
    peer_inputs = write_peer_inputs(work, method, data)
    ours = SelfsupSide(method, data, args, precision, lrs)
    theirs = PeerSide(args, work, precision, lrs)
    try:
        ready = theirs.ready
        print(f"bench/clip.py: {precision}: open_clip {ready['open_clip']} ready, init max |diff| "
              f"{ready['init_max_abs_diff']}", file=sys.stderr)
        for i in range(args.steps):  # warm-up steps, then the timed ones, alternating sides
            ours.step(i)
            theirs.step(i)
            print(f"bench/clip.py: {precision} step {i + 1:>3} ({'timed' if i >= args.warmup else 'warm-up'}): "
                  f"selfsup {ours.seconds[-1]:.2f}s loss {ours.losses[-1]:.4f} | open_clip "
                  f"{theirs.seconds[-1]:.2f}s loss {theirs.losses[-1]:.4f}", file=sys.stderr)
        done = theirs.close()
    finally:
        theirs.kill()
    timed = slice(args.warmup, args.steps)
    B = args.batch

    def rate(side) -> float:
        return B * len(side.seconds[timed]) / sum(side.seconds[timed])

    def last5(values: list[float]) -> float:
        return round(sum(values[-5:]) / len(values[-5:]), 4)

    ours_v, peer_v = rate(ours), rate(theirs)
    cpu_model, cpu_flags = cpu_info()
    model_cfg = peer_inputs["settings"]["model"]
    line = {
        "bench": "clip",
        "task": f"clip {IMAGE_PRESET}+{TEXT_PRESET} emoji {args.size}px b{B} {precision}",
        "metric": "samples_per_s",
        "selfsup": round(ours_v, 2),
        "peer": f"open_clip {ready['open_clip']}",
        "peer_value": round(peer_v, 2),
        "ratio": round(ours_v / peer_v, 3),
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "quality": {
            "loss_final": {"selfsup": round(ours.losses[-1], 4), "peer": round(theirs.losses[-1], 4)},
            "loss_last5": {"selfsup": last5(ours.losses), "peer": last5(theirs.losses)},
            "loss_first_step": {"selfsup": round(ours.losses[0], 4), "peer": round(theirs.losses[0], 4)},
            "loss_chance": round(math.log(B), 4),
            "logit_scale_final": {"selfsup": round(ours.logit_scale[-1], 3), "peer": round(theirs.logit_scale[-1], 3)},
        },
        "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": {"selfsup": torch.__version__, "peer": ready["torch"]},
        "torchvision_peer": ready["torchvision"],
        "cpu_bf16": cpu_has_fast_bf16(), "cpu_model": cpu_model, "cpu_flags": cpu_flags,
        "step_s_median": {"selfsup": round(median(ours.seconds[timed]), 4),
                          "peer": round(median(theirs.seconds[timed]), 4)},
        "params": {"selfsup": sum(p.numel() for p in method.parameters()), "peer": ready["params"]},
        "init_max_abs_diff": {k: float(f"{v:.3g}") for k, v in ready["init_max_abs_diff"].items()},
        "weights_left_out": peer_inputs["left_out"],
        "augmentation": ("random resized crop, area 0.9-1.0, aspect 3/4-4/3, both sides, inside the timed step "
                         "(selfsup: PairBatches' batched bilinear ImageViews; open_clip: its training transform, "
                         "torchvision RandomResizedCrop bicubic per PIL image, DataLoader num_workers=0)"),
        "text_tokens": {"selfsup_mean_width": round(sum(ours.widths[timed]) / len(ours.widths[timed]), 2),
                        "peer_width": theirs.widths[-1]},
        "peer_config": model_cfg,
        "optimizer": (f"AdamW lr {args.lr} (selfsup lr_at: warm-up {train_cfg.warmup_fraction}, cosine to "
                      f"{train_cfg.min_lr_ratio}x), betas {tuple(train_cfg.betas)}, eps 1e-8, weight decay "
                      f"{args.weight_decay} (each side's own no-decay rule), foreach, grad clip "
                      f"{args.grad_clip or 'none'}, logit scale clamped at ln 100"),
        "peak_rss_mb": {"selfsup_process": round(peak_rss_mb()), "peer": round(done["peak_rss_mb"])},
        "data": data["info"],
        "notes": ("same initial weights; same image rows and caption ids step for step; timed steps alternate "
                  "between the sides (two processes, one waits while the other steps)"),
        "wall_s": round(time.perf_counter() - tic_all, 1),
    }
    return line


def table(lines: list[dict]) -> str:
    head = f"{'task':<44} {'selfsup/s':>9} {'open_clip/s':>11} {'ratio':>6} {'loss ours':>9} {'loss peer':>9}"
    rows = [head, "-" * len(head)]
    for line in lines:
        loss = line["quality"]["loss_last5"]
        rows.append(f"{line['task']:<44} {line['selfsup']:>9.2f} {line['peer_value']:>11.2f} {line['ratio']:>6.2f} "
                    f"{loss['selfsup']:>9.3f} {loss['peer']:>9.3f}")
    return "\n".join(rows)


def main() -> None:
    from selfsup.config import TrainConfig  # light: no torch

    train = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=128, help="image–caption pairs per step")
    parser.add_argument("--size", type=int, default=32, help="image side, px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 row only, even where the CPU has bf16 units")
    parser.add_argument("--lr", type=float, default=train.lr, help="peak AdamW learning rate (selfsup's default)")
    parser.add_argument("--weight-decay", type=float, default=train.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=train.grad_clip or 0.0,
                        help="global gradient-norm clip on both sides (selfsup's train default); 0 = none")
    parser.add_argument("--probe", type=int, default=32, help="pairs in the start-up same-weights check")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="python of the open_clip environment")
    parser.add_argument("--peer-timeout", type=float, default=900, help="seconds to wait for any one peer reply")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    if not args.peer_python.exists():
        raise SystemExit(f"bench/clip.py: no open_clip environment at {args.peer_python}; "
                         "build it with `make .venv-bench/.stamp-open-clip` (or pass --peer-python)")

    import torch

    torch.set_num_threads(args.threads)
    from selfsup.train.runtime import cpu_has_fast_bf16

    tic = time.perf_counter()
    data = make_data(args)
    data["args"] = args
    print(f"bench/clip.py: data {data['info']} in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
    precisions = ["fp32"] + (["bf16"] if cpu_has_fast_bf16() and not args.no_bf16 else [])
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        for precision in precisions:
            tic = time.perf_counter()
            work = Path(tmp) / precision
            work.mkdir()
            line = run_precision(precision, data, args, work)
            lines.append(line)
            print(json.dumps(line), flush=True)
            print(f"bench/clip.py: {precision} took {time.perf_counter() - tic:.0f}s", file=sys.stderr)
    print("\n" + table(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
