"""CLIP (Radford et al. 2021): the symmetric InfoNCE against a loop written from the paper's
equation, its global-batch (offset) form, the learnable temperature and its clamp, config errors,
two gloo ranks against one process, and whole runs: locked towers, a bit-identical resume, a tower
started from another run, and the head file.

Run as a script under torchrun, this file is the 2-rank worker of `test_ddp_matches_one_process`.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from selfsup.encoders import build_encoder
from selfsup.errors import SelfsupError
from selfsup.methods import build_method
from selfsup.methods.clip import HEAD_FILE, clip_loss
from selfsup.modalities.image_text import ImageTextModality

REPO = Path(__file__).resolve().parents[2]
E = 8  # embed_dim of the method-level tests


# -- the loss ------------------------------------------------------------------------------------


def naive_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """The paper's figure 3 in loops: logits_ij = scale * <I_i, T_j>; cross-entropy of row i against
    column i (image -> text) and of column j against row j (text -> image), each averaged, then halved."""
    n = image.shape[0]
    logits = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    image_to_text = text_to_image = 0.0
    for i in range(n):
        row = logits[i]
        image_to_text += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        column = [logits[k][i] for k in range(n)]
        text_to_image += -(column[i] - math.log(sum(math.exp(v) for v in column)))
    return (image_to_text / n + text_to_image / n) / 2


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_the_papers_equation(scale):
    image, text = unit(7, 5, seed=0), unit(7, 5, seed=1)
    # the two directions differ (the logits are not symmetric), so a one-way loss would not pass
    loss, top1 = clip_loss(image.float(), text.float(), torch.tensor(scale))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - naive_clip_loss(image, text, scale)) < 1e-4 * max(1.0, scale / 10)
    expected_top1 = float(((image @ text.T).argmax(dim=1) == torch.arange(7)).double().mean())
    assert top1.item() == pytest.approx(expected_top1)


def test_matched_pairs_score_lower_than_shuffled_ones():
    image = unit(16, 8, seed=2)
    loss_matched, top1 = clip_loss(image.float(), image.float(), torch.tensor(10.0))
    loss_shuffled, _ = clip_loss(image.float(), image.flip(0).float(), torch.tensor(10.0))
    assert top1.item() == 1.0 and loss_matched < loss_shuffled


def test_offset_form_over_the_global_batch_is_the_batch_loss():
    image, text = unit(8, 6, seed=3).float(), unit(8, 6, seed=4).float()
    scale = torch.tensor(7.5)
    whole, top1 = clip_loss(image, text, scale)
    same, same_top1 = clip_loss(image, text, scale, image, text, 0)
    assert torch.equal(same, whole) and torch.equal(same_top1, top1)
    # two "ranks" of 4 rows each scoring against the whole batch: their mean is the batch loss
    parts = [clip_loss(image[r * 4 : (r + 1) * 4], text[r * 4 : (r + 1) * 4], scale, image, text, r * 4)
             for r in range(2)]
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((parts[0][1] + parts[1][1]) / 2, top1)
    # ... and a wrong offset (every rank taking rows 0..3 as its positives) is not
    wrong = clip_loss(image[4:], text[4:], scale, image, text, 0)[0]
    assert not torch.allclose((parts[0][0] + wrong) / 2, whole, atol=1e-3)


# -- the method ----------------------------------------------------------------------------------


def towers(image_dim: int = 16, text_dim: int = 16, **image_knobs):
    """Tiny clip_vit / clip_text towers at the contract batch's sizes (3x16x16 images, vocab 50, 10 tokens)."""
    inputs = ImageTextModality().contract_tower_inputs()
    image = build_encoder("clip_vit", **inputs["image"], dim=image_dim, depth=1, heads=2, **image_knobs)
    text = build_encoder("clip_text", **inputs["text"], dim=text_dim, depth=1, heads=2)
    return {"image": image, "text": text}


