"""Bias probes: how well do low-level statistics alone tell AI images from human ones?

A probe is a linear classifier (standardisation + logistic regression) that sees
one group of features that say little about content:

* ``dct``: histograms of the absolute 8x8 block-DCT coefficients of the luma
  channel, for 11 AC coefficients (low, mid, and the highest horizontal and
  vertical frequency), in fixed bins: JPEG history, smoothness, resampling.
* ``noise``: noise residual energy: mean absolute value and standard deviation
  of the luma minus its 3x3 median, minus its Gaussian blur (sigma 1 and 2), and
  of the half-scale luma minus its 3x3 median.
* ``original``: what the file was before normalisation, from a manifest (built
  by the caller, see :func:`imageorigin.audit.original_features`).
* ``all``: every group above, side by side.

Its cross-validated ROC AUC for AI (every class but ``human``) against human
says how much a detector could score from those statistics alone, without
looking at what the image shows; above ``WARN_AUC`` the audit warns.  Folds are
grouped (``StratifiedGroupKFold``, 5 folds, seed 0): files that share a group
(a prompt group of the manifest, exact or near duplicates of one image) are
never on both sides of a split.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import fft, ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HUMAN = "human"  # the one class that is not AI
WARN_AUC = 0.75
N_FOLDS = 5
SEED = 0
MIN_GROUPS_PER_SIDE = 10  # independent AI and human groups needed for a meaningful AUC

# (row, column) of the 8x8 DCT coefficients whose histograms the dct probe sees: the first
# AC coefficients, the diagonal up to (3, 3), the middle and the highest of row and column 0.
DCT_COEFFICIENTS = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 2), (3, 3), (0, 4), (4, 0), (0, 7), (7, 0))
# Bin edges for |coefficient| of the orthonormal DCT of 0-255 luma; the last bin is open.
DCT_BIN_EDGES = np.array([0.5, 1.5, 2.5, 4, 6, 10, 16, 25, 40, 64])
NOISE_SIGMAS = (1.0, 2.0)
# Compare-exchanges (i, j) of a sorting network that leaves the median of 9 values at index 4
# (Paeth's 19-exchange network, as in N. Devillard, "Fast median search: an ANSI C implementation").
MEDIAN9_NETWORK = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
                   (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))
MAX_SIDE = 1024  # pixel statistics of a larger image come from its central MAX_SIDE crop

FEATURE_GROUPS = {  # key -> name in reports
    "dct": "8x8 DCT histograms",
    "noise": "noise residual energy",
    "original": "original format / size / coding",
    "all": "all together",
}
DESCRIPTIONS = {
    "dct": f"share of luma 8x8 blocks per |coefficient| bin (edges {', '.join(f'{e:g}' for e in DCT_BIN_EDGES)}) "
           f"for {len(DCT_COEFFICIENTS)} AC coefficients: low, mid and the highest horizontal / vertical",
    "noise": "log mean |r| and log std r of luma minus 3x3 median, minus Gaussian blur sigma "
             + " and ".join(f"{s:g}" for s in NOISE_SIGMAS) + ", and of the half-scale luma minus its 3x3 median",
    "original": "manifest: original format, longer-side band, aspect, coding history (one-hot), "
                "log2 width and height, round-trip quality",
    "all": "every feature above",
}


# ---------------------------------------------------------------- pixel features


def luma(image: Image.Image) -> np.ndarray:
    """Luma (ITU-R 601, as JPEG codes it) as float32 (H, W): central crop of at most
    MAX_SIDE, both sides cut to a multiple of 8."""
    y = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = (min(n, MAX_SIDE) // 8 * 8 for n in y.shape)
    top, left = (y.shape[0] - h) // 2, (y.shape[1] - w) // 2
    return y[top:top + h, left:left + w]


def dct_histograms(y: np.ndarray) -> np.ndarray:
    """Share of blocks in each |coefficient| bin, per coefficient in DCT_COEFFICIENTS: (11 * 11,)."""
    h, w = y.shape
    blocks = y.reshape(h // 8, 8, w // 8, 8) - 128.0  # (rows, 8, cols, 8)
    coef = np.abs(fft.dctn(blocks, axes=(1, 3), norm="ortho"))
    n_bins = len(DCT_BIN_EDGES) + 1
    hists = [np.bincount(np.searchsorted(DCT_BIN_EDGES, coef[:, u, :, v].ravel(), side="right"),
                         minlength=n_bins) for u, v in DCT_COEFFICIENTS]
    return np.concatenate(hists) / (coef.shape[0] * coef.shape[2])


def median3x3(y: np.ndarray) -> np.ndarray:
    """3x3 median filter, edges mirrored: the same values as ``scipy.ndimage.median_filter(y, 3)``,
    5x faster (MEDIAN9_NETWORK over the 9 shifted copies of the image)."""
    h, w = y.shape
    padded = np.pad(y, 1, mode="symmetric")
    v = [padded[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for i, j in MEDIAN9_NETWORK:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    return v[4]


def noise_energy(y: np.ndarray) -> np.ndarray:
    """log(1 + mean |r|) and log(1 + std r) of four residuals r (median, two blurs, median at half scale): (8,)."""
    h, w = y.shape
    half = y.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    residuals = [y - median3x3(y),
                 *(y - ndimage.gaussian_filter(y, sigma) for sigma in NOISE_SIGMAS),
                 half - median3x3(half)]
    return np.log1p([stat for r in residuals for stat in (np.abs(r).mean(), r.std())])


def pixel_features(image: Image.Image) -> dict[str, np.ndarray]:
    """The probes' features of one decoded image: ``{"dct": (121,), "noise": (8,)}``."""
    y = luma(image)
    if min(y.shape) < 8:
        raise ValueError(f"image too small for 8x8 blocks: {image.size}")
    return {"dct": dct_histograms(y), "noise": noise_energy(y)}


