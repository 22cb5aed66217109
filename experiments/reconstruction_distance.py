"""How far each image is from its own reconstruction through a generator's
autoencoder (the training-free idea of AEROBLADE, Ricker et al., CVPR 2024),
and how well that distance alone tells AI from human, per source.

    python experiments/reconstruction_distance.py --autoencoder ../shared/decoders/taef2 \
        --out docs/pseudofakes/reconstruction-distance.json

For every val image of both sets and both views: its reconstruction (cached as
lossless PNG by imageorigin.pseudofakes), then the mean squared error per
96 px crop of a 3x3 grid (the shipped model's crops) in 8-bit units.  An
image the decoder made is reconstructed more closely, so the score of "AI" is
minus the distance: the image's smallest crop distance (the crop the decoder
redraws best) and the mean over its crops.  AUC per AI source against the
human images of the same view, and overall.  LPIPS (AEROBLADE's distance)
needs VGG weights that cannot be had here: pixels only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from imageorigin.autoencoder import load_autoencoder
from imageorigin.data import grid_boxes, match_manifest, read_manifest
from imageorigin.images import decode_image, find_images
from imageorigin.pseudofakes import make_twins

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = ("dh3-bench", "dh3-wide")


def crop_distances(real: Path, twin: Path, crop: int = 96, n: int = 3) -> np.ndarray:
    """(n*n,) mean squared error of each grid crop between an image and its reconstruction."""
    a = np.asarray(decode_image(real), np.float32)
    b = np.asarray(decode_image(twin), np.float32)
    h, w = a.shape[:2]
    return np.array([((a[y:y + crop, x:x + crop] - b[y:y + crop, x:x + crop]) ** 2).mean()
                     for x, y in grid_boxes(w, h, crop, n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder", default=str(SHARED / "decoders/taef2"))
    p.add_argument("--views", nargs="+", default=["native", "resized"], choices=["native", "resized"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ae = load_autoencoder(args.autoencoder)
    rows = read_manifest([SHARED / s / "manifest.csv" for s in SETS], ("path", "source", "label"))
    result: dict = {"autoencoder": ae.name, "views": {}}
    for view in args.views:
        files = sorted(find_images([SHARED / s / view / "val" for s in SETS]))
        print(f"{view}: {len(files)} images", file=sys.stderr)
        twins = make_twins(files, ae, aligned=False, progress=sys.stderr.isatty())
        meta = match_manifest(files, rows)
        by_source: dict[str, list] = defaultdict(list)
        humans_min, humans_mean = [], []
        for f, t, m in zip(files, twins.twin, meta):
            if t is None or m is None:
                continue
            d = crop_distances(f, t)
            if m["label"] == "human":
                humans_min.append(d.min()), humans_mean.append(d.mean())
            by_source[m["source"]].append((m["label"], d.min(), d.mean()))
        table = {}
        all_ai_min, all_ai_mean = [], []
        for source, items in sorted(by_source.items()):
            if items[0][0] == "human":
                table[source] = {"label": "human", "n": len(items),
                                 "median_min_crop_mse": round(float(np.median([i[1] for i in items])), 2)}
                continue
            mins, means = [i[1] for i in items], [i[2] for i in items]
            all_ai_min += mins
            all_ai_mean += means
            y = [1] * len(mins) + [0] * len(humans_min)
            table[source] = {
                "label": items[0][0], "n": len(items),
                "auc_min_crop": round(roc_auc_score(y, [-v for v in mins + humans_min]), 3),
                "auc_mean_crop": round(roc_auc_score(y, [-v for v in means + humans_mean]), 3),
                "median_min_crop_mse": round(float(np.median(mins)), 2)}
        y = [1] * len(all_ai_min) + [0] * len(humans_min)
        result["views"][view] = {
            "images": len(files), "humans": len(humans_min),
            "auc_min_crop": round(roc_auc_score(y, [-v for v in all_ai_min + humans_min]), 3),
            "auc_mean_crop": round(roc_auc_score(y, [-v for v in all_ai_mean + humans_mean]), 3),
            "sources": table}
    text = json.dumps(result, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
