"""How often the out-of-scope caveats fire, and what they change, with the default model.

    python benchmarks/caveats.py [--out docs/caveats]

- Screenshots drawn with PIL (benchmarks/screenshots.py): the detector was
  tuned on the ``tuning`` kind (chats, settings panels) and is measured here on
  the unrelated ``testing`` kind (documents, terminals, web pages, some with a
  photo pasted in).  Before: share called AI by the threshold alone; after:
  share whose verdict is "likely_ai".
- dh3-bench and dh3-wide native/val, per class: how many images get a caveat
  (for AI images, detections the caveat turns "uncertain"), and the same with
  every human image blurred (sigma 2) or upscaled x4 from a quarter of its size.

Writes caveats.json and caveats.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageFilter

import imageorigin
from imageorigin.data import scan_folders

sys.path.insert(0, str(Path(__file__).parent))
import screenshots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rates(preds, threshold: float) -> dict:
    """Shares of images: over the threshold, with a caveat, verdict likely_ai."""
    preds = [p for p in preds if p.error is None]
    n = len(preds)
    return {"n": n,
            "mean_p_ai": sum(p.p_ai for p in preds) / n,
            "over_half": sum(p.p_ai >= 0.5 for p in preds) / n,
            "over_threshold": sum(p.p_ai >= threshold for p in preds) / n,
            "with_caveat": sum(bool(p.caveats) for p in preds) / n,
            "likely_ai": sum(p.verdict == "likely_ai" for p in preds) / n,
            "uncertain": sum(p.verdict == "uncertain" for p in preds) / n,
            "likely_human": sum(p.verdict == "likely_human" for p in preds) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "caveats"))
    ap.add_argument("-n", type=int, default=300, help="screenshots of each kind")
    args = ap.parse_args()
    shared = Path(args.shared)
    model = imageorigin.load("default")
    t = model.threshold
    result = {"threshold": t, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("tuning", "testing"):
            files = []
            for i in range(args.n):
                data, ext = screenshots.encode(screenshots.make(kind, i, shared), i)
                f = Path(tmp) / f"{kind}-{i:04d}{ext}"
                f.write_bytes(data)
                files.append(f)
            result["rows"][f"screenshots, {kind} kind"] = rates(imageorigin.predict(model, files), t)
            print(kind, result["rows"][f"screenshots, {kind} kind"], flush=True)
    for name in ("dh3-bench", "dh3-wide"):
        folder = scan_folders(shared / name / "native" / "val")
        for y, label in enumerate(folder.classes):
            files = [p for p, c in folder.samples if c == y]
            key = f"{name} native/val, {label}"
            result["rows"][key] = rates(imageorigin.predict(model, files), t)
            print(key, result["rows"][key], flush=True)
            if label != model.human_label:
                continue
            for what, f in (("blurred sigma 2", lambda im: im.filter(ImageFilter.GaussianBlur(2))),
                            ("upscaled x4 from a quarter", lambda im: im.resize(
                                (max(1, im.width // 4), max(1, im.height // 4)), Image.BICUBIC)
                             .resize(im.size, Image.BICUBIC))):
                images = [f(imageorigin.decode_image(p)) for p in files]
                result["rows"][f"{key}, {what}"] = rates(imageorigin.predict(model, images), t)
                print(what, result["rows"][f"{key}, {what}"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "caveats.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Caveats: how often they fire, and what they change (default model, threshold {t:.4f})",
             "", "Written by `python benchmarks/caveats.py`. *Over threshold*: called AI by p_ai alone "
             "(before caveats); *likely AI*: the verdict after caveats. *p_ai >= 0.5*: how many "
             "look more AI than not, whatever the threshold.", "",
             "| images | n | mean p_ai | p_ai >= 0.5 | over threshold (before) | with a caveat | "
             "likely AI (after) | uncertain | likely human |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in result["rows"].items():
        lines.append(f"| {key} | {r['n']} | {r['mean_p_ai']:.3f} | {r['over_half']:.1%} | "
                     f"{r['over_threshold']:.1%} | {r['with_caveat']:.1%} | "
                     f"{r['likely_ai']:.1%} | {r['uncertain']:.1%} | {r['likely_human']:.1%} |")
    (out / "caveats.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/caveats.md")


if __name__ == "__main__":
    main()
