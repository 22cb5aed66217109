"""Aligned pseudo-fakes: each human training image's twin through a generator's autoencoder.

A twin has the content, size and framing of its real image; what differs is
the trace the autoencoder's decoder leaves.  Trained on the pair in the same
batch, with the same crop and the same degradation (see
:func:`imageorigin.data.loader`'s ``twin_of``), a detector can only learn that
trace ("Aligned Datasets", Rajan et al., ICLR 2025).

The twin is also coded as its real image was ("Dual Data Alignment", arXiv
2505.14359): a reconstruction restores the high frequencies JPEG removed, so
an uncoded twin teaches "sharp = AI" and flags crisp photographs.  A JPEG real
image gives its twin its own quantisation tables and chroma subsampling (read
from the file, so the coding is exact); a manifest's ``coding`` column
(``webp-roundtrip-qNN``: the original went through lossy WebP before it was
cut and saved) adds that round trip first; a PNG twin stays lossless; a WebP
twin is saved as WebP at quality 90 (the file does not record its quality).

Twins are computed once and kept in the cache (``$IMAGEORIGIN_CACHE/pseudofakes``),
named by the real file's SHA-256 and the autoencoder's digest: a second run,
or an interrupted one run again, computes only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from .autoencoder import Autoencoder
from .data import LabelledFolder, match_manifest, read_manifest
from .fileio import atomic_path
from .images import ImageDecodeError, decode_image
from .runtime import cache_dir

_WEBP_ROUNDTRIP = re.compile(r"webp-roundtrip-q(\d+)")
# The autoencoder's 64-channel float activations take about 256 bytes a pixel at
# full resolution: 4 megapixels stay near 1 GB; larger images get no twin.
MAX_PIXELS = 4_000_000


@dataclass
class Twins:
    """``twin[i]``: the path of ``files[i]``'s twin, or None where it could not be made."""

    files: list[Path]
    twin: list[Path | None]
    computed: int = 0
    cached: int = 0
    errors: list[str] = field(default_factory=list)
    aligned: bool = True  # coded as the real image was


def file_coding(path, manifest_coding: str | None = None) -> dict:
    """How ``path`` (a file's path or binary stream) was coded, for its twin to be coded alike: ``{"format": "JPEG",
    "qtables": ..., "subsampling": 0/1/2}``, ``{"format": "PNG"}`` or
    ``{"format": "WEBP", "quality": 90}``, plus ``"webp_roundtrip": q`` where the
    manifest says the original went through lossy WebP first."""
    with Image.open(path) as im:
        fmt = {"MPO": "JPEG"}.get(im.format, im.format)  # a camera's multi-picture JPEG is a JPEG
        out: dict = {"format": fmt if fmt in ("JPEG", "WEBP") else "PNG"}
        if fmt == "JPEG":
            out["qtables"] = {k: list(v) for k, v in im.quantization.items()}
            out["subsampling"] = JpegImagePlugin.get_sampling(im)
        elif fmt == "WEBP" and _webp_lossless(im.fp):
            out["format"] = "PNG"  # a lossless WebP: its twin stays lossless too
        elif fmt == "WEBP":
            out["quality"] = 90
    m = _WEBP_ROUNDTRIP.fullmatch(manifest_coding or "")
    if m:
        out["webp_roundtrip"] = int(m.group(1))
    return out


