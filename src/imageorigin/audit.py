"""Dataset audit: what a classifier could learn from a labelled folder besides content.

For each class, :func:`audit` measures the spread of file format, pixel size,
JPEG quality, colour mode / alpha, metadata and file size, warns where one of
them nearly separates the classes (the format-bias trap of published
detectors), and finds exact and near-duplicate images, above all pairs that
straddle train and val.

Headers and metadata are read with ``PIL.Image.open`` (inspection only); pixels
come from :func:`imageorigin.images.decode_image`, the decoder every other path
uses, so the hashes describe what the model sees.

Warning rules (every number in a warning is a count or share of files):

* **predicts**: the attribute alone, used as a lookup table (the most common
  class among the *other* files with the same value: leave-one-out, so a value
  seen once predicts nothing), gets the class right for >= 90% of files and at
  least 20 points above always guessing the largest class.  Checked over all
  classes and over every pair of classes (a format can split DALL-E from other
  AI while saying nothing about photographs).
* **separates**: one value covers >= 90% of a class and <= 10% of all other files.
* **marks**: one value is (almost) exclusive to a class: >= 95% of the files
  with it are in that class, at least 2 files and >= 20% of the class have it.
  It does not separate the class, but a model can learn "this value => class".

Near duplicates: 64-bit pHash (DCT) Hamming distance <= 8 *and* 64-bit dHash
(gradient) distance <= 12.  Requiring both hashes to agree is measured, not
guessed: on the DH3 bench, re-encoding at JPEG quality 70 or resizing to 90%
moves pHash by <= 2 and dHash by <= 4, cutting off the bottom 1/64 moves them
by <= 6 and <= 7, while pHash alone matches unrelated low-contrast images (a
DALL-E "Malevich" render and a magnolia clip art at pHash 4 have dHash 30).
Near-uniform images (grey-level standard deviation < 2) have no usable hash;
they are listed as blank instead of being paired with each other.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import statistics
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from .data import LabelledFolder, match_manifest, read_manifest, scan_folder
from .fileio import write_json, write_text
from .images import ImageDecodeError, decode_image

# Sub-folders with these names make DATA_DIR a folder of splits, each holding class folders.
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")

# Rule thresholds, documented in the module docstring.
PREDICTS_ACCURACY = 0.90
PREDICTS_MARGIN = 0.20
SEPARATES_COVER = 0.90
SEPARATES_LEAK = 0.10
MARKS_PRECISION = 0.95
MARKS_COVER = 0.20
MARKS_MIN_FILES = 2
PHASH_MAX_DISTANCE = 8
DHASH_MAX_DISTANCE = 12
BLANK_STD = 2.0
MAX_LISTED_PAIRS = 50  # in the markdown; audit.json keeps up to MAX_STORED_PAIRS
MAX_STORED_PAIRS = 5000

# IJG (libjpeg) standard luminance quantisation table, ITU-T T.81 Annex K.1, in
# natural (row-major) order, the order Pillow's ``im.quantization`` uses.
IJG_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip

SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}

# EXIF tags whose text can name a generator: ImageDescription, UserComment,
# Software, Make, Model, Artist, Copyright, MakerNote.
EXIF_TEXT_TAGS = (270, 37510, 305, 271, 272, 315, 33432, 37500)
AI_TEXT = re.compile(
    r"openai|dall[-· ]?e|stable.?diffusion|midjourney|novelai|comfyui|automatic1111|"
    r"trainedalgorithmicmedia|firefly|craiyon|generat(ed|ive) ai",
    re.IGNORECASE,
)
# PNG text chunks written by generators: AUTOMATIC1111 ('parameters'), ComfyUI ('prompt', 'workflow').
AI_PNG_KEYS = ("parameters", "prompt", "workflow")

# Attributes checked for separation: key in a file record -> label in reports.
ATTRIBUTES = {
    "format": "file format",
    "pixel_size": "pixel size",
    "long_side": "longer side",
    "aspect": "aspect",
    "jpeg_quality": "JPEG quality",
    "subsampling": "chroma subsampling",
    "mode": "colour mode",
    "alpha": "alpha channel",
    "exif": "EXIF",
    "exif_software": "EXIF Software",
    "exif_make": "EXIF Make",
    "icc": "ICC profile",
    "xmp": "XMP",
    "png_text": "PNG text chunks",
    "ai_metadata": "metadata naming a generator",
    "file_size": "file size",
}
ORIGINAL_ATTRIBUTES = {
    "orig_format": "original file format",
    "orig_size": "original pixel size",
    "orig_long_side": "original longer side",
}


# ---------------------------------------------------------------- folders


def find_splits(data_dir: str | os.PathLike) -> list[tuple[str | None, LabelledFolder]]:
    """The labelled folders in ``data_dir``: ``[(split or None, LabelledFolder)]``.

    ``data_dir`` either has one sub-folder per class, or only split folders
    (train/, val/, test/ ...) that each have one sub-folder per class.
    """
    root = Path(data_dir)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    if subdirs and all(name in SPLIT_NAMES for name in subdirs):
        order = {name: i for i, name in enumerate(SPLIT_NAMES)}
        return [(s, scan_folder(root / s)) for s in sorted(subdirs, key=order.get)]
    return [(None, scan_folder(root))]


# ---------------------------------------------------------------- one file


def ijg_table(quality: int) -> list[int]:
    """The luminance table libjpeg writes at ``quality`` (1-100), baseline (<= 255).

    Same arithmetic as libjpeg's ``jpeg_quality_scaling`` and ``jpeg_add_quant_table``.
    """
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((v * scale + 50) // 100, 1), 255) for v in IJG_LUMINANCE]


_IJG_TABLES = {q: np.array(ijg_table(q)) for q in range(1, 101)}


def estimate_jpeg_quality(quantization: dict | None) -> tuple[int, bool] | None:
    """Estimate the libjpeg quality factor from a JPEG's quantisation tables.

    Compares the luminance table (``quantization[0]``, as Pillow gives it) with
    the IJG table scaled for every quality 1-100 and returns ``(quality, exact)``
    for the closest one (smallest sum of absolute differences; ties go to the
    higher quality).  ``exact`` is True when the table is the IJG one exactly
    (libjpeg, Pillow and most software); encoders with their own tables
    (Photoshop, cameras) get the nearest IJG quality, ``exact`` False.  None when
    there is no 64-entry luminance table.
    """
    if not quantization or len(quantization.get(0, ())) != 64:
        return None
    table = np.asarray(quantization[0], dtype=np.int64)
    errors = {q: int(np.abs(table - ref).sum()) for q, ref in _IJG_TABLES.items()}
    best = min(errors, key=lambda q: (errors[q], -q))
    return best, errors[best] == 0


def _text(value) -> str:
    """EXIF / PNG text as str; UserComment's 8-byte charset prefix removed."""
    if isinstance(value, bytes):
        if value[:8] in (b"ASCII\0\0\0", b"UNICODE\0", b"\0" * 8):
            value = value[8:]
        value = value.decode("utf-8", errors="replace")
    return str(value).strip("\0 ").strip()


