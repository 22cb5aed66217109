"""Dataset audit: what a classifier could learn from a labelled folder besides content.

For each class, :func:`audit` measures the spread of file format, pixel size,
JPEG quality, colour mode / alpha, metadata and file size, warns where one of
them nearly separates the classes (the format-bias trap of published
detectors), finds exact and near-duplicate images, above all pairs that
straddle train and val, and runs bias probes: classifiers that see only
low-level statistics (DCT histograms, noise residuals, the original format and
size) and whose cross-validated AUC says how much they alone give away
(:mod:`imageorigin.probes`).

Headers and metadata are read with ``PIL.Image.open`` (inspection only); pixels
come from :func:`imageorigin.images.decode_image`, the decoder every other path
uses, so the hashes and probe features describe what the model sees.

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
* **probe**: a bias probe tells AI from human with a cross-validated ROC AUC
  above 0.75 (``probes.WARN_AUC``).

Near duplicates: 64-bit pHash (DCT) Hamming distance <= 8 *and* 64-bit dHash
(gradient) distance <= 12.  Requiring both hashes to agree is measured, not
guessed: on the DH3 bench, re-encoding at JPEG quality 70 or resizing to 90%
moves pHash by <= 2 and dHash by <= 4, cutting off the bottom 1/64 moves them
by <= 6 and <= 7, while pHash alone matches unrelated low-contrast images (a
DALL-E "Malevich" render and a magnolia clip art at pHash 4 have dHash 30).
Near-uniform images (grey-level standard deviation < 2) have no usable hash;
they are listed as blank instead of being paired with each other.

Layout of this module: folders; one file; attributes (one categorical value
per file and attribute); separation (does one attribute tell the classes
apart?); duplicates; summaries (per class, manifest); bias probes; the audit
itself; reports (markdown, console lines, files).
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
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from . import probes
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
    subdirs = []
    if root.is_dir():
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and all(name in SPLIT_NAMES for name in subdirs):
        return [(s, scan_folder(root / s)) for s in sorted(subdirs, key=SPLIT_NAMES.index)]
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


def audit_file(path: Path) -> tuple[dict, dict | None]:
    """Everything the audit records about one file, and the bias probes' pixel features.

    The record's ``error`` is set when the file cannot be read or decoded; the
    features are None when the pixels could not be decoded (or the image is under 8 px).
    """
    record: dict = {"bytes": None, "sha256": None, "error": None}
    try:
        data = path.read_bytes()
    except OSError as err:
        record["error"] = f"cannot read file ({err.strerror or err})"
        return record, None
    record["bytes"] = len(data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, name=str(path))
    except ImageDecodeError as err:
        record["error"] = err.reason
        return record, None
    record.update(hash_image(image))
    pixels = probes.pixel_features(image) if min(image.size) >= 8 else None
    try:
        record.update(inspect_file(data))
    except Exception as err:  # noqa: BLE001 - Pillow's metadata parsers raise many kinds; the audit goes on
        record["error"] = f"metadata unreadable ({type(err).__name__}: {err})"
    return record, pixels


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


def jpeg_quality_value(rec: dict) -> str:
    """The estimated JPEG quality as reported: "90", "~92" (not IJG tables) or "n/a"."""
    if rec["jpeg_quality"] is None:
        return "n/a"
    return str(rec["jpeg_quality"]) if rec["jpeg_quality_exact"] else f"~{rec['jpeg_quality']}"


def attribute_values(rec: dict) -> dict[str, str]:
    """A readable file record as one categorical value per attribute in ATTRIBUTES."""
    yes = {True: "yes", False: "no"}
    return {
        "format": rec["format"] or "unknown",
        "pixel_size": f"{rec['width']}x{rec['height']}",
        "long_side": long_side_bucket(rec["width"], rec["height"]),
        "aspect": aspect(rec["width"], rec["height"]),
        "jpeg_quality": jpeg_quality_value(rec),
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


def has_originals(row: dict | None) -> bool:
    """Whether a manifest row gives the original format and size (orig_format, orig_width, orig_height)."""
    return bool(row and row.get("orig_format") and row.get("orig_width") and row.get("orig_height"))


def original_values(row: dict) -> dict[str, str]:
    """A manifest row's originals as one categorical value per ORIGINAL_ATTRIBUTES key."""
    w, h = int(row["orig_width"]), int(row["orig_height"])
    return {"orig_format": row["orig_format"], "orig_size": f"{w}x{h}",
            "orig_long_side": long_side_bucket(w, h)}


