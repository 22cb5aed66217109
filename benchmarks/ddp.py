"""Training on one process against `--ddp 2` on the same data in the same run.

    python benchmarks/ddp.py [--epochs 2] [--seeds 0 1 2] [--out docs/ddp/ddp.json]

Fine-tunes MobileNetV2 on 96 px native crops (the default model's recipe, on
the bench's native view only, fewer epochs), once in one process and once
split across 2 gloo processes: validation accuracy of each (target: within 1
point) and wall-clock seconds of each (on one 2-core machine the two processes
share the cores one process already uses: no speed-up is expected here; the
point of --ddp is more machines or GPUs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from imageorigin.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one run of each per seed: the spread between seeds is the yardstick")
    ap.add_argument("--out")
    args = ap.parse_args()
    bench = Path(args.shared) / "dh3-bench/native"
    cfg = TrainConfig(backbone="mobilenet_v2", finetune=True, native=True, image_size=96, epochs=args.epochs,
                      lr=1e-3, weight_decay=1e-4, schedule="onecycle", label_smoothing=0.05, downscale=0.5,
                      blur=0.3, noise=0.2, jpeg=0.5, rotation=0, color_jitter=0, samples=False)
    result = {"data": str(bench), "epochs": args.epochs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for n in (1, 2):
                started = time.perf_counter()
                out = Path(tmp) / f"s{seed}p{n}"
                model = train([bench / "train"], out, replace(cfg, seed=seed), val=[bench / "val"],
                              progress=False, ddp=n)
                history = json.loads((out / "history.json").read_text())
                run = {"seed": seed, "processes": n, "wall_s": round(time.perf_counter() - started, 1),
                       "val_accuracy": round(model.info["metrics"]["val_accuracy"], 4),
                       "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in history],
                       "epoch_seconds": [h["seconds"] for h in history]}
                result["runs"].append(run)
                print(run, flush=True)
    acc = {(r["seed"], r["processes"]): r["val_accuracy"] for r in result["runs"]}
    result["ddp2_minus_one_points_per_seed"] = {s: round(100 * (acc[s, 2] - acc[s, 1]), 2) for s in args.seeds}
    ones = [acc[s, 1] for s in args.seeds]
    result["one_process_spread_over_seeds_points"] = round(100 * (max(ones) - min(ones)), 2)
    walls = {(r["seed"], r["processes"]): r["wall_s"] for r in result["runs"]}
    result["wall_ratio_ddp2_vs_one"] = round(sum(walls[s, 2] for s in args.seeds)
                                             / sum(walls[s, 1] for s in args.seeds), 2)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