def inspect_file(data: bytes) -> dict:
    """Format, size, mode, JPEG tables and metadata of an image file's bytes (no pixel decode).

    Raises the usual Pillow errors for data that is not an image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    width, height = im.size
    exif = im.getexif()
    software = _text(exif.get(305, "")) or None
    make = _text(exif.get(271, "")) or None
    png_text = {}
    if im.format == "PNG":
        png_text = {k: _text(v) for k, v in im.text.items() if k != "XML:com.adobe.xmp"}
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    quality = estimate_jpeg_quality(getattr(im, "quantization", None)) if im.format == "JPEG" else None
    sampling = JpegImagePlugin.get_sampling(im) if im.format == "JPEG" else None
    return {
        "format": im.format,
        "width": width,
        "height": height,
        "mode": im.mode,
        "alpha": im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info,
        "jpeg_quality": quality[0] if quality else None,
        "jpeg_quality_exact": quality[1] if quality else None,
        "subsampling": None if sampling is None else SUBSAMPLING.get(sampling, "other"),
        "exif": len(exif) > 0,
        "exif_software": software,
        "exif_make": make,
        "icc": bool(im.info.get("icc_profile")),
        "xmp": bool(xmp),
        "png_text": sorted(png_text),
        "ai_metadata": _ai_metadata(exif, png_text, xmp, im.info.get("comment")),
    }


def _ai_metadata(exif, png_text: dict, xmp, comment) -> str | None:
    """Every piece of metadata that names an AI generator, as 'where: text; ...', or None."""
    found = []
    for tag in EXIF_TEXT_TAGS:
        text = _text(exif.get(tag, ""))
        if AI_TEXT.search(text):
            found.append(f"EXIF {ExifTags.TAGS.get(tag, tag)}: {text[:80]}")
    for key, text in png_text.items():
        if key.lower() in AI_PNG_KEYS or AI_TEXT.search(text):
            found.append(f"PNG text '{key}': {text[:80]}")
    for where, text in (("XMP", xmp), ("JPEG comment", comment)):
        match = AI_TEXT.search(_text(text or ""))
        if match:
            found.append(f"{where}: ...{match.group(0)}...")
    return "; ".join(found) or None


def hash_image(image: Image.Image) -> dict:
    """64-bit pHash and dHash (hex) and the grey-level standard deviation of a decoded image."""
    import imagehash  # imported here: only the audit needs it

    grey = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float64)
    return {
        "phash": str(imagehash.phash(image)),
        "dhash": str(imagehash.dhash(image)),
        "grey_std": round(float(grey.std()), 2),
    }


def audit_file(path: Path) -> dict:
    """Everything the audit records about one file; ``error`` is set when it cannot be read."""
    record: dict = {"bytes": None, "sha256": None, "error": None}
    try:
        data = path.read_bytes()
    except OSError as err:
        record["error"] = f"cannot read file ({err.strerror or err})"
        return record
    record["bytes"] = len(data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        record.update(hash_image(decode_image(data, name=str(path))))
    except ImageDecodeError as err:
        record["error"] = err.reason
        return record
    try:
        record.update(inspect_file(data))
    except Exception as err:  # noqa: BLE001 - Pillow's metadata parsers raise many kinds; the audit goes on
        record["error"] = f"metadata unreadable ({type(err).__name__}: {err})"
    return record


# ---------------------------------------------------------------- attributes


def _bucket(value: int, edges: Sequence[int], labels: Sequence[str]) -> str:
    for edge, label in zip(edges, labels):
        if value <= edge:
            return label
    return labels[-1]


def long_side_bucket(width: int, height: int) -> str:
    """Longer side in the bands generators and cameras fall into."""
    return _bucket(max(width, height), (255, 256, 511, 512, 1023, 1024, 2048),
                   ("<256", "256", "257-511", "512", "513-1023", "1024", "1025-2048", ">2048"))


def aspect(width: int, height: int) -> str:
    """square, landscape or portrait."""
    return "square" if width == height else "landscape" if width > height else "portrait"


def file_size_bucket(n_bytes: int) -> str:
    """File size in powers-of-4 bands."""
    kb = 1024
    return _bucket(n_bytes, (16 * kb, 64 * kb, 256 * kb, 1024 * kb),
                   ("<16 KB", "16-64 KB", "64-256 KB", "256 KB-1 MB", ">=1 MB"))


def attribute_values(rec: dict) -> dict[str, str]:
    """A readable file record as one categorical value per attribute in ATTRIBUTES."""
    yes = {True: "yes", False: "no"}
    if rec["jpeg_quality"] is None:
        quality = "n/a"
    else:
        quality = str(rec["jpeg_quality"]) if rec["jpeg_quality_exact"] else f"~{rec['jpeg_quality']}"
    return {
        "format": rec["format"] or "unknown",
        "pixel_size": f"{rec['width']}x{rec['height']}",
        "long_side": long_side_bucket(rec["width"], rec["height"]),
        "aspect": aspect(rec["width"], rec["height"]),
        "jpeg_quality": quality,
        "subsampling": rec["subsampling"] or "n/a",
        "mode": rec["mode"],
        "alpha": yes[rec["alpha"]],
        "exif": yes[rec["exif"]],
        "exif_software": rec["exif_software"] or "none",
        "exif_make": rec["exif_make"] or "none",
        "icc": yes[rec["icc"]],
        "xmp": yes[rec["xmp"]],
        "png_text": ",".join(rec["png_text"]) or "none",
        "ai_metadata": yes[rec["ai_metadata"] is not None],
        "file_size": file_size_bucket(rec["bytes"]),
    }


# ---------------------------------------------------------------- separation


def lookup_accuracy(values: Sequence[str], labels: Sequence[str]) -> float:
    """Leave-one-out accuracy of predicting the label from the value alone.

    Each file is given the most common label among the *other* files with the
    same value (ties, and values seen only once, go to the most common label
    overall), so that a value unique to one file earns nothing.
    """
    overall = Counter(labels)
    rank = {c: (-n, c) for c, n in overall.items()}  # tie-break: larger class, then name
    by_value: dict[str, Counter] = defaultdict(Counter)
    for v, y in zip(values, labels):
        by_value[v][y] += 1
    correct = 0
    for counts in by_value.values():
        for y, n in counts.items():
            others = counts.copy()
            others[y] -= 1
            guess = min(overall, key=lambda c: (-others[c], rank[c]))
            correct += n if guess == y else 0
    return correct / len(labels)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def separation_warnings(values: Sequence[str], labels: Sequence[str], attribute: str,
                        name: str, origin: str = "files") -> tuple[dict, list[dict]]:
    """Measure how well one attribute alone tells the classes apart; warn per the module's rules.

    Returns ``(summary, warnings)``: the summary holds the lookup accuracy and
    baseline over all classes; each warning holds the rule, classes, value and numbers.
    """
    classes = sorted(set(labels))
    found: list[dict] = []
    summary = {"n_values": len(set(values))}
    scopes = [tuple(classes)] + (list(itertools.combinations(classes, 2)) if len(classes) > 2 else [])
    hits = []  # every scope (all classes, each pair) where the attribute alone predicts the class
    for scope in scopes:
        pairs = [(v, y) for v, y in zip(values, labels) if y in scope]
        if len(pairs) < 4:
            continue
        vs, ys = zip(*pairs)
        acc = lookup_accuracy(vs, ys)
        base = max(Counter(ys).values()) / len(ys)
        if scope == tuple(classes):
            summary.update(accuracy=round(acc, 3), baseline=round(base, 3))
        if acc >= PREDICTS_ACCURACY and acc >= base + PREDICTS_MARGIN:
            hits.append({"classes": list(scope), "files": len(ys), "accuracy": round(acc, 3),
                         "baseline": round(base, 3)})
    if hits:
        # One warning per attribute: the first scope in words, the other scopes after it.
        first, more = hits[0], hits[1:]
        what = "the classes" if first["classes"] == classes else " from ".join(first["classes"])
        message = (f"{name} alone tells {what} apart: right for {_pct(first['accuracy'])} of "
                   f"{first['files']} files (leave-one-out lookup) vs {_pct(first['baseline'])} "
                   "for the largest class")
        if more:
            message += "; pairs: " + ", ".join(
                f"{'/'.join(h['classes'])} {_pct(h['accuracy'])} vs {_pct(h['baseline'])}" for h in more)
        found.append({"rule": "predicts", "attribute": attribute, "origin": origin,
                      "classes": first["classes"], "value": None, "accuracy": first["accuracy"],
                      "baseline": first["baseline"], "scopes": hits, "message": message})
    n_class = Counter(labels)
    table = Counter(zip(values, labels))
    n_value = Counter(values)
    for (v, c), n in sorted(table.items()):
        rest = len(labels) - n_class[c]
        leak = n_value[v] - n
        cover = n / n_class[c]
        numbers = {"in_class": n, "class_size": n_class[c], "in_rest": leak, "rest_size": rest}
        if rest and cover >= SEPARATES_COVER and leak / rest <= SEPARATES_LEAK:
            found.append({
                "rule": "separates", "attribute": attribute, "origin": origin, "classes": [c],
                "value": v, **numbers,
                "message": f"{name} = {v} nearly separates {c}: {n}/{n_class[c]} {c} files "
                           f"({_pct(cover)}) vs {leak}/{rest} of the rest ({_pct(leak / rest)})",
            })
        elif (n >= MARKS_MIN_FILES and cover >= MARKS_COVER and n / n_value[v] >= MARKS_PRECISION
              and len(classes) > 1):
            found.append({
                "rule": "marks", "attribute": attribute, "origin": origin, "classes": [c],
                "value": v, **numbers,
                "message": f"{name} = {v} marks {c}: {n}/{n_class[c]} {c} files ({_pct(cover)}) "
                           f"have it, {leak}/{rest} of the rest",
            })
    return summary, found


# ---------------------------------------------------------------- duplicates


# Bits set in each byte value: a popcount that also works on numpy < 2 (no np.bitwise_count).
_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits in each uint64 of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int64)


def _hamming_pairs(hashes: np.ndarray, max_distance: int) -> Iterable[tuple[int, int, int]]:
    """(i, j, distance) for i < j with Hamming distance <= max_distance, in row blocks (bounded memory)."""
    block = 512
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        dist = _popcount(rows[:, None] ^ hashes[None, :])
        for r, j in zip(*np.nonzero(dist <= max_distance)):
            i = start + int(r)
            if j > i:
                yield i, int(j), int(dist[r, j])


def find_duplicates(records: list[dict]) -> dict:
    """Exact (same SHA-256) and near (pHash and dHash close) duplicate pairs among readable records.

    Each pair names both files, their splits and classes and the distances;
    ``counts`` gives pairs across splits, within each split and across classes.
    """
    exact_groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        exact_groups[r["sha256"]].append(i)
    exact = [(i, j) for idx in exact_groups.values() for i, j in itertools.combinations(idx, 2)]
    exact_set = set(exact)

    hashable = [i for i, r in enumerate(records) if r["grey_std"] >= BLANK_STD]
    phash = np.array([int(records[i]["phash"], 16) for i in hashable], dtype=np.uint64)
    dhash = np.array([int(records[i]["dhash"], 16) for i in hashable], dtype=np.uint64)
    near = []
    for a, b, dp in _hamming_pairs(phash, PHASH_MAX_DISTANCE):
        dd = (int(dhash[a]) ^ int(dhash[b])).bit_count()
        i, j = hashable[a], hashable[b]
        if dd <= DHASH_MAX_DISTANCE and (i, j) not in exact_set:
            near.append((i, j, dp, dd))

    def pair(i, j, **extra) -> dict:
        a, b = records[i], records[j]
        return {"a": a["path"], "b": b["path"], "split_a": a["split"], "split_b": b["split"],
                "class_a": a["class"], "class_b": b["class"], **extra}

    exact_pairs = [pair(i, j) for i, j in exact]
    near_pairs = [pair(i, j, phash_distance=dp, dhash_distance=dd) for i, j, dp, dd in
                  sorted(near, key=lambda t: (t[2] + t[3], t[0], t[1]))]
    blank = [r["path"] for r in records if r["grey_std"] < BLANK_STD]
    return {
        "method": {"exact": "SHA-256 of the file bytes",
                   "near": f"pHash distance <= {PHASH_MAX_DISTANCE} and dHash distance <= "
                           f"{DHASH_MAX_DISTANCE} (64-bit, imagehash), exact duplicates excluded",
                   "blank": f"grey-level std < {BLANK_STD}: no usable hash, not paired"},
        "exact": {"counts": _pair_counts(exact_pairs), "pairs": _cross_first(exact_pairs)},
        "near": {"counts": _pair_counts(near_pairs), "pairs": _cross_first(near_pairs)},
        "blank": blank,
    }


def _pair_counts(pairs: list[dict]) -> dict:
    within = Counter(p["split_a"] or "all" for p in pairs if p["split_a"] == p["split_b"])
    return {
        "pairs": len(pairs),
        "across_splits": sum(p["split_a"] != p["split_b"] for p in pairs),
        "within_split": dict(sorted(within.items())),
        "across_classes": sum(p["class_a"] != p["class_b"] for p in pairs),
    }


def _cross_first(pairs: list[dict]) -> list[dict]:
    """Pairs across splits, then across classes, then the rest; at most MAX_STORED_PAIRS."""
    key = lambda p: (p["split_a"] == p["split_b"], p["class_a"] == p["class_b"])  # noqa: E731
    return sorted(pairs, key=key)[:MAX_STORED_PAIRS]


# ---------------------------------------------------------------- summaries


def _spread(numbers: list[int]) -> dict:
    if not numbers:
        return {}
    return {"min": min(numbers), "median": statistics.median(numbers), "max": max(numbers)}


def _common_sizes(sizes: Iterable[tuple[int, int]], n: int = 3) -> list[list]:
    """The n most common "WxH" sizes as [size, count] (lists: the same in audit.json)."""
    return [[s, k] for s, k in Counter(f"{w}x{h}" for w, h in sizes).most_common(n)]


def class_summary(records: list[dict]) -> dict:
    """Counts and spreads for the readable files of one class."""
    count = lambda key: dict(Counter(r[key] for r in records).most_common())  # noqa: E731
    png_keys = Counter(k for r in records for k in r["png_text"])
    return {
        "files": len(records),
        "format": count("format"),
        "width": _spread([r["width"] for r in records]),
        "height": _spread([r["height"] for r in records]),
        "common_sizes": _common_sizes((r["width"], r["height"]) for r in records),
        "jpeg_quality": dict(Counter(attribute_values(r)["jpeg_quality"] for r in records).most_common()),
        "subsampling": dict(Counter(r["subsampling"] or "n/a" for r in records).most_common()),
        "mode": count("mode"),
        "alpha": sum(r["alpha"] for r in records),
        "exif": sum(r["exif"] for r in records),
        "exif_software": dict(Counter(r["exif_software"] for r in records if r["exif_software"]).most_common()),
        "exif_make": dict(Counter(r["exif_make"] for r in records if r["exif_make"]).most_common()),
        "icc": sum(r["icc"] for r in records),
        "xmp": sum(r["xmp"] for r in records),
        "png_text": sum(bool(r["png_text"]) for r in records),
        "png_text_keys": dict(png_keys.most_common()),
        "ai_metadata": sum(r["ai_metadata"] is not None for r in records),
        "file_bytes": _spread([r["bytes"] for r in records]),
        "blank": sum(r["grey_std"] < BLANK_STD for r in records),
    }


# ---------------------------------------------------------------- manifest


def manifest_summary(path, rows: list[dict], matched: list[tuple[dict, dict]], n_files: int) -> dict:
    """Per-source counts, the originals' format and size per class (orig_format, orig_width,
    orig_height, where present), prompt groups and original files (orig_sha256) found in
    more than one split, and files whose manifest label differs from their class folder."""
    sources: dict[str, Counter] = defaultdict(Counter)
    for rec, row in matched:
        sources[row.get("source") or "unknown"][rec["class"] + (f"/{rec['split']}" if rec["split"] else "")] += 1
    return {
        "path": str(path),
        "rows": len(rows),
        "matched_files": len(matched),
        "files_without_row": n_files - len(matched),
        "sources": {s: dict(sorted(c.items())) for s, c in sorted(sources.items())},
        "label_mismatches": [rec["path"] for rec, row in matched
                             if row.get("label") and row["label"] != rec["class"]],
        "originals": _originals(matched),
        "groups_across_splits": _across_splits(matched, "group"),
        "originals_across_splits": _across_splits(matched, "orig_sha256"),
    }


def _originals(matched: list[tuple[dict, dict]]) -> dict:
    """Per class: the original format and size (before normalisation), from the manifest."""
    have = [(rec, row) for rec, row in matched if row.get("orig_format") and row.get("orig_width")]
    per_class: dict[str, dict] = {}
    for c in sorted({rec["class"] for rec, _ in have}):
        rows = [row for rec, row in have if rec["class"] == c]
        widths, heights = [int(r["orig_width"]) for r in rows], [int(r["orig_height"]) for r in rows]
        per_class[c] = {
            "files": len(rows),
            "format": dict(Counter(r["orig_format"] for r in rows).most_common()),
            "width": _spread(widths),
            "height": _spread(heights),
            "common_sizes": _common_sizes(zip(widths, heights)),
        }
    return per_class


def original_values(row: dict) -> dict[str, str]:
    """A manifest row's originals as one categorical value per ORIGINAL_ATTRIBUTES key."""
    w, h = int(row["orig_width"]), int(row["orig_height"])
    return {"orig_format": row["orig_format"], "orig_size": f"{w}x{h}",
            "orig_long_side": long_side_bucket(w, h)}


