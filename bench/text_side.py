"""One side of bench/text.py: selfsup's own training loop, or a plain Hugging Face transformers loop.

Both sides read the folder bench/text.py writes once per objective — `tokenizer.json` (trained
there, loaded here) and `blocks.pt` (the packed int64 blocks with their document ids, and the
training documents' names) — and draw their batches with `selfsup.data.sampler.BatchOrder` under
the same seed, so step t of either side trains on the very same blocks.

- `--side selfsup`: `selfsup.train.loop.fit` with `TextBatches`, `build_encoder("text_encoder" |
  "text_decoder", vocab_size, max_len)` and `build_method({"name": "mlm", mask_id, special_ids} |
  {"name": "next_token"})`, as `selfsup pretrain` assembles a text run (`_assemble_text`). The step
  times and losses are read back from the run's metrics.jsonl (`tokens_per_s`, `loss`).
- `--side hf`: `BertForMaskedLM` / `GPT2LMHeadModel` built from a config of the same sizes, and the
  loop HF users write: batch (MLM: `DataCollatorForLanguageModeling`, 15 %, 80/10/10; GPT-2:
  labels = input_ids, shifted inside the model), `model(input_ids=..., labels=...).loss`,
  `backward`, clip, `AdamW.step`, `zero_grad`; weight decay off for biases and LayerNorm weights as
  HF's Trainer does. Each step is timed with `time.perf_counter` from drawing the batch to the end of
  the optimizer step, as selfsup's loop times its own.

    .venv/bin/python bench/text_side.py --side hf --objective mlm --data DIR [--precision bf16]
        [--steps 30 --warmup 3 --batch 32 --threads 2 --seed 0]

Prints one JSON line: tokens/s (median after `--warmup` steps), per-step seconds and losses,
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_record, median, peak_rss_mb  # noqa: E402

PRESETS = {"mlm": "text_encoder", "next_token": "text_decoder"}


def load_data(folder: Path):
    """(TextTokenizer, PackedBlocks, document names) as bench/text.py wrote them."""
    import torch

    from selfsup.data.packing import PackedBlocks
    from selfsup.data.tokenizer import TextTokenizer

    saved = torch.load(folder / "blocks.pt", weights_only=True)
    blocks = PackedBlocks(input_ids=saved["input_ids"], document_ids=saved["document_ids"],
                          attention_mask=saved["attention_mask"])
    names = json.loads((folder / "documents.json").read_text())
    return TextTokenizer.load(folder / "tokenizer.json"), blocks, names


def run_selfsup(args: argparse.Namespace) -> dict:
    import torch

    from selfsup.config import TrainConfig
    from selfsup.data.pipeline import TextBatches
    from selfsup.encoders import build_encoder
    from selfsup.methods import build_method
    from selfsup.train.loop import fit
    from selfsup.train.runtime import init_runtime

    tokenizer, blocks, names = load_data(args.data)
    runtime = init_runtime("cpu", args.precision)
    torch.manual_seed(args.seed)
    encoder = build_encoder(PRESETS[args.objective], vocab_size=tokenizer.vocab_size, max_len=args.seq_len)
    section = ({"name": "mlm", "mask_id": tokenizer.mask_id, "special_ids": sorted(tokenizer.special_ids)}
               if args.objective == "mlm" else {"name": "next_token"})
    method = build_method(section, encoder)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      betas=(0.9, 0.999), warmup_fraction=0.0, min_lr_ratio=1.0,  # constant LR
                      grad_clip=args.grad_clip or None, precision=args.precision, device="cpu",
                      threads=args.threads, checkpoint_every=10**9, log_every=10**9, eval_every=0,
                      diagnostics_every=0, cpu_gemm=args.cpu_gemm)
    batches = TextBatches(blocks, names, runtime.device, document_masks=False)
    with tempfile.TemporaryDirectory() as run_dir:
        fit(method, batches, cfg, Path(run_dir), runtime, seed=args.seed)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    import selfsup

    return {
        "version": getattr(selfsup, "__version__", "dev"), "model": PRESETS[args.objective],
        "params": sum(p.numel() for p in method.parameters()),
        "tokens_per_s_steps": [r["tokens_per_s"] for r in rows],
        "step_s": [args.batch * args.seq_len / r["tokens_per_s"] for r in rows],
        "loss": [r["loss"] for r in rows],
        **gemm_record(method, "cpu"),  # where fp32 Linear products ran (selfsup/nn/gemm.py)
    }


def hf_model(args: argparse.Namespace, tokenizer):
    """(model, make_batch(ids [B, L]) -> model kwargs, name) for the objective, sized like selfsup's preset."""
    import transformers
    from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, GPT2Config,
                              GPT2LMHeadModel, PreTrainedTokenizerFast)

    V, L = tokenizer.vocab_size, args.seq_len
    if args.objective == "mlm":
        # Dropout 0: selfsup's encoders have none (see the module docstring of bench/text.py).
        config = BertConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, max_position_embeddings=L, hidden_act="gelu",
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_id,
                            attn_implementation="sdpa")
        model = BertForMaskedLM(config)
        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.data / "tokenizer.json"), pad_token="[PAD]",
                                               unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                               mask_token="[MASK]")
        collator = DataCollatorForLanguageModeling(tokenizer=hf_tokenizer, mlm=True, mlm_probability=0.15,
                                                   seed=args.seed)

        def make_batch(ids):
            return collator(list(ids))  # {"input_ids", "labels"}: -100 where not selected

        name = "BertForMaskedLM"
    else:
        config = GPT2Config(vocab_size=V, n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=L,
                            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, attn_implementation="sdpa")
        model = GPT2LMHeadModel(config)

        def make_batch(ids):
            return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself

        name = "GPT2LMHeadModel"
    return model, make_batch, f"transformers {transformers.__version__} {name}"


