"""Speed benchmark: every row of the speed issue's table, side by side in one run.

    python benchmarks/speed.py [--out result.json] [--skip-training]

Prints one JSON object.  Each figure is a ratio against a baseline measured in
the same run, because these machines are noisy:

- inference: ``imageorigin.predict`` on a folder of 256 bench images (native/val,
  seeded sample) against a plain loop (PIL open, torchvision transforms, eager
  fp32 forward, batch 32) in its own process that imports only torch,
  torchvision, safetensors and Pillow.  Each side runs in a fresh process,
  twice, alternating; the faster of the two counts.  The clock covers decoding,
  preprocessing and the forward pass over the folder (the model is loaded
  first, on both sides; imageorigin's converted-model cache is warm, and the
  first, cold call is reported apart).  Rows: DenseNet121 (random weights: its
  ImageNet weights cannot be downloaded here) and the shipped default model.
- agreement: the fast path's calibrated probabilities against the plain loop's.
- training: ``imageorigin train`` with the seed's defaults on resized/train,
  frozen MobileNetV2 (DenseNet121's weights are unreachable), ``--no-cache``
  (the straightforward loop) against the feature cache (1 view, the default),
  cold and warm, and with 2 views, cold.
- large images: the same comparison on 64 images of 1024-1536 px (the raw
  samples of that size, and bench crops enlarged for timing only).
- memory: peak RSS of ``imageorigin predict`` over 1,000 and 10,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", REPO.parent / "shared"))
BENCH = SHARED / "dh3-bench"
ROUNDS = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--skip-training", action="store_true", help="leave out the training rows (5 min)")
    p.add_argument("--skip-memory", action="store_true", help="leave out the 10,000-image run (1 min)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="imageorigin-bench-") as tmp:
        tmp = Path(tmp)
        # A cache of this run only: the cold figures are really cold.
        os.environ["IMAGEORIGIN_CACHE"] = str(tmp / "cache")
        folder = _folder(tmp / "images", sorted((BENCH / "native/val").rglob("*.jpg")), 256)
        result = {"machine": _machine()}
        dense = _densenet_checkpoint(tmp / "densenet121.safetensors")
        # The same network in the seed's .pth layout: no stored precision check,
        # so predict checks it on the first batch of these images.
        import imageorigin

        seed = imageorigin.export_seed(imageorigin.load(dense), tmp / "densenet_finetuned_dense.pth")
        result["seed_pth"] = _inference(str(seed), folder, tmp, plain_ckpt=dense)
        for name, ckpt in (("densenet121", dense), ("default", "default")):
            row = _inference(ckpt, folder, tmp)
            if name == "densenet121":
                result.update(inference_speedup=row["speedup"],
                              inference_images_per_s=row["images_per_s"],
                              agreement=row["agreement"], densenet121=row)
            else:
                result["default_model"] = row
        # Large originals: raw 1024 px files and bench crops enlarged to 1024-1536 px
        # (for timing only: their pixels are no real generator's).
        result["default_model_large"] = _inference("default", _large_folder(tmp / "large"), tmp)
        if not args.skip_memory:
            result.update(_memory(tmp))
        if not args.skip_training:
            result.update(_training(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


# ---------------------------------------------------------------- inference


def _inference(ckpt: str, folder: Path, tmp: Path, plain_ckpt: str | None = None) -> dict:
    """``plain_ckpt``: the same network as ``ckpt`` in our format, for the plain loop
    (which reads the preprocessing from its metadata)."""
    plain, fast = [], []
    shutil.rmtree(tmp / "cache" / "openvino", ignore_errors=True)  # cold: converts the model
    cold = _child("fast", ckpt, folder, tmp / "cold.json")
    for r in range(ROUNDS):
        plain.append(_child("plain", plain_ckpt or ckpt, folder, tmp / f"plain{r}.json"))
        fast.append(_child("fast", ckpt, folder, tmp / f"fast{r}.json"))
    best_plain = min(plain, key=lambda r: r["seconds"])
    best_fast = min(fast, key=lambda r: r["seconds"])
    n = best_fast["images"]
    import numpy as np

    ref, got = np.array(best_plain["probs"]), np.array(best_fast["probs"])
    return {
        "speedup": round(best_plain["seconds"] / best_fast["seconds"], 2),
        "images_per_s": round(n / best_fast["seconds"], 1),
        "baseline_images_per_s": round(n / best_plain["seconds"], 1),
        "cold_images_per_s": round(n / cold["seconds"], 1),
        "engine": best_fast["engine"],
        "agreement": {"same_label": round(float((ref.argmax(1) == got.argmax(1)).mean()), 4),
                      "max_prob_diff": float(f"{np.abs(ref - got).max():.2g}"), "images": n},
        "seconds": {"plain": [r["seconds"] for r in plain], "fast": [r["seconds"] for r in fast],
                    "fast_cold": cold["seconds"]},
    }


def _child(kind: str, ckpt: str, folder: Path, out: Path) -> dict:
    subprocess.run([sys.executable, __file__, f"_{kind}", str(ckpt), str(folder), str(out)], check=True)
    return json.loads(out.read_text())


def _plain(ckpt: str, folder: str, out: str) -> None:
    """The baseline a user writes: PIL, torchvision transforms, eager fp32, batch 32
    (at most 256 crops a forward pass)."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from safetensors import safe_open
    from torchvision import transforms as T

    path = REPO / "src/imageorigin/models/default.safetensors" if ckpt == "default" else ckpt
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["imageorigin"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    net = getattr(torchvision.models, meta["backbone"]["name"])(weights=None)
    head = torch.nn.Linear(tensors["head.weight"].shape[1], tensors["head.weight"].shape[0])
    head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
    if hasattr(net.classifier, "__getitem__"):  # MobileNetV2: Dropout, Linear
        net.classifier[-1] = head
    else:  # DenseNet121: Linear
        net.classifier = head
    net.features.load_state_dict({k[len("backbone.features."):]: v for k, v in tensors.items()
                                  if k.startswith("backbone.features.")})
    net.eval()
    pre = meta["preprocessing"]
    normalise = T.Compose([T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    c, n = pre["crop"], pre.get("crops", 1)

    def at(side, k):
        return [round(i * (side - c) / (k - 1)) for i in range(k)] if k > 1 else [(side - c) // 2]

    def transform(im):  # -> (K, 3, c, c) crops, (K,) votes: as the checkpoint says
        if pre["resize"]:
            return normalise(T.CenterCrop(c)(T.Resize(pre["resize"])(im)))[None], torch.ones(1)
        if min(im.size) < c:
            im = T.Resize(c, interpolation=T.InterpolationMode.BICUBIC)(im)
        w, h = im.size
        nx, ny = (n, n) if n != "cover" else (-(-w // c), -(-h // c))
        if nx * ny > pre.get("max_crops", nx * ny):
            f = (pre["max_crops"] / (nx * ny)) ** 0.5
            nx, ny = max(1, int(nx * f)), max(1, int(ny * f))
        boxes = [(x0, y) for y in at(h, ny) for x0 in at(w, nx)]
        x = normalise(im)
        crops = torch.stack([x[:, y:y + c, x0:x0 + c] for x0, y in boxes])
        if pre.get("pool") != "detail_mean_logit":
            return crops, torch.ones(len(boxes))
        # A crop's vote: its share of 8x8 blocks whose luma spans more than flat_spread.
        luma = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32)) @ torch.tensor([299., 587., 114.])
        votes = []
        for x0, y in boxes:
            b = luma[y:y + c, x0:x0 + c].reshape(c // 8, 8, c // 8, 8)
            votes.append(((b.amax((1, 3)) - b.amin((1, 3))) > 1000 * pre["flat_spread"]).float().mean())
        votes = torch.stack(votes)
        return crops, votes if votes.sum() > 0 else torch.ones(len(boxes))

    files = sorted(Path(folder).iterdir())
    probs = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(files), 32):
            batch = [transform(Image.open(f).convert("RGB")) for f in files[i:i + 32]]
            crops = torch.cat([x for x, _ in batch])  # every crop of the batch's images
            tiles = torch.cat([net(crops[j:j + 256]) for j in range(0, len(crops), 256)])
            tiles = tiles.split([len(x) for x, _ in batch])  # each image's (K, C) logits
            logits = torch.stack([(o * v[:, None]).sum(0) / v.sum() for o, (_, v) in zip(tiles, batch)])
            probs.append(torch.softmax(logits / meta["temperature"], 1))
    seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"seconds": seconds, "images": len(files), "engine": "eager fp32",
                                     "probs": torch.cat(probs).tolist()}))


def _fast(ckpt: str, folder: str, out: str) -> None:
    """imageorigin's one inference function, as `imageorigin predict` calls it."""
    import imageorigin
    from imageorigin.engine import check_outcome
    from imageorigin.predict import current_engine

    model = imageorigin.load(ckpt)
    files = sorted(Path(folder).iterdir())
    start = time.perf_counter()
    preds = list(imageorigin.predict(model, files))
    seconds = time.perf_counter() - start
    engine = current_engine(model)  # read back from the compiled engine after predict's check
    assert all(p.error is None for p in preds)
    check = model.info.get("precision_check") or {}
    if "checked_on" in check:
        engine = f"{engine} ({check_outcome(check)}; checked on {check['checked_on']})"
    Path(out).write_text(json.dumps({
        "seconds": seconds, "images": len(files), "engine": str(engine),
        "probs": [[p.probs[l] for l in model.labels] for p in preds]}))


def _densenet_checkpoint(path: Path) -> str:
    """DenseNet121 with the seed's 3-way head; random weights (ImageNet's are unreachable).

    Its precision is chosen as training chooses it: checked on images it will not
    be benchmarked on (64 native/train images).
    """
    import torch

    import imageorigin
    from imageorigin.backbones import build_backbone
    from imageorigin.engine import check_precision
    from imageorigin.model import SEED_LABELS

    torch.manual_seed(0)
    model = imageorigin.Classifier(build_backbone("densenet121", "random"), SEED_LABELS,
                                   backbone_weights="random").eval()
    held_out = random.Random(1).sample(sorted((BENCH / "native/train").rglob("*.jpg")), 64)
    x = torch.stack([model.transform(imageorigin.decode_image(f)) for f in held_out])
    check = check_precision(model, x)
    model.inference_precision = check["precision"]
    model.info["precision_check"] = check
    imageorigin.save(model, path)
    return str(path)


# ---------------------------------------------------------------- memory


def _memory(tmp: Path) -> dict:
    files = sorted((BENCH / "native").rglob("*.jpg")) + sorted((BENCH / "resized").rglob("*.jpg"))
    out = {}
    for n in (1000, 10000):
        folder = _folder(tmp / f"many{n}", files, n)
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "imageorigin.cli",
                              "predict", str(folder), "--format", "csv", "--out", str(tmp / "p.csv"),
                              "--quiet"], check=True, capture_output=True, text=True)
        out[f"peak_rss_mb_{n}"] = round(int(run.stdout.split()[-1]) / 1024)
        out[f"predict_{n}_seconds"] = round(time.perf_counter() - start, 1)
    out["peak_rss_mb"] = out["peak_rss_mb_10000"]
    return out


