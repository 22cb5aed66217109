"""Ensembles of k-fold runs, compared on their held-out sources without retraining.

    python experiments/ensembles.py runs/kfold-a runs/kfold-b ... [--out docs/crossval/ensembles.json]

Committed result: ``python experiments/ensembles.py runs/kfold-e5-now runs/kfold-e5-s1
runs/kfold-e8 runs/kfold-early runs/kfold-freeze7 runs/kfold-npr runs/kfold-lite0
--out docs/crossval/ensembles.json`` (seconds).

Runs made on the same folds (``imageorigin crossval --folds K``, the same
``--fold-seed``) score the same held-out images. For every combination of one,
two or three runs, each image's score is the mean of the runs' p_ai logits (the
rule that pools a model's crops), and each held-out source is ranked against
its fold's held-out images of the other kind, as cross-validation does. Prints
the mean and worst AUC of each combination, best mean first. Only folds that
every run finished are used.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from kfold_runs import fold_names, held_out_aucs, report, test_scores


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dirs", type=Path, nargs="+")
    p.add_argument("--largest", type=int, default=3, help="the most runs in one ensemble")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    finished = [fold_names(d) for d in args.kfold_dirs]  # each run's crossval.json read once
    shared = [f for f in finished[0] if all(f in names for names in finished)]
    # fold -> the first run's test_scores rows; fold -> per run, (N,) p_ai logits in that row order
    logits: dict[str, list[np.ndarray]] = {}
    rows: dict[str, list[dict]] = {}
    for fold in shared:
        per_run = [test_scores(d, fold) for d in args.kfold_dirs]
        paths = [r["path"] for r in per_run[0]]
        if any([r["path"] for r in other] != paths for other in per_run[1:]):
            raise SystemExit(f"{fold}: the runs scored different images; were they made on the same folds?")
        rows[fold] = per_run[0]
        logits[fold] = [_logit(np.array([float(r["p_ai"]) for r in run])) for run in per_run]
    table = []
    for k in range(1, min(args.largest, len(args.kfold_dirs)) + 1):
        for combo in itertools.combinations(range(len(args.kfold_dirs)), k):
            aucs = []
            for fold in shared:
                z = np.mean([logits[fold][i] for i in combo], axis=0)
                aucs += held_out_aucs(rows[fold], 1 / (1 + np.exp(-z)))
            table.append({"runs": [str(args.kfold_dirs[i]) for i in combo], "mean_auc": round(float(np.mean(aucs)), 4),
                          "worst_auc": round(float(np.min(aucs)), 4), "sources": len(aucs)})
    table.sort(key=lambda r: -r["mean_auc"])
    report({"folds": shared, "ensembles": table}, args.out)


if __name__ == "__main__":
    main()
