"""The lightly side of bench/vision.py: one pretraining run written the way lightly's examples write it.

Runs in its own environment (.venv-bench: torch 2.14.1, torchvision 0.29.1, lightly 1.6, built by
`make bench`), because lightly needs torchvision, which does not install beside selfsup's torch.
It never imports selfsup: the orchestrator hands it the data (a .npz it wrote once for both sides)
and the recipe numbers (JSON, read from selfsup's own method/view defaults) on the command line.

What it does, all from lightly's own modules as its examples use them:
- backbone: torchvision ResNet-18 with the CIFAR stem (conv1 3x3 stride 1, max-pool removed, fc
  dropped), or torchvision's VisionTransformer (32 px, patch 4, 12 layers, 192-d, 3 heads, MLP 768)
  wrapped in lightly's `MaskedVisionTransformerTorchvision` (its class token is the embedding);
- data: a torch Dataset over PIL images with lightly's transform (`SimCLRTransform`,
  `BYOLTransform`, `DINOTransform`, `MAETransform`), a `DataLoader` with `--workers` worker
  processes; the transforms are part of every timed step;
- heads, losses and helpers: `SimCLRProjectionHead` + `NTXentLoss`; `BYOLProjectionHead`,
  `BYOLPredictionHead`, `NegativeCosineSimilarity`, `update_momentum`, `cosine_schedule`;
  `DINOProjectionHead` + `DINOLoss` (+ `cancel_last_layer_gradients`); `deactivate_requires_grad`
  on the teachers; as in lightly's DINO example the teacher head is a fresh `DINOProjectionHead`
  (not a copy of the student's) and the teacher backbone a deep copy;
- MAE, as lightly's torchvision MAE example (lightly's current example needs timm, which is not
  installed here): `MaskedVisionTransformerTorchvision` as the encoder (`encode(idx_keep=...)` runs
  on the visible patches only) + `masked_autoencoder.MAEDecoder` (torchvision blocks, fixed
  sine-cosine positions) with the model's own mask token, `utils.random_token_mask` (the class token
  is never masked), `repeat_token` / `set_at_index` / `get_at_index` / `patchify`, `nn.MSELoss` on
  the masked patches; the norm-pix target (each patch normalised by its own mean and variance) is
  `utils.normalize_mean_var`. Decoder width/depth/heads and the mask ratio come from the recipe;
- optimizer: AdamW (lr / weight decay from the recipe, selfsup's defaults) with lightly's
  `CosineWarmupScheduler` per step. lightly's SimCLR/BYOL examples use SGD(lr=0.06) and its DINO
  example Adam(lr=1e-3); AdamW on both sides keeps the optimizer out of the comparison;
- fp32 (lightly's default), `torch.set_num_threads(--threads)`; `--precision bf16` runs each
  step's forward and loss under `torch.autocast(device, torch.bfloat16)` (the backward outside it,
  as PyTorch's AMP recipe and Lightning's "bf16-mixed" do), and the embedding too;
- `--device cuda` (or `cuda:N`; default `cpu`): the model, the loss (DINO's centre) and every batch
  on the GPU. The transforms stay in the DataLoader on the CPU, as lightly works; each batch is
  moved to the GPU inside the timed step. TF32 is switched off for matmuls and cuDNN
  (`torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False`), the same
  setting as bench/selfsup_side.py, so fp32 is plain fp32 on both sides. Without CUDA,
  `--device cuda` stops with a message before lightly is imported.

A step is timed (wall clock) from fetching the batch to the end of the optimizer step — on CUDA
closed by `torch.cuda.synchronize()` before the clock is read, so it covers the step's kernels, as
on selfsup's side; the result is the median after `--warmup` steps, as samples/s (a sample is one
image, however many views). At the end the backbone (eval mode, no augmentation, normalised with
the data's mean/std) embeds the bank and test images — on the run's device and precision, the
features returned to the CPU — and saves them as .npy for the orchestrator's kNN.

    .venv-bench/bin/python bench/peers/lightly_side.py --method simclr --encoder resnet18 \\
        --data DATA.npz --features-out DIR [--steps 8 --warmup 2 --batch 256 --threads 2 --workers 0] \\
        [--device cuda] [--precision bf16]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import resource
import statistics
import sys
import time
from pathlib import Path

# Used where the orchestrator passes no recipe: selfsup's defaults when this file was written.
DEFAULT_RECIPE = {
    "lr": 1e-3, "weight_decay": 1e-4, "warmup_fraction": 0.05,
    "min_scale": 0.2,  # random-resized-crop area lower bound (SimCLR/BYOL views)
    "temperature": 0.2,  # SimCLR NT-Xent
    "proj_hidden": 4096, "proj_dim": 256, "byol_momentum": 0.99,  # BYOL
    "dino_out_dim": 2048, "dino_hidden_dim": 512, "dino_bottleneck_dim": 64, "dino_head_batchnorm": True,
    "dino_momentum": 0.99, "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
    "teacher_temp_warmup": 0.3, "center_momentum": 0.9, "freeze_last_layer": 0.01,
    "global_crop_scale": [0.4, 1.0], "local_crop_scale": [0.05, 0.4],
    "mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, "norm_pix_loss": True,  # MAE
}


def rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def device_name(name: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise argparse.ArgumentTypeError(f"{name!r} is not cpu, cuda or cuda:N")
    return name


def build_backbone(name: str, image_size: int):
    """(backbone, embedding dim): backbone(x) -> [B, D] (after flatten)."""
    import torchvision
    from torch import nn

    if name == "resnet18":
        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
        return nn.Sequential(*list(resnet.children())[:-1]), 512
    if name == "vit_tiny":
        from lightly.models.modules.masked_vision_transformer_torchvision import MaskedVisionTransformerTorchvision
        from torchvision.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(image_size=image_size, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
        return MaskedVisionTransformerTorchvision(vit=vit), 192
    raise SystemExit(f"lightly_side: unknown encoder {name!r} (resnet18, vit_tiny)")


def build_transform(method: str, size: int, n_local: int, local_size: int, normalize: dict, recipe: dict):
    from lightly.transforms import BYOLTransform, DINOTransform, MAETransform, SimCLRTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

    if method == "simclr":
        return SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0, min_scale=recipe["min_scale"],
                               normalize=normalize)
    if method == "byol":
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=size, min_scale=recipe["min_scale"], normalize=normalize),
            view_2_transform=BYOLView2Transform(input_size=size, min_scale=recipe["min_scale"], normalize=normalize),
        )
    if method == "dino":
        return DINOTransform(global_crop_size=size, global_crop_scale=tuple(recipe["global_crop_scale"]),
                             local_crop_size=local_size, local_crop_scale=tuple(recipe["local_crop_scale"]),
                             n_local_views=n_local, normalize=normalize)
    if method == "mae":  # random-resized crop (bicubic) + horizontal flip
        return MAETransform(input_size=size, min_scale=recipe["min_scale"], normalize=normalize)
    raise SystemExit(f"lightly_side: unknown method {method!r} (simclr, byol, dino, mae)")


def build_model(method: str, backbone, dim: int, steps: int, recipe: dict):
    """(model, loss, step_fn): step_fn(model, loss, views, step) -> loss tensor, as lightly's examples."""
    import torch
    from torch import nn
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    if method == "simclr":
        class SimCLR(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.projection_head = SimCLRProjectionHead(dim, dim, 128)

            def forward(self, x):
                return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def simclr_step(model, criterion, views, step):
            x0, x1 = views
            return criterion(model(x0), model(x1))

        return SimCLR(), NTXentLoss(temperature=recipe["temperature"]), simclr_step

    if method == "byol":
        class BYOL(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.projection_head = BYOLProjectionHead(dim, recipe["proj_hidden"], recipe["proj_dim"])
                self.prediction_head = BYOLPredictionHead(recipe["proj_dim"], recipe["proj_hidden"], recipe["proj_dim"])
                self.backbone_momentum = copy.deepcopy(self.backbone)
                self.projection_head_momentum = copy.deepcopy(self.projection_head)
                deactivate_requires_grad(self.backbone_momentum)
                deactivate_requires_grad(self.projection_head_momentum)

            def forward(self, x):
                return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

            def forward_momentum(self, x):
                return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

        def byol_step(model, criterion, views, step):
            x0, x1 = views
            momentum = cosine_schedule(step, steps, recipe["byol_momentum"], 1)
            update_momentum(model.backbone, model.backbone_momentum, m=momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

        return BYOL(), NegativeCosineSimilarity(), byol_step

    if method == "dino":
        # Steps during which the prototypes get no gradient, and the teacher-temperature warm-up, in steps.
        freeze_steps = math.ceil(recipe["freeze_last_layer"] * steps)
        warmup_teacher_steps = max(1, round(recipe["teacher_temp_warmup"] * steps))
        head_args = (dim, recipe["dino_hidden_dim"], recipe["dino_bottleneck_dim"], recipe["dino_out_dim"])

        class DINO(nn.Module):
            def __init__(self):
                super().__init__()
                self.student_backbone = backbone
                self.student_head = DINOProjectionHead(*head_args, batch_norm=recipe["dino_head_batchnorm"],
                                                       freeze_last_layer=freeze_steps)
                self.teacher_backbone = copy.deepcopy(backbone)
                self.teacher_head = DINOProjectionHead(*head_args, batch_norm=recipe["dino_head_batchnorm"])
                deactivate_requires_grad(self.teacher_backbone)
                deactivate_requires_grad(self.teacher_head)

            def forward(self, x):
                return self.student_head(self.student_backbone(x).flatten(start_dim=1))

            def forward_teacher(self, x):
                return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

        criterion = DINOLoss(output_dim=recipe["dino_out_dim"], warmup_teacher_temp=recipe["warmup_teacher_temp"],
                             teacher_temp=recipe["teacher_temp"], warmup_teacher_temp_epochs=warmup_teacher_steps,
                             student_temp=recipe["student_temp"], center_momentum=recipe["center_momentum"])

        def dino_step(model, criterion, views, step):
            momentum = cosine_schedule(step, steps, recipe["dino_momentum"], 1)
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
            update_momentum(model.student_head, model.teacher_head, m=momentum)
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            return criterion(teacher_out, student_out, epoch=step)  # "epoch" indexes the warm-up: steps here

        return DINO(), criterion, dino_step

    if method == "mae":
        from lightly.models import utils
        from lightly.models.modules.masked_autoencoder import MAEDecoder
        from lightly.models.modules.masked_vision_transformer_torchvision import MaskedVisionTransformerTorchvision

        if not isinstance(backbone, MaskedVisionTransformerTorchvision):
            raise SystemExit("lightly_side: mae needs the ViT backbone (--encoder vit_tiny)")
        vit = backbone.vit
        decoder_dim = recipe["decoder_dim"]

        class MAE(nn.Module):
            """lightly's torchvision MAE example, with the decoder sized by the recipe."""

            def __init__(self):
                super().__init__()
                self.mask_ratio = recipe["mask_ratio"]
                self.patch_size = vit.patch_size
                self.sequence_length = vit.seq_length  # patches + the class token
                self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
                self.backbone = backbone
                self.decoder = MAEDecoder(
                    seq_length=vit.seq_length, num_layers=recipe["decoder_depth"], num_heads=recipe["decoder_heads"],
                    embed_input_dim=vit.hidden_dim, hidden_dim=decoder_dim, mlp_dim=decoder_dim * 4,
                    out_dim=vit.patch_size**2 * 3, dropout=0.0, attention_dropout=0.0,
                )

            def forward_encoder(self, images, idx_keep=None):
                return self.backbone.encode(images=images, idx_keep=idx_keep)

            def forward_decoder(self, x_encoded, idx_keep, idx_mask):
                batch_size = x_encoded.shape[0]
                x_decode = self.decoder.embed(x_encoded)
                x_masked = utils.repeat_token(self.mask_token, (batch_size, self.sequence_length))
                x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
                x_decoded = self.decoder.decode(x_masked)
                x_pred = utils.get_at_index(x_decoded, idx_mask)  # only the masked tokens are predicted
                return self.decoder.predict(x_pred)

            def forward(self, images):
                batch_size = images.shape[0]
                idx_keep, idx_mask = utils.random_token_mask(
                    size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device)
                x_encoded = self.forward_encoder(images=images, idx_keep=idx_keep)
                x_pred = self.forward_decoder(x_encoded=x_encoded, idx_keep=idx_keep, idx_mask=idx_mask)
                patches = utils.patchify(images, self.patch_size)
                target = utils.get_at_index(patches, idx_mask - 1)  # idx_mask counts the class token
                if recipe["norm_pix_loss"]:
                    target = utils.normalize_mean_var(target, dim=-1)
                return x_pred, target

        def mae_step(model, criterion, views, step):
            predictions, targets = model(views[0])  # views holds a single view
            return criterion(predictions, targets)

        return MAE(), nn.MSELoss(), mae_step

    raise SystemExit(f"lightly_side: unknown method {method!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=["simclr", "byol", "dino", "mae"])
    parser.add_argument("--encoder", required=True, choices=["resnet18", "vit_tiny"])
    parser.add_argument("--data", required=True, type=Path, help=".npz from bench/vision.py")
    parser.add_argument("--features-out", type=Path, help="folder for bank.npy / test.npy; omitted = no embedding")
    parser.add_argument("--init-features-out", type=Path, help="folder for the random-init features (before training)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--n-local", type=int, default=2, help="DINO local crops per image")
    parser.add_argument("--local-size", type=int, default=16, help="DINO local crop side, px")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of DEFAULT_RECIPE (selfsup's defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (lightly's default) or bf16 autocast around the forward and loss")
    args = parser.parse_args()
    recipe = {**DEFAULT_RECIPE, **json.loads(args.recipe)}

    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"lightly_side: --device {args.device} asks for CUDA, but torch.cuda.is_available() is "
                             f"False here (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"lightly_side: --device {args.device}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        if device.index is not None:  # set_device refuses a bare torch.device("cuda")
            torch.cuda.set_device(device.index)
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32, the same setting as selfsup_side.py
        torch.backends.cudnn.allow_tf32 = False

    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    import numpy as np
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    import lightly
    from lightly.utils.scheduler import CosineWarmupScheduler

    assert "selfsup" not in sys.modules, "the peer side must not import selfsup"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = np.load(args.data)
    x_train = data["x"]  # uint8 [N, 3, S, S]
    size = int(x_train.shape[-1])
    mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]

    class Images(Dataset):
        """In-memory uint8 images handed out as PIL, like torchvision's CIFAR10 dataset."""

        def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
            self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # HWC for PIL
            self.labels, self.transform = labels, transform

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, index: int):
            return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])

    transform = build_transform(args.method, size, args.n_local, args.local_size, {"mean": mean, "std": std}, recipe)
    loader = DataLoader(Images(x_train, data["y"], transform), batch_size=args.batch, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    backbone, dim = build_backbone(args.encoder, size)
    model, criterion, step_fn = build_model(args.method, backbone, dim, args.steps, recipe)
    if cuda:
        model.to(device)
        criterion.to(device)  # DINOLoss keeps its centre in a buffer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe["lr"],
                                  weight_decay=recipe["weight_decay"])
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=round(recipe["warmup_fraction"] * args.steps),
                                      max_epochs=args.steps)

    embedder = model.student_backbone if args.method == "dino" else model.backbone
    mean_t, std_t = torch.tensor(mean).reshape(1, -1, 1, 1), torch.tensor(std).reshape(1, -1, 1, 1)
    if cuda:
        mean_t, std_t = mean_t.to(device), std_t.to(device)

    @torch.no_grad()
    def embed(folder: Path) -> None:
        """bank.npy / test.npy: the backbone's features of the un-augmented, normalised images
        (on the run's device and precision; float32 on the CPU)."""
        embedder.eval()
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("bank", "test"):
            images = data[f"x_{name}"]
            features = []
            for i in range(0, len(images), 512):
                x = torch.from_numpy(images[i:i + 512])
                x = x.to(device) if cuda else x
                with autocast():
                    features.append(embedder((x.float() / 255 - mean_t) / std_t).flatten(start_dim=1).float().cpu())
            np.save(folder / f"{name}.npy", torch.cat(features).numpy())
        model.train()

    if args.init_features_out is not None:  # the random-init baseline, before any step
        embed(args.init_features_out)

    def batches():
        while True:  # epochs: 4,000 images make 15 batches of 256
            yield from loader

    stream = batches()
    step_s, losses = [], []
    for step in range(args.steps):
        tic = time.perf_counter()
        views, _ = next(stream)
        if cuda:
            views = [view.to(device) for view in views]
        with autocast():
            loss = step_fn(model, criterion, views, step)
        loss.backward()
        if args.method == "dino":
            model.student_head.cancel_last_layer_gradients(current_epoch=step)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if cuda:
            torch.cuda.synchronize(device)  # the step's kernels are done before the clock is read
        step_s.append(time.perf_counter() - tic)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"lightly_side: non-finite loss at step {step}")
    del stream, loader  # ends the worker processes, so RUSAGE_CHILDREN covers them
    timed = step_s[args.warmup:] or step_s

    out = {
        "side": "lightly", "version": lightly.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "method": args.method, "encoder": args.encoder, "samples_per_s": args.batch / statistics.median(timed),
        "step_s": [round(s, 3) for s in step_s], "final_loss": losses[-1], "workers": args.workers,
        "optimizer": "AdamW", "precision": args.precision, "threads": args.threads, "batch": args.batch,
        "views": len(views), "view_sizes": sorted({int(v.shape[-1]) for v in views}, reverse=True),
        "device": args.device,
    }
    if cuda:
        out["device_name"] = torch.cuda.get_device_name(device)
        out["tf32"] = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20  # training (and the init embedding)
    if args.features_out is not None:
        tic = time.perf_counter()
        embed(args.features_out)
        out["embed_s"] = round(time.perf_counter() - tic, 2)
    out["peak_rss_mb"] = rss_mb(resource.RUSAGE_SELF)
    out["peak_rss_workers_mb"] = rss_mb(resource.RUSAGE_CHILDREN) if args.workers else 0.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