def _across_splits(matched: list[tuple[dict, dict]], column: str) -> dict:
    """Values of ``column`` (prompt group, original hash) whose files sit in more than one split."""
    splits: dict[str, set] = defaultdict(set)
    for rec, row in matched:
        if row.get(column) and rec["split"]:
            splits[row[column]].add(rec["split"])
    shared = sorted(v for v, s in splits.items() if len(s) > 1)
    return {"checked": len(splits), "count": len(shared), "examples": shared[:20]}


# ---------------------------------------------------------------- the audit


def audit(data_dir: str | os.PathLike, manifest: str | os.PathLike | None = None,
          progress: bool = False) -> dict:
    """Audit a labelled image folder; returns a JSON-serialisable dict.

    ``data_dir`` has one sub-folder per class, or split folders (train/, val/
    ...) each with class sub-folders.  Keys: ``layout``, ``counts``,
    ``per_class``, ``separation`` (per attribute: leave-one-out lookup accuracy
    and baseline), ``warnings`` (each with ``rule``, ``attribute``,
    ``classes``, numbers and a ``message``), ``duplicates``, ``ai_metadata``
    (files whose metadata names a generator), ``unreadable``, ``manifest``
    (with ``manifest=``), ``files`` (the number of files) and ``file_records``
    (what was found in each file).
    """
    from tqdm import tqdm

    root = Path(data_dir)
    folders = find_splits(root)
    todo = [(split, folder.classes[y], path) for split, folder in folders for path, y in folder.samples]
    records = []
    for split, cls, path in tqdm(todo, desc="audit", unit="file", disable=not progress):
        rec = {"path": path.relative_to(root).as_posix(), "split": split, "class": cls}
        rec.update(audit_file(path))
        records.append(rec)
    good = [r for r in records if r["error"] is None]
    classes = sorted({r["class"] for r in records})
    splits = [s for s, _ in folders if s is not None]

    result: dict = {
        "data_dir": str(root),
        "layout": "splits" if splits else "classes",
        "splits": splits,
        "classes": classes,
        "files": len(records),
        "counts": {s or "all": f.counts() for s, f in folders},
        "unreadable": [{"path": r["path"], "error": r["error"]} for r in records if r["error"]],
        "per_class": {c: class_summary([r for r in good if r["class"] == c]) for c in classes},
        "ai_metadata": [{"path": r["path"], "class": r["class"], "found": r["ai_metadata"]}
                        for r in good if r["ai_metadata"]],
    }
    labels = [r["class"] for r in good]
    values = [attribute_values(r) for r in good]
    result["separation"], found = _separation(values, labels, ATTRIBUTES, "files")
    result["duplicates"] = find_duplicates(good)
    if manifest is not None:
        rows = read_manifest(manifest)
        matched = [(rec, row) for rec, row in zip(good, match_manifest([r["path"] for r in good], rows))
                   if row is not None]
        result["manifest"] = manifest_summary(manifest, rows, matched, len(good))
        # The same separation rules on the originals: where a normalised bench's bias still shows.
        orig = [(original_values(row), rec["class"]) for rec, row in matched
                if row.get("orig_format") and row.get("orig_width")]
        if orig:
            summary, more = _separation([v for v, _ in orig], [c for _, c in orig],
                                        ORIGINAL_ATTRIBUTES, "manifest originals")
            result["manifest"]["separation"] = summary
            found += more
    result["warnings"] = _data_warnings(result) + found
    result["file_records"] = records
    return result