# ---------------------------------------------------------------- separation


def _warning(rule: str, message: str, attribute: str | None = None, origin: str = "files",
             classes: Sequence[str] = (), value: str | None = None, **numbers) -> dict:
    """One entry of the audit's ``warnings``: the rule, what it is about, its numbers, and a message."""
    return {"rule": rule, "attribute": attribute, "origin": origin, "classes": list(classes),
            "value": value, **numbers, "message": message}


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

    Returns ``(summary, warnings)``: the summary holds the number of distinct
    values and the lookup accuracy and baseline over all classes; each warning
    holds the rule, classes, value and numbers.
    """
    summary, predicts = _predicts(values, labels, attribute, name, origin)
    return summary, predicts + _value_warnings(values, labels, attribute, name, origin)


def _predicts(values: Sequence[str], labels: Sequence[str], attribute: str, name: str,
              origin: str) -> tuple[dict, list[dict]]:
    """The *predicts* rule, over all classes and each pair: at most one warning per attribute."""
    classes = sorted(set(labels))
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
    if not hits:
        return summary, []
    # One warning per attribute: the first scope in words, the other scopes after it.
    first, more = hits[0], hits[1:]
    what = "the classes" if first["classes"] == classes else " from ".join(first["classes"])
    message = (f"{name} alone tells {what} apart: right for {_pct(first['accuracy'])} of "
               f"{first['files']} files (leave-one-out lookup) vs {_pct(first['baseline'])} "
               "for the largest class")
    if more:
        message += "; pairs: " + ", ".join(
            f"{'/'.join(h['classes'])} {_pct(h['accuracy'])} vs {_pct(h['baseline'])}" for h in more)
    return summary, [_warning("predicts", message, attribute, origin, first["classes"],
                              accuracy=first["accuracy"], baseline=first["baseline"], scopes=hits)]


def _value_warnings(values: Sequence[str], labels: Sequence[str], attribute: str, name: str,
                    origin: str) -> list[dict]:
    """The *separates* and *marks* rules, for each (value, class)."""
    found = []
    n_class = Counter(labels)
    n_value = Counter(values)
    for (v, c), n in sorted(Counter(zip(values, labels)).items()):
        rest = len(labels) - n_class[c]
        leak = n_value[v] - n
        cover = n / n_class[c]
        numbers = {"in_class": n, "class_size": n_class[c], "in_rest": leak, "rest_size": rest}
        if rest and cover >= SEPARATES_COVER and leak / rest <= SEPARATES_LEAK:
            message = (f"{name} = {v} nearly separates {c}: {n}/{n_class[c]} {c} files "
                       f"({_pct(cover)}) vs {leak}/{rest} of the rest ({_pct(leak / rest)})")
            found.append(_warning("separates", message, attribute, origin, [c], v, **numbers))
        elif (n >= MARKS_MIN_FILES and cover >= MARKS_COVER and n / n_value[v] >= MARKS_PRECISION
              and len(n_class) > 1):
            message = (f"{name} = {v} marks {c}: {n}/{n_class[c]} {c} files ({_pct(cover)}) "
                       f"have it, {leak}/{rest} of the rest")
            found.append(_warning("marks", message, attribute, origin, [c], v, **numbers))
    return found


def separation(values: list[dict], labels: list[str], attributes: dict[str, str],
               origin: str) -> tuple[dict, list[dict]]:
    """:func:`separation_warnings` for every attribute: ``({key: summary}, warnings)``; empty for one class."""
    summary, found = {}, []
    if len(set(labels)) < 2:
        return summary, found
    for key, name in attributes.items():
        summary[key], warns = separation_warnings([v[key] for v in values], labels, key, name, origin)
        found += warns
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


def _tally(values: Iterable) -> dict:
    """{value: count}, most common first."""
    return dict(Counter(values).most_common())


def _spread(numbers: list[int]) -> dict:
    if not numbers:
        return {}
    return {"min": min(numbers), "median": statistics.median(numbers), "max": max(numbers)}


def _common_sizes(sizes: Iterable[tuple[int, int]], n: int = 3) -> list[list]:
    """The n most common "WxH" sizes as [size, count] (lists: the same in audit.json)."""
    return [[s, k] for s, k in Counter(f"{w}x{h}" for w, h in sizes).most_common(n)]


def class_summary(records: list[dict]) -> dict:
    """Counts and spreads for the readable files of one class."""
    count = lambda key: _tally(r[key] for r in records)  # noqa: E731
    total = lambda key: sum(bool(r[key]) for r in records)  # noqa: E731
    return {
        "files": len(records),
        "format": count("format"),
        "width": _spread([r["width"] for r in records]),
        "height": _spread([r["height"] for r in records]),
        "common_sizes": _common_sizes((r["width"], r["height"]) for r in records),
        "jpeg_quality": _tally(jpeg_quality_value(r) for r in records),
        "subsampling": _tally(r["subsampling"] or "n/a" for r in records),
        "mode": count("mode"),
        "alpha": total("alpha"),
        "exif": total("exif"),
        "exif_software": _tally(r["exif_software"] for r in records if r["exif_software"]),
        "exif_make": _tally(r["exif_make"] for r in records if r["exif_make"]),
        "icc": total("icc"),
        "xmp": total("xmp"),
        "png_text": total("png_text"),
        "png_text_keys": _tally(k for r in records for k in r["png_text"]),
        "ai_metadata": sum(r["ai_metadata"] is not None for r in records),
        "file_bytes": _spread([r["bytes"] for r in records]),
        "blank": sum(r["grey_std"] < BLANK_STD for r in records),
    }


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
    have = [(rec, row) for rec, row in matched if has_originals(row)]
    per_class: dict[str, dict] = {}
    for c in sorted({rec["class"] for rec, _ in have}):
        rows = [row for rec, row in have if rec["class"] == c]
        widths, heights = [int(r["orig_width"]) for r in rows], [int(r["orig_height"]) for r in rows]
        per_class[c] = {
            "files": len(rows),
            "format": _tally(r["orig_format"] for r in rows),
            "width": _spread(widths),
            "height": _spread(heights),
            "common_sizes": _common_sizes(zip(widths, heights)),
        }
    return per_class


def _across_splits(matched: list[tuple[dict, dict]], column: str) -> dict:
    """Values of ``column`` (prompt group, original hash) whose files sit in more than one split."""
    splits: dict[str, set] = defaultdict(set)
    for rec, row in matched:
        if row.get(column) and rec["split"]:
            splits[row[column]].add(rec["split"])
    shared = sorted(v for v, s in splits.items() if len(s) > 1)
    return {"checked": len(splits), "count": len(shared), "examples": shared[:20]}


# ---------------------------------------------------------------- bias probes


def bias_probes(records: list[dict], pixels: dict[str, dict], rows: dict[str, dict] | None,
                duplicates: dict) -> dict:
    """Run the bias probes (:mod:`imageorigin.probes`) over the readable files.

    ``pixels`` and ``rows`` map a file's path to its pixel features and its
    manifest row (``rows`` None without a manifest).  The ``original`` probe runs
    when every file has a row with the original format and size.  Folds are
    grouped by connected prompt groups and exact / near duplicates.
    """
    records = [r for r in records if pixels.get(r["path"]) is not None]
    features = {key: np.array([pixels[r["path"]][key] for r in records]) for key in ("dct", "noise")}
    file_rows = [(rows or {}).get(r["path"]) for r in records]
    missing = sum(not has_originals(row) for row in file_rows)
    if rows is not None and not missing:
        features["original"] = original_features(file_rows)
    result = probes.run_probes(features, [r["class"] for r in records],
                               _probe_groups(records, file_rows, duplicates))
    prompt_groups = any(row and row.get("group") for row in file_rows)
    result["grouped_by"] = ("prompt group (manifest `group`), " if prompt_groups else "") + \
        "exact and near duplicates"
    result["note"] = None if rows is None or not missing else (
        f"No original probe: {missing} file(s) lack a manifest row with orig_format, orig_width, orig_height")
    return result


def original_features(rows: Sequence[dict]) -> np.ndarray:
    """The ``original`` bias probe's features of manifest rows: (n, k).

    One-hot original format, longer-side band, aspect and coding history
    (dh3-wide's ``coding`` without its quality: webp-orig, webp-roundtrip,
    none; "n/a" without the column), then log2 of the original width and
    height and the round trip's quality / 100 (0 without one).
    """
    categories, numbers = [], []
    for row in rows:
        w, h = int(row["orig_width"]), int(row["orig_height"])
        coding = re.fullmatch(r"(.+)-q(\d+)", row.get("coding") or "")
        categories.append({"format": row["orig_format"], "long_side": long_side_bucket(w, h),
                           "aspect": aspect(w, h),
                           "coding": coding[1] if coding else row.get("coding") or "n/a"})
        numbers.append([np.log2(w), np.log2(h), int(coding[2]) / 100 if coding else 0.0])
    return np.hstack([probes.one_hot(categories), np.array(numbers, dtype=float).reshape(len(rows), 3)])


def _probe_groups(records: list[dict], rows: list[dict | None], duplicates: dict) -> np.ndarray:
    """A group id per file: files linked by a manifest ``group`` or a duplicate pair share one."""
    index = {r["path"]: i for i, r in enumerate(records)}
    links = [(index[p["a"]], index[p["b"]]) for kind in ("exact", "near") for p in duplicates[kind]["pairs"]
             if p["a"] in index and p["b"] in index]
    first: dict[str, int] = {}  # manifest group -> its first file
    for i, row in enumerate(rows):
        if row and row.get("group"):
            links.append((first.setdefault(row["group"], i), i))
    return probes.connected_groups(len(records), links)


def _probe_warnings(result: dict, classes: list[str]) -> list[dict]:
    """A *probe* warning for each feature group above probes.WARN_AUC."""
    found = []
    for key, p in result["probes"].items():
        if p["warning"]:
            message = (f"bias probe ({probes.FEATURE_GROUPS[key]}): AI vs {probes.HUMAN} ROC AUC "
                       f"{p['auc']:.3f} ± {p['std']:.3f} > {probes.WARN_AUC} ({result['images']} images, "
                       f"{result['folds']}-fold grouped cross-validation): these features alone, "
                       "without the content, tell the classes apart")
            found.append(_warning("probe", message, key, "bias probe", classes, auc=p["auc"], std=p["std"]))
    return found


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
    (with ``manifest=``), ``bias_probes`` (cross-validated AI-vs-human AUC of
    each probe, see :mod:`imageorigin.probes`), ``files`` (the number of
    files) and ``file_records`` (what was found in each file).
    """
    root = Path(data_dir)
    folders = find_splits(root)
    records, pixels = _read_files(root, folders, progress)
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
    result["separation"], found = separation([attribute_values(r) for r in good], [r["class"] for r in good],
                                             ATTRIBUTES, "files")
    result["duplicates"] = find_duplicates(good)
    rows = None
    if manifest is not None:
        all_rows = read_manifest(manifest)
        rows = _manifest_rows(good, all_rows)
        result["manifest"], more = _audit_manifest(manifest, all_rows, good, rows)
        found += more
    result["bias_probes"] = bias_probes(good, pixels, rows, result["duplicates"])
    result["warnings"] = _data_warnings(result) + found + _probe_warnings(result["bias_probes"], classes)
    result["file_records"] = records
    return result


