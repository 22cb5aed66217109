"""Human images flagged after everyday re-saving: the share a moderator would wrongly accuse.

    python benchmarks/resaved.py --out docs/resaved/resaved.json

Every human image of the native val folders of both sets (256 px crops) and of
``../shared/dh3-full`` (full-size originals, 512-3680 px), as it is and after
each transformation a photo meets on its way to an upload: JPEG once or twice,
shrinking to phone sizes then JPEG, phone-style sharpening, WebP, a crop.  For
each: the share whose verdict is likely AI (what a user reads, caveats
included) and the share at or above the stored threshold (p_ai alone).  The
transformations run in memory; each re-encoded file is decoded again by
:func:`imageorigin.decode_image`, as an upload would be.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


import imageorigin
from imageorigin.evaluate import RESAVES
from imageorigin.images import find_images

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def measure(model, files: list[Path], batch: int = 32) -> dict[str, dict]:
    """Per transformation: images, flagged likely AI (verdict), at or above the threshold (p_ai)."""
    out = {name: {"images": 0, "likely_ai": 0, "above_threshold": 0} for name in RESAVES}
    for start in range(0, len(files), batch):
        images = [imageorigin.decode_image(f) for f in files[start:start + batch]]
        for name, change in RESAVES.items():
            for p in imageorigin.predict(model, [change(im) for im in images], batch_size=batch, num_workers=0):
                row = out[name]
                row["images"] += 1
                row["likely_ai"] += p.verdict == "likely_ai"
                row["above_threshold"] += p.p_ai >= model.threshold
    for row in out.values():
        row["likely_ai_share"] = round(row["likely_ai"] / max(row["images"], 1), 4)
        row["above_threshold_share"] = round(row["above_threshold"] / max(row["images"], 1), 4)
    return out


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="default")
    a.add_argument("--out", type=Path, required=True)
    args = a.parse_args()
    model = imageorigin.load(args.model)
    sets = {
        "native val, 256 px crops (both sets)": sorted(find_images(
            [SHARED / s / "native/val/human" for s in ("dh3-bench", "dh3-wide")])),
        "dh3-full, full-size originals": sorted(find_images([SHARED / "dh3-full/human"])),
    }
    started = time.perf_counter()
    result = {"model": args.model, "threshold": model.threshold, "sets": {}}
    for name, files in sets.items():
        result["sets"][name] = measure(model, files)
        for t, row in result["sets"][name].items():
            print(f"{name} | {t}: {row['likely_ai_share']:.1%} likely AI, "
                  f"{row['above_threshold_share']:.1%} at or above the threshold ({row['images']} images)")
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
