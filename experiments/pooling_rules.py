"""Pooling rules for a multi-crop model, compared on a grouped k-fold run's held-out sources.

    python experiments/pooling_rules.py runs/kfold [--out docs/crossval/pooling.json]

Committed result: ``python experiments/pooling_rules.py runs/kfold-ft96 --out
docs/crossval/pooling.json``.

For each fold of an ``imageorigin crossval --folds K`` run, the fold's model
scores the fold's held-out images (its ``test_scores.csv``) crop by crop
(``Prediction.patches``), and each rule pools the crops' p_ai into one score:
the model's own rule (mean logit, the published default), the mean p_ai, the
median p_ai, the largest p_ai, and the mean of the 3 largest.  Each held-out
source is then ranked against the fold's held-out images of the other kind, as
cross-validation does; prints the mean and worst AUC per rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kfold_runs import folds, held_out_aucs, report

import imageorigin  # noqa: E402  (on the path through kfold_runs)

RULES = {
    "mean logit (model)": None,
    "mean p_ai": lambda c: c.mean(),
    "median p_ai": lambda c: float(np.median(c)),
    "max p_ai": lambda c: c.max(),
    "mean of top 3 p_ai": lambda c: np.sort(c)[-3:].mean(),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    aucs: dict[str, list[float]] = {rule: [] for rule in RULES}
    for _, rows, model in folds(args.kfold_dir):
        preds = list(imageorigin.predict(model, [r["path"] for r in rows]))
        crops = [np.array([c["p_ai"] for c in q.patches]) for q in preds]
        for rule, pool in RULES.items():
            aucs[rule] += held_out_aucs(rows, np.array([q.p_ai if pool is None else pool(c)
                                                        for q, c in zip(preds, crops)]))
    report({"kfold_dir": str(args.kfold_dir),
            "rules": {rule: {"mean_auc": round(float(np.mean(a)), 4), "min_auc": round(float(np.min(a)), 4),
                             "sources": len(a)} for rule, a in aucs.items()}}, args.out)


if __name__ == "__main__":
    main()