def _separation(values: list[dict], labels: list[str], attributes: dict, origin: str):
    summary, found = {}, []
    if len(set(labels)) < 2:
        return summary, found
    for key, name in attributes.items():
        summary[key], warns = separation_warnings([v[key] for v in values], labels, key, name, origin)
        found += warns
    return summary, found


def _data_warnings(result: dict) -> list[dict]:
    """Warnings about the data itself: unreadable files, blank images, duplicates, manifest problems."""
    out = []

    def warn(rule: str, message: str, **numbers):
        out.append({"rule": rule, "attribute": None, "origin": "files", "classes": [],
                    "value": None, **numbers, "message": message})

    if result["unreadable"]:
        warn("unreadable", f"{len(result['unreadable'])} file(s) could not be read", count=len(result["unreadable"]))
    dup = result["duplicates"]
    if dup["blank"]:
        warn("blank", f"{len(dup['blank'])} near-uniform image(s) (grey-level std < {BLANK_STD}): "
                      "no content to learn from", count=len(dup["blank"]))
    for kind in ("exact", "near"):
        c = dup[kind]["counts"]
        if c["across_splits"]:
            warn(f"{kind}_duplicates_across_splits",
                 f"{c['across_splits']} {kind}-duplicate pair(s) straddle splits", count=c["across_splits"])
        if c["across_classes"]:
            warn(f"{kind}_duplicates_across_classes",
                 f"{c['across_classes']} {kind}-duplicate pair(s) have different classes",
                 count=c["across_classes"])
    man = result.get("manifest", {})
    for key, what in (("groups_across_splits", "prompt group(s)"),
                      ("originals_across_splits", "original file(s) (orig_sha256)")):
        if man.get(key, {}).get("count"):
            warn(key, f"{man[key]['count']} {what} appear in more than one split", count=man[key]["count"])
    if man.get("label_mismatches"):
        warn("label_mismatches", f"{len(man['label_mismatches'])} file(s) sit in a class folder "
                                 "that differs from their manifest label", count=len(man["label_mismatches"]))
    return out


