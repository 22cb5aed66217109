"""Metrics over a labelled folder, computed from the one inference function."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from . import report
from .data import LabelledFolder, scan_folder
from .fileio import atomic_path, write_json
from .model import Classifier
from .predict import predict


def evaluate(
    model: Classifier,
    data: str | os.PathLike | LabelledFolder,
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` on a folder with one sub-folder per class (named as its labels).

    Returns the metrics dict: ``accuracy``, ``loss`` (mean cross-entropy),
    ``labels``, ``confusion_matrix`` (rows = true class, in ``labels`` order),
    ``per_class`` (precision, recall, f1, support), ``n_images``,
    ``ai_vs_human_auc`` (ROC AUC of p_ai against "not human"; None when the
    model or the data has no human class or only one kind), and ``errors``
    (files that could not be read; they are left out of every figure).

    With ``out_dir``: writes ``metrics.json``, ``predictions.csv``,
    ``confusion_matrix.png`` and ``gallery.png`` there.
    """
    folder = data if isinstance(data, LabelledFolder) else scan_folder(data, classes=model.labels)
    paths = [p for p, _ in folder.samples]
    truth = [y for _, y in folder.samples]
    preds = list(predict(model, paths, batch_size=batch_size, num_workers=num_workers,
                         progress=progress))
    ok = [i for i, p in enumerate(preds) if p.error is None]
    if not ok:
        raise ValueError(f"{folder.root}: none of the {len(preds)} images could be read")
    labels = model.labels
    k = len(labels)
    y = np.array([truth[i] for i in ok])  # (N,)
    probs = np.array([[preds[i].probs[l] for l in labels] for i in ok], dtype=np.float64)  # (N, C)
    probs /= probs.sum(1, keepdims=True)  # float32 softmax sums to 1 only within ~1e-7
    y_pred = probs.argmax(1)

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, y_pred, labels=range(k), zero_division=0
    )
    result = {
        "accuracy": float(skm.accuracy_score(y, y_pred)),
        "loss": float(skm.log_loss(y, probs, labels=range(k))),
        "labels": labels,
        "confusion_matrix": skm.confusion_matrix(y, y_pred, labels=range(k)).tolist(),
        "per_class": {
            l: {"precision": float(precision[j]), "recall": float(recall[j]),
                "f1": float(f1[j]), "support": int(support[j])}
            for j, l in enumerate(labels)
        },
        "n_images": len(ok),
        "ai_vs_human_auc": _ai_auc(model, y, [preds[i].p_ai for i in ok]),
        "data_dir": str(folder.root),
        "errors": [preds[i].error for i in range(len(preds)) if preds[i].error is not None],
    }
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "metrics.json", result)
        with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, ["true_label"] + list(preds[0].row(labels)))
            writer.writeheader()
            for i, p in enumerate(preds):
                writer.writerow({"true_label": labels[truth[i]], **p.row(labels)})
        report.confusion_plot(result["confusion_matrix"], labels, out / "confusion_matrix.png",
                              title=f"accuracy {result['accuracy']:.3f} on {len(ok)} images")
        report.gallery(model, [paths[i] for i in ok], y, probs, out / "gallery.png")
    return result


def _ai_auc(model: Classifier, y: np.ndarray, p_ai: list) -> float | None:
    """ROC AUC of p_ai = 1 - p_human against the truth "not human"."""
    h = model.human_index
    if h is None:
        return None
    is_ai = y != h
    if is_ai.all() or not is_ai.any():
        return None
    return float(skm.roc_auc_score(is_ai, p_ai))
