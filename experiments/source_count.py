"""Is it the number of sources or the number of images? A learning curve over training families.

    python experiments/source_count.py runs/kfold-e5-now runs/kfold-e5-s1 \
        --work runs/source-count --out docs/crossval/source-count.json

(the command of the committed result; about 5 min per fold and arm).

The first run (a grouped k-fold run of ``imageorigin crossval --group-by family``
on the native view of both sets, as in the README) gives the folds and the
recipe; every run named is scored on the same images. For each fold K, two
models are trained with that run's recipe, each on a fraction of what the full
run trained on, and each tested on fold K's held-out images exactly as the full
run was:

- arm A, **half the families**: a fixed, seeded half of the human families and
  half of the AI families are left out of training (all their images), in every
  fold; the others keep all their images.
- arm B, **every family, as many images as arm A**: every training family, each
  subsampled (seeded) to arm A's share of the images.

If arm A loses much more than arm B, what limits the held-out figures is the
number of different sources the model learns from, not the number of images.
Training data are symlink trees under ``--work`` (nothing is copied); each
(arm, fold) is an ``--only-folds K --folds-from RUN/crossval.json`` run under
``--work``, skipped when its ``crossval.json`` exists, so an interrupted run goes
on where it stopped. About 5 min per (arm, fold) on a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from kfold_runs import REPO, held_out_aucs, test_scores

from imageorigin.crossval import crossval, family, recorded_folds
from imageorigin.train import TrainConfig

SETS = ("dh3-bench", "dh3-wide")
ARMS = {"A": "half the families", "B": "every family, as many images as arm A"}


def training_files(shared: Path) -> tuple[dict[str, list[str]], set[str]]:
    """Each family's native training images (family -> paths relative to the
    view, "dh3-bench/train/dalle/x.jpg"), and which families are human."""
    files: dict[str, list[str]] = {}
    humans = set()
    for name in SETS:
        with open(shared / name / "manifest.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] == "train" and (shared / name / "native" / row["path"]).exists():
                    files.setdefault(family(row), []).append(f"{name}/{row['path']}")
                    if row["label"] == "human":
                        humans.add(family(row))
    return files, humans


def plan(files: dict[str, list[str]], fold_of: dict[str, int], humans: set[str],
         seed: int = 0) -> tuple[set, dict, dict]:
    """The families arm A leaves out (half of each kind, seeded); per fold each
    arm's tree: fold -> arm -> paths (the fold's own families always in it:
    crossval holds them out and tests them); and per fold how many images the
    full run trains on (families and images in its training folders) and how many arms A and B keep."""
    rng = random.Random(seed)
    hum = sorted(f for f in files if f in humans)
    ai = sorted(f for f in files if f not in humans)
    dropped = set(rng.sample(hum, len(hum) // 2)) | set(rng.sample(ai, len(ai) // 2))
    out, counts = {}, {}
    for k in sorted(set(fold_of.values())):
        own = [p for f in files if fold_of[f] == k for p in files[f]]
        others = [f for f in files if fold_of[f] != k]
        kept = [p for f in others if f not in dropped for p in files[f]]
        share = len(kept) / sum(len(files[f]) for f in others)
        sub = [p for f in others
               for p in random.Random(f"{k}:{f}").sample(sorted(files[f]), max(1, round(share * len(files[f]))))]
        out[k] = {"A": own + kept, "B": own + sub}
        counts[f"fold {k}"] = {"families": len(others), "families_A": sum(f not in dropped for f in others),
                               "images": sum(len(files[f]) for f in others), "images_A": len(kept),
                               "images_B": len(sub)}
    return dropped, out, counts


def link_tree(root: Path, paths: list[str], shared: Path) -> list[str]:
    """Symlink ``paths`` under ``root`` as SET/train/CLASS/NAME (what the manifests
    match on); returns the training folders to give crossval."""
    shutil.rmtree(root, ignore_errors=True)
    for p in paths:
        name, rel = p.split("/", 1)
        dest = root / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((shared / name / "native" / rel).resolve(), dest)
    return [str(root / name / "train") for name in SETS if (root / name / "train").is_dir()]


def image_key(path: str) -> tuple:
    """(set, view, split, class, name) of a tested image, wherever its tree lies."""
    parts = Path(path).parts
    i = max(j for j, p in enumerate(parts) if p in SETS)
    rest = parts[i + 1:]
    if rest[0] not in ("native", "resized"):  # an arm's tree holds native images only
        rest = ("native",) + rest
    return (parts[i],) + rest


def compare(scored: dict[str, dict[int, Path]]) -> dict:
    """Per run or arm: held-out AUC per fold (mean over its sources) and overall,
    on the images every one of them scored in that fold."""
    folds = sorted(set.intersection(*(set(v) for v in scored.values())))
    per: dict[str, dict[int, list[float]]] = {n: {} for n in scored}
    for k in folds:
        rows = {n: {image_key(r["path"]): r for r in test_scores(d[k], f"fold {k}")} for n, d in scored.items()}
        common = sorted(set.intersection(*(set(v) for v in rows.values())))
        for n, r in rows.items():
            rs = [r[c] for c in common]
            per[n][k] = [a for a in held_out_aucs(rs, np.array([float(x["p_ai"]) for x in rs])) if a is not None]
    return {n: {"folds": {f"fold {k}": round(float(np.mean(v)), 4) for k, v in p.items()},
                "mean_auc": round(float(np.mean([a for v in p.values() for a in v])), 4),
                "worst_auc": round(float(min(a for v in p.values() for a in v)), 4),
                "sources": sum(len(v) for v in p.values())} for n, p in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="full k-fold runs; the first gives the folds and the recipe")
    p.add_argument("--work", type=Path, required=True, help="folder for the symlink trees and the arms' runs")
    p.add_argument("--out", type=Path, help="write the comparison here (JSON)")
    p.add_argument("--only-folds", type=int, nargs="+", metavar="K")
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("IMAGEORIGIN_SHARED", REPO.parent / "shared")))
    args = p.parse_args()
    first = json.loads((args.runs[0] / "crossval.json").read_text())
    files, humans = training_files(args.shared)
    fold_of = {g: i + 1 for g, i in recorded_folds(args.runs[0] / "crossval.json", files, len(first["folds"])).items()}
    dropped, arms, counts = plan(files, fold_of, humans)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in first["config"].items() if k in fields})
    folds = args.only_folds or sorted(arms)
    manifests = [str(args.shared / name / "manifest.csv") for name in SETS]
    reference = [str(args.shared / name / view / "val") for view in ("native", "resized") for name in SETS]
    for k in folds:
        for arm in ARMS:
            out = args.work / arm / f"f{k}"
            if (out / "crossval.json").exists():
                continue
            data = link_tree(args.work / "trees" / arm / f"f{k}", arms[k][arm], args.shared)
            print(f"fold {k}, arm {arm} ({ARMS[arm]}): {counts[f'fold {k}'][f'images_{arm}']} training images",
                  flush=True)
            crossval(data, manifests, out, cfg, reference=reference, folds=len(arms), group_by="family",
                     only=[k], folds_from=args.runs[0] / "crossval.json", progress=True)
    scored = {str(r): {k: r for k in folds} for r in args.runs}
    scored.update({f"arm {a}: {what}": {k: args.work / a / f"f{k}" for k in folds} for a, what in ARMS.items()})
    result = {"dropped_families": sorted(dropped),
              "training": {f"fold {k}": counts[f"fold {k}"] for k in folds},
              "runs": compare(scored)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
