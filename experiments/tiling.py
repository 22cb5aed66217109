"""How much of an image to score, and which crops may vote: a 3x3 grid against
tiles covering the whole image, pooled plainly or without the flat tiles.

    git show 44ba12e:src/imageorigin/models/default.safetensors > /tmp/grid-default.safetensors
    python experiments/tiling.py /tmp/grid-default.safetensors --out docs/tiling/tiling.json

(the default before tiling, whose threshold was set on its 3x3 grid).

For each file of ``../shared/dh3-full`` (full-size originals, 512-3680 px) and
of the native val views of dh3-bench and dh3-wide (256 px), the model's
logits for every tile of a cover (ceil(W/crop) x ceil(H/crop) tiles of the
model's crop side, spread evenly, so that every pixel is in one; at most
``--max-tiles``, spread with gaps beyond that) and for the 3x3 grid the
model ships with.  Each tile's "detail": the share of its 8x8 blocks whose
luma varies by more than ``--flat-spread`` levels.  Pooling rules, all of
them a mean of logits: ``grid`` (the shipped 3x3), ``cover`` (every tile),
``cover, detailed`` (tiles weighted by their detail share; a tile with no
detailed block does not vote).  AUC of AI against human, and the share of
humans / AI at or above the model's stored cut (which was fitted on the grid;
rules that move the scale would need a cut of their own, so AUC is the fair
comparison), by image size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import imageorigin
from imageorigin.data import MAX_TILES, cover_boxes, grid_boxes, read_manifest, tile_detail
from imageorigin.images import decode_image, find_images

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def score(model, path, max_tiles: int, spread_max: int) -> dict:
    """Per-tile logits (N, C) and detail (N,) for the cover and the 3x3 grid."""
    im = decode_image(path)
    c = model.preprocessing["crop"]
    x = model.transform.transforms[0](im)  # ToImage: (3, H, W) uint8
    x = model.transform.transforms[1](x)   # EnlargeTo
    h, w = x.shape[-2:]
    norm = model.transform.transforms[-2:]  # to float, normalise
    pre = dict(model.preprocessing, flat_spread=spread_max)
    out = {"size": list(im.size)}
    for name, boxes in (("grid", grid_boxes(w, h, c, 3)), ("cover", cover_boxes(w, h, c, max_tiles))):
        t = torch.stack([x[:, y:y + c, xx:xx + c] for xx, y in boxes])  # (N, 3, c, c)
        for f in norm:
            t = f(t)
        with torch.inference_mode():
            out[name] = model.head(model.backbone(t))  # (N, C)
        out[name + "_detail"] = tile_detail(t, pre).numpy()
    return out


def p_ai(model, logits: torch.Tensor) -> float:
    _, p = model.scores(logits[None])
    return float(p[0])


RULES = {
    "grid": lambda r: (r["grid"].mean(0), None),
    "cover": lambda r: (r["cover"].mean(0), None),
    "cover, detailed": lambda r: weighted(r["cover"], r["cover_detail"]),
}


def weighted(logits: torch.Tensor, w: np.ndarray):
    if w.sum() <= 0:
        return logits.mean(0), "no detailed tile"
    w = torch.tensor(w / w.sum(), dtype=logits.dtype)
    return (logits * w[:, None]).sum(0), None


def size_bucket(w: int, h: int) -> str:
    side = max(w, h)
    return "256 px" if side <= 256 else "512-767 px" if side < 768 else "768-1279 px" if side < 1280 else ">= 1280 px"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tiles", type=int, default=MAX_TILES)
    ap.add_argument("--flat-spread", type=int, default=6)
    ap.add_argument("--val-per-set", type=int, default=400, help="val images per set and class kind (seeded)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TILING_THREADS", "1")))
    model = imageorigin.load(args.model)
    h = model.human_label
    files = []
    for row in read_manifest(SHARED / "dh3-full/manifest.csv", ("path", "label")):
        files.append(("dh3-full", SHARED / "dh3-full" / row["path"], row["label"] != h))
    rng = np.random.default_rng(0)
    for s in ("dh3-bench", "dh3-wide"):
        paths = list(find_images([SHARED / s / "native/val"]))
        for kind in (True, False):
            pick = [p for p in paths if (p.parent.name != h) == kind]
            for i in rng.permutation(len(pick))[:args.val_per_set]:
                files.append((f"{s} val", pick[i], kind))
    rows, start = [], time.perf_counter()
    for k, (group, path, is_ai) in enumerate(files):
        r = score(model, path, args.max_tiles, args.flat_spread)
        row = {"group": group, "path": str(path), "is_ai": is_ai, "size": r["size"],
               "tiles": len(r["cover"]), "detailed_tiles": int((r["cover_detail"] > 0).sum())}
        for name, rule in RULES.items():
            logits, note = rule(r)
            row[name] = p_ai(model, logits)
        rows.append(row)
        if k % 100 == 0:
            print(f"{k}/{len(files)} {time.perf_counter() - start:.0f} s", flush=True)
    cut = model.threshold
    table = {}
    for group in sorted({r["group"] for r in rows}) + ["dh3-full by size"]:
        if group == "dh3-full by size":
            parts = {}
            for r in rows:
                if r["group"] == "dh3-full":
                    parts.setdefault("dh3-full " + size_bucket(*r["size"]), []).append(r)
        else:
            parts = {group: [r for r in rows if r["group"] == group]}
        for name, part in parts.items():
            y = np.array([r["is_ai"] for r in part])
            entry = {"n_ai": int(y.sum()), "n_human": int((~y).sum()),
                     "tiles (mean)": float(np.mean([r["tiles"] for r in part]))}
            for rule in RULES:
                p = np.array([r[rule] for r in part])
                entry[rule] = {
                    "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None,
                    "humans flagged": float((p[~y] >= cut).mean()) if (~y).any() else None,
                    "AI flagged": float((p[y] >= cut).mean()) if y.any() else None,
                }
            table[name] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cut": cut, "max_tiles": args.max_tiles, "flat_spread": args.flat_spread,
                               "table": table, "rows": rows}, indent=1))
    for name, e in table.items():
        print(name, e["n_ai"], e["n_human"], f"{e['tiles (mean)']:.0f} tiles",
              " | ".join(f"{r}: auc {e[r]['auc'] if e[r]['auc'] is None else round(e[r]['auc'], 3)} "
                         f"hum {e[r]['humans flagged']} ai {e[r]['AI flagged']}" for r in RULES))


if __name__ == "__main__":
    main()
