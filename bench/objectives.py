"""The six vision objectives on one labelled set after the same wall-clock budget: which one learns most?

What: simclr, byol, dino, mae, beit and colorize each pretrain with selfsup's own pipeline
(`selfsup.pretrain.pretrain`, exactly what `selfsup pretrain` runs: the method's default
encoder — ResNet-18 for simclr/byol/dino/colorize, ViT-Tiny for mae/beit, or all on `--encoder` —
its own view recipe and knobs, bf16 autocast where `precision=auto` picks it) on the glyphs set
(~33,000 Noto glyphs, 32 px, ~100 scripts). Then the frozen encoder is probed on the held-out split
the run never saw, as `selfsup probe` does (`_common.encoder_features` (selfsup's image preparation) +
`selfsup.adapt.probes.probe_suite`): a linear probe (logistic regression, C by cross-validation)
and a kNN probe (k=20), trained on 10 % and 100 % of the training labels. The same encoder untrained
(the run's seeded init, `build_encoder_from(cfg)`: the weights pretraining started from) is probed
the same way as the baseline row, since a short run can score below its own init. The headline
metric is the linear probe at 10 % labels.

Why: the objectives differ in what a step costs by up to ~10x (MAE encodes a quarter of the
patches of one view; DINO runs a teacher and a student over 2 global + 6 local crops), so "after
N steps" would compare unequal compute. The question a user with a fixed machine asks is "what
do I get from an hour of this CPU", so every objective gets the same training time instead.

How the budget is made fair: each objective is first calibrated — `--calibrate` (4) steps of its
real run (same data, encoder, batch, threads, precision; a throw-away run directory), the step time
taken as the median of steps 2.. from metrics.jsonl (the first step pays one-time costs: allocator
warm-up, collapse diagnostics) — and then trained for `train.steps = floor(budget / step time)`
steps, so its cosine learning-rate schedule (and EMA / teacher-temperature schedules) completes
within the budget rather than being cut off mid-schedule. The budget covers the optimizer steps as
the training loop times them (drawing and augmenting the batch, forward, backward, optimizer and EMA
step); what is done once per run is not charged but reported in `wall_s`: loading the data,
fitting BEiT's k-means visual tokens and colorize's colour bins, the end-of-run kNN monitor,
checkpoint and export. `train_s` reports the training time actually spent (it is the budget +-
the step-time noise of a shared machine). Calibration and training run one after the other with
`--threads` torch threads and OMP_WAIT_POLICY=PASSIVE; nothing else should run meanwhile.

Colour: glyphs are black-on-white, so colorize refuses them ("no colour"); its glyphs row reads
"n/a: glyphs carry no colour" and it runs on the `emoji` built-in instead (3,655 colour emoji,
9 groups) when `builtin_available("emoji")` says it is prepared, with its own untrained baseline
there. `--dataset emoji` runs all six on emoji for a like-for-like comparison.

    .venv/bin/python bench/objectives.py [--methods simclr mae] [--minutes 4] [--dataset glyphs]
        [--encoder vit_tiny] [--batch 256] [--threads 2] [--fractions 0.1 1.0] [--keep DIR]
    .venv/bin/python bench/objectives.py --tiny --minutes 0.05 --methods mae simclr   # smoke test

Prints one JSON line per objective and per baseline encoder on stdout (DESIGN.md, "Benchmarks";
`make bench` collects them), progress and a readable table at the end on stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when torch loads: before any torch import

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median  # noqa: E402

sys.path.insert(0, str(REPO))

OBJECTIVES = ["simclr", "byol", "dino", "mae", "beit", "colorize"]
COLOUR_FALLBACK = "emoji"  # where colorize runs when the main dataset has no colour

# --tiny: small encoders, heads and fits, so the whole script runs in a minute or two (a smoke test,
# not a measurement).
TINY_ENCODER = {"resnet": ["encoder.layers=[1,1,1,1]", "encoder.width=8"],
                "vit": ["encoder.depth=1", "encoder.dim=32", "encoder.heads=2"]}
TINY_METHOD = {
    "simclr": [], "byol": ["method.proj_hidden=128", "method.proj_dim=32"],
    "dino": ["method.out_dim=128", "method.hidden_dim=64", "method.bottleneck_dim=16", "views.num_local=2"],
    "mae": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
    "beit": ["method.num_tokens=32", "method.fit_max_images=256", "method.fit_passes=1"],
    "colorize": ["method.decoder_dim=16", "method.fit_max_images=256"],
}
TINY_RUN = ["train.knn_max_bank=200"]


def log(message: str) -> None:
    print(f"bench/objectives.py: {message}", file=sys.stderr, flush=True)


def pct(fraction: float) -> str:
    """0.1 -> '10', 1.0 -> '100', 0.01 -> '1' (for metric names such as linear_acc_10pct)."""
    return f"{fraction * 100:g}"


class NoColour(Exception):
    """The dataset has no colour for colorize to predict."""


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        import torch

        torch.set_num_threads(args.threads)
        self.args = args
        self.work = work
        self.budget_s = args.minutes * 60
        self.baselines: dict[str, dict[str, Any]] = {}  # key: encoder spec + data + preprocess -> baseline result
        self.rows: list[dict[str, Any]] = []  # the objectives, for the table
        self.baseline_rows: list[dict[str, Any]] = []  # the untrained encoders, below them

    # -- configuration ---------------------------------------------------------------------------

    def encoder_for(self, method: str) -> tuple[str, str | None]:
        """(encoder name, note): --encoder, except that a ViT-only objective keeps its ViT."""
        from selfsup.methods import METHODS

        spec = METHODS[method]
        name = self.args.encoder or spec.encoder
        if spec.vit_only and not name.startswith("vit"):
            return spec.encoder, f"kept {spec.encoder}: {method} needs a ViT (masks patch tokens), not {name}"
        return name, None

    def overrides(self, method: str, source: str, encoder: str) -> list[str]:
        a = self.args
        out = [f"method.name={method}", f"encoder.name={encoder}", f"data.source={source}",
               f"data.image_size={a.size}", "data.channels=3", f"seed={a.seed}",
               f"train.batch_size={a.batch}", f"train.threads={a.threads}", f"train.precision={a.precision}",
               "train.log_every=1000000000", "train.checkpoint_every=1000000000", "train.eval_every=0"]
        if a.tiny:
            out += TINY_ENCODER["vit" if encoder.startswith("vit") else "resnet"] + TINY_METHOD.get(method, []) + TINY_RUN
        return out + list(a.override)

    # -- one objective ---------------------------------------------------------------------------

    def calibrate(self, method: str, overrides: list[str], folder: Path) -> dict[str, Any]:
        """Median step time (s) of `--calibrate` real steps, leaving out the first."""
        from selfsup.config import load_config
        from selfsup.errors import SelfsupError
        from selfsup.pretrain import pretrain

        # A long nominal run stopped early: no final checkpoint, export or kNN monitor.
        cfg = load_config(None, [*overrides, "train.steps=100000"])
        tic = time.perf_counter()
        try:
            pretrain(cfg, folder, overwrite=True, stop_after=self.args.calibrate, show_progress=False)
        except SelfsupError as err:
            if "no colour" in str(err) or "colour images" in str(err):
                raise NoColour(str(err)) from None
            raise
        wall = time.perf_counter() - tic
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        step_s = [cfg.train.batch_size / r["samples_per_s"] for r in rows]
        if not self.args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return {"step_s": median(step_s[1:] or step_s), "steps_s": [round(s, 3) for s in step_s], "wall_s": wall}

    def features(self, encoder, preprocess: dict, train, holdout, runtime):
        """(train x, train y, test x, test y): frozen features of the labelled rows (capped by --probe-train/-test)."""
        import torch

        from _common import encoder_features
        from selfsup.data.split import labelled_rows

        rows = {"train": labelled_rows(train, "training"), "test": labelled_rows(holdout, "held-out")}
        caps = {"train": self.args.probe_train, "test": self.args.probe_test}
        for part, cap in caps.items():
            if cap is not None and len(rows[part]) > cap:  # seeded subset, the same for every encoder
                gen = torch.Generator().manual_seed(self.args.seed)
                rows[part] = rows[part][torch.randperm(len(rows[part]), generator=gen)[:cap]].sort().values
        encoder = encoder.to(runtime.device)
        fx = encoder_features(encoder, train.images[rows["train"]], preprocess, runtime.device, runtime.autocast_dtype)
        ft = encoder_features(encoder, holdout.images[rows["test"]], preprocess, runtime.device, runtime.autocast_dtype)
        return fx, train.labels[rows["train"]], ft, holdout.labels[rows["test"]]

    def probe(self, name: str, encoder, preprocess: dict, train, holdout, runtime, cfg) -> dict[str, Any]:
        from selfsup.adapt.probes import probe_suite

        tic = time.perf_counter()
        fx, fy, tx, ty = self.features(encoder, preprocess, train, holdout, runtime)
        embed_s = time.perf_counter() - tic
        results = probe_suite(name, fx, fy, tx, ty, fractions=self.args.fractions, seed=self.args.seed,
                              k=cfg.probe.knn_k, probes=("linear", "knn"))
        accs = {f"{r.probe}_acc": {} for r in results}
        labels = {}
        for r in results:
            accs[f"{r.probe}_acc"][f"{pct(r.label_fraction)}%"] = round(r.accuracy, 4)
            labels[f"{pct(r.label_fraction)}%"] = r.num_labels
        return {"acc": accs, "num_labels": labels, "probe_test": len(ty), "embed_s": round(embed_s, 1),
                "wall_s": round(time.perf_counter() - tic, 1), "results": results}

    def baseline(self, cfg, preprocess: dict, train, holdout, runtime, source: str) -> dict[str, Any]:
        """The untrained encoder (the run's seeded init), probed once per encoder/data/input preparation."""
        from selfsup.pretrain import build_encoder_from

        encoder, spec = build_encoder_from(cfg)
        key = json.dumps([spec, source, preprocess], sort_keys=True, default=str)
        if key not in self.baselines:
            name = f"untrained {cfg.encoder['name']}" + (" (grey input)" if preprocess.get("input_transform") else "")
            log(f"probing {name} on {source} (baseline)")
            result = self.probe("untrained", encoder, preprocess, train, holdout, runtime, cfg)
            result.update(name=name, source=source, encoder=cfg.encoder["name"], emitted=False)
            self.baselines[key] = result
        return self.baselines[key]

    def run(self, method: str, source: str) -> dict[str, Any]:
        """Calibrate, pretrain for the budget, probe; returns the objective's result."""
        from selfsup.config import load_config
        from selfsup.export.encoder import load_encoder
        from selfsup.pretrain import pretrain
        from selfsup.train.runtime import init_runtime

        encoder, note = self.encoder_for(method)
        overrides = self.overrides(method, source, encoder)
        out = {"method": method, "source": source, "encoder": encoder, "note": note, "wall_s": {}}
        calib = self.calibrate(method, overrides, self.work / f"{method}-{source}-calibrate")
        out["wall_s"]["calibrate"] = round(calib["wall_s"], 1)
        steps = max(1, int(self.budget_s // calib["step_s"]))
        out.update(calibrated_step_s=round(calib["step_s"], 4), calibration_step_s=calib["steps_s"], steps=steps)
        log(f"{method} on {source} ({encoder}): {calib['step_s']:.3f} s/step calibrated -> {steps} steps "
            f"for {self.budget_s:.0f} s")

        cfg = load_config(None, [*overrides, f"train.steps={steps}"])
        run_dir = self.work / f"{method}-{source}"
        tic = time.perf_counter()
        result = pretrain(cfg, run_dir, overwrite=True, show_progress=False)
        out["wall_s"]["pretrain"] = round(time.perf_counter() - tic, 1)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["samples_per_s"] for r in rows]
        runtime = init_runtime(cfg.train.device, cfg.train.precision)  # what the run used; the probes embed under it
        out.update(train_s=round(sum(cfg.train.batch_size / s for s in speeds), 1),
                   samples_per_s=round(median(speeds[1:] or speeds), 2),
                   epochs=round(steps * cfg.train.batch_size / len(result.train), 2),
                   final_loss=round(rows[-1]["loss"], 4), knn_monitor=rows[-1].get("knn_acc"),
                   precision=runtime.precision, train_images=len(result.train), holdout_images=len(result.holdout))

        trained, meta = load_encoder(run_dir)
        preprocess = meta["preprocess"]
        log(f"probing {method}")
        out["probe"] = self.probe(method, trained, preprocess, result.train, result.holdout, runtime, cfg)
        out["wall_s"]["probe"] = out["probe"]["wall_s"]
        out["baseline"] = self.baseline(cfg, preprocess, result.train, result.holdout, runtime, source)
        if not self.args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        return out

    # -- output ----------------------------------------------------------------------------------

    def headline(self) -> tuple[str, float]:
        """(metric name, label fraction) of the headline number: linear probe at 10 % labels if probed."""
        fraction = 0.1 if 0.1 in self.args.fractions else self.args.fractions[0]
        return f"linear_acc_{pct(fraction)}pct", fraction

    def task(self, method: str, encoder: str, source: str) -> str:
        return f"{method} {encoder} {source} {self.args.size}px b{self.args.batch} {self.args.minutes:g}min"

    def common(self) -> dict[str, Any]:
        a = self.args
        return {"budget_s": round(self.budget_s, 1), "batch": a.batch, "threads": a.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "seed": a.seed, "tiny": a.tiny}

    def emit(self, line: dict[str, Any]) -> None:
        print(json.dumps(line), flush=True)

    def emit_baseline(self, base: dict[str, Any]) -> None:
        """The baseline's own line, after the first objective that used it (then its table row goes last)."""
        if base["emitted"]:
            return
        base["emitted"] = True
        metric, fraction = self.headline()
        value = base["acc"]["linear_acc"].get(f"{pct(fraction)}%")
        self.emit({"bench": "objectives", "task": f"{base['name']} {base['source']} {self.args.size}px (baseline)",
                   "metric": metric, "selfsup": value, "quality": base["acc"], "num_labels": base["num_labels"],
                   "probe_test": base["probe_test"], "steps": 0, **self.common(), "wall_s": {"probe": base["wall_s"]}})
        self.baseline_rows.append({"name": base["name"], "source": base["source"], "encoder": base["encoder"],
                                   "steps": 0, "acc": base["acc"]})

    def emit_objective(self, method: str, source: str, res: dict[str, Any] | None, error: str | None = None) -> None:
        metric, fraction = self.headline()
        encoder = res["encoder"] if res else self.encoder_for(method)[0]
        line: dict[str, Any] = {"bench": "objectives", "task": self.task(method, encoder, source), "metric": metric}
        if res is None or "probe" not in res:
            line.update(selfsup=None, note=error, **self.common())
            self.emit(line)
            self.rows.append({"name": method, "source": source, "encoder": encoder, "note": error})
            return
        key = f"{pct(fraction)}%"
        value = res["probe"]["acc"]["linear_acc"].get(key)
        base = res["baseline"]
        base_value = base["acc"]["linear_acc"].get(key)
        line.update({
            "selfsup": value, "baseline": f"{base['name']} (the run's seeded init)", "baseline_value": base_value,
            "gain": None if value is None or base_value is None else round(value - base_value, 4),
            "quality": {**res["probe"]["acc"], "baseline": base["acc"], "knn_monitor_end_of_run": res["knn_monitor"]},
            "num_labels": res["probe"]["num_labels"], "probe_test": res["probe"]["probe_test"],
            "steps": res["steps"], "epochs": res["epochs"], **self.common(), "train_s": res["train_s"],
            "calibrated_step_s": res["calibrated_step_s"], "calibration_step_s": res["calibration_step_s"],
            "samples_per_s": res["samples_per_s"], "precision": res["precision"], "final_loss": res["final_loss"],
            "data": {"source": source, "train": res["train_images"], "holdout": res["holdout_images"]},
            "wall_s": res["wall_s"],
        })
        if res.get("note"):
            line["note"] = res["note"]
        self.emit(line)
        self.rows.append({"name": method, "source": source, "encoder": encoder, "steps": res["steps"],
                          "train_s": res["train_s"], "samples_per_s": res["samples_per_s"], "acc": res["probe"]["acc"]})
        self.emit_baseline(base)

    def table(self) -> str:
        fractions = [f"{pct(f)}%" for f in self.args.fractions]
        header = ["objective", "encoder", "data", "steps", "train s", "samples/s"]
        header += [f"linear {f}" for f in fractions] + [f"kNN {f}" for f in fractions]
        body = []
        for r in [*self.rows, *self.baseline_rows]:
            if "note" in r:
                body.append([r["name"], r["encoder"], r["source"], r["note"]])
                continue
            cells = [r["name"], r["encoder"], r["source"], str(r["steps"]),
                     f"{r['train_s']:.0f}" if "train_s" in r else "-",
                     f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else "-"]
            for probe in ("linear_acc", "knn_acc"):
                accs = r["acc"].get(probe, {})
                cells += [f"{accs[f] * 100:.1f}" if f in accs else "-" for f in fractions]
            body.append(cells)
        full = [row for row in [header, *body] if len(row) == len(header)]  # not the note rows
        widths = [max(len(row[i]) for row in ([header, *body] if i < 3 else full)) for i in range(len(header))]
        lines = []
        for row in [header, *body]:
            if len(row) == 4:  # a note spans the numeric columns
                lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
            else:
                lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        title = (f"{self.args.minutes:g} min of training each, batch {self.args.batch}, {self.args.threads} threads; "
                 f"probe accuracy (%) on the held-out split, trained on a share of the training labels")
        return "\n".join([title, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=OBJECTIVES, default=OBJECTIVES, metavar="METHOD",
                        help=f"objectives to compare (default: all of {' '.join(OBJECTIVES)})")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per objective, minutes")
    parser.add_argument("--dataset", default="glyphs", help="a labelled selfsup image source (default: built-in glyphs)")
    parser.add_argument("--encoder", help="one encoder for all (e.g. vit_tiny); default: each method's own "
                                          "(ResNet-18; ViT-Tiny for mae/beit, which need a ViT)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 256; 32 with --tiny)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side, px")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="train.precision (auto = bf16 autocast on this CPU)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0],
                        help="label fractions the probes train on (default: 0.1 1.0)")
    parser.add_argument("--calibrate", type=int, default=4, help="steps timed before each run to size it (>= 2)")
    parser.add_argument("--probe-train", type=int, help="at most this many labelled training images for the probes")
    parser.add_argument("--probe-test", type=int, help="at most this many held-out images scored by the probes")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra selfsup config override for every run (repeatable)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: tiny encoders/heads, batch 32, probes on 1,000 train / 300 test images")
    parser.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 32 if args.tiny else 256
    if args.tiny:
        args.probe_train = args.probe_train or 1000
        args.probe_test = args.probe_test or 300
    if args.calibrate < 2:
        parser.error("--calibrate needs at least 2 steps (the first is left out)")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")

    from selfsup.data.builtins import BUILTIN, builtin_available
    from selfsup.methods import METHODS

    missing = [m for m in args.methods if m not in METHODS]
    if missing:
        raise SystemExit(f"bench/objectives.py: selfsup has no method {', '.join(missing)} (has: {', '.join(METHODS)})")
    if args.dataset in BUILTIN:
        ok, why = builtin_available(args.dataset)
        if not ok:
            raise SystemExit(f"bench/objectives.py: built-in {args.dataset!r} is not available: {why}")
    colour_ok, colour_why = builtin_available(COLOUR_FALLBACK)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, work)
        start = time.perf_counter()
        for method in args.methods:
            tic = time.perf_counter()
            try:
                bench.emit_objective(method, args.dataset, bench.run(method, args.dataset))
            except NoColour:
                verb = "carry" if args.dataset.endswith("s") else "carries"  # "glyphs carry", "mnist carries"
                bench.emit_objective(method, args.dataset, None, f"n/a: {args.dataset} {verb} no colour")
                if args.dataset != COLOUR_FALLBACK:
                    if colour_ok:
                        log(f"{method}: {args.dataset} has no colour; running it on {COLOUR_FALLBACK}")
                        try:
                            bench.emit_objective(method, COLOUR_FALLBACK, bench.run(method, COLOUR_FALLBACK))
                        except Exception as err:  # noqa: BLE001 - reported in the JSON line
                            log(f"{method} on {COLOUR_FALLBACK} failed: {err!r}")
                            bench.emit_objective(method, COLOUR_FALLBACK, None, f"failed: {str(err)[-300:]}")
                    else:
                        bench.emit_objective(method, COLOUR_FALLBACK, None,
                                             f"n/a: the {COLOUR_FALLBACK} built-in is not available ({colour_why})")
            except Exception as err:  # noqa: BLE001 - one objective's failure never stops the others
                log(f"{method} failed: {err!r}")
                bench.emit_objective(method, args.dataset, None, f"failed: {str(err)[-300:]}")
            log(f"{method} took {time.perf_counter() - tic:.0f} s")
        log(f"all done in {time.perf_counter() - start:.0f} s")
        print("\n" + bench.table(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
