"""Does a model see a generator's decoder trace?  Each human val image against
its own twin through the autoencoder (coded as the image was): the share of
pairs where the twin gets the higher p_ai, and the unpaired AUC.

    python experiments/pair_accuracy.py default runs/some/model.safetensors \
        --out docs/pseudofakes/pair-accuracy.json

Both sets, native and resized views (the resized view's downscale erases the
decoder's pixel grid, so expect chance there).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import imageorigin
from imageorigin.autoencoder import load_autoencoder
from imageorigin.images import find_images
from imageorigin.pseudofakes import pair_accuracy

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETS = ("dh3-bench", "dh3-wide")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="'default' or checkpoint paths")
    p.add_argument("--autoencoder", default=str(SHARED / "decoders/taef2"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ae = load_autoencoder(args.autoencoder)
    manifests = [SHARED / s / "manifest.csv" for s in SETS]
    result = {"autoencoder": ae.name, "models": {}}
    for name in args.models:
        model = imageorigin.load(name)
        rows = {}
        for view in ("native", "resized"):
            humans = sorted(find_images([SHARED / s / view / "val" / "human" for s in SETS]))
            rows[view] = pair_accuracy(model, humans, ae, manifest=manifests, progress=True)
        result["models"][name] = rows
        print(name, json.dumps(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