# ---------------------------------------------------------------- helpers for the caller


def one_hot(values: Sequence[dict]) -> np.ndarray:
    """Categorical values (one dict per file) as 0/1 columns, one per (key, value) seen."""
    columns = sorted({(k, v) for d in values for k, v in d.items()})
    return np.array([[float(d.get(k) == v) for k, v in columns] for d in values]).reshape(len(values), len(columns))


def connected_groups(n: int, links: Iterable[tuple[int, int]]) -> np.ndarray:
    """Group id per item 0..n-1: items joined by a chain of (i, j) links share one."""
    pairs = np.array(list(links), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


# ---------------------------------------------------------------- the probe


def probe_auc(x: np.ndarray, is_ai: np.ndarray, groups: np.ndarray) -> dict:
    """ROC AUC per fold of standardisation + logistic regression, N_FOLDS grouped folds.

    Folds whose test side holds one class only are left out (they have no AUC).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=SEED)
    aucs = []
    # One BLAS thread: these matrices are small, and threads made each fit 15x slower on 2 busy cores.
    with threadpool_limits(limits=1):
        for train, test in folds.split(x, is_ai, groups):
            if len(set(is_ai[test])) == 2 and len(set(is_ai[train])) == 2:
                model.fit(x[train], is_ai[train])
                aucs.append(float(roc_auc_score(is_ai[test], model.predict_proba(x[test])[:, 1])))
    if not aucs:
        return {"features": x.shape[1], "auc": None, "std": None, "folds": [], "warning": False}
    auc = float(np.mean(aucs))
    return {"features": x.shape[1], "auc": round(auc, 3), "std": round(float(np.std(aucs)), 3),
            "folds": [round(a, 3) for a in aucs], "warning": auc > WARN_AUC}


def run_probes(features: dict[str, np.ndarray], classes: Sequence[str], groups: np.ndarray) -> dict:
    """Cross-validated AI-vs-human AUC of each feature group and of all of them together.

    ``features`` maps a FEATURE_GROUPS key to an (n_files, n_features) array;
    ``classes`` is each file's class, ``groups`` its group id (files sharing one
    stay on one side of every split).  ``skipped`` says why no probe ran, if none did.
    """
    is_ai = np.array([c != HUMAN for c in classes])
    groups = np.asarray(groups)
    n_groups = {side: len(set(groups[is_ai == side])) for side in (True, False)}
    result = {"images": len(classes), "ai": int(is_ai.sum()), "human": int((~is_ai).sum()),
              "groups": len(set(groups)), "folds": N_FOLDS, "seed": SEED, "warn_auc": WARN_AUC,
              "probes": {}, "skipped": None}
    if min(n_groups.values()) < MIN_GROUPS_PER_SIDE:
        result["skipped"] = (f"needs >= {MIN_GROUPS_PER_SIDE} independent groups of AI and of "
                             f"{HUMAN} images, found {n_groups[True]} and {n_groups[False]}")
        return result
    if len(features) > 1:
        features = {**features, "all": np.hstack(list(features.values()))}
    result["probes"] = {key: probe_auc(x, is_ai, groups) for key, x in features.items()}
    return result