def _large_folder(root: Path, n: int = 64) -> Path:
    """``n`` images of 1024-1536 px: the raw samples of that size, then bench crops
    enlarged (Lanczos) to 1024x1024 or 1536x1024 and saved as JPEG q95."""
    from PIL import Image

    root.mkdir(parents=True)
    raw = [f for f in sorted((SHARED / "raw-samples").rglob("*")) if f.suffix in (".png", ".jpg")]
    big = [f for f in raw if min(Image.open(f).size) >= 1024]
    for f in big:
        (root / f.name).symlink_to(f)
    crops = random.Random(0).sample(sorted((BENCH / "native/val").rglob("*.jpg")), n - len(big))
    for i, f in enumerate(crops):
        size = (1024, 1024) if i % 2 else (1536, 1024)
        Image.open(f).convert("RGB").resize(size, Image.LANCZOS).save(root / f"big{i:03d}.jpg", quality=95)
    return root


def _folder(root: Path, pool: list[Path], n: int) -> Path:
    """``n`` symlinks to files of ``pool`` (a seeded sample, repeated if needed)."""
    root.mkdir(parents=True)
    picks = random.Random(0).sample(pool, min(n, len(pool)))
    while len(picks) < n:
        picks += picks[: n - len(picks)]
    for i, f in enumerate(picks):
        (root / f"{i:05d}_{f.name}").symlink_to(f)
    return root


