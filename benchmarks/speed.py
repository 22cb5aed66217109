"""Speed benchmark: every row of the speed issues' tables, side by side in one run.

    python benchmarks/speed.py [--out result.json] [--skip-training] [--skip-memory]

Prints one JSON object.  Each figure is a ratio against a baseline measured in
the same run, because these machines are noisy:

- inference: ``imageorigin.predict`` against a plain loop (PIL open,
  torchvision transforms, eager fp32 forward, batch 32) in its own process that
  imports only torch, torchvision, safetensors and Pillow, on two folders:
  256 bench images (native/val, seeded sample; 256 px) and the 82 full-size
  originals of ``../shared/dh3-full`` (512-3680 px).  For each model
  (the seed's ``.pth`` layout, DenseNet121 with random weights since its
  ImageNet weights cannot be downloaded here; and the shipped default),
  predict runs in each precision this host has: fp32, int8 and, where the CPU
  has it, bf16, forced with ``precision=``, and as predict chooses by itself
  (``chosen``: the precision check's pick, for the seed file made on the
  first batch of these images).  Each side runs in a fresh process, twice,
  alternating; the faster of the two counts.  The clock covers decoding,
  preprocessing and the forward pass over the folder (the model is loaded
  first, on both sides; imageorigin's converted and quantised models are in
  its cache: the first, cold call, which converts and checks, is reported apart).
- agreement: each precision's calibrated probabilities against the plain loop's.
- training: ``imageorigin train`` with the seed's defaults on resized/train,
  frozen MobileNetV2 (DenseNet121's weights are unreachable), ``--no-cache``
  (the straightforward loop) against the feature cache (1 view, the default),
  cold and warm, and with 2 views, cold.
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
        import imageorigin
        from imageorigin.images import find_images

        folders = {"256px": _folder(tmp / "images", sorted((BENCH / "native/val").rglob("*.jpg")), 256),
                   "full_size": _folder(tmp / "full", sorted(find_images([SHARED / "dh3-full"])), 82)}
        result = {"machine": _machine()}
        dense = _densenet_checkpoint(tmp / "densenet121.safetensors")
        # The same network in the seed's .pth layout: no stored precision check,
        # so predict checks it on the first batch of the images it is given.
        seed = imageorigin.export_seed(imageorigin.load(dense), tmp / "densenet_finetuned_dense.pth")
        for size, folder in folders.items():
            result[f"seed_pth_{size}"] = _inference(str(seed), folder, tmp, plain_ckpt=dense)
            _write(result, args.out)  # each row as it comes: a long run keeps what it measured
            result[f"default_{size}"] = _inference("default", folder, tmp)
            _write(result, args.out)
        if not args.skip_memory:
            result.update(_memory(tmp))
        if not args.skip_training:
            result.update(_training(tmp))
    print(json.dumps(result, indent=2))
    _write(result, args.out)


def _write(result: dict, out: str | None) -> None:
    if out:
        from imageorigin.fileio import write_json

        write_json(out, result)


# ---------------------------------------------------------------- inference


def _inference(ckpt: str, folder: Path, tmp: Path, plain_ckpt: str | None = None) -> dict:
    """The plain loop against predict in every precision this host has.
    ``plain_ckpt``: the same network as ``ckpt`` in our format, for the plain loop
    (which reads the preprocessing from its metadata)."""
    import numpy as np

    from imageorigin.engine import host_bf16

    precisions = ["fp32", "int8"] + (["bf16"] if host_bf16() else [])
    shutil.rmtree(tmp / "cache", ignore_errors=True)  # cold: converts and checks the model
    cold = _child("fast", ckpt, folder, tmp / "cold.json")
    # Each forced precision once, untimed: a model that chose fp32 quantises int8 here.
    warm = {p: _child("fast", ckpt, folder, tmp / f"warm-{p}.json", p) for p in precisions}
    plain, fast = [], {p: [] for p in precisions}
    for r in range(ROUNDS):
        plain.append(_child("plain", plain_ckpt or ckpt, folder, tmp / f"plain{r}.json"))
        for p in precisions:
            fast[p].append(_child("fast", ckpt, folder, tmp / f"fast-{p}{r}.json", p))
    best_plain = min(plain, key=lambda r: r["seconds"])
    n = best_plain["images"]
    ref = np.array(best_plain["probs"])
    rows = {}
    for p in precisions:
        best = min(fast[p], key=lambda r: r["seconds"])
        got = np.array(best["probs"])
        rows[p] = {"speedup": round(best_plain["seconds"] / best["seconds"], 2),
                   "images_per_s": round(n / best["seconds"], 1), "engine": best["engine"],
                   "agreement": {"same_label": round(float((ref.argmax(1) == got.argmax(1)).mean()), 4),
                                 "max_prob_diff": float(f"{np.abs(ref - got).max():.2g}"), "images": n},
                   "seconds": [r["seconds"] for r in fast[p]], "cold_seconds": warm[p]["seconds"]}
    chosen = cold["precision"]
    return {
        "chosen": chosen, "why": cold["why"],
        "speedup": rows[chosen]["speedup"], "images_per_s": rows[chosen]["images_per_s"],
        "baseline_images_per_s": round(n / best_plain["seconds"], 1),
        "cold_images_per_s": round(n / cold["seconds"], 1),
        "precisions": rows, "plain_seconds": [r["seconds"] for r in plain], "cold_seconds": cold["seconds"],
    }


def _child(kind: str, ckpt: str, folder: Path, out: Path, precision: str = "chosen") -> dict:
    subprocess.run([sys.executable, __file__, f"_{kind}", str(ckpt), str(folder), str(out), precision],
                   check=True)
    return json.loads(out.read_text())


def _plain(ckpt: str, folder: str, out: str, _precision: str) -> None:
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


def _fast(ckpt: str, folder: str, out: str, precision: str) -> None:
    """imageorigin's one inference function, as `imageorigin predict` calls it
    (``precision`` "chosen": as predict chooses by itself)."""
    import imageorigin
    from imageorigin.predict import current_engine, precision_reason

    model = imageorigin.load(ckpt)
    files = sorted(Path(folder).iterdir())
    forced = None if precision == "chosen" else precision
    start = time.perf_counter()
    preds = list(imageorigin.predict(model, files, precision=forced))
    seconds = time.perf_counter() - start
    engine = current_engine(model, precision=forced)  # read back after predict's check
    assert all(p.error is None for p in preds), [p.error for p in preds if p.error]
    Path(out).write_text(json.dumps({
        "seconds": seconds, "images": len(files), "engine": str(engine), "precision": engine.precision,
        "why": precision_reason(model, engine), "probs": [[p.probs[l] for l in model.labels] for p in preds]}))


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
    if len(sys.argv) == 6 and sys.argv[1] in ("_plain", "_fast"):
        {"_plain": _plain, "_fast": _fast}[sys.argv[1]](*sys.argv[2:])
    else:
        main()