def _read_files(root: Path, folders: list[tuple[str | None, LabelledFolder]],
                progress: bool) -> tuple[list[dict], dict[str, dict]]:
    """:func:`audit_file` on every file: records (path, split, class first) and ``{path: pixel features}``."""
    from tqdm import tqdm

    todo = [(split, folder.classes[y], path) for split, folder in folders for path, y in folder.samples]
    records, pixels = [], {}
    for split, cls, path in tqdm(todo, desc="audit", unit="file", disable=not progress):
        rec = {"path": path.relative_to(root).as_posix(), "split": split, "class": cls}
        found, pixels[rec["path"]] = audit_file(path)
        records.append({**rec, **found})
    return records, pixels


def _manifest_rows(records: list[dict], rows: list[dict]) -> dict[str, dict]:
    """``{path: manifest row}`` for the records that match one row."""
    return {rec["path"]: row for rec, row in zip(records, match_manifest([r["path"] for r in records], rows))
            if row is not None}


def _audit_manifest(manifest, all_rows: list[dict], good: list[dict],
                    rows: dict[str, dict]) -> tuple[dict, list[dict]]:
    """The manifest summary, and the separation rules run on the originals' format and size:
    where a normalised bench's bias still shows."""
    matched = [(rec, rows[rec["path"]]) for rec in good if rec["path"] in rows]
    summary = manifest_summary(manifest, all_rows, matched, len(good))
    orig = [(original_values(row), rec["class"]) for rec, row in matched if has_originals(row)]
    found: list[dict] = []
    if orig:
        summary["separation"], found = separation([v for v, _ in orig], [c for _, c in orig],
                                                  ORIGINAL_ATTRIBUTES, "manifest originals")
    return summary, found