def _webp_lossless(fp) -> bool:
    """Whether a WebP file's image chunk is lossless (VP8L) rather than lossy (VP8)."""
    fp.seek(12)
    while len(head := fp.read(8)) == 8:
        fourcc, size = head[:4], int.from_bytes(head[4:], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        fp.seek(size + (size & 1), 1)  # chunks are padded to an even size
    return False


def encode_like(image: Image.Image, coding: dict) -> bytes:
    """``image`` coded as ``coding`` (:func:`file_coding`) says: the file's bytes."""
    if coding.get("webp_roundtrip"):
        buf = io.BytesIO()
        image.save(buf, "WEBP", quality=coding["webp_roundtrip"])
        buf.seek(0)
        with Image.open(buf) as im:
            image = im.convert("RGB")
    buf = io.BytesIO()
    if coding["format"] == "JPEG":
        qtables = [coding["qtables"][k] for k in sorted(coding["qtables"], key=int)]
        subsampling = coding["subsampling"] if coding["subsampling"] >= 0 else 2
        image.save(buf, "JPEG", qtables=qtables, subsampling=subsampling)
    elif coding["format"] == "WEBP":
        image.save(buf, "WEBP", quality=coding["quality"])
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


_SUFFIX = {"JPEG": ".jpg", "WEBP": ".webp", "PNG": ".png"}


def make_twins(files: Sequence[str | os.PathLike], autoencoder: Autoencoder, *,
               codings: Sequence[str | None] | None = None, aligned: bool = True,
               cache: str | os.PathLike | None = None, progress: bool = True) -> Twins:
    """The twin of each file (see the module's docstring), from the cache or made now.

    ``codings``: the manifest's ``coding`` of each file (or None).  ``aligned``
    False saves every twin as lossless PNG (the unaligned control).  A file
    that cannot be decoded gets no twin and an error naming it; the rest go on.
    """
    files = [Path(f) for f in files]
    codings = list(codings) if codings is not None else [None] * len(files)
    root = Path(cache) if cache else cache_dir() / "pseudofakes"
    folder = root / f"{autoencoder.name}-{autoencoder.digest}" / ("aligned" if aligned else "png")
    folder.mkdir(parents=True, exist_ok=True)
    out = Twins(files, [None] * len(files), aligned=aligned)
    bar = tqdm(total=len(files), desc=f"pseudo-fakes ({autoencoder.name})", unit="img",
               disable=not progress, leave=False)
    for i, (path, manifest_coding) in enumerate(zip(files, codings)):
        bar.update(1)
        try:
            data = path.read_bytes()
        except OSError as err:
            out.errors.append(f"{path}: not readable ({err.strerror})")
            continue
        stem = hashlib.sha256(data).hexdigest()[:32] + (f"-{manifest_coding}" if manifest_coding and aligned else "")
        done = [p for p in (folder / (stem + s) for s in _SUFFIX.values()) if p.is_file()]
        if done:
            out.twin[i], out.cached = done[0], out.cached + 1
            continue
        try:
            image = decode_image(data, str(path))
            coding = file_coding(io.BytesIO(data), manifest_coding) if aligned else {"format": "PNG"}
        except (ImageDecodeError, OSError) as err:
            out.errors.append(str(err) if isinstance(err, ImageDecodeError) else f"{path}: {err}")
            continue
        if image.width * image.height > MAX_PIXELS:
            out.errors.append(f"{path}: {image.width}x{image.height} is over the {MAX_PIXELS // 10**6} "
                              "megapixels the autoencoder is run on here: no twin")
            continue
        twin = folder / (stem + _SUFFIX[coding["format"]])
        try:
            encoded = encode_like(autoencoder.reconstruct(image), coding)
        except Exception as err:  # noqa: BLE001 - one odd file must not end the run
            out.errors.append(f"{path}: no twin ({type(err).__name__}: {err})")
            continue
        with atomic_path(twin) as tmp:  # an interrupted run leaves no half-written twin
            Path(tmp).write_bytes(encoded)
        out.twin[i], out.computed = twin, out.computed + 1
    bar.close()
    return out


def _codings(files: Sequence[Path], manifest) -> list[str | None]:
    """Each file's manifest ``coding`` (None without a manifest, a row or the column)."""
    if manifest is None:
        return [None] * len(files)
    rows = match_manifest(files, read_manifest(manifest))
    return [(row or {}).get("coding") or None for row in rows]


def licence_of(folder: str | os.PathLike) -> str:
    """The first line of the autoencoder folder's LICENSE file (e.g. "MIT License"), or "not stated"."""
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
        path = Path(folder) / name
        if path.is_file():
            first = next((line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()), "")
            return first or "not stated"
    return "not stated"


def training_pairs(folder: LabelledFolder, autoencoder: Autoencoder, *, human: int, label: int,
                   share: float | None = None, aligned: bool = True, manifest=None, seed: int = 0,
                   progress: bool = True) -> dict:
    """The training items with pseudo-fakes added: ``{"items", "labels", "twin_of", "info"}``
    for :func:`imageorigin.data.loader`.

    Every human image of ``folder`` (class index ``human``) gets its twin, of
    class ``label``.  ``share``: the share of the AI training examples that are
    twins: None keeps every real AI image and every twin; below the natural
    share a seeded sample of the twins is used, above it a seeded sample of the
    real AI images (1.0: none of them).
    """
    if share is not None and not 0.0 <= share <= 1.0:
        raise ValueError(f"--pseudo-share {share}: a share between 0 and 1")
    humans = [p for p, y in folder.samples if y == human]
    real_ai = [(p, y) for p, y in folder.samples if y != human]
    made = make_twins(humans, autoencoder, codings=_codings(humans, manifest), aligned=aligned, progress=progress)
    pairs = [(h, t) for h, t in zip(humans, made.twin) if t is not None]
    rng = np.random.default_rng(seed)
    if share is not None:
        if share < 1.0:
            wanted = round(share * len(real_ai) / (1.0 - share))  # twins for that share, every real AI kept
            if wanted < len(pairs):
                pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), wanted, replace=False))]
            else:  # more twins than there are: keep them all, sample the real AI images
                keep = round(len(pairs) * (1.0 - share) / share) if share > 0 else len(real_ai)
                real_ai = [real_ai[i] for i in sorted(rng.choice(len(real_ai), min(keep, len(real_ai)),
                                                                 replace=False))]
        else:
            real_ai = []
    twinned = {h: t for h, t in pairs}
    items, labels, twin_of = [], [], []
    for p, y in [(h, human) for h in humans] + real_ai:
        items.append(p), labels.append(y), twin_of.append(None)
        if p in twinned:
            twin_of.append(len(items) - 1)
            items.append(twinned[p]), labels.append(label)
    info = {"autoencoder": autoencoder.name, "autoencoder_digest": autoencoder.digest,
            "aligned_coding": aligned, "twins": len(pairs), "real_ai_images": len(real_ai),
            "share_of_ai_examples": round(len(pairs) / max(1, len(pairs) + len(real_ai)), 4),
            "twins_computed": made.computed, "twins_cached": made.cached, "errors": made.errors}
    return {"items": items, "labels": labels, "twin_of": twin_of, "info": info}


