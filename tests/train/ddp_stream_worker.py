"""Run by test_stream_loop.py under torchrun (2 processes, gloo): `fit` on a shard source with 2 reader
processes per rank, uninterrupted, then interrupted after step 3 and resumed; writes what each rank saw."""

import json
import sys
from pathlib import Path

import torch

from selfsup.train.loop import fit
from selfsup.train.runtime import init_runtime, shutdown
from tests.conftest import tiny_train_config
from tests.train.test_loop import ToyRegression
from tests.train.test_stream_loop import shard_source


def main(out_path: str) -> None:
    runtime = init_runtime("cpu", "fp32")
    root = Path(out_path).parent
    # 8 shards x 4 rows, batch 8 over 2 ranks: micro-batches of 4; 2 ranks x 2 readers = 4 readers of
    # 2 shards = 2 micro-batches each; 4 steps per epoch.
    cfg = tiny_train_config(steps=8, checkpoint_every=2)

    def run(folder: str, **kwargs):
        torch.manual_seed(0)
        model, source = ToyRegression(), shard_source(num_shards=8, size=4, workers=2)
        fit(model, source, cfg, root / folder, runtime, seed=0, **kwargs)
        return model, source

    whole, source = run("whole")
    run("crash", stop_after=3)
    resumed, again = run("crash", resume=True)
    equal = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    with open(f"{out_path}.{runtime.rank}", "w") as f:
        json.dump({"seen": source.seen, "resumed_seen": again.seen,
                   "resumed_equal": equal and again.seen == source.seen[2:]}, f)
    shutdown(runtime)


if __name__ == "__main__":
    main(sys.argv[1])