# ---------------------------------------------------------------- reports


def summary_line(result: dict) -> str:
    """One line: files, classes, warnings, duplicate pairs."""
    dup = result["duplicates"]
    where = "across splits" if result["splits"] else "in all"
    ex, nr = dup["exact"]["counts"], dup["near"]["counts"]
    n_ex = ex["across_splits"] if result["splits"] else ex["pairs"]
    n_nr = nr["across_splits"] if result["splits"] else nr["pairs"]
    return (f"audited {result['files']} files ({len(result['unreadable'])} unreadable) in "
            f"{len(result['classes'])} classes: {len(result['warnings'])} warnings, "
            f"{n_ex} exact and {n_nr} near-duplicate pairs {where}")


def _fmt_counts(counts: dict, limit: int = 4) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "") if items else "-"


def _fmt_spread(s: dict) -> str:
    return f"{s['min']} / {s['median']:g} / {s['max']}" if s else "-"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def to_markdown(result: dict) -> str:
    """The audit as a human-readable markdown report: warnings first, then tables."""
    classes = result["classes"]
    pc = result["per_class"]
    md = [f"# Dataset audit: {result['data_dir']}", "", summary_line(result) + ".", ""]
    counts = result["counts"]
    md += _table(["split"] + classes, [[s] + [c.get(k, 0) for k in classes] for s, c in counts.items()]) + [""]

    md += [f"## Warnings ({len(result['warnings'])})", ""]
    md += [f"- {w['message']}" + (" (manifest originals)" if w["origin"] != "files" else "")
           for w in result["warnings"]] or ["None."]
    md += ["", "Rules: *predicts* = the attribute alone, as a leave-one-out lookup table, is right for "
           f">= {_pct(PREDICTS_ACCURACY)} of files and >= {PREDICTS_MARGIN * 100:.0f} points above the "
           f"largest class (all classes or any pair); *separates* = one value covers >= "
           f"{_pct(SEPARATES_COVER)} of a class and <= {_pct(SEPARATES_LEAK)} of the rest; *marks* = "
           f">= {_pct(MARKS_PRECISION)} of the files with a value are in one class "
           f"(>= {MARKS_MIN_FILES} files, >= {_pct(MARKS_COVER)} of the class).", ""]

    md += ["## Per class", ""]
    rows = [
        ["files"] + [pc[c]["files"] for c in classes],
        ["format"] + [_fmt_counts(pc[c]["format"]) for c in classes],
        ["width min / median / max"] + [_fmt_spread(pc[c]["width"]) for c in classes],
        ["height min / median / max"] + [_fmt_spread(pc[c]["height"]) for c in classes],
        ["common sizes"] + [_fmt_counts(dict(pc[c]["common_sizes"])) for c in classes],
        ["JPEG quality (~ = not IJG tables)"] + [_fmt_counts(pc[c]["jpeg_quality"]) for c in classes],
        ["chroma subsampling"] + [_fmt_counts(pc[c]["subsampling"]) for c in classes],
        ["colour mode"] + [_fmt_counts(pc[c]["mode"]) for c in classes],
        ["alpha channel"] + [pc[c]["alpha"] for c in classes],
        ["EXIF"] + [pc[c]["exif"] for c in classes],
        ["EXIF Software"] + [_fmt_counts(pc[c]["exif_software"], 2) for c in classes],
        ["EXIF Make"] + [_fmt_counts(pc[c]["exif_make"], 2) for c in classes],
        ["ICC profile"] + [pc[c]["icc"] for c in classes],
        ["XMP"] + [pc[c]["xmp"] for c in classes],
        ["PNG text chunks"] + [f"{pc[c]['png_text']} ({_fmt_counts(pc[c]['png_text_keys'], 3)})"
                               for c in classes],
        ["metadata naming a generator"] + [pc[c]["ai_metadata"] for c in classes],
        ["file bytes min / median / max"] + [_fmt_spread(pc[c]["file_bytes"]) for c in classes],
        ["blank (near-uniform)"] + [pc[c]["blank"] for c in classes],
    ]
    md += _table(["attribute"] + classes, rows) + [""]

    if result["separation"]:
        md += ["## Each attribute alone (all classes)", ""]
        md += _table(["attribute", "distinct values", "lookup accuracy", "largest class"],
                     [[ATTRIBUTES[k], s["n_values"], s.get("accuracy", "-"), s.get("baseline", "-")]
                      for k, s in result["separation"].items()]) + [""]

    if result["ai_metadata"]:
        md += ["## Metadata naming a generator", ""]
        md += [f"- `{m['path']}` ({m['class']}): {m['found']}" for m in result["ai_metadata"]] + [""]

    md += _duplicates_markdown(result["duplicates"])
    if "manifest" in result:
        md += _manifest_markdown(result["manifest"], classes)
    if result["unreadable"]:
        md += ["## Unreadable files", ""]
        md += [f"- `{u['path']}`: {u['error']}" for u in result["unreadable"]] + [""]
    return "\n".join(md)