def _data_warnings(result: dict) -> list[dict]:
    """Warnings about the data itself: unreadable files, blank images, duplicates, manifest problems."""
    out = []

    def warn(rule: str, message: str, count: int):
        out.append(_warning(rule, message, count=count))

    if result["unreadable"]:
        warn("unreadable", f"{len(result['unreadable'])} file(s) could not be read", len(result["unreadable"]))
    dup = result["duplicates"]
    if dup["blank"]:
        warn("blank", f"{len(dup['blank'])} near-uniform image(s) (grey-level std < {BLANK_STD}): "
                      "no content to learn from", len(dup["blank"]))
    for kind in ("exact", "near"):
        c = dup[kind]["counts"]
        if c["across_splits"]:
            warn(f"{kind}_duplicates_across_splits",
                 f"{c['across_splits']} {kind}-duplicate pair(s) straddle splits", c["across_splits"])
        if c["across_classes"]:
            warn(f"{kind}_duplicates_across_classes",
                 f"{c['across_classes']} {kind}-duplicate pair(s) have different classes", c["across_classes"])
    man = result.get("manifest", {})
    for key, what in (("groups_across_splits", "prompt group(s)"),
                      ("originals_across_splits", "original file(s) (orig_sha256)")):
        if man.get(key, {}).get("count"):
            warn(key, f"{man[key]['count']} {what} appear in more than one split", man[key]["count"])
    if man.get("label_mismatches"):
        warn("label_mismatches", f"{len(man['label_mismatches'])} file(s) sit in a class folder "
                                 "that differs from their manifest label", len(man["label_mismatches"]))
    return out