def clip(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    return build_method({"name": "clip", "embed_dim": E, **cfg}, **towers())


def test_temperature_starts_at_init_and_is_clamped_after_each_step():
    method = clip()
    assert method.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert method.logit_scale.requires_grad
    assert clip(init_temperature=0.5).logit_scale.item() == pytest.approx(math.log(2.0))
    with torch.no_grad():
        method.logit_scale.fill_(math.log(250.0))
    method.after_optimizer_step(0.5)
    assert method.logit_scale.item() == pytest.approx(math.log(100.0))
    capped = clip(max_logit_scale=20.0)
    with torch.no_grad():
        capped.logit_scale.fill_(10.0)
    capped.after_optimizer_step(0.5)
    assert capped.logit_scale.item() == pytest.approx(math.log(20.0))
    # below the cap it is left as it is
    with torch.no_grad():
        capped.logit_scale.fill_(1.25)
    capped.after_optimizer_step(0.5)
    assert capped.logit_scale.item() == 1.25
    # the logits use exp(s): the logged scale is exp of the parameter
    out = capped(ImageTextModality().contract_batch(4), 0.0)
    assert out["logit_scale"].item() == pytest.approx(math.exp(1.25))


def test_forward_is_the_loss_of_its_embeddings():
    method = clip().eval()
    batch = ImageTextModality().contract_batch(6)
    out = method(batch, 0.0)
    with torch.no_grad():
        image = method.embed_images(batch["views"][0]).double()
        text = method.embed_texts(batch["input_ids"], batch["attention_mask"]).double()
    assert torch.allclose(image.norm(dim=1), torch.ones(6, dtype=torch.float64))
    expected = naive_clip_loss(image, text, math.exp(method.logit_scale.item()))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    out["loss"].backward()
    assert method.logit_scale.grad is not None and method.image_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("knobs", "message"), [
    ({"embed_dim": -4}, "embed_dim"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"embed_dim": 2.5}, "embed_dim"),
    ({"init_temperature": 0.0}, "init_temperature"),
    ({"init_temperature": -0.1}, "init_temperature"),
    ({"max_logit_scale": 1.0}, "max_logit_scale"),
    ({"max_logit_scale": 10.0}, "init_temperature"),  # 1/0.07 starts above a clamp of 10
    ({"embed_dimm": 8}, "embed_dim"),  # a typo names the nearest knob
    ({"lock_text": "yes"}, "lock_text"),
])
def test_config_errors_are_selfsup_errors(knobs, message):
    with pytest.raises(SelfsupError, match=message):
        build_method({"name": "clip", **knobs}, **towers())


def test_locked_towers_get_no_gradient_and_stay_in_eval_mode():
    method = clip(lock_image=True)
    method.train()
    assert not method.image.training and method.text.training and method.training
    assert not any(p.requires_grad for p in method.image.parameters())
    method(ImageTextModality().contract_batch(4), 0.0)["loss"].backward()
    assert all(p.grad is None for p in method.image.parameters())
    assert all(p.grad is not None for p in method.text.parameters())
    assert method.image_proj.weight.grad is not None, "the projection of a locked tower still learns"
    locked_text = clip(lock_text=True).train()
    assert locked_text.image.training and not locked_text.text.training
    assert not any(p.requires_grad for p in locked_text.text.parameters())


# -- two ranks against one process ----------------------------------------------------------------

DDP_BATCH = 8


