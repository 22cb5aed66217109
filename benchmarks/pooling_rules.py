"""Pooling rules for a multi-crop model, compared on a grouped k-fold run's held-out sources.

    python benchmarks/pooling_rules.py runs/kfold [--out docs/crossval/pooling.json]

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
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import imageorigin  # noqa: E402
from imageorigin.evaluate import figures  # noqa: E402

RULES = {
    "mean logit (model)": None,
    "mean p_ai": lambda c: c.mean(),
    "median p_ai": lambda c: float(np.median(c)),
    "max p_ai": lambda c: c.max(),
    "mean of top 3 p_ai": lambda c: np.sort(c)[-3:].mean(),
}


def held_out_aucs(source: np.ndarray, ai: np.ndarray, score: np.ndarray) -> list[float]:
    """A fold's AUC per held-out source, as cross-validation computes it: each
    source's images against the fold's held-out images of the other kind.
    ``source`` (N,) names, ``ai`` (N,) bool, ``score`` (N,) p_ai; sources in sorted order."""
    out = []
    for name in sorted(set(source)):
        mine = source == name
        scored = mine | (ai != ai[mine][0])
        out.append(figures(np.ones(scored.sum(), bool), ai[scored], score[scored], None)["ai_vs_human_auc"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = json.loads((args.kfold_dir / "crossval.json").read_text())
    aucs: dict[str, list[float]] = {rule: [] for rule in RULES}
    for fold in result["folds"]:
        fold_dir = args.kfold_dir / fold["fold"].replace(" ", "_")
        rows = [line.split(",") for line in (fold_dir / "test_scores.csv").read_text().splitlines()[1:]]
        model = imageorigin.load(fold_dir / "model.safetensors")
        preds = list(imageorigin.predict(model, [r[0] for r in rows]))
        crops = [np.array([c["p_ai"] for c in q.patches]) for q in preds]
        src = np.array([r[1] for r in rows])
        ai = np.array([r[2] != "human" for r in rows])
        for rule, pool in RULES.items():
            aucs[rule] += held_out_aucs(src, ai, np.array([q.p_ai if pool is None else pool(c)
                                                           for q, c in zip(preds, crops)]))
        print(f"{fold['fold']} done", file=sys.stderr, flush=True)
    table = {rule: {"mean_auc": round(float(np.mean(a)), 4), "min_auc": round(float(np.min(a)), 4),
                    "sources": len(a)} for rule, a in aucs.items()}
    text = json.dumps({"kfold_dir": str(args.kfold_dir), "rules": table}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