# ---------------------------------------------------------------- training


def _training(tmp: Path) -> dict:
    base = [sys.executable, "-m", "imageorigin.cli", "train", str(BENCH / "resized/train"),
            "--val", str(BENCH / "resized/val"), "--backbone", "mobilenet_v2", "--quiet"]
    cache, other = ["--cache-dir", str(tmp / "features")], ["--cache-dir", str(tmp / "features2")]
    runs = {}
    for name, extra in (("straightforward", ["--no-cache"]), ("cached_cold", cache),
                        ("cached_warm", cache), ("cached_cold_2_views", other + ["--views", "2"])):
        out = tmp / f"train_{name}"
        start = time.perf_counter()
        subprocess.run(base + extra + ["--out", str(out)], check=True, capture_output=True)
        seconds = time.perf_counter() - start
        history = json.loads((out / "history.json").read_text())
        runs[name] = {"seconds": round(seconds, 1), "val_accuracy": round(history[-1]["val_accuracy"], 4)}
    slow = runs["straightforward"]["seconds"]
    return {
        "training_speedup": round(slow / runs["cached_cold"]["seconds"], 2),
        "training_speedup_warm_cache": round(slow / runs["cached_warm"]["seconds"], 2),
        "val_accuracy_baseline": runs["straightforward"]["val_accuracy"],
        "val_accuracy_fast": runs["cached_cold"]["val_accuracy"],
        "training_speedup_2_views": round(slow / runs["cached_cold_2_views"]["seconds"], 2),
        "training": runs,
    }


def _machine() -> str:
    import platform

    import torch

    from imageorigin.engine import host_bf16

    # The flags that decide which precisions can run here (bf16 needs AVX-512-bf16 or AMX).
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags] or ["none of " + " ".join(wanted)]
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, CPU flags "
            f"{' '.join(have)}, bf16 {'available' if host_bf16() else 'not available: this CPU has no bf16'}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] in ("_plain", "_fast"):
        {"_plain": _plain, "_fast": _fast}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
