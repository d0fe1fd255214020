"""What each CLI command does, given its parsed arguments (cli.py only parses and dispatches)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from selfsup.errors import SelfsupError

if TYPE_CHECKING:
    from selfsup.config import RunConfig

log = logging.getLogger("selfsup")


def run_pretrain(args: argparse.Namespace) -> None:
    from selfsup.config import dump_config, load_config
    from selfsup.pretrain import pretrain

    given = args.config is not None or bool(args.overrides)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_config(cfg, every_key=True))
        return
    if args.out is None:
        raise SelfsupError("pretrain needs --out DIR: the run directory to write")
    result = pretrain(cfg if (given or not args.resume) else None, args.out, resume=args.resume, overwrite=args.overwrite)
    if result.fit.last_row:
        shown = {k: round(v, 4) for k, v in result.fit.last_row.items() if isinstance(v, float)}
        log.info("done: %d steps, %s; encoder in %s", result.fit.steps, shown, args.out)


def run_probe(args: argparse.Namespace) -> None:
    from selfsup.adapt.probes import format_table, probe_suite
    from selfsup.config import load_config
    from selfsup.data.split import labelled_rows
    from selfsup.export.encoder import load_encoder
    from selfsup.modalities import load_reader, load_splits
    from selfsup.pretrain import untrained_tower
    from selfsup.rundir import CONFIG_FILE, resolve_tower
    from selfsup.train.runtime import init_runtime

    run = Path(args.run)
    if not (run / CONFIG_FILE).is_file():
        raise SelfsupError(f"{run / CONFIG_FILE}: not found; probe needs the run's config to rebuild its data split")
    folder, role = resolve_tower(run, args.tower)
    encoder, meta = load_encoder(folder)
    reader = load_reader(meta, folder, str(folder / "encoder.json"))
    overrides = [] if args.data is None else [f"data.source={args.data}"]
    cfg = load_config(run / CONFIG_FILE, overrides)
    train, holdout = load_splits(cfg)
    train_rows, test_rows = labelled_rows(train, "training"), labelled_rows(holdout, "held-out")
    runtime = init_runtime(cfg.train.device, cfg.train.precision)
    train_y, test_y = train.labels[train_rows], holdout.labels[test_rows]
    fractions = args.fractions or cfg.probe.fractions
    max_iter = cfg.probe.max_iter if args.max_iter is None else args.max_iter
    c_grid = cfg.probe.c_grid if args.c_grid is None else args.c_grid
    if max_iter < 1:
        raise SelfsupError(f"--max-iter must be at least 1, got {max_iter}")
    if not all(c > 0 and math.isfinite(c) for c in c_grid):
        raise SelfsupError(f"--c-grid: inverse L2 strengths must be positive numbers, got {' '.join(map(str, c_grid))}")
    if args.compare_raw and reader.raw_features(train, train_rows[:1]) is None:
        raise SelfsupError(f"--compare-raw: {reader.modality} has no raw-input baseline (images do: their pixels); "
                           "drop --compare-raw, or compare with --compare-untrained")
    candidates = [(meta["method"]["name"], encoder)]
    if args.compare_untrained:
        # The run's own starting point: same architecture, same seed, so the weights pretraining began from.
        candidates.append(("untrained", untrained_tower(run, cfg, role)))
    settings = {"fractions": fractions, "seed": cfg.seed, "k": cfg.probe.knn_k, "probes": cfg.probe.probes,
                "c_grid": c_grid, "max_iter": max_iter, "knob": "--max-iter"}
    results = []
    if args.compare_raw:  # first, as the demo's table: the floor the encoders are read against
        results += probe_suite("raw", reader.raw_features(train, train_rows), train_y,
                               reader.raw_features(holdout, test_rows), test_y, **settings)
    for name, model in candidates:
        fx = reader.features(model, train, train_rows, runtime, chunks=args.max_chunks)
        ft = reader.features(model, holdout, test_rows, runtime, chunks=args.max_chunks)
        results += probe_suite(name, fx, train_y, ft, test_y, **settings)
    print(format_table(results))
    from selfsup.files import write_atomic

    out = args.out or run / "probe.json"
    write_atomic(out, json.dumps([{**r.as_dict(), "tower": role} for r in results], indent=1))
    log.info("wrote %s (tower %s)", out, role)


def run_adapt(args: argparse.Namespace) -> None:
    from selfsup.adapt.run import adapt
    from selfsup.adapt.task import AdaptConfig

    cfg = AdaptConfig(mode=args.mode, head=args.head, label_fraction=args.label_fraction, k_shot=args.k_shot,
                      epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                      layer_decay=args.layer_decay, lora_rank=args.lora_rank, text_chunks=args.text_chunks,
                      max_iter=args.max_iter, seed=args.seed)
    cfg.validate()
    metrics = adapt(args.base, args.out, cfg, data=args.data, overwrite=args.overwrite, tower=args.tower)
    if cfg.fits_probe():
        fitted = metrics["history"][0]
        how = (f"C={fitted['C']:g}" + (f" by 3-fold cross-validation (accuracy {fitted['val_acc']:.4f})"
                                        if fitted["val_acc"] is not None else " (too few labels per class to cross-validate)"))
    else:
        how = f"best validation {metrics['val_acc']:.4f} after {metrics['epochs']} epochs"
    print(f"{args.mode}: test accuracy {metrics['test_acc']:.4f}, balanced accuracy {metrics['test_balanced_acc']:.4f}, "
          f"macro-F1 {metrics['test_macro_f1']:.4f} ({metrics['num_test']} held-out rows), {how}, "
          f"{metrics['num_train_labels']} training labels; task in {args.out}")


def run_leverage(args: argparse.Namespace) -> None:
    from selfsup.evaluate.ladder import LEVERAGE_JSON, LEVERAGE_PNG, run_leverage as leverage

    result = leverage(args.base, args.out, mode=args.mode, ladder=args.ladder, k_shot=args.k_shot_ladder,
                      num_seeds=args.seeds, data=args.data, epochs=args.epochs, patience=args.patience,
                      scratch_lr=args.scratch_lr, text_chunks=args.text_chunks, metric=args.metric, keep=args.keep,
                      overwrite=args.overwrite, tower=args.tower)
    print(result["text"])
    print(f"wrote {Path(args.out) / LEVERAGE_JSON} and {Path(args.out) / LEVERAGE_PNG}")


def run_select(args: argparse.Namespace) -> None:
    from selfsup.evaluate.ladder import SELECT_JSON, select_bases

    result = select_bases(args.bases, args.out, data=args.data, scores=args.scores, budget_s=args.budget_s,
                          max_samples=args.max_samples, validate=args.validate, mode=args.mode, epochs=args.epochs,
                          text_chunks=args.text_chunks, metric=args.metric, seed=args.seed, keep=args.keep,
                          overwrite=args.overwrite, tower=args.tower)
    print(result["text"])
    print(f"wrote {Path(args.out) / SELECT_JSON}")


def run_predict(args: argparse.Namespace) -> None:
    from selfsup.adapt.run import predict

    out = predict(args.task, args.out or Path(args.task) / "predictions.csv", data=args.data)
    print(f"wrote {out}")


def run_zeroshot(args: argparse.Namespace) -> None:
    from selfsup.evaluate.zeroshot import parse_descriptions, zero_shot

    result = zero_shot(args.run, data=args.data, templates=args.template, names=parse_descriptions(args.describe),
                       out=args.out, compare_untrained=args.compare_untrained)
    print(result["text"])


def run_evaluate(args: argparse.Namespace) -> None:
    from selfsup.evaluate.audit import EVAL_DIR, evaluate_predictions, evaluate_task
    from selfsup.evaluate.subgroups import format_subgroups

    pairs = []
    for text in args.pairs:
        a, sep, b = text.partition(":")
        if not sep or not a or not b:
            raise SelfsupError(f"--pairs {text}: write two group columns as A:B, e.g. skin_tone:subgroup")
        pairs.append((a, b))
    settings = {"group_columns": args.groups, "pairs": pairs, "min_n": args.min_n, "num_bootstrap": args.bootstrap,
                "alpha": args.alpha, "seed": args.seed}
    if args.predictions is not None:
        if args.task is not None:
            raise SelfsupError("give a TASK directory or --predictions CSV, not both")
        print(format_subgroups(evaluate_predictions(args.predictions, **settings)))
        print("note: slices and representation diagnostics need the task model's features: run `selfsup evaluate TASK`")
        return
    if args.task is None:
        raise SelfsupError("give a TASK directory (a `selfsup adapt` output) or --predictions CSV")
    result = evaluate_task(args.task, data=args.data, slices=not args.no_slices, num_clusters=args.clusters, **settings)
    print(result["text"])
    print(f"\nwrote {Path(args.task) / EVAL_DIR}/; next: selfsup report {args.task}")


def run_report(args: argparse.Namespace) -> None:
    from selfsup.adapt.task import TASK_META

    path = Path(args.path)
    if (path / TASK_META).is_file():
        from selfsup.report.task_report import write_task_report

        report = write_task_report(path, leverage=args.leverage)
    elif (path / "config.yaml").is_file():
        from selfsup.report.html import write_report

        if args.leverage is not None:
            raise SelfsupError("--leverage goes with a task directory's report (selfsup adapt, evaluate, report TASK)")
        results = json.loads((path / "results.json").read_text()) if (path / "results.json").is_file() else []
        report = write_report(path, f"selfsup pretrain: {path}", results)
    else:
        raise SelfsupError(f"{path}: neither a `selfsup adapt` output ({TASK_META}) nor a pretraining run (config.yaml)")
    print(f"wrote {report}")
    if args.check:
        from selfsup.report.browser import check_in_browser

        checked = check_in_browser(report, report.with_suffix(".png"))
        print(f"checked in {checked['browser']}: {checked['loaded']}/{checked['images']} figures loaded; "
              f"screenshot {checked['screenshot']} ({checked['height']} px tall)")


def run_export(args: argparse.Namespace) -> None:
    from selfsup.rundir import resolve_tower

    if args.format == "hf" and args.tower is None:
        from selfsup.export.hf_clip import export_hf_clip, is_clip_run

        if is_clip_run(Path(args.run)):  # both towers and the head, as one CLIPModel
            out = export_hf_clip(Path(args.run), args.out, overwrite=args.overwrite)
            print(f"wrote {out}: load it with transformers' CLIPModel.from_pretrained({str(out)!r}), or "
                  f"pipeline('zero-shot-image-classification', model={str(out)!r})")
            return
    folder, _ = resolve_tower(Path(args.run), args.tower)
    if args.format == "encoder":
        from selfsup.export.encoder import export_encoder

        out = export_encoder(folder, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: load it with selfsup.export.encoder.load_encoder({str(out)!r})")
        return
    from selfsup.export.hf import export_hf

    out = export_hf(folder, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: load it with transformers' AutoModelFor{'CausalLM' if _is_causal(folder) else 'MaskedLM'}"
          f".from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained({str(out)!r})")


def _is_causal(folder: Path) -> bool:
    meta = json.loads((Path(folder) / "encoder.json").read_text())
    return bool(meta["encoder"]["config"].get("causal"))


def run_generate(args: argparse.Namespace) -> None:
    from selfsup.data.tokenizer import TextTokenizer
    from selfsup.export.encoder import load_encoder
    from selfsup.generate import SamplingConfig, check_generator_model, generate_text

    encoder, meta = load_encoder(args.run)
    check_generator_model(encoder)
    pre = meta["preprocess"]
    tokenizer = TextTokenizer.load(Path(args.run) / pre["tokenizer"])
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    for i, text in enumerate(generate_text(encoder, tokenizer, args.prompt, cfg, seed=args.seed,
                                           num_samples=args.num_samples)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def run_tokenizer_train(args: argparse.Namespace) -> None:
    from selfsup.data.text import iter_text_source, load_text_source
    from selfsup.data.tokenizer import train_tokenizer

    if str(args.source) == "manpages":
        texts = iter(load_text_source("manpages").texts)
    else:
        texts = (record.text for record in iter_text_source(args.source, text_field=args.text_field, unit=args.unit,
                                                            errors=args.errors))
    tokenizer = train_tokenizer(texts, args.kind, args.vocab_size, args.min_frequency)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.kind}, {tokenizer.vocab_size} tokens; use it with tokenizer.path={args.out}")


def run_data_list() -> None:
    from selfsup.data.builtins import BUILTIN, builtin_available

    for name, description in BUILTIN.items():
        ok, reason = builtin_available(name)
        print(f"{name:10s} {'available' if ok else 'MISSING  '}  {description}" + ("" if ok else f"  ({reason})"))


def run_data_prepare(args: argparse.Namespace) -> None:
    """`selfsup data prepare NAME`: the work is in the dataset's module; this only reports it."""
    if args.name == "manpages":
        from selfsup.data.builtins.manpages import prepare_manpages

        print(prepare_manpages(args.out, force=args.force, progress=True, max_pages=args.max_pages).describe())
        return
    if args.name == "klettres":
        from selfsup.data.builtins.klettres import prepare_klettres

        print(prepare_klettres(args.out, force=args.force, progress=True).describe())
        return
    if args.name == "espeak":
        from selfsup.data.builtins.espeak import prepare_espeak

        print(prepare_espeak(args.out, force=args.force, progress=True).describe())
        return
    if args.name == "emoji":
        from selfsup.data.builtins.emoji import prepare_emoji

        print(prepare_emoji(args.out, size=args.size, force=args.force, progress=True).describe())
        return
    from selfsup.data.builtins.glyphs import prepare_glyphs

    assert args.name == "glyphs", args.name  # argparse's choices allow nothing else
    summary = prepare_glyphs(args.out, size=args.size, min_per_script=args.min_per_script,
                             max_per_script=args.max_per_script, font_dir=args.font_dir,
                             scripts_file=args.scripts_file, force=args.force, progress=True)
    print(summary.describe())