def ddp_worker(out_path: str) -> None:
    """One rank under torchrun: this rank's half of the global batch through DDP-wrapped CLIP;
    writes its loss and its (DDP-averaged) gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    method = clip(seed=0)
    model = DistributedDataParallel(method)
    batch = ImageTextModality().contract_batch(DDP_BATCH)
    rows = slice(rank * DDP_BATCH // world, (rank + 1) * DDP_BATCH // world)
    shard = {"views": [batch["views"][0][rows]], "input_ids": batch["input_ids"][rows],
             "attention_mask": batch["attention_mask"][rows], "generator": batch["generator"]}
    out = model(shard, 0.0)
    out["loss"].backward()
    torch.save({"loss": out["loss"].detach(), "top1": out["top1"],
                "grads": {n: p.grad for n, p in method.named_parameters()}}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]

    method = clip(seed=0)
    out = method(ImageTextModality().contract_batch(DDP_BATCH), 0.0)
    out["loss"].backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out["loss"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((ranks[0]["top1"] + ranks[1]["top1"]) / 2, out["top1"])
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"]), "the ranks saw different pairs"
    for name, param in method.named_parameters():
        for rank in ranks:
            assert rank["grads"][name] is not None, name
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


# -- whole runs ----------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe", "dot")


def write_pairs(folder: Path) -> Path:
    """24 small pictures of a coloured shape, two captions each, labelled by colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for c, (colour, rgb) in enumerate(COLOURS.items()):
        for s, shape in enumerate(SHAPES):
            for k in range(2):
                pixels = np.full((12, 12, 3), 255, np.uint8)
                where = {"square": np.s_[3:9, 3:9], "stripe": np.s_[:, 5:7], "dot": np.s_[5:7, 5:7]}[shape]
                pixels[where] = rgb
                pixels = np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
                path = f"img/{colour}-{shape}-{k}.png"
                (folder / "img").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / path)
                rows += [(path, f"a {colour} {shape}", colour), (path, f"{shape} in {colour}", colour)]
    with open(folder / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption", "label"), *rows])
    return folder / "pairs.csv"


def clip_run(manifest: Path, *extra: str) -> list[str]:
    return ["method.name=clip", f"data.source={manifest}", "method.embed_dim=16",
            "encoders.image.dim=32", "encoders.image.depth=1", "encoders.image.heads=2",
            "encoders.text.dim=32", "encoders.text.depth=1", "encoders.text.heads=2",
            "data.image_size=16", "data.seq_len=12", "tokenizer.vocab_size=300",
            "train.steps=4", "train.batch_size=16", "train.checkpoint_every=2", "train.log_every=1",
            "train.precision=fp32", "train.device=cpu", *extra]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def base_run(manifest, tmp_path_factory) -> Path:
    """A finished 4-step CLIP run, through the CLI."""
    from selfsup.cli import main

    run = tmp_path_factory.mktemp("clip") / "run"
    assert main(["pretrain", *clip_run(manifest), "--out", str(run)]) == 0
    return run


def tower_weights(run: Path, role: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "towers" / role / "encoder.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_keeps_the_head_beside_the_towers(base_run):
    from selfsup.export.encoder import load_encoder

    head = base_run / HEAD_FILE
    assert head.is_file()
    with safe_open(str(head), "pt") as f:
        assert f.metadata()["kind"] == "clip_head"
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(tensors) == {"image_proj.weight", "text_proj.weight", "logit_scale"}
    assert tensors["image_proj.weight"].shape == (16, 32) and tensors["text_proj.weight"].shape == (16, 32)
    assert tensors["logit_scale"].shape == () and tensors["logit_scale"].item() <= math.log(100.0) + 1e-6
    # the trained head: the final checkpoint's, not the initial one
    final = load_file(str(base_run / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.equal(tensors[k], final[k]) for k in tensors)
    assert tensors["logit_scale"].item() != pytest.approx(math.log(1 / 0.07), abs=1e-7)
    _, image_meta = load_encoder(base_run / "towers" / "image")
    _, text_meta = load_encoder(base_run / "towers" / "text")
    assert image_meta["preprocess"]["modality"] == "image" and text_meta["preprocess"]["modality"] == "text"
    assert (base_run / "towers" / "text" / "tokenizer.json").is_file()


def test_locked_text_tower_is_saved_untrained(manifest, tmp_path):
    from selfsup.cli import main
    from selfsup.config import load_config
    from selfsup.pretrain import untrained_tower

    run = tmp_path / "locked"
    overrides = clip_run(manifest, "method.lock_text=true")
    assert main(["pretrain", *overrides, "--out", str(run)]) == 0
    cfg = load_config(None, overrides)
    untrained = {role: untrained_tower(run, cfg, role).state_dict() for role in ("image", "text")}
    assert same(tower_weights(run, "text"), untrained["text"]), "a locked tower is not trained"
    assert not same(tower_weights(run, "image"), untrained["image"]), "the other tower is"
    head = load_file(str(run / HEAD_FILE))
    assert head["logit_scale"].item() != pytest.approx(math.log(1 / 0.07), abs=1e-7)


def test_resume_is_bit_identical(base_run, manifest, tmp_path):
    from selfsup.config import load_config
    from selfsup.pretrain import pretrain

    cut = tmp_path / "cut"
    pretrain(load_config(None, clip_run(manifest)), cut, stop_after=3, show_progress=False, report=False)
    assert not (cut / "towers").exists()
    pretrain(None, cut, resume=True, show_progress=False, report=False)
    for role in ("image", "text"):
        whole = (base_run / "towers" / role / "encoder.safetensors").read_bytes()
        assert (cut / "towers" / role / "encoder.safetensors").read_bytes() == whole, role
    assert (cut / HEAD_FILE).read_bytes() == (base_run / HEAD_FILE).read_bytes()


def test_image_init_loads_another_runs_tower(base_run, manifest, tmp_path):
    from selfsup.cli import main
    from selfsup.config import load_config
    from selfsup.pretrain import untrained_tower

    # LiT: the image tower from the base run, locked; the text tower learns to meet it
    run = tmp_path / "lit"
    overrides = clip_run(manifest, f"encoders.image.init={base_run}:image", "method.lock_image=true", "train.steps=2",
                         "seed=1")
    assert main(["pretrain", *overrides, "--out", str(run)]) == 0
    theirs = tower_weights(base_run, "image")
    assert same(tower_weights(run, "image"), theirs), "the image tower is the base run's"
    # where pretraining began: the base run's tower (not a random one), and the text tower's seeded start
    cfg = load_config(run / "config.yaml")
    assert same(untrained_tower(run, cfg, "image").state_dict(), theirs)
    assert not same(tower_weights(run, "text"), untrained_tower(run, cfg, "text").state_dict())


def test_starting_towers_load_the_init_and_leave_the_rest_seeded(base_run):
    from selfsup.encoders import build_seeded, describe_encoder
    from selfsup.rundir import starting_towers

    inputs = {"in_channels": 3, "image_size": 16}
    image = describe_encoder("clip_vit", **inputs, dim=32, depth=1, heads=2)
    text = describe_encoder("clip_text", vocab_size=50, max_len=12, dim=32, depth=1, heads=2)
    plain = build_seeded(3, {"image": image, "text": text})
    towers = starting_towers(3, {"image": {**image, "init": f"{base_run}:image"}, "text": text})
    assert same(towers["image"].state_dict(), tower_weights(base_run, "image"))
    assert same(towers["text"].state_dict(), plain["text"].state_dict()), "the seeded stream is unchanged"


def test_init_of_another_architecture_names_the_key(base_run, manifest, tmp_path, capsys):
    from selfsup.cli import EXIT_BAD_INPUT, main
    from selfsup.encoders import build_encoder
    from selfsup.rundir import load_init

    # a narrower ViT differs first at its [CLS] token
    image = build_encoder("clip_vit", in_channels=3, image_size=16, dim=16, depth=1, heads=2)
    first = next(k for k, v in image.state_dict().items() if v.shape != tower_weights(base_run, "image")[k].shape)
    with pytest.raises(SelfsupError, match=rf"encoders\.image\.init=.*architecture.*first difference: {first}\b"):
        load_init(image, f"{base_run}:image", "image")
    # a tower with a block more: the extra keys are named
    deeper = build_encoder("clip_vit", in_channels=3, image_size=16, dim=32, depth=2, heads=2)
    with pytest.raises(SelfsupError, match=r"first difference: blocks\.1\."):
        load_init(deeper, f"{base_run}:image", "image")
    # ... and one without the run's pre-encoder LayerNorm: the keys only the run has are named
    plain = build_encoder("clip_vit", in_channels=3, image_size=16, dim=32, depth=1, heads=2, pre_norm=False)
    with pytest.raises(SelfsupError, match=r"first difference: pre_norm\.bias"):
        load_init(plain, f"{base_run}:image", "image")
    # through the CLI: bad input, the key named, and nothing left of the run
    run = tmp_path / "mismatch"
    overrides = clip_run(manifest, f"encoders.image.init={base_run}:image", "encoders.image.dim=16", "train.steps=1")
    capsys.readouterr()
    assert main(["pretrain", *overrides, "--out", str(run)]) == EXIT_BAD_INPUT
    assert f"first difference: {first}" in capsys.readouterr().err
    assert not (run / "towers").exists() and not (run / "checkpoints").exists()
    for bad in ("", f"hf:{tmp_path}"):
        assert main(["pretrain", *clip_run(manifest, f"encoders.image.init={bad}"), "--out", str(run)]) == EXIT_BAD_INPUT
        assert "must name a run" in capsys.readouterr().err


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
