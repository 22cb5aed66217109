"""Which crops to score, compared on a grouped k-fold run's held-out sources.

    python experiments/crop_choice.py runs/kfold [--only-folds 1 2] [--out docs/crossval/crop_choice.json]

Committed result: ``python experiments/crop_choice.py runs/kfold-e5-now --out
docs/crossval/crop_choice.json`` (about 30 min; ``runs/kfold-e5-now`` is the
README's grouped 6-fold run of the shipped recipe with the 3x3 grid: a tiled
model reads every tile, and this comparison needs a grid model).

The same fold models, the same held-out images, only the crops differ: each
fold's model (of an ``imageorigin crossval --folds K`` run with a native n x n
grid) scores a dense grid of 5(n-1)+1 crops per side (for 3x3 at 96 px on a
256 px image: 11 x 11, a stride of 16 px), which contains its own n x n grid,
and its horizontal flips of that grid.  Each choice pools its crops by the mean
logit: the model's own grid; a 4 x 4 grid; the whole dense grid; and, as
TextureCrop chooses them, the 4, 9 or 18 dense crops of most texture (mean
absolute Laplacian of the grey crop); the 9 of least texture; the model's grid
with its flips.  Each held-out source is ranked against the fold's held-out
images of the other kind, as cross-validation does; prints the mean and worst
AUC per choice, overall and per fold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from kfold_runs import folds, held_out_aucs, report

from imageorigin.data import eval_transform  # noqa: E402  (on the path through kfold_runs)
from imageorigin.images import decode_image  # noqa: E402


def _grid(side: int, rows) -> list[int]:
    """Indices, in a dense grid of ``side`` x ``side`` crops (row by row), of the crops at ``rows`` x ``rows``."""
    return [r * side + c for r in rows for c in rows]


def choices(n: int, texture: np.ndarray) -> dict[str, np.ndarray]:
    """The crops each choice scores, as indices into the dense grid (side 5(n-1)+1)
    plus, past its end, the flips of the model's own grid; ``texture`` (side**2,)."""
    side = 5 * (n - 1) + 1
    own = _grid(side, range(0, side, 5))
    order = np.argsort(-texture, kind="stable")
    return {
        f"own {n}x{n} grid (the model's rule)": np.array(own),
        f"own {n}x{n} grid and its flips": np.array(own + list(range(side * side, side * side + len(own)))),
        "4x4 grid": np.array(_grid(side, np.round(np.linspace(0, side - 1, 4)).astype(int))),
        f"dense {side}x{side} grid": np.arange(side * side),
        "4 most textured": order[:4],
        "9 most textured": order[:9],
        "18 most textured": order[:18],
        "9 least textured": order[::-1][:9],
    }


def fold_scores(model, paths: list[str]) -> dict[str, np.ndarray]:
    """Each choice's pooled p_ai (N,) for these images."""
    n = model.preprocessing["crops"]
    dense = eval_transform(dict(model.preprocessing, crops=5 * (n - 1) + 1))
    h = model.human_index
    scores: dict[str, list[float]] = {}
    with torch.inference_mode():
        for path in paths:
            crops = dense(decode_image(path))  # (side**2, 3, crop, crop), normalised
            side = 5 * (n - 1) + 1
            own = _grid(side, range(0, side, 5))
            x = torch.cat([crops, crops[own].flip(-1)])  # (side**2 + n*n, 3, crop, crop)
            logits = model.head(model.backbone(x))  # (side**2 + n*n, C)
            grey = crops.mean(1)  # (side**2, crop, crop); ranking within one image only
            lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
                   - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).abs().mean((1, 2))
            for name, idx in choices(n, lap.numpy()).items():
                probs, _ = model.scores(logits[torch.as_tensor(idx.copy())].mean(0, keepdim=True))
                scores.setdefault(name, []).append(1.0 - float(probs[0, h]))
    return {k: np.array(v) for k, v in scores.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--only-folds", type=int, nargs="+", metavar="N")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    aucs: dict[str, dict[str, list[float]]] = {}
    for fold, rows, model in folds(args.kfold_dir, args.only_folds):
        for name, score in fold_scores(model, [r["path"] for r in rows]).items():
            aucs.setdefault(name, {})[fold["fold"]] = held_out_aucs(rows, score)
    table = {name: {"mean_auc": round(float(np.mean(sum(f.values(), []))), 4),
                    "min_auc": round(float(np.min(sum(f.values(), []))), 4),
                    "sources": len(sum(f.values(), [])),
                    "per_fold_mean_auc": {k: round(float(np.mean(v)), 4) for k, v in f.items()}}
             for name, f in aucs.items()}
    report({"kfold_dir": str(args.kfold_dir), "choices": table}, args.out)


if __name__ == "__main__":
    main()
