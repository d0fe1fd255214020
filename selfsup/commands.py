"""What each CLI command does, given its parsed arguments (cli.py only parses and dispatches)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from selfsup.errors import SelfsupError

log = logging.getLogger("selfsup")


def run_pretrain(args: argparse.Namespace) -> None:
    from selfsup.config import dump_config, load_config
    from selfsup.train.pretrain import pretrain

    given = args.config is not None or bool(args.overrides)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return
    if args.out is None:
        raise SelfsupError("pretrain needs --out DIR: the run directory to write")
    result = pretrain(cfg if (given or not args.resume) else None, args.out, resume=args.resume, overwrite=args.overwrite)
    if result.fit.last_row:
        shown = {k: round(v, 4) for k, v in result.fit.last_row.items() if isinstance(v, float)}
        log.info("done: %d steps, %s; encoder in %s", result.fit.steps, shown, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        from selfsup.report.html import write_report

        write_report(args.out, f"selfsup pretrain: {args.out}")


def run_probe(args: argparse.Namespace) -> None:
    from selfsup.adapt.frozen import encoder_features, labelled
    from selfsup.adapt.probes import format_table, probe_suite
    from selfsup.config import load_config
    from selfsup.export.encoder import load_encoder
    from selfsup.train.pretrain import CONFIG_FILE, load_splits
    from selfsup.train.runtime import init_runtime

    run = Path(args.run)
    encoder, meta = load_encoder(run)
    overrides = [] if args.data is None else [f"data.source={args.data}"]
    if not (run / CONFIG_FILE).is_file():
        raise SelfsupError(f"{run / CONFIG_FILE}: not found; probe needs the run's config to rebuild its data split")
    cfg = load_config(run / CONFIG_FILE, overrides)
    train, holdout = load_splits(cfg)
    train_x, train_y = labelled(train, "training")
    test_x, test_y = labelled(holdout, "held-out")
    runtime = init_runtime(cfg.train.device, cfg.train.precision)
    pre = meta["preprocess"]
    fx = encoder_features(encoder.to(runtime.device), train_x, pre, runtime.device, runtime.autocast_dtype)
    ft = encoder_features(encoder, test_x, pre, runtime.device, runtime.autocast_dtype)
    results = probe_suite(meta["method"]["name"], fx, train_y, ft, test_y, fractions=args.fractions or cfg.probe.fractions,
                          seed=cfg.seed, k=cfg.probe.knn_k, probes=cfg.probe.probes)
    print(format_table(results))
    out = args.out or run / "probe.json"
    out.write_text(json.dumps([r.as_dict() for r in results], indent=1))
    log.info("wrote %s", out)


def run_data_list() -> None:
    from selfsup.data.builtin import BUILTIN, builtin_available

    for name, description in BUILTIN.items():
        ok, reason = builtin_available(name)
        print(f"{name:10s} {'available' if ok else 'MISSING  '}  {description}" + ("" if ok else f"  ({reason})"))


def run_data_prepare(args: argparse.Namespace) -> None:
    """`selfsup data prepare NAME`: the work is in the dataset's module; this only reports it."""
    if args.name == "manpages":
        from selfsup.data.manpages import prepare_manpages

        print(prepare_manpages(args.out, force=args.force, progress=True, max_pages=args.max_pages).describe())
        return
    from selfsup.data.glyphs import prepare_glyphs

    assert args.name == "glyphs", args.name  # argparse's choices allow nothing else
    summary = prepare_glyphs(args.out, size=args.size, min_per_script=args.min_per_script,
                             max_per_script=args.max_per_script, font_dir=args.font_dir,
                             scripts_file=args.scripts_file, force=args.force, progress=True)
    print(summary.describe())
