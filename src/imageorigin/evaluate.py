"""Metrics over a labelled folder, computed from the one inference function.

Everything a moderator asks of a detector: accuracy per class and per source,
threshold-free ranking figures of p_ai (ROC AUC, average precision, TPR at a
fixed false-positive rate on human images), the rates at the model's stored
threshold, calibration (ECE, reliability bins), and how the figures hold up
when images are re-compressed, shrunk or blurred.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter
from sklearn import metrics as skm
from tqdm import tqdm

from . import report
from .data import LabelledFolder, manifest_name, match_manifest, read_manifest, scan_folders
from .fileio import atomic_path, write_json
from .images import decode_image
from .model import Classifier
from .predict import predict
from .verdict import BANDS

log = logging.getLogger(__name__)

# False-positive rates on human images at which the TPR on AI images is reported.
FPR_TARGETS = (0.01, 0.05)
# Equal-width confidence bins for ECE and the reliability diagram (the usual 15).
N_BINS = 15
# The source of files a manifest does not list.
UNKNOWN_SOURCE = "unknown"


# ---------------------------------------------------------------- perturbations


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return decode_image(buf.getvalue(), name=f"<jpeg q{quality}>")


def _downscale(image: Image.Image, factor: float) -> Image.Image:
    # Left small: the model's own preprocessing resizes it back up, as it
    # would a small image found on the web.
    w, h = image.size
    return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)


def _blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


def _sharpen(image: Image.Image, amount: float) -> Image.Image:
    # A phone camera's or an editor's unsharp mask: radius 2 px, ``amount`` x 100%
    # of the edge contrast added, edges under 3 levels left alone.
    return image.filter(ImageFilter.UnsharpMask(radius=2, percent=round(100 * amount), threshold=3))


# name -> function(decoded RGB image, parameter) -> perturbed RGB image
PERTURBATIONS = {"jpeg": _jpeg, "downscale": _downscale, "blur": _blur, "sharpen": _sharpen}

def _webp(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=quality)
    return decode_image(buf.getvalue(), name=f"<webp q{quality}>")


def _long_side(image: Image.Image, side: int) -> Image.Image:
    # Shrunk (never enlarged) so that the longer side is `side`, as a phone's share sheet does.
    return _downscale(image, min(1.0, side / max(image.size)))


def _centre_crop(image: Image.Image, share: float) -> Image.Image:
    w, h = image.size
    cw, ch = round(w * share), round(h * share)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


# What happens to a photo on its way to an upload: name -> function(decoded RGB
# image) -> the re-saved image.  Training sets its cut so that these do not flag
# the calibration humans (train._resave_cut); benchmarks/resaved.py measures them.
RESAVES = {
    "original": lambda im: im,
    "JPEG q95": lambda im: _jpeg(im, 95),
    "JPEG q85": lambda im: _jpeg(im, 85),
    "JPEG q70": lambda im: _jpeg(im, 70),
    "JPEG q50": lambda im: _jpeg(im, 50),
    "JPEG q85 then q70 (saved twice)": lambda im: _jpeg(_jpeg(im, 85), 70),
    "JPEG q70 then q50 (saved twice)": lambda im: _jpeg(_jpeg(im, 70), 50),
    "downscale 1/2, JPEG q80": lambda im: _jpeg(_downscale(im, 0.5), 80),
    "downscale 1/3, JPEG q80": lambda im: _jpeg(_downscale(im, 1 / 3), 80),
    "downscale 1/4, JPEG q80": lambda im: _jpeg(_downscale(im, 0.25), 80),
    "long side 1080 px, JPEG q75 (a phone's share)": lambda im: _jpeg(_long_side(im, 1080), 75),
    "sharpen 150%, JPEG q90 (a phone camera)": lambda im: _jpeg(_sharpen(im, 1.5), 90),
    "WebP q80": lambda im: _webp(im, 80),
    "centre crop 70%, JPEG q90": lambda im: _jpeg(_centre_crop(im, 0.7), 90),
}

# The robustness sweep, in report order: (perturbation, parameter).
SWEEP = [
    ("jpeg", 90), ("jpeg", 70), ("jpeg", 50), ("jpeg", 30),
    ("downscale", 0.5), ("downscale", 0.25),
    ("blur", 1), ("blur", 2),
    ("sharpen", 1), ("sharpen", 2),
]


# ---------------------------------------------------------------- evaluate


def evaluate(
    model: Classifier,
    data: str | os.PathLike | LabelledFolder,
    out_dir: str | os.PathLike | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    robustness: bool = True,
    samples: bool = True,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
    engine: str = "auto",
    precision: str | None = None,
) -> dict:
    """Evaluate ``model`` on a folder (or several) with one sub-folder per class (named as its labels).

    ``engine`` and ``precision`` choose how the forward pass runs (see :func:`predict`).
    ``samples=False`` draws no gallery of the images (for reports published
    where the images may not be copied).

    Returns the metrics dict: ``accuracy``, ``loss`` (mean cross-entropy),
    ``labels``, ``confusion_matrix`` (rows = true class, in ``labels`` order),
    ``per_class`` (precision, recall, f1, support), ``n_images``,
    ``ai_vs_human_auc`` (ROC AUC of p_ai against "not human"; None when the
    model or the data has no human class or only one kind), and ``errors``
    (files that could not be read; they are left out of every figure).  Also:

    - ``ai_vs_human_ap`` (average precision of p_ai) and ``tpr_at_fpr``
      (``{"0.01": .., "0.05": ..}``: TPR on AI images at the p_ai cut that
      keeps the FPR on human images at or under that rate, read off this
      data's ROC curve: a ranking figure, not a deployable operating point);
      ``curves`` (the ROC and precision-recall curves).
    - ``threshold`` (the model's stored threshold on p_ai, or None) and at it
      ``human_flagged_rate`` (FPR on human images) and ``ai_detected_rate`` (TPR).
    - ``ece`` (top-label expected calibration error, 15 equal-width bins) with
      its ``reliability`` bins (confidence, accuracy, count), and ``ece_ai`` /
      ``reliability_ai`` for p_ai as the probability of "AI-generated".
    - with ``manifest`` (a CSV with ``path`` and ``source`` columns):
      ``per_source`` (see :func:`per_source`) and ``mean_auc_vs_human``, the
      mean of the AI sources' AUC against all human images.
    - ``by_size``: the same figures per size of image (see :func:`by_size`), where
      the images come in more than one size.
    - with ``robustness``: ``robustness``, one row per setting of :data:`SWEEP`
      after a ``clean`` row (see :func:`robustness_sweep`); 10 more passes over the data.

    With ``out_dir``: writes ``metrics.json``, ``predictions.csv``,
    ``report.md`` and its plots (``confusion_matrix.png``, ``gallery.png``,
    ``roc.png``, ``pr.png``, ``reliability.png``, ``robustness.png``,
    ``per_source.png``) there.
    """
    folder = data if isinstance(data, LabelledFolder) else scan_folders(data, classes=model.labels)
    paths = [p for p, _ in folder.samples]
    truth = [y for _, y in folder.samples]
    run = {"engine": engine, "precision": precision}
    preds = list(predict(model, paths, batch_size=batch_size, num_workers=num_workers,
                         progress=progress, **run))
    ok = [i for i, p in enumerate(preds) if p.error is None]
    if not ok:
        raise ValueError(f"{folder.root}: none of the {len(preds)} images could be read")
    labels = model.labels
    k = len(labels)
    y = np.array([truth[i] for i in ok])  # (N,)
    probs = np.array([[preds[i].probs[l] for l in labels] for i in ok], dtype=np.float64)  # (N, C)
    probs /= probs.sum(1, keepdims=True)  # float32 softmax sums to 1 only within ~1e-7
    y_pred = probs.argmax(1)
    human = model.human_index
    is_ai = None if human is None else y != human  # (N,) truth "AI-generated"
    p_ai = None if human is None else np.array([preds[i].p_ai for i in ok])  # (N,)
    threshold = model.threshold

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, y_pred, labels=range(k), zero_division=0
    )
    clean = figures(y_pred == y, is_ai, p_ai, threshold)
    ranks = ranking(is_ai, p_ai)
    ece, bins = calibration(probs.max(1), y_pred == y)
    ece_ai, bins_ai = (None, None) if p_ai is None else calibration(p_ai, is_ai)
    # Headline figures first, the long lists (bins, curves) last: metrics.json reads top down.
    result = {
        "accuracy": clean["accuracy"],
        "loss": float(skm.log_loss(y, probs, labels=range(k))),
        "labels": labels,
        "n_images": len(ok),
        "ai_vs_human_auc": clean["ai_vs_human_auc"],
        "ai_vs_human_ap": ranks["ai_vs_human_ap"],
        "tpr_at_fpr": ranks["tpr_at_fpr"],
        "threshold": threshold,
        "human_flagged_rate": clean["human_flagged_rate"],
        "ai_detected_rate": clean["ai_detected_rate"],
        "verdicts": None if is_ai is None else _verdicts([preds[i] for i in ok], is_ai),
        "ece": ece,
        "ece_ai": ece_ai,
        "confusion_matrix": skm.confusion_matrix(y, y_pred, labels=range(k)).tolist(),
        "per_class": {
            l: {"precision": float(precision[j]), "recall": float(recall[j]),
                "f1": float(f1[j]), "support": int(support[j])}
            for j, l in enumerate(labels)
        },
        "model": {"backbone": model.describe()["backbone"]["name"], "temperature": model.temperature},
        "data_dir": str(folder.root),
        "errors": [preds[i].error for i in range(len(preds)) if preds[i].error is not None],
    }

    sources = None
    if manifest is not None:
        sources = np.array(sources_from_manifest(manifest, [paths[i] for i in ok]))
        result["manifest"] = manifest_name(manifest)
        result["per_source"] = per_source(sources, y, y_pred, is_ai, p_ai, labels, threshold)
        aucs = [s["auc_vs_all_human"] for name, s in result["per_source"].items()
                if s["auc_vs_all_human"] is not None and name != UNKNOWN_SOURCE]
        result["mean_auc_vs_human"] = float(np.mean(aucs)) if aucs else None
    result["by_size"] = by_size([preds[i].size for i in ok], y, y_pred, is_ai, p_ai, threshold)
    if robustness:
        result["robustness"] = robustness_sweep(
            model, [paths[i] for i in ok], y, y_pred, p_ai, batch_size=batch_size, progress=progress,
            **run)
    result.update(reliability=bins, reliability_ai=bins_ai, curves=ranks["curves"])

    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "metrics.json", result)
        _write_predictions(out / "predictions.csv", preds, truth, labels,
                           None if sources is None else dict(zip(ok, sources)))
        report.confusion_plot(result["confusion_matrix"], labels, out / "confusion_matrix.png",
                              title=f"accuracy {result['accuracy']:.3f} on {len(ok)} images")
        if samples:
            report.gallery(model, [paths[i] for i in ok], y, probs, out / "gallery.png")
        report.write_evaluation_report(result, out, model.display_names)
    return result


# ---------------------------------------------------------------- figures


def figures(correct: np.ndarray, is_ai: np.ndarray | None, p_ai: np.ndarray | None,
            threshold: float | None) -> dict:
    """Accuracy, AI-vs-human ROC AUC and the rates at the stored threshold for a set of images.

    The one definition behind the headline figures, each source and each
    robustness row.  ``correct``: (N,) predicted class == true class;
    ``is_ai``: (N,) the truth "not human"; ``p_ai``: (N,) scores.  The rates
    are None without a threshold, or without images of that kind.
    """
    out = {"accuracy": float(np.mean(correct)), "ai_vs_human_auc": _auc(is_ai, p_ai),
           "human_flagged_rate": None, "ai_detected_rate": None}
    if p_ai is not None and threshold is not None:
        flagged = p_ai >= threshold  # the same rule predict applies for is_ai
        if (~is_ai).any():
            out["human_flagged_rate"] = float(flagged[~is_ai].mean())
        if is_ai.any():
            out["ai_detected_rate"] = float(flagged[is_ai].mean())
    return out


def _auc(is_ai: np.ndarray | None, p_ai: np.ndarray | None) -> float | None:
    """ROC AUC of p_ai against the truth "not human"; None where it is not defined."""
    if not _both_kinds(is_ai, p_ai):
        return None
    return float(skm.roc_auc_score(is_ai, p_ai))


def _both_kinds(is_ai: np.ndarray | None, p_ai: np.ndarray | None) -> bool:
    # Ranking figures need scores and at least one AI and one human image.
    return is_ai is not None and p_ai is not None and bool(is_ai.any()) and not is_ai.all()


def ranking(is_ai: np.ndarray | None, p_ai: np.ndarray | None) -> dict:
    """Threshold-free figures of p_ai: ``ai_vs_human_ap``, ``tpr_at_fpr`` and ``curves``.

    ``tpr_at_fpr[f]`` is the highest TPR on AI images among the cuts of this
    data's ROC curve whose FPR on human images is at most ``f``.  The cut is
    found on the evaluated data itself, so it ranks the score; the operating
    point to act on is the stored threshold's.  All None when the data lacks
    one of the two kinds.
    """
    if not _both_kinds(is_ai, p_ai):
        return {"ai_vs_human_ap": None, "tpr_at_fpr": None, "curves": None}
    fpr, tpr, roc_cut = skm.roc_curve(is_ai, p_ai)
    precision, recall, pr_cut = skm.precision_recall_curve(is_ai, p_ai)
    return {
        "ai_vs_human_ap": float(skm.average_precision_score(is_ai, p_ai)),
        # fpr[0] == 0, so every target has at least one cut
        "tpr_at_fpr": {str(f): float(tpr[fpr <= f].max()) for f in FPR_TARGETS},
        "curves": {
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "p_ai_cut": _finite(roc_cut)},
            "pr": {"precision": precision.tolist(), "recall": recall.tolist(),
                   "p_ai_cut": _finite(pr_cut)},
        },
    }


def _finite(a: np.ndarray) -> list:
    # roc_curve's first cut is +inf ("flag nothing"); JSON has no infinity.
    return [float(v) if np.isfinite(v) else None for v in a]


def calibration(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = N_BINS
                ) -> tuple[float, list[dict]]:
    """Expected calibration error and reliability bins over equal-width bins of [0, 1].

    ``confidence``: (N,) predicted probability of an event; ``outcome``: (N,)
    whether it happened.  For the top-label ECE these are the highest class
    probability and "the arg-max class is right"; for p_ai, p_ai and "is AI".
    Bin b holds confidences in (b/n, (b+1)/n] (0 goes to the first); each bin
    gives ``lo``, ``hi``, ``confidence`` (mean), ``accuracy`` (observed
    frequency; None when empty) and ``count``.  ECE = sum over bins of
    count / N * |accuracy - confidence|.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    b = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for j in range(n_bins):
        m = b == j
        n = int(m.sum())
        conf = float(confidence[m].mean()) if n else None
        acc = float(outcome[m].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        bins.append({"lo": j / n_bins, "hi": (j + 1) / n_bins, "confidence": conf,
                     "accuracy": acc, "count": n})
    return float(ece), bins


# ---------------------------------------------------------------- per source


def sources_from_manifest(manifest: str | os.PathLike, files: Sequence[str | os.PathLike]) -> list[str]:
    """The ``source`` of each file, from a manifest CSV with ``path`` and ``source`` columns.

    Files are matched by :func:`imageorigin.data.match_manifest`; files that
    match no row get "unknown".
    """
    rows = match_manifest(files, read_manifest(manifest, ("path", "source")))
    out = [UNKNOWN_SOURCE if row is None else row["source"] for row in rows]
    if out and all(s == UNKNOWN_SOURCE for s in out):
        log.warning("%s: none of the %d files is in the manifest", manifest, len(out))
    return out


def per_source(sources: np.ndarray, y: np.ndarray, y_pred: np.ndarray, is_ai: np.ndarray | None,
               p_ai: np.ndarray | None, labels: Sequence[str], threshold: float | None) -> dict:
    """Figures per source: {source: {n, label, accuracy, ai_vs_human_auc, auc_vs_all_human,
    mean_p_ai, flagged_rate}}, grouped by class, "unknown" last.

    Most sources hold one class only, where an AUC within the source is not
    defined (``ai_vs_human_auc`` None); ``auc_vs_all_human`` ranks a source's
    AI images against every human image in the evaluated set: the
    per-generator figure the field reports (None for human-only sources).
    ``flagged_rate``: fraction of the source's images with p_ai at or over the
    stored threshold (None without one).
    """
    humans = None if is_ai is None else p_ai[~is_ai]
    # Grouped by class (a source's first class in label order), then by name; "unknown" last.
    order = sorted(set(sources.tolist()),
                   key=lambda s: (s == UNKNOWN_SOURCE, y[sources == s].min(), s))
    out = {}
    for name in order:
        m = sources == name
        sub_ai = None if is_ai is None else is_ai[m]
        sub_p = None if p_ai is None else p_ai[m]
        fig = figures(y_pred[m] == y[m], sub_ai, sub_p, threshold)
        vs_human = None
        if sub_ai is not None and sub_ai.any():
            scores = np.concatenate([sub_p[sub_ai], humans])
            vs_human = _auc(np.arange(len(scores)) < sub_ai.sum(), scores)
        out[name] = {
            "n": int(m.sum()),
            "label": "+".join(labels[c] for c in sorted(set(y[m].tolist()))),
            "accuracy": fig["accuracy"],
            "ai_vs_human_auc": fig["ai_vs_human_auc"],
            "auc_vs_all_human": vs_human,
            "mean_p_ai": None if sub_p is None else float(sub_p.mean()),
            "flagged_rate": None if sub_p is None or threshold is None
            else float(np.mean(sub_p >= threshold)),
        }
    return out


# Longer side of an image, in px: the buckets of :func:`by_size`.
SIZE_BUCKETS = ((256, "up to 256 px"), (767, "257-767 px"), (1279, "768-1279 px"), (None, "1280 px and over"))


def by_size(sizes: Sequence[tuple[int, int]], y: np.ndarray, y_pred: np.ndarray, is_ai: np.ndarray | None,
            p_ai: np.ndarray | None, threshold: float | None) -> dict | None:
    """Figures per size of image (its longer side, :data:`SIZE_BUCKETS`): {bucket:
    {n, n_ai, n_human, accuracy, ai_vs_human_auc, human_flagged_rate, ai_detected_rate}};
    None where every image falls in one bucket (the headline says it all)."""
    side = np.array([max(s) for s in sizes])
    bucket = np.array([next(name for top, name in SIZE_BUCKETS if top is None or s <= top) for s in side])
    if len(set(bucket.tolist())) < 2:
        return None
    out = {}
    for _, name in SIZE_BUCKETS:
        m = bucket == name
        if not m.any():
            continue
        sub_ai = None if is_ai is None else is_ai[m]
        fig = figures(y_pred[m] == y[m], sub_ai, None if p_ai is None else p_ai[m], threshold)
        out[name] = {"n": int(m.sum()), "n_ai": None if sub_ai is None else int(sub_ai.sum()),
                     "n_human": None if sub_ai is None else int((~sub_ai).sum()), **fig}
    return out


# ---------------------------------------------------------------- robustness


def robustness_sweep(model: Classifier, paths: Sequence, y: np.ndarray, y_pred: np.ndarray,
                     p_ai: np.ndarray | None, *, batch_size: int = 32,
                     progress: bool = False, **run) -> list[dict]:
    """Figures on the clean images and under every perturbation of :data:`SWEEP`.

    ``paths``: the readable images, with their true classes ``y`` and clean
    predictions ``y_pred`` and ``p_ai``.  Each image is decoded once per chunk
    of ``batch_size`` and perturbed in memory, so memory stays flat whatever
    the folder's size.  Rows: ``perturbation`` ("clean", "jpeg", "downscale",
    "blur"), ``param`` (JPEG quality, scale factor, blur sigma), the
    :func:`figures` of that setting, ``label_changed`` (fraction of images whose
    predicted class differs from the clean one) and ``mean_abs_delta_p_ai``.
    ``run``: ``engine`` / ``precision`` for :func:`predict`.
    """
    human = model.human_index
    is_ai = None if human is None else y != human
    threshold = model.threshold
    probs = {s: [] for s in SWEEP}
    with tqdm(total=len(paths) * len(SWEEP), desc="robustness", unit="img",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            images = [decode_image(p) for p in paths[start:start + batch_size]]
            for name, param in SWEEP:
                items = [PERTURBATIONS[name](im, param) for im in images]
                # One batch of images already in memory per call: nothing to
                # decode ahead.
                for p in predict(model, items, batch_size=batch_size, num_workers=0, **run):
                    probs[(name, param)].append([p.probs[l] for l in model.labels])
                bar.update(len(items))
    rows = [{"perturbation": "clean", "param": None,
             **figures(y_pred == y, is_ai, p_ai, threshold),
             "label_changed": 0.0, "mean_abs_delta_p_ai": 0.0 if p_ai is not None else None}]
    for (name, param), pr in probs.items():
        pr = np.array(pr)  # (N, C)
        pred = pr.argmax(1)
        score = None if human is None else 1.0 - pr[:, human]
        rows.append({
            "perturbation": name, "param": param,
            **figures(pred == y, is_ai, score, threshold),
            "label_changed": float(np.mean(pred != y_pred)),
            "mean_abs_delta_p_ai": None if score is None else float(np.mean(np.abs(score - p_ai))),
        })
    return rows


# ---------------------------------------------------------------- outputs


def _verdicts(preds, is_ai: np.ndarray) -> dict | None:
    """Share of human and of AI images in each verdict band (what a user reads,
    caveats included), e.g. {"human": {"likely_ai": 0.01, ...}, "ai": {...}}."""
    if preds[0].verdict is None:
        return None
    out = {}
    for kind, mask in (("human", ~is_ai), ("ai", is_ai)):
        mine = [p.verdict for p, m in zip(preds, mask) if m]
        if mine:
            out[kind] = {b: mine.count(b) / len(mine) for b in BANDS}
    return out


def _write_predictions(path: Path, preds, truth, labels, sources: dict | None) -> None:
    """predictions.csv: the true label, predict's row, and the source when a manifest is given."""
    columns = ["true_label"] + list(preds[0].row(labels)) + (["source"] if sources else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for i, p in enumerate(preds):
            row = {"true_label": labels[truth[i]], **p.row(labels)}
            if sources:
                row["source"] = sources.get(i, "")
            writer.writerow(row)