def pair_accuracy(model, humans: Sequence[Path], autoencoder: Autoencoder, *, aligned: bool = True,
                  manifest=None, progress: bool = False) -> dict:
    """How often ``model`` scores each human image's twin above the image itself
    (p_ai): the check that the decoder's trace is learned at all.  Chance is 0.5.
    Returns ``{"pairs": n, "twin_scored_higher": share, "auc": unpaired AUC}``."""
    from sklearn.metrics import roc_auc_score

    from .predict import predict

    made = make_twins(humans, autoencoder, codings=_codings(list(humans), manifest), aligned=aligned,
                      progress=progress)
    pairs = [(h, t) for h, t in zip(humans, made.twin) if t is not None]
    if not pairs:
        return {"pairs": 0, "twin_scored_higher": None, "auc": None}
    # fp32: a model without a stored precision check must not be checked (and changed) here
    real = [p.p_ai for p in predict(model, [h for h, _ in pairs], precision="fp32")]
    fake = [p.p_ai for p in predict(model, [t for _, t in pairs], precision="fp32")]
    ok = [(r, f) for r, f in zip(real, fake) if r is not None and f is not None]
    if not ok:
        return {"pairs": 0, "twin_scored_higher": None, "auc": None}
    higher = sum(f > r for r, f in ok) / len(ok)
    auc = roc_auc_score([0] * len(ok) + [1] * len(ok), [r for r, _ in ok] + [f for _, f in ok])
    return {"pairs": len(ok), "twin_scored_higher": round(higher, 4), "auc": round(float(auc), 4)}