def run_hf(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from selfsup.data.sampler import BatchOrder

    tokenizer, blocks, _ = load_data(args.data)
    torch.manual_seed(args.seed)
    model, make_batch, name = hf_model(args, tokenizer)
    model.train()
    # HF Trainer's grouping: no weight decay on biases and LayerNorm parameters.
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    order = BatchOrder(blocks.num_blocks, args.batch, args.seed)  # the order selfsup's fit draws
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    input_ids = blocks.input_ids
    step_s, batch_s, losses = [], [], []
    for _ in range(args.steps):
        tic = time.perf_counter()
        batch = make_batch(input_ids[order.next()])
        batch_s.append(time.perf_counter() - tic)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - tic)
    tokens = args.batch * args.seq_len
    return {
        "version": name, "model": name.split()[-1], "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "tokens_per_s_steps": [tokens / s for s in step_s], "step_s": step_s, "loss": losses,
        "batch_s": batch_s,  # of step_s: drawing + collating (masking) the batch
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    out = run_selfsup(args) if args.side == "selfsup" else run_hf(args)
    speeds = out.pop("tokens_per_s_steps")
    out.update({
        "side": args.side, "objective": args.objective, "precision": args.precision,
        "tokens_per_s": median(speeds[args.warmup:] or speeds),
        "loss_last5": sum(out["loss"][-5:]) / len(out["loss"][-5:]),
        "step_s": [round(s, 4) for s in out["step_s"]], "loss": [round(v, 4) for v in out["loss"]],
        "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_mb(), 1),
    })
    if "batch_s" in out:
        out["batch_s_median"] = round(median(out.pop("batch_s")[args.warmup:]), 4)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["selfsup", "hf"], required=True)
    parser.add_argument("--objective", choices=list(PRESETS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with tokenizer.json, blocks.pt, documents.json")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 = none")
    parser.add_argument("--cpu-gemm", choices=["auto", "torch", "openblas"], default="auto",
                        help="train.cpu_gemm: where fp32 Linear products run (auto: OpenBLAS on AMD CPUs, selfsup/nn/gemm.py)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse_args())))
