"""What the experiments that re-read a grouped k-fold run share: its folds, each
fold's held-out scores and model, per-source AUC, and the JSON they report."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import imageorigin  # noqa: E402
from imageorigin.evaluate import figures  # noqa: E402


def folds(kfold_dir: Path, only: list[int] | None = None) -> Iterator[tuple[dict, list[dict], object]]:
    """Each fold of an ``imageorigin crossval --folds K`` run in ``kfold_dir`` (or
    only these fold numbers): (its crossval.json row with ``sources``, the rows
    of the sources it held out, added; its test_scores.csv rows; its model)."""
    result = json.loads((kfold_dir / "crossval.json").read_text())
    for fold in result["folds"]:
        if only and int(fold["fold"].split()[-1]) not in only:
            continue
        fold_dir = kfold_dir / fold["fold"].replace(" ", "_")
        held = [s for s in result["sources"] if s["fold"] == fold["fold"]]
        yield (dict(fold, sources=held), test_scores(kfold_dir, fold["fold"]),
               imageorigin.load(fold_dir / "model.safetensors").eval())
        print(f"{fold['fold']} done", file=sys.stderr, flush=True)


def fold_names(kfold_dir: Path) -> list[str]:
    """The folds a k-fold run finished ("fold 1", ...)."""
    return [f["fold"] for f in json.loads((kfold_dir / "crossval.json").read_text())["folds"]]


def test_scores(kfold_dir: Path, fold: str) -> list[dict]:
    """A fold's test_scores.csv rows (path, source, label, p_ai), as dicts."""
    with open(kfold_dir / fold.replace(" ", "_") / "test_scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def held_out_aucs(rows: list[dict], score: np.ndarray) -> list[float]:
    """A fold's AUC per held-out source, as cross-validation computes it: each
    source's images against the fold's held-out images of the other kind.
    ``rows``: the fold's test_scores.csv rows; ``score`` (N,) p_ai; sources in sorted order."""
    source = np.array([r["source"] for r in rows])
    ai = np.array([r["label"] != "human" for r in rows])
    out = []
    for name in sorted(set(source)):
        mine = source == name
        scored = mine | (ai != ai[mine][0])
        out.append(figures(np.ones(scored.sum(), bool), ai[scored], score[scored], None)["ai_vs_human_auc"])
    return out


def report(data: dict, out: Path | None) -> None:
    """Print ``data`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(data, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