# ---------------------------------------------------------------- reports


def summary_line(result: dict) -> str:
    """One line: files, classes, warnings, duplicate pairs."""
    dup = result["duplicates"]
    count = "across_splits" if result["splits"] else "pairs"
    n_exact, n_near = (dup[kind]["counts"][count] for kind in ("exact", "near"))
    where = "across splits" if result["splits"] else "in all"
    return (f"audited {result['files']} files ({len(result['unreadable'])} unreadable) in "
            f"{len(result['classes'])} classes: {len(result['warnings'])} warnings, "
            f"{n_exact} exact and {n_near} near-duplicate pairs {where}")


def warning_text(w: dict) -> str:
    """A warning's message, saying where it comes from when that is not the files themselves."""
    return w["message"] + (" (manifest originals)" if w["origin"] == "manifest originals" else "")


def probe_lines(result: dict) -> list[str]:
    """One line per bias probe that ran: its feature group, AUC ± std over folds, and WARNING above the limit."""
    bias = result["bias_probes"]
    return [f"bias probe, {probes.FEATURE_GROUPS[key]}: AI vs {probes.HUMAN} ROC AUC {_fmt_auc(p)} "
            f"({bias['images']} images, {bias['folds']} grouped folds)" + (" WARNING" if p["warning"] else "")
            for key, p in bias["probes"].items()]


def console_lines(result: dict) -> list[str]:
    """What the command line prints after the summary line: the warnings, then the bias probes."""
    return [f"warning: {warning_text(w)}" for w in result["warnings"]] + probe_lines(result)


def _fmt_auc(p: dict) -> str:
    return "-" if p["auc"] is None else f"{p['auc']:.3f} ± {p['std']:.3f}"


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


def _class_table(first: str, summaries: dict[str, dict], classes: list[str],
                 rows: Sequence[tuple[str, Callable[[dict], object]]]) -> list[str]:
    """A table with a column per class: one row per (label, how to show a class summary)."""
    return _table([first] + classes, [[label] + [show(summaries[c]) for c in classes] for label, show in rows])


# Rows of the per-class table: label, and how to show it from a class_summary().
PER_CLASS_ROWS: tuple[tuple[str, Callable[[dict], object]], ...] = (
    ("files", lambda s: s["files"]),
    ("format", lambda s: _fmt_counts(s["format"])),
    ("width min / median / max", lambda s: _fmt_spread(s["width"])),
    ("height min / median / max", lambda s: _fmt_spread(s["height"])),
    ("common sizes", lambda s: _fmt_counts(dict(s["common_sizes"]))),
    ("JPEG quality (~ = not IJG tables)", lambda s: _fmt_counts(s["jpeg_quality"])),
    ("chroma subsampling", lambda s: _fmt_counts(s["subsampling"])),
    ("colour mode", lambda s: _fmt_counts(s["mode"])),
    ("alpha channel", lambda s: s["alpha"]),
    ("EXIF", lambda s: s["exif"]),
    ("EXIF Software", lambda s: _fmt_counts(s["exif_software"], 2)),
    ("EXIF Make", lambda s: _fmt_counts(s["exif_make"], 2)),
    ("ICC profile", lambda s: s["icc"]),
    ("XMP", lambda s: s["xmp"]),
    ("PNG text chunks", lambda s: f"{s['png_text']} ({_fmt_counts(s['png_text_keys'], 3)})"),
    ("metadata naming a generator", lambda s: s["ai_metadata"]),
    ("file bytes min / median / max", lambda s: _fmt_spread(s["file_bytes"])),
    ("blank (near-uniform)", lambda s: s["blank"]),
)
# The same for the manifest's originals (manifest_summary()["originals"]).
ORIGINAL_ROWS = PER_CLASS_ROWS[:5]

