"""The open_clip side of bench/clip.py: CLIP training steps written the way open_clip's own trainer
(`open_clip_train/train.py`, `train_one_epoch`) takes them, driven step by step by the orchestrator.

Runs in its own environment (.venv-bench: torch 2.14.1, torchvision 0.29.1, open-clip-torch 3.3.0,
timm, built by `make bench`), because open_clip needs torchvision and timm, which do not install
beside selfsup's torch. It never imports selfsup: the orchestrator hands it

- `--config`: a JSON file with the open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`,
  the format of open_clip's `model_configs/*.json`), registered with `open_clip.add_model_config`
  and built by `open_clip.create_model_and_transforms` with the data's mean/std; plus the optimizer
  settings and the gradient clip;
- `--weights`: a .safetensors file of initial weights under open_clip's own names (selfsup's
  initial weights, renamed by the orchestrator), loaded with `load_state_dict(strict=True)`;
- `--data`: a .npz of plain arrays: the training images (uint8 [N, 3, S, S]), the image rows of
  every step (`indices` [steps, B]), every step's caption token ids (`input_ids` [steps, B,
  context_length], selfsup's tokenizer, right-padded to the context length as open_clip's tokenizer
  pads), and a probe batch with selfsup's embeddings of it for the start-up check.

Each step, as `train_one_epoch` with accum_freq 1: the learning rate the orchestrator sends, the batch
from a `DataLoader` (num_workers 0, so nothing runs between the timed steps) over PIL images with
open_clip's training transform (`RandomResizedCrop(S, scale=(0.9, 1.0))`, bicubic, to tensor,
normalise), `zero_grad`, the model and `ClipLoss` under open_clip's autocast for the precision
(`open_clip_train.precision.get_autocast`: none for fp32, bf16 autocast for amp_bf16), backward,
`clip_grad_norm_`, `optimizer.step()`, and the logit scale clamped to [0, ln 100]. The optimizer is
open_clip's `main.py` AdamW with its two groups (no decay where ndim < 2 or the name holds bn/ln/bias/
logit_scale) and the orchestrator's lr, betas, eps, weight decay and `foreach`.

Protocol (stdout lines starting with "@@ ", each a JSON object; everything else goes to stderr):
  start-up             -> @@ {"event": "ready", versions, params, init_max_abs_diff}
  stdin "step I LR"    -> @@ {"event": "step", "i": I, "seconds": ..., "loss": ...}
  stdin "quit"         -> @@ {"event": "done", "peak_rss_mb": ...}, then exit

The orchestrator alternates: while this process steps, selfsup waits, and the other way round.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path


def reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="JSON: model (open_clip config), optimizer, grad_clip")
    parser.add_argument("--weights", required=True, type=Path, help=".safetensors of initial weights (open_clip names)")
    parser.add_argument("--data", required=True, type=Path, help=".npz from bench/clip.py")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = json.loads(args.config.read_text())

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the transforms' random crops draw from torch's global generator
    import open_clip
    import torchvision
    from open_clip_train.precision import get_autocast
    from PIL import Image
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, Dataset

    assert "selfsup" not in sys.modules, "the peer side must not import selfsup"

    data = np.load(args.data)
    x = data["x"]  # uint8 [N, 3, S, S]
    steps_indices = data["indices"]  # int64 [steps, B]
    steps_ids = torch.from_numpy(data["input_ids"])  # int64 [steps, B, context_length]
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])

    # The model: a custom config registered the way open_clip reads its model_configs/*.json.
    name = "selfsup-bench-clip"
    config_dir = args.config.parent / "open_clip_config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(settings["model"]))
    open_clip.add_model_config(config_dir)
    precision = "amp_bf16" if args.precision == "bf16" else "fp32"
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        name, precision=precision, device="cpu", image_mean=mean, image_std=std, output_dict=True)
    model.load_state_dict(load_file(str(args.weights)), strict=True)
    loss_fn = open_clip.ClipLoss()
    autocast = get_autocast(precision, device_type="cpu")

    @torch.no_grad()
    def init_check() -> dict[str, float]:
        """Max |selfsup - open_clip| of the unit embeddings of the probe batch (fp32, eval mode)."""
        model.eval()
        image = model.encode_image(torch.from_numpy(data["probe_images"]), normalize=True)
        text = model.encode_text(torch.from_numpy(data["probe_ids"]), normalize=True)
        model.train()
        return {"image": float((image - torch.from_numpy(data["probe_image_emb"])).abs().max()),
                "text": float((text - torch.from_numpy(data["probe_text_emb"])).abs().max())}

    init_diff = init_check()

    # open_clip_train/main.py's AdamW groups.
    opt = settings["optimizer"]
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": opt["weight_decay"]}],
        lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], foreach=opt["foreach"])
    grad_clip = settings.get("grad_clip")

    class Pairs(Dataset):
        """In-memory uint8 images handed out as PIL with open_clip's training transform, and the step's
        caption ids (tokenized once by the orchestrator, as open_clip's CsvDataset tokenizes per item)."""

        def __init__(self) -> None:
            self.images = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # HWC for PIL

        def __len__(self) -> int:
            return steps_ids.shape[0] * steps_ids.shape[1]

        def __getitem__(self, key: tuple[int, int]):
            step, row = key
            image = Image.fromarray(self.images[int(steps_indices[step, row])])
            return preprocess_train(image), steps_ids[step, row]

    B = steps_indices.shape[1]
    loader = DataLoader(Pairs(), batch_sampler=[[(s, r) for r in range(B)] for s in range(len(steps_indices))],
                        num_workers=0)
    batches = iter(loader)
    model.train()
    reply({"event": "ready", "open_clip": open_clip.__version__, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "params": sum(p.numel() for p in model.parameters()),
           "init_max_abs_diff": init_diff, "precision": precision, "transform": repr(preprocess_train)})

    expected = 0
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        assert parts[0] == "step" and int(parts[1]) == expected, f"open_clip_side: unexpected command {line!r}"
        i, lr = int(parts[1]), float(parts[2])
        expected += 1

        tic = time.perf_counter()
        for group in optimizer.param_groups:  # open_clip's scheduler(step) sets every group's lr
            group["lr"] = lr
        images, texts = next(batches)
        optimizer.zero_grad()
        with autocast():
            out = model(images, texts)
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = total.item()
        seconds = time.perf_counter() - tic
        if not math.isfinite(value):
            raise SystemExit(f"open_clip_side: non-finite loss {value} at step {i + 1}")
        reply({"event": "step", "i": i, "seconds": seconds, "loss": value,
               "logit_scale": float(model.logit_scale.detach().exp()), "text_len": int(texts.shape[1])})

    reply({"event": "done", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
