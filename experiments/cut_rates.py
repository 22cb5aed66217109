"""How a k-fold run's models do at each stored operating point, on their held-out sources.

    python experiments/cut_rates.py runs/kfold [--out FILE.json]

Committed results: ``docs/crossval/cut-rates-*.json``, each from
``python experiments/cut_rates.py RUN --out docs/crossval/cut-rates-NAME.json`` on
the k-fold run its name says (``RUN`` as the README's research log gives it).

Each fold model stores the p_ai cuts that flag 1%, 2%, 5% and 10% of its own
calibration humans (``info.thresholds_at_fpr``). Applied to the fold's held-out
images (its ``test_scores.csv``), each cut gives, per held-out source, the share
flagged as AI: for a human source the false accusations a moderator would meet,
for an AI source the detection rate. Prints, per cut, the mean and the worst
human source and the mean AI source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kfold_runs import folds, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--only-folds", type=int, nargs="+", metavar="N",
                   help="only these folds (to compare with a run that did not finish)")
    args = p.parse_args()
    human: dict[str, list[tuple[float, str]]] = {}
    ai: dict[str, list[float]] = {}
    for fold, rows, model in folds(args.kfold_dir, args.only_folds):
        for held in fold["sources"]:
            p_ai = np.array([float(r["p_ai"]) for r in rows if r["source"] == held["source"]])
            for fpr, cut in model.info["thresholds_at_fpr"].items():
                rate = float(np.mean(p_ai >= cut))
                if held["label"] == ["human"]:
                    human.setdefault(fpr, []).append((rate, held["source"]))
                else:
                    ai.setdefault(fpr, []).append(rate)
    table = {fpr: {"humans_flagged_mean": round(float(np.mean([r for r, _ in human[fpr]])), 4),
                   "humans_flagged_worst": round(max(human[fpr])[0], 4), "worst_source": max(human[fpr])[1],
                   "ai_detected_mean": round(float(np.mean(ai[fpr])), 4),
                   "human_sources": len(human[fpr]), "ai_sources": len(ai[fpr])}
             for fpr in sorted(human, key=float)}
    report({"kfold_dir": str(args.kfold_dir), "folds": args.only_folds or "all", "cuts": table}, args.out)


if __name__ == "__main__":
    main()