RULES = (f"Rules: *predicts* = the attribute alone, as a leave-one-out lookup table, is right for "
         f">= {_pct(PREDICTS_ACCURACY)} of files and >= {PREDICTS_MARGIN * 100:.0f} points above the "
         f"largest class (all classes or any pair); *separates* = one value covers >= "
         f"{_pct(SEPARATES_COVER)} of a class and <= {_pct(SEPARATES_LEAK)} of the rest; *marks* = "
         f">= {_pct(MARKS_PRECISION)} of the files with a value are in one class "
         f"(>= {MARKS_MIN_FILES} files, >= {_pct(MARKS_COVER)} of the class); *probe* = a bias probe's "
         f"cross-validated AI-vs-human ROC AUC is above {probes.WARN_AUC} (see Bias probes).")


def to_markdown(result: dict) -> str:
    """The audit as a human-readable markdown report: warnings first, then tables."""
    classes = result["classes"]
    md = [f"# Dataset audit: {result['data_dir']}", "", summary_line(result) + ".", ""]
    md += _table(["split"] + classes, [[s] + [c.get(k, 0) for k in classes]
                                       for s, c in result["counts"].items()]) + [""]
    md += [f"## Warnings ({len(result['warnings'])})", ""]
    md += [f"- {warning_text(w)}" for w in result["warnings"]] or ["None."]
    md += ["", RULES, ""]
    md += ["## Per class", ""] + _class_table("attribute", result["per_class"], classes, PER_CLASS_ROWS) + [""]
    if result["separation"]:
        md += ["## Each attribute alone (all classes)", ""]
        md += _table(["attribute", "distinct values", "lookup accuracy", "largest class"],
                     [[ATTRIBUTES[k], s["n_values"], s.get("accuracy", "-"), s.get("baseline", "-")]
                      for k, s in result["separation"].items()]) + [""]
    md += _probes_markdown(result["bias_probes"], classes)
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


def _probes_markdown(bias: dict, classes: list[str]) -> list[str]:
    ai = ", ".join(c for c in classes if c != probes.HUMAN) or "-"
    md = ["## Bias probes", "",
          f"Can low-level statistics alone, without the content, tell AI ({ai}) from {probes.HUMAN}? "
          "Each probe is a logistic regression on standardised features, scored by ROC AUC in "
          f"{bias['folds']}-fold cross-validation (StratifiedGroupKFold, seed {bias['seed']}) grouped by "
          f"{bias['grouped_by']}, so that no group sits on both sides of a split: {bias['images']} images "
          f"({bias['ai']} AI, {bias['human']} {probes.HUMAN}) in {bias['groups']} groups. "
          f"Above {bias['warn_auc']} it warns: a detector can score that much from these statistics.", ""]
    if bias["skipped"]:
        return md + [f"Not run: {bias['skipped']}.", ""]
    md += _table(["features", "what they are", "n features", "ROC AUC (mean ± std over folds)", "images", "warning"],
                 [[probes.FEATURE_GROUPS[k], probes.DESCRIPTIONS[k], p["features"], _fmt_auc(p), bias["images"],
                   "**WARNING**" if p["warning"] else ""] for k, p in bias["probes"].items()]) + [""]
    warned = [k for k, p in bias["probes"].items() if p["warning"]]
    if warned:
        md += [f"**WARNING**: AUC above {bias['warn_auc']} for "
               + ", ".join(probes.FEATURE_GROUPS[k] for k in warned) + ".", ""]
    return md + ([bias["note"] + ".", ""] if bias["note"] else [])


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
    if man["originals"]:
        md += ["What the originals looked like before normalisation (manifest orig_* columns):", ""]
        md += _class_table("original", man["originals"], [c for c in classes if c in man["originals"]],
                           ORIGINAL_ROWS) + [""]
    return md


def write_outputs(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    return [write_json(out / "audit.json", result), write_text(out / "audit.md", to_markdown(result))]
