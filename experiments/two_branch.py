"""The shipped model and a decoder-trace model side by side, and combined.

    python experiments/two_branch.py default runs/trace-s1/model.safetensors \
        --out docs/pseudofakes/two-branch.json

Each model's p_ai on the val images of both sets (native view, and resized),
as a logit, standardised by the mean and spread of its logits on 200 human
*training* images (so the rule sees no val label), and the plain average of the
two standardised logits.  AUC of AI against human overall and per AI source
(against all human val images of the view), and predict's throughput of each
model on the same images (the cost of running both).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import imageorigin
from imageorigin.data import match_manifest, read_manifest
from imageorigin.images import find_images

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = ("dh3-bench", "dh3-wide")


def logits(model, files) -> tuple[np.ndarray, float]:
    """logit(p_ai) of each file (clipped away from 0 and 1), and images per second."""
    start = time.perf_counter()
    p = np.array([x.p_ai for x in imageorigin.predict(model, files, precision="fp32")], dtype=np.float64)
    rate = len(files) / (time.perf_counter() - start)
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)), rate


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("shipped")
    a.add_argument("trace")
    a.add_argument("--out", required=True)
    args = a.parse_args()
    models = {"shipped": imageorigin.load(args.shipped), "trace": imageorigin.load(args.trace)}
    rows = read_manifest([SHARED / s / "manifest.csv" for s in SETS], ("path", "source", "label"))
    reference = random.Random(0).sample(sorted(find_images([SHARED / s / "native/train/human" for s in SETS])), 200)
    scale = {}
    for name, model in models.items():
        z, _ = logits(model, reference)
        scale[name] = (z.mean(), z.std())
    result = {"models": {"shipped": args.shipped, "trace": args.trace}, "views": {}}
    for view in ("native", "resized"):
        files = sorted(find_images([SHARED / s / view / "val" for s in SETS]))
        meta = match_manifest(files, rows)
        keep = [i for i, m in enumerate(meta) if m is not None]
        files, meta = [files[i] for i in keep], [meta[i] for i in keep]
        y = np.array([m["label"] != "human" for m in meta])
        scores, rates = {}, {}
        for name, model in models.items():
            z, rates[name] = logits(model, files)
            mu, sd = scale[name]
            scores[name] = (z - mu) / sd
        scores["combined"] = (scores["shipped"] + scores["trace"]) / 2
        human = ~y
        per_source = {}
        for source in sorted({m["source"] for m, ai in zip(meta, y) if ai}):
            mask = np.array([m["source"] == source for m in meta]) | human
            per_source[source] = {"n": int((mask & y).sum()), **{
                k: round(float(roc_auc_score(y[mask], s[mask])), 3) for k, s in scores.items()}}
        result["views"][view] = {
            "images": len(files), "humans": int(human.sum()),
            "auc": {k: round(float(roc_auc_score(y, s)), 3) for k, s in scores.items()},
            "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "sources": per_source}
        print(view, json.dumps(result["views"][view]["auc"]), json.dumps(result["views"][view]["images_per_s"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
