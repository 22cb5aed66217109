"""The verdict a person reads: a band, and caveats where the model is unreliable.

A p_ai alone misleads: 0.80 on a photograph and 0.80 on a screenshot of a
chat are not the same evidence.  So every prediction carries

- ``verdict``: one of :data:`BANDS`.  "likely_ai" at or above the stored
  threshold (the calibration split's 1% false-flag cut for the default),
  "likely_human" at or below a lower cut chosen on the same calibration data
  (at most 5% of its AI images fall below it), "uncertain" between them;
- ``caveats``: plain sentences naming what makes this image out of the model's
  scope (:func:`image_caveats`).  An image with a caveat is never called
  "likely_ai" or "likely_human": its band becomes "uncertain".

The cut-points travel in the checkpoint (``bands``), so the CLI, the service
and every other caller give the same verdict.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BANDS = ("likely_ai", "uncertain", "likely_human")
WORDS = {"likely_ai": "likely AI", "uncertain": "uncertain", "likely_human": "likely human"}
AI_MISSED = 0.05  # share of calibration AI images the "likely human" band may hold
# The least width of the "uncertain" band, in logits of p_ai below the threshold:
# where the calibration AI images all lie above the threshold (a tiny calibration
# split) the fitted band would be empty, one point where "likely human" meets
# "likely AI"; no calibration split is good enough to say that.
MIN_UNCERTAIN_LOGITS = 1.0

# Screenshot / flat-graphics detector (see :func:`image_stats`).  Tuned on the
# `tuning` screenshots of benchmarks/screenshots.py and dh3 *train* images,
# measured on the unrelated `testing` screenshots and dh3 *val*
# (benchmarks/caveats.py, docs/caveats.md).
FLAT_SHARE = 0.45  # share of pixels in exactly flat 8x8 blocks
# Blur / upscale detector: detail at 1 px against detail at 4 px; a photo,
# drawing or render keeps fine detail, a blurred or upscaled image loses it.
FINE_DETAIL = 0.29
# The statistics look at most this much of the centre (cost: they run for every image).
FLAT_SIDE = 1024
DETAIL_SIDE = 512


def fit_bands(p_ai: np.ndarray, is_human: np.ndarray, threshold: float,
              ai_missed: float = AI_MISSED) -> dict:
    """The verdict cut-points from held-out calibration scores.

    p_ai: (N,) scores; is_human: (N,) bool.  "likely_ai" from ``threshold`` up;
    "likely_human" at or below the highest cut that leaves at most ``ai_missed``
    of the AI images in that band, and at least :data:`MIN_UNCERTAIN_LOGITS`
    below the threshold: ``widened`` is True where that rule, not the data, set it.
    """
    ai = np.sort(np.asarray(p_ai, dtype=np.float64)[~np.asarray(is_human, bool)])
    if len(ai) == 0:
        raise ValueError("choosing verdict bands needs held-out AI images")
    allowed = int(np.floor(ai_missed * len(ai)))  # AI images "likely human" may hold
    cut = float(np.nextafter(ai[0], -np.inf)) if allowed == 0 else float((ai[allowed - 1] + ai[allowed]) / 2)
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    widest = float(1 / (1 + np.exp(MIN_UNCERTAIN_LOGITS - np.log(t / (1 - t)))))  # threshold's logit - 1
    return {"likely_ai": float(threshold), "likely_human": min(cut, widest),
            "ai_missed": ai_missed, "widened": cut > widest}


def band(p_ai: float | None, bands: dict | None, threshold: float | None, caveats: list[str]) -> str | None:
    """The band of one score; None without a score or a threshold.  ``threshold``
    (the stored one, or the user's override) is where "likely_ai" starts."""
    if p_ai is None or threshold is None:
        return None
    if caveats:
        return "uncertain"
    if p_ai >= threshold:
        return "likely_ai"
    low = None if bands is None else bands.get("likely_human")
    if low is None or p_ai <= min(low, threshold):
        return "likely_human"
    return "uncertain"


def image_stats(image: Image.Image) -> dict:
    """Cheap statistics of a decoded image's centre (FLAT_SIDE, DETAIL_SIDE):
    ``flat``, the share of pixels in 8x8 blocks with no variation at all (UI
    panels, documents, flat graphics; photos and renders have almost none), and
    ``fine``, the detail at 1 px against the detail at 4 px (about 1 for fine
    texture, towards 1/4 when blurred or upscaled)."""
    w, h = image.size
    left, top = max(0, (w - FLAT_SIDE) // 2), max(0, (h - FLAT_SIDE) // 2)
    g = np.asarray(image.crop((left, top, left + min(w, FLAT_SIDE), top + min(h, FLAT_SIDE)))
                   .convert("L"), dtype=np.int16)  # (H, W) luma of the centre
    bh, bw = g.shape[0] // 8, g.shape[1] // 8
    if bh == 0 or bw == 0:
        return {"flat": 0.0, "fine": 1.0}
    blocks = g[: bh * 8, : bw * 8].reshape(bh, 8, bw, 8)
    spread = blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3))  # (bh, bw)
    flat = float((spread <= 1).mean())
    top, left = max(0, (g.shape[0] - DETAIL_SIDE) // 2), max(0, (g.shape[1] - DETAIL_SIDE) // 2)
    g = g[top:top + DETAIL_SIDE, left:left + DETAIL_SIDE]
    # Detail at 1 px (neighbour differences) against detail at 4 px: about 1
    # for fine texture and noise, falling towards 1/4 as blur or upscaling
    # smooths the finest scale away.  Flat areas add nothing to either sum.
    near = np.abs(np.diff(g, axis=0)).sum() + np.abs(np.diff(g, axis=1)).sum()
    far = np.abs(g[4:] - g[:-4]).sum() + np.abs(g[:, 4:] - g[:, :-4]).sum()
    return {"flat": flat, "fine": float(near / far) if far > 0 else 1.0}


def least_side(pre: dict) -> int:
    """The shorter side under which an image gets the small-image caveat: a
    native-resolution model's two crops (under that it reads the image through
    a few overlapping tiles, and re-saved human photos of 128-179 px crossed its
    cut 2.7-3.7% of the time, docs/resaved), a resizing model's one crop."""
    return 2 * pre["crop"] if pre.get("resize") is None else pre["crop"]


def image_caveats(image: Image.Image, crop: int, least: int | None = None) -> list[str]:
    """Sentences naming why the model is unreliable on this image (empty if none).

    ``crop``: the model's crop side; smaller images are upscaled to score.
    ``least`` (default ``crop``, see :func:`least_side`): smaller images are too
    little for a verdict.  Each sentence starts with a short tag ("small
    image", "screenshot or flat graphics", "blurred or upscaled") followed by a colon.
    """
    out = []
    w, h = image.size
    if min(w, h) < crop:
        out.append(f"small image: {w}x{h} px is smaller than the model's {crop} px crop, "
                   "so it was upscaled and the pixel traces the model reads are gone")
    elif min(w, h) < (least or crop):
        out.append(f"small image: {w}x{h} px is read through fewer than two of the model's {crop} px "
                   "tiles a side, too little of it for a verdict")
    stats = image_stats(image)
    if stats["flat"] >= FLAT_SHARE:
        out.append(f"screenshot or flat graphics: {stats['flat']:.0%} of it is flat colour (a screen, "
                   "a document, clip art); the model was not made for such images")
    elif stats["fine"] < FINE_DETAIL:
        out.append("blurred or upscaled: the finest detail is missing, and with it the traces the "
                   "model reads")
    return out