def run_data_shard(args: argparse.Namespace) -> None:
    """`selfsup data shard SOURCE --out DIR`: the modality writes its shards (data/shards.py)."""
    from selfsup.modalities import get_modality

    cfg = shard_config(args.source, args.overrides)
    name = args.modality or cfg.data.modality or _shard_modality(str(args.source))
    if args.modality and cfg.data.modality and args.modality != cfg.data.modality:
        raise SelfsupError(f"--modality {args.modality} and data.modality={cfg.data.modality} disagree; give one")
    cfg.data.modality = name
    modality = get_modality(name, "--modality")
    shard_items = modality.shard_items if args.shard_items is None else args.shard_items
    log.info("sharding %s as %s, %d per shard, into %s", args.source, name, shard_items, args.out)
    summary = modality.write_shards(cfg, args.out, shard_items, args.overwrite, progress=True,
                                    tokenizer_kind=args.tokenizer_kind)
    print(summary.describe())


def _shard_modality(source: str) -> str:
    """The modality `data shard` assumes without --modality: a text or audio built-in's own, text for a
    .txt file, else image (a folder or a manifest could hold anything: --modality says otherwise)."""
    from selfsup.data.audio import AUDIO_BUILTINS
    from selfsup.data.text import TEXT_BUILTINS

    if source in TEXT_BUILTINS or source.lower().endswith(".txt"):
        return "text"
    return "audio" if source in AUDIO_BUILTINS else "image"


