"""Training on one process against `--ddp 2` on the same data in the same run.

    python benchmarks/ddp.py [--epochs 2] [--out docs/ddp/ddp.json]

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
from pathlib import Path

from imageorigin.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out")
    args = ap.parse_args()
    bench = Path(args.shared) / "dh3-bench/native"
    cfg = TrainConfig(backbone="mobilenet_v2", finetune=True, native=True, image_size=96, epochs=args.epochs,
                      lr=1e-3, weight_decay=1e-4, schedule="onecycle", label_smoothing=0.05, downscale=0.5,
                      blur=0.3, noise=0.2, jpeg=0.5, rotation=0, color_jitter=0, samples=False)
    result = {"data": str(bench), "epochs": args.epochs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            started = time.perf_counter()
            model = train([bench / "train"], Path(tmp) / f"p{n}", cfg, val=[bench / "val"], progress=False, ddp=n)
            history = json.loads((Path(tmp) / f"p{n}/history.json").read_text())
            result["runs"][n] = {"processes": n, "wall_s": round(time.perf_counter() - started, 1),
                                 "val_accuracy": round(model.info["metrics"]["val_accuracy"], 4),
                                 "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in history],
                                 "epoch_seconds": [h["seconds"] for h in history]}
            print(result["runs"][n], flush=True)
    one, two = result["runs"][1], result["runs"][2]
    result["val_accuracy_difference_points"] = round(100 * (two["val_accuracy"] - one["val_accuracy"]), 2)
    result["wall_ratio_ddp2_vs_one"] = round(two["wall_s"] / one["wall_s"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
