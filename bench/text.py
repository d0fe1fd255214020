"""Text pretraining side by side: selfsup against Hugging Face transformers, same config, same run.

What is compared, per objective and per precision:

- **mlm**: selfsup's `mlm` method with the `text_encoder` preset against `transformers.BertForMaskedLM`
  (BertConfig hidden 256, 4 layers, 4 heads, intermediate 1024, max_position_embeddings = seq_len,
  hidden_act "gelu", attn_implementation "sdpa" — HF's default), masking by HF's
  `DataCollatorForLanguageModeling` (15 %, 80/10/10) on the HF side and by the method itself on ours;
- **next_token**: selfsup's `next_token` method with the `text_decoder` preset against
  `transformers.GPT2LMHeadModel` (n_embd 256, n_layer 4, n_head 4, n_inner 1024, n_positions = seq_len,
  activation "gelu", SDPA), labels = input_ids.

How it is kept fair:

- Same data: the built-in man-pages corpus (`load_text_source("manpages")`; when it is not prepared,
  a corpus of the Python standard library's docstrings, and the JSON says so), split as `selfsup
  pretrain` splits it (20 % held out, seeded); one tokenizer per objective (WordPiece for mlm, byte-
  level BPE for next_token, `--vocab` tokens) trained here once on the training split and saved to the
  work folder, which both sides load; the training split packed with `pack_documents` into blocks of
  `--seq-len` (drop_last; BERT blocks wrap each document as [CLS] doc [SEP], GPT-2 blocks end each
  with <|endoftext|>) and saved once, so both sides read the identical int64 blocks; and both draw
  batches with `selfsup.data.sampler.BatchOrder` under the same seed — fit's own order — so step t
  of either side trains on the same blocks.
- Same batch (`--batch` blocks), steps, threads (`torch.set_num_threads`, OMP_WAIT_POLICY=PASSIVE,
  TOKENIZERS_PARALLELISM=false), optimizer (AdamW, lr 5e-4, betas (0.9, 0.999), weight decay 0.01
  except on biases and norms, constant LR, the global gradient norm clipped at `--grad-clip`, HF
  Trainer's default 1.0) and precision: each objective runs once in bf16 autocast (what selfsup's
  `precision=auto` picks on this CPU, and `torch.autocast("cpu", torch.bfloat16)` on the HF side) and
  once in fp32, as separate rows — same precision against same precision.
- Dropout is 0 on the HF side (hidden/attention/embedding dropout) because selfsup's text encoders
  have no dropout; HF's defaults (0.1) would add work and noise to its side only.
- selfsup runs its real training loop (`bench/text_side.py --side selfsup`: `fit` + `TextBatches` +
  `build_method` + `build_encoder`, as `selfsup pretrain` assembles a text run) and its step times and
  losses come from the run's metrics.jsonl; the HF side is the plain loop HF users write
  (`--side hf`). Both time a step from drawing the batch (masking included) to the end of the
  optimizer step. Each measurement runs in a fresh subprocess (its own peak RSS), one after the other.

Known differences (the implementations differ; the knobs do not):

- BERT is post-norm (LayerNorm after each residual); selfsup's `text_encoder` is pre-norm with a
  LayerNorm on the embeddings and a final one (RoBERTa-PreLayerNorm). GPT-2 and `text_decoder` are
  both pre-norm with a final LayerNorm. HF's GPT-2 uses Conv1D (addmm) layers, ours nn.Linear.
- selfsup's MLM computes the LM head (transform + vocabulary projection) only at the ~15 % selected
  positions; `BertForMaskedLM` computes vocabulary logits at every position and ignores 85 % of them
  in the loss. That is a real design advantage of selfsup, not a benchmark artefact — it is in the
  throughput on purpose.
- Attention: HF uses SDPA throughout; selfsup's `attend` uses SDPA in fp32 but two matmuls
  (q k^T, softmax, @ v) under bf16 on the CPU, where SDPA's backward was measured slower.
- selfsup's next_token carries no loss where the next token starts another document (packed
  blocks); GPT-2 with labels = input_ids predicts across the <|endoftext|> boundary too (1-2 % more
  positions). The masks differ in their random draws (HF's collator has its own seeded RNG; the
  same 15 % / 80-10-10 rule), so losses agree statistically, not bit for bit. Initialisation is
  N(0, 0.02) on both sides (GPT-2 scales its residual projections further).

Metric: tokens/s of the median step after `--warmup` steps (`ratio` = selfsup / transformers);
quality: the mean training loss of the last 5 steps of each side.

    .venv/bin/python bench/text.py [--objectives mlm next_token] [--precisions bf16 fp32] [--steps 30]
        [--warmup 3] [--batch 32] [--seq-len 128] [--threads 2] [--vocab 8192] [--seed 0]

Prints one JSON line per (objective, precision) (DESIGN.md, "Benchmarks") and a table on stderr.
Nothing else may run meanwhile (shared/MACHINE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_json  # noqa: E402

BENCH = Path(__file__).resolve().parent
SIDE = BENCH / "text_side.py"
OBJECTIVES = ["mlm", "next_token"]
PRECISIONS = ["bf16", "fp32"]
KIND = {"mlm": "wordpiece", "next_token": "bpe"}
PRESET = {"mlm": "text_encoder", "next_token": "text_decoder"}
PEER_MODEL = {"mlm": "BertForMaskedLM", "next_token": "GPT2LMHeadModel"}


def stdlib_corpus():
    """A TextSet of the Python standard library's docstrings (one document per module), the fallback
    when the man pages are not prepared."""
    import ast
    import sysconfig

    from selfsup.data.text import TextSet

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, ids = [], []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[len(root.parts):-1] or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = (n for n in ast.walk(tree) if isinstance(n, kinds))
        docs = [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]
        if docs:
            texts.append("\n\n".join(docs))
            ids.append(str(path.relative_to(root)))
    return TextSet(texts, ids, None, None, {}, source="python-stdlib-docstrings")


def load_corpus(seed: int):
    """(training split, corpus description): the man pages, else the stdlib docstrings."""
    from selfsup.data.split import split_holdout
    from selfsup.data.text import load_text_source
    from selfsup.errors import SelfsupError

    try:
        data, name = load_text_source("manpages"), "manpages"
    except (SelfsupError, OSError) as err:
        print(f"bench/text.py: the manpages corpus is not available ({err}); "
              "falling back to Python stdlib docstrings", file=sys.stderr)
        data, name = stdlib_corpus(), "python-stdlib-docstrings (manpages unavailable)"
    train, _ = split_holdout(data, 0.2, seed)  # as `selfsup pretrain` splits (data.holdout_fraction)
    return train, {"corpus": name, "documents": len(train), "chars": sum(len(t) for t in train.texts)}


def build_data(folder: Path, objective: str, train, args: argparse.Namespace) -> dict:
    """Writes tokenizer.json, blocks.pt and documents.json for `objective` into `folder`."""
    import torch

    from selfsup.data.packing import pack_documents
    from selfsup.data.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    tokenizer = train_tokenizer(train.texts, KIND[objective], vocab_size=args.vocab)
    tokenizer.save(folder / "tokenizer.json")
    trained_s = time.perf_counter() - tic
    bos, eos = tokenizer.packing_bounds
    blocks = pack_documents(tokenizer.encode_batch(train.texts), args.seq_len, bos_id=bos, eos_id=eos,
                            pad_id=tokenizer.pad_id, drop_last=True)
    if blocks.num_blocks < args.batch:
        raise SystemExit(f"bench/text.py: only {blocks.num_blocks} blocks of {args.seq_len} tokens, "
                         f"fewer than one batch of {args.batch}")
    torch.save({"input_ids": blocks.input_ids, "document_ids": blocks.document_ids,
                "attention_mask": blocks.attention_mask}, folder / "blocks.pt")
    (folder / "documents.json").write_text(json.dumps(train.ids))
    return {"tokenizer": KIND[objective], "vocab": tokenizer.vocab_size, "blocks": blocks.num_blocks,
            "tokenizer_s": round(trained_s, 1), "prepare_s": round(time.perf_counter() - tic, 1)}


def run_pair(objective: str, precision: str, folder: Path, args: argparse.Namespace, data_info: dict) -> dict:
    common = ["--objective", objective, "--data", str(folder), "--precision", precision,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--seed", str(args.seed),
              "--grad-clip", str(args.grad_clip)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # OPENBLAS_THREAD_TIMEOUT as the selfsup command sets it (selfsup/cli.py); transformers never calls OpenBLAS.
    env.update(OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               OPENBLAS_THREAD_TIMEOUT="4")
    results, errors, wall = {}, {}, {}
    for side in ("selfsup", "hf"):
        tic = time.perf_counter()
        try:
            results[side] = run_json([sys.executable, str(SIDE), "--side", side, *common], env)
        except Exception as err:  # noqa: BLE001 - one side's failure is reported in the JSON line
            results[side] = None
            errors[side] = str(err).strip().splitlines()[-1][:400] if str(err).strip() else repr(err)
            print(f"bench/text.py: {objective} {precision} {side} failed: {err}", file=sys.stderr)
        wall[side] = round(time.perf_counter() - tic, 1)
    ours, peer = results["selfsup"], results["hf"]
    value = lambda r, key: None if r is None else round(r[key], 4 if key == "loss_last5" else 1)  # noqa: E731
    line = {
        "bench": "text", "task": f"{objective} {PRESET[objective]} d256x4 L{args.seq_len} b{args.batch} {precision}",
        "metric": "tokens_per_s",
        "selfsup": value(ours, "tokens_per_s"),
        "peer": peer["version"] if peer else f"transformers {PEER_MODEL[objective]}",
        "peer_value": value(peer, "tokens_per_s"),
        "ratio": round(ours["tokens_per_s"] / peer["tokens_per_s"], 3) if ours and peer else None,
        "precision": "bf16 autocast" if precision == "bf16" else "fp32", "selfsup_cpu_gemm": ours and ours.get("cpu_gemm"),
        "quality": {"loss_last5": {"selfsup": value(ours, "loss_last5"), "peer": value(peer, "loss_last5")}},
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "omp_wait_policy": "PASSIVE",
        "peak_rss_mb": {"selfsup": ours and round(ours["peak_rss_mb"]), "peer": peer and round(peer["peak_rss_mb"])},
        "params": {"selfsup": ours and ours["params"], "peer": peer and peer["params"]},
        "notes": ("HF dropouts set to 0 (selfsup has no dropout); attn_implementation "
                  f"{peer.get('attn_implementation') if peer else 'sdpa'}; AdamW lr 5e-4 wd 0.01 constant, "
                  f"clip {args.grad_clip or 'none'}; identical packed blocks in identical order (BatchOrder)"),
        "data": data_info, "wall_s": wall,
    }
    if peer and "batch_s_median" in peer:
        line["peer_batch_s_median"] = peer["batch_s_median"]  # drawing + masking, part of the HF step
    if errors:
        line["errors"] = errors
    return line


def table(lines: list[dict]) -> str:
    head = (f"{'task':<44} {'selfsup tok/s':>13} {'HF tok/s':>10} {'ratio':>6} {'loss ours':>9} {'loss HF':>8} "
            f"{'RSS MB ours/HF':>15}")
    rows = [head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for line in lines:
        loss = line["quality"]["loss_last5"]
        rss = line["peak_rss_mb"]
        rows.append(f"{line['task']:<44} {fmt(line['selfsup'], '13,.0f')} {fmt(line['peer_value'], '10,.0f')} "
                    f"{fmt(line['ratio'], '6.2f')} {fmt(loss['selfsup'], '9.3f')} {fmt(loss['peer'], '8.3f')} "
                    f"{fmt(rss['selfsup'], '.0f'):>7}/{fmt(rss['peer'], '.0f'):<7}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=OBJECTIVES)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=32, help="blocks per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary size")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip on both sides; 0 = none")
    parser.add_argument("--keep", type=Path, help="keep the tokenizers and blocks in this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    if args.seq_len > 128:
        print("bench/text.py: note: seq_len above 128 makes both models longer than the presets' usual max_len",
              file=sys.stderr)

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tic = time.perf_counter()
        train, corpus = load_corpus(args.seed)
        print(f"bench/text.py: {corpus} in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
        for objective in args.objectives:
            folder = work / objective
            info = {**corpus, **build_data(folder, objective, train, args)}
            print(f"bench/text.py: {objective} data {info}", file=sys.stderr)
            for precision in args.precisions:
                tic = time.perf_counter()
                line = run_pair(objective, precision, folder, args, info)
                lines.append(line)
                print(json.dumps(line), flush=True)
                print(f"bench/text.py: {objective} {precision} took {time.perf_counter() - tic:.0f}s", file=sys.stderr)
    print("\n" + table(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