def _duplicates_markdown(dup: dict) -> list[str]:
    md = ["## Duplicates", "", f"Exact: {dup['method']['exact']}. Near: {dup['method']['near']}.", ""]
    rows = []
    for kind in ("exact", "near"):
        c = dup[kind]["counts"]
        within = ", ".join(f"{s} {n}" for s, n in c["within_split"].items()) or "0"
        rows.append([kind, c["pairs"], c["across_splits"], within, c["across_classes"]])
    md += _table(["kind", "pairs", "across splits", "within split", "across classes"], rows) + [""]
    for kind in ("exact", "near"):
        pairs = dup[kind]["pairs"]
        if not pairs:
            continue
        shown = f", first {MAX_LISTED_PAIRS}" if len(pairs) > MAX_LISTED_PAIRS else ""
        md += [f"{kind.capitalize()} pairs ({len(pairs)}{shown}; across splits first):", ""]
        for p in pairs[:MAX_LISTED_PAIRS]:
            dist = f" (pHash {p['phash_distance']}, dHash {p['dhash_distance']})" if "phash_distance" in p else ""
            md.append(f"- `{p['a']}` / `{p['b']}`{dist}")
        md.append("")
    if dup["blank"]:
        md += [f"Blank (near-uniform) images, not hashed ({len(dup['blank'])}):", ""]
        md += [f"- `{p}`" for p in dup["blank"][:MAX_LISTED_PAIRS]] + [""]
    return md