_SHARD_SECTIONS = ("seed", "data", "tokenizer")  # what `data shard` reads of a run config


def shard_config(source: str, overrides: list[str]) -> "RunConfig":
    """The run config `data shard` works from: defaults, `data.source=SOURCE` and `data.*`, `tokenizer.*`
    and `seed` overrides, checked as a run checks them; other sections belong to a run, not to its data."""
    from selfsup.config import DataConfig, RunConfig, TokenizerConfig, from_dict, parse_override
    from selfsup.data.decode import check_bad_file_settings

    tree: dict = {"data": {}, "tokenizer": {}}
    for text in overrides:
        key, value = parse_override(text)
        if key[0] not in _SHARD_SECTIONS or (key[0] == "seed") != (len(key) == 1):
            raise SelfsupError(f"override `{text}`: `data shard` takes data.*, tokenizer.* and seed (the data's "
                               "settings); give the others to `selfsup pretrain`")
        if key[0] == "seed":
            tree["seed"] = value
        else:
            tree[key[0]][".".join(key[1:])] = value
    if "source" in tree["data"]:
        raise SelfsupError("give the source once, as the SOURCE argument (not data.source=...)")
    tree["data"]["source"] = str(source)
    cfg = RunConfig(seed=from_dict(RunConfig, {"seed": tree.get("seed", 0)}).seed,
                    data=from_dict(DataConfig, tree["data"], prefix="data."),
                    tokenizer=from_dict(TokenizerConfig, tree["tokenizer"], prefix="tokenizer."))
    d = cfg.data
    for key, value in {"data.image_size": d.image_size, "data.sample_rate": d.sample_rate,
                       "data.max_line_chars": d.max_line_chars}.items():
        if value < 1:
            raise SelfsupError(f"`{key}` must be at least 1, got {value}")
    if d.channels not in (1, 3):
        raise SelfsupError(f"`data.channels` must be 1 or 3, got {d.channels}")
    if not 0 <= d.holdout_fraction < 1:
        raise SelfsupError(f"`data.holdout_fraction` must be in [0, 1), got {d.holdout_fraction}")
    if not d.max_file_seconds > 0:
        raise SelfsupError(f"`data.max_file_seconds` must be positive (seconds), got {d.max_file_seconds}")
    check_bad_file_settings(d.on_bad_file, d.max_bad_fraction)
    return cfg
