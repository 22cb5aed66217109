"""What each file of an audited folder is: format, size, JPEG quality, colour mode,
metadata (and whether it names a generator), perceptual hashes, and the
categorical value of each attribute that :mod:`imageorigin.audit_checks` compares
across classes.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

from . import probes
from .images import ImageDecodeError, decode_image

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