def _manifest_markdown(man: dict, classes: list[str]) -> list[str]:
    md = ["## Manifest", "", f"`{man['path']}`: {man['rows']} rows, {man['matched_files']} files matched, "
          f"{man['files_without_row']} without a row; {len(man['label_mismatches'])} label mismatches; "
          f"prompt groups in more than one split: {man['groups_across_splits']['count']} of "
          f"{man['groups_across_splits']['checked']}; original files in more than one split: "
          f"{man['originals_across_splits']['count']}.", ""]
    cols = sorted({k for c in man["sources"].values() for k in c})
    md += ["Files per source:", ""]
    md += _table(["source"] + cols, [[s] + [c.get(k, 0) for k in cols] for s, c in man["sources"].items()])
    md.append("")
    orig = man["originals"]
    if orig:
        md += ["What the originals looked like before normalisation (manifest orig_* columns):", ""]
        cs = [c for c in classes if c in orig]
        md += _table(["original"] + cs, [
            ["files"] + [orig[c]["files"] for c in cs],
            ["format"] + [_fmt_counts(orig[c]["format"]) for c in cs],
            ["width min / median / max"] + [_fmt_spread(orig[c]["width"]) for c in cs],
            ["height min / median / max"] + [_fmt_spread(orig[c]["height"]) for c in cs],
            ["common sizes"] + [_fmt_counts(dict(orig[c]["common_sizes"])) for c in cs],
        ]) + [""]
    return md


def write_outputs(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    return [write_json(out / "audit.json", result), write_text(out / "audit.md", to_markdown(result))]
