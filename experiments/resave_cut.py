"""Which re-saves the stored cut should answer for: what each choice costs in AI caught.

    python experiments/resave_cut.py runs/default-v2/model.safetensors --out docs/resaved/cut-choice.json

``runs/default-v2``: the default's training command at commit 3567760, when the
cut answered for every re-save, however small it left the image (the shipped
default has the same weights: training is deterministic; only its cut
differs).  Its ``info.resave_cuts`` keeps the cut each re-save alone would need.  On the native val images of both sets (never seen in
training or calibration), for each candidate cut: the share of human images
at or above it after each re-save (the target: 2% or fewer each), and the
share of AI images caught as they are.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import imageorigin
from imageorigin.evaluate import RESAVES
from imageorigin.images import find_images

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def p_ai(model, images) -> np.ndarray:
    return np.array([p.p_ai for p in imageorigin.predict(model, images, num_workers=0)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = imageorigin.load(args.model)
    val = [SHARED / s / "native/val" for s in ("dh3-bench", "dh3-wide")]
    humans = [imageorigin.decode_image(f) for f in find_images([v / "human" for v in val])]
    ai = sorted(find_images([v / c for v in val for c in ("dalle", "other_ai")]))
    crop = model.preprocessing["crop"]
    scores, sizes = {}, {}
    for name, change in RESAVES.items():
        changed = [change(im) for im in humans]
        sizes[name] = min(min(im.size) for im in changed)
        keep = [im for im in changed if min(im.size) >= crop]  # smaller: the small-image caveat
        scores[name] = p_ai(model, keep)
    ai_scores = p_ai(model, ai)
    cuts = model.info["resave_cuts"]
    candidates = {
        "as they are only (the 1% cut)": cuts["original"],
        "and every re-save that leaves 2 tiles a side, 192 px or more (shipped, with the small-image caveat under that)":
            max(c for n, c in cuts.items() if sizes[n] >= 2 * crop),
        "and every re-save": max(cuts.values()),
    }
    table = {}
    for label, cut in candidates.items():
        table[label] = {
            "cut": cut,
            "AI caught, as they are": float((ai_scores >= cut).mean()),
            "humans flagged, worst re-save": max(float((s >= cut).mean()) for s in scores.values() if len(s)),
            "humans flagged per re-save": {n: float((s >= cut).mean()) for n, s in scores.items() if len(s)},
        }
        print(f"{label}: cut {cut:.4f}, AI caught {table[label]['AI caught, as they are']:.1%}, "
              f"worst re-save {table[label]['humans flagged, worst re-save']:.1%}")
    Path(args.out).write_text(json.dumps({"model": args.model, "humans": len(humans), "ai": len(ai),
                                          "smallest side after each re-save": sizes, "candidates": table},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
