"""Adapting to a new generator: AUC on a held-out source with 0, 10 and 50 of its images added.

    python experiments/adapt_curve.py runs/kfold --source SOURCE [--source ...] --out docs/adapt

Committed result: ``python experiments/adapt_curve.py runs/kfold-ft96
--source jamez-bondos_awesome-gpt4o-images/cases
--source andygock_FLUX-Style-CheatSheet/img_flux_tiles
--source csjunxu_PolyU-Real-World-Noisy-Images/cropped_real --out docs/adapt``.

Reads a grouped k-fold run of ``imageorigin crossval`` (its fold models and
``test_scores.csv``).  For each named source, held out in some fold: the fold's
model (which never saw the source's family) is warm-started
(``imageorigin train --init``, 3 epochs) on ``n`` of the source's images plus a
replay sample of 40 images per class from the fold's own training sources, and
scored on the source's *other* images against the fold's held-out images of the
other kind, exactly as cross-validation scored it.  ``n = 0`` is the fold model
as it is.  Writes ``adapt.json`` and ``adapt.md``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import imageorigin  # noqa: E402
from imageorigin.data import scan_folders  # noqa: E402
from imageorigin.evaluate import figures  # noqa: E402
from imageorigin.fileio import write_json, write_text  # noqa: E402
from imageorigin.train import TrainConfig, train  # noqa: E402

SHOTS = (0, 10, 50)
REPLAY_PER_CLASS = 40


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--source", action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    result = json.loads((args.kfold_dir / "crossval.json").read_text())
    cfg = TrainConfig(**{**result["config"], "epochs": args.epochs, "init": None})
    rows = []
    for source in args.source:
        fold = next(r["fold"] for r in result["sources"] if r["source"] == source)
        fold_dir = args.kfold_dir / fold.replace(" ", "_")
        scores = [line.split(",") for line in (fold_dir / "test_scores.csv").read_text().splitlines()[1:]]
        mine = sorted(path for path, src, _, _ in scores if src == source)
        label = next(lab for _, src, lab, _ in scores if src == source)
        others = [path for path, src, lab, _ in scores if (lab == "human") != (label == "human")]
        # The source's images to learn from: native view, a seeded sample; its
        # other images (both views of the rest) are the test.
        pool = [f for f in mine if "/native/" in f]
        random.Random(0).shuffle(pool)
        test_names = None
        for n in SHOTS:
            shots = pool[:n]
            names = {Path(f).name for f in pool[:max(SHOTS)]}
            test_names = test_names or names
            test = [f for f in mine if Path(f).name not in test_names]
            start = time.perf_counter()
            if n == 0:
                model = imageorigin.load(fold_dir / "model.safetensors")
            else:
                data = _adapt_folder(args.out / "data" / f"{fold_dir.name}-{_slug(source)}-{n}", shots, label,
                                     result, fold)
                model = train(data, args.out / "runs" / f"{_slug(source)}-{n}",
                              TrainConfig(**{**cfg.__dict__, "init": str(fold_dir / "model.safetensors"),
                                             "val_fraction": 0.2}), progress=False)
            seconds = time.perf_counter() - start
            preds = list(imageorigin.predict(model, test + others))
            p_ai = np.array([q.p_ai for q in preds])
            truth_ai = np.array([label != "human"] * len(test) + [label == "human"] * len(others))
            on_source = figures(np.ones(len(test), bool), truth_ai[:len(test)], p_ai[:len(test)],
                                model.threshold)
            rows.append({"source": source, "fold": fold, "label": label, "added": n,
                         "test_images": len(test), "other_kind": len(others),
                         "auc": figures(np.ones(len(preds), bool), truth_ai, p_ai, None)["ai_vs_human_auc"],
                         "flagged_rate": on_source["ai_detected_rate" if label != "human"
                                                   else "human_flagged_rate"],
                         "adapt_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"rows": rows, "kfold_dir": str(args.kfold_dir), "epochs": args.epochs,
           "replay_per_class": REPLAY_PER_CLASS}
    write_json(args.out / "adapt.json", out)
    write_text(args.out / "adapt.md", _markdown(out))
    print(_markdown(out))


def _adapt_folder(root: Path, shots: list[str], label: str, result: dict, fold: str) -> Path:
    """Class folders of links: the new source's images and a replay sample of the
    fold's training data (sources outside the fold), 40 per class."""
    held = set(next(f["held_out"] for f in result["folds"] if f["fold"] == fold))
    from imageorigin.crossval import family
    from imageorigin.data import match_manifest, read_manifest

    manifests = result["manifest"].split(", ")
    rows = read_manifest(manifests, ("path", "source"))
    train_dirs = [Path(m).parent / "native/train" for m in manifests]
    folder = scan_folders(train_dirs)
    matched = match_manifest([p for p, _ in folder.samples], rows)
    by_class: dict[str, list[Path]] = {}
    group_by = result["method"].split(" by ")[-1]
    for (path, y), row in zip(folder.samples, matched):
        if row is not None and (family(row) if group_by == "family" else row["source"]) not in held:
            by_class.setdefault(folder.classes[y], []).append(path)
    for cls, files in sorted(by_class.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in random.Random(1).sample(files, REPLAY_PER_CLASS):
            _link(f, root / cls / f.name)
    for f in shots:
        _link(Path(f), root / label / ("new-" + Path(f).name))
    return root


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.symlink(os.path.abspath(src), dst)


def _slug(s: str) -> str:
    return s.replace("/", "__").replace(" ", "_")


def _markdown(out: dict) -> str:
    lines = ["# Adapting to a held-out source", "",
             f"Each fold model of `{out['kfold_dir']}` warm-started (`imageorigin train --init`, "
             f"{out['epochs']} epochs) on n images of a source its training never saw plus "
             f"{out['replay_per_class']} replay images per class from its own training sources; "
             "scored on the source's other images against the fold's held-out images of the other kind.",
             "", "| source | class | images added | AUC | flagged as AI | test images | adapt time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        lines.append(f"| {r['source']} | {r['label']} | {r['added']} | {r['auc']:.3f} | "
                     f"{r['flagged_rate']:.3f} | {r['test_images']} | {r['adapt_seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
