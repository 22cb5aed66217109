"""Plots: what a run and an evaluation show a person (training curves, collage,
confusion matrix, galleries, heatmap overlay, ROC / PR / reliability,
robustness and per-source charts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path  # noqa: E402
from .images import ImageDecodeError, decode_image  # noqa: E402
from .verdict import WORDS  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _thumb(path, size: int = 160):
    try:
        im = decode_image(path)
    except ImageDecodeError:
        return None
    im.thumbnail((size, size))
    return np.asarray(im)


def training_plots(history: list[dict], out_dir: str | os.PathLike) -> None:
    """``loss.png`` and ``accuracy.png``: train and val curves over epochs (the card's plots)."""
    epochs = [h["epoch"] for h in history]
    for key, name in (("loss", "Loss"), ("accuracy", "Accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{name} over epochs")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, Path(out_dir) / f"{key}.png")


def collage(folder, path: str | os.PathLike, per_class: int = 6, seed: int = 0) -> Path:
    """A grid of sample images, one row per class (the card's "Sample Dataset")."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx, name in enumerate(folder.classes):
        files = [p for p, y in folder.samples if y == idx]
        pick = rng.choice(len(files), size=min(per_class, len(files)), replace=False)
        rows.append((name, [files[i] for i in sorted(pick)]))
    fig, axes = plt.subplots(len(rows), per_class, figsize=(1.8 * per_class, 1.9 * len(rows)),
                             squeeze=False)
    for r, (name, files) in enumerate(rows):
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(files):
                thumb = _thumb(files[c])
                if thumb is not None:
                    ax.imshow(thumb)
            if c == 0:
                ax.set_title(name, loc="left", fontsize=10, fontweight="bold")
    fig.suptitle("Sample training images per class")
    return _save(fig, path)


def confusion_plot(cm: Sequence[Sequence[int]], labels: Sequence[str], path, title: str = "") -> Path:
    """Confusion matrix heat map, rows = true class, columns = predicted class."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title or "Confusion matrix")
    return _save(fig, path)


def _tiles(tiles: list[tuple], path, title: str, cols: int = 4) -> Path:
    """A grid of thumbnails: ``tiles`` are (image path or PIL image, caption, colour)."""
    rows = max(1, int(np.ceil(len(tiles) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.9 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption, colour) in zip(axes.flat, tiles):
        thumb = _thumb(image)
        if thumb is not None:
            ax.imshow(thumb)
        ax.set_title(caption, fontsize=8, color=colour)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def gallery(model, paths, y_true: np.ndarray, probs: np.ndarray, path, per_class: int = 4,
            seed: int = 0) -> Path:
    """Sample predictions on labelled images (the card's "Model Output Samples"):
    ``per_class`` images drawn at random from each true class, right or wrong
    alike, so the share of red tiles is the sample's error rate."""
    rng = np.random.default_rng(seed)
    y_pred = probs.argmax(1)
    tiles, hits = [], 0
    for c in range(len(model.labels)):
        idx = np.flatnonzero(y_true == c)
        for i in rng.permutation(idx)[:per_class]:
            hit = y_pred[i] == c
            hits += hit
            tiles.append((paths[i], f"true: {model.labels[c]}\nsaid: {model.labels[y_pred[i]]}, "
                          f"p = {probs[i, y_pred[i]]:.2f}", "green" if hit else "red"))
    return _tiles(tiles, path, f"{per_class} random images per true class: {hits} of {len(tiles)} right "
                  "(green right, red wrong; p = the model's probability of what it said)", per_class)


def prediction_gallery(preds, path, per_row: int = 4) -> Path:
    """Thumbnails of predicted images with their verdict and p_ai (``predict --gallery``)."""
    colour = {"likely_ai": "red", "likely_human": "green"}
    tiles = []
    for p in preds:
        if p.error:
            continue
        name = Path(p.path).name
        name = name if len(name) <= 28 else name[:25] + "..."
        words = WORDS.get(p.verdict, p.label)
        score = f"p_ai = {p.p_ai:.2f}" if p.p_ai is not None else f"p = {max(p.probs.values()):.2f}"
        tiles.append((p.path, f"{name}\n{words}, {score}" + (" (caveat)" if p.caveats else ""),
                      colour.get(p.verdict, "darkorange")))
    return _tiles(tiles, path, "Verdicts (red likely AI, orange uncertain, green likely human; "
                  "p_ai = probability of AI)", per_row)


def overlay(image_path, prediction, path) -> Path:
    """The image with its patch map drawn over it: each scored crop tinted from
    green (p_ai 0) to red (p_ai 1), its p_ai written in it where the crops are
    few enough to read; a flat crop, which does not vote, only outlined in grey.
    The verdict is the title."""
    image = decode_image(image_path)
    fig, ax = plt.subplots(figsize=(7, 7 * image.height / max(image.width, 1) + 0.6), layout="constrained")
    ax.imshow(np.asarray(image))
    patches = prediction.patches
    numbered = len(patches) <= 36  # beyond 6 x 6 the numbers cover the picture
    for patch in patches:
        x, y, w, h = patch["box"]
        if patch.get("weight", 1) == 0:
            ax.add_patch(matplotlib.patches.Rectangle((x, y), w, h, fill=False, edgecolor="0.6",
                                                      linewidth=0.8, linestyle=":"))
            continue
        colour = (patch["p_ai"], 1 - patch["p_ai"], 0.15)
        ax.add_patch(matplotlib.patches.Rectangle((x, y), w, h, facecolor=(*colour, 0.35),
                                                  edgecolor=colour, linewidth=1.5 if numbered else 0.6))
        if numbered:
            ax.text(x + w / 2, y + h / 2, f"{patch['p_ai']:.2f}", ha="center", va="center", fontsize=8,
                    color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    ax.axis("off")
    flat = sum(p.get("weight", 1) == 0 for p in patches)
    ax.set_title(f"{Path(str(image_path)).name}: {WORDS.get(prediction.verdict, prediction.label)}, "
                 f"p_ai {prediction.p_ai:.2f}\n{len(patches)} crops, each tinted by its own p_ai "
                 f"(green 0, red 1)" + (f"; {flat} flat, dotted grey, do not vote" if flat else ""),
                 fontsize=9)
    return _save(fig, path)


def setting_name(row: dict) -> str:
    """A robustness row's setting as a person reads it: "JPEG q30", "downscale 1/4", "blur σ=2",
    "sharpen 200%"."""
    name, param = row["perturbation"], row["param"]
    if name == "jpeg":
        return f"JPEG q{param}"
    if name == "downscale":
        return f"downscale 1/{round(1 / param)}"
    if name == "blur":
        return f"blur σ={param:g}"
    if name == "sharpen":
        return f"sharpen {round(100 * param)}%"
    return name


def roc_plot(result: dict, path) -> Path:
    """ROC curve of p_ai (AI vs human), full and zoomed on low FPR, with the TPR at
    1% / 5% FPR and the stored threshold's operating point marked."""
    roc = result["curves"]["roc"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, xmax in zip(axes, (1.0, 0.1)):
        ax.plot(roc["fpr"], roc["tpr"], "-", lw=2, label=f"p_ai (AUC {result['ai_vs_human_auc']:.3f})")
        ax.plot([0, xmax], [0, xmax], ":", color="grey", label="chance")
        for f, tpr in result["tpr_at_fpr"].items():
            ax.plot(float(f), tpr, "o", ms=8, label=f"TPR {tpr:.3f} at FPR {float(f):.0%}")
        if result.get("human_flagged_rate") is not None and result.get("ai_detected_rate") is not None:
            ax.plot(result["human_flagged_rate"], result["ai_detected_rate"], "*", ms=15, color="red",
                    label=f"stored threshold {result['threshold']:.3g} "
                          f"(FPR {result['human_flagged_rate']:.3f}, TPR {result['ai_detected_rate']:.3f})")
        ax.set_xlim(-0.01 * xmax, xmax)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false-positive rate (human images flagged as AI)")
        ax.set_ylabel("true-positive rate (AI images flagged)")
        ax.grid(alpha=0.3)
    axes[0].set_title("ROC: AI-generated vs human-created")
    axes[1].set_title("Zoom: FPR up to 10%")
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_plot(result: dict, path) -> Path:
    """Precision-recall curve of p_ai for "AI-generated", with the prevalence baseline."""
    pr = result["curves"]["pr"]
    # The curve's first point flags every image: its precision is the share of
    # AI images, what flagging at random achieves.
    ai_share = pr["precision"][0]
    fig, ax = plt.subplots(figsize=(6, 4.8))
    ax.plot(pr["recall"], pr["precision"], "-", lw=2, label=f"p_ai (AP {result['ai_vs_human_ap']:.3f})")
    ax.axhline(ai_share, ls=":", color="grey", label=f"chance (AI share {ai_share:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (AI images flagged)")
    ax.set_ylabel("precision (flagged images that are AI)")
    ax.set_title("Precision-recall: AI-generated vs human-created")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, path)


def reliability_plot(result: dict, path) -> Path:
    """Reliability diagrams (top-label, and p_ai when the model has a human class)
    with the number of images per bin under each."""
    panels = [("top-label confidence", "accuracy", result["reliability"], result["ece"])]
    if result.get("reliability_ai"):
        panels.append(("p_ai", "fraction AI-generated", result["reliability_ai"], result["ece_ai"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for c, (xlabel, ylabel, bins, ece) in enumerate(panels):
        top, bottom = axes[0][c], axes[1][c]
        lo = np.array([b["lo"] for b in bins])
        width = bins[0]["hi"] - bins[0]["lo"]
        full = [b for b in bins if b["count"]]
        left = np.array([b["lo"] for b in full])
        top.bar(left, [b["accuracy"] for b in full], width=width, align="edge", edgecolor="black",
                alpha=0.8, label="observed")
        # What the model claimed, drawn as a line across each bin so the observed bar stays whole.
        top.hlines([b["confidence"] for b in full], left, left + width, color="red", lw=2.5,
                   label="mean confidence in the bin")
        top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel(ylabel)
        top.set_title(f"{xlabel}: ECE {ece:.3f}")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(lo, [b["count"] for b in bins], width=width, align="edge", edgecolor="black",
                   color="grey")
        bottom.set_xlabel(xlabel)
        bottom.set_ylabel("images")
    fig.suptitle(f"Reliability ({len(bins)} equal-width bins)")
    return _save(fig, path)


def robustness_plot(rows: list[dict], path, n_classes: int = 3) -> Path:
    """Accuracy, AI-vs-human AUC and human images flagged under each perturbation,
    as grouped bars (the perturbations are separate cases, not a sequence)."""
    names = [setting_name(r) for r in rows]
    x = np.arange(len(rows))
    series = [("accuracy", f"{n_classes}-class accuracy"), ("ai_vs_human_auc", "AI-vs-human AUC")]
    if any(r.get("human_flagged_rate") is not None for r in rows):
        series.append(("human_flagged_rate", "human images flagged (stored threshold)"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows) + 2), 4.8))
    for k, (key, label) in enumerate(series):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=label)
        if not np.isnan(vals[0]):
            ax.axhline(vals[0], ls=":", color=bars.patches[0].get_facecolor(), alpha=0.9)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("value (dotted: on the clean images)")
    ax.set_title("Robustness: figures on perturbed copies of the images", pad=30)
    ax.grid(axis="y", alpha=0.3)
    # Above the plot: inside it, the legend would cover the bars.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), fontsize=8, frameon=False)
    return _save(fig, path)


def per_source_plot(per_source: dict, path, n_classes: int = 3) -> Path:
    """Per source: n-class accuracy (left), and the AUC of its AI images against
    all human images (right), each with its own chance level."""
    names = list(per_source)
    y = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.42 * len(names) + 1.8), sharey=True,
                                      layout="constrained")
    left.barh(y, [per_source[n]["accuracy"] for n in names], color="tab:blue")
    left.axvline(1 / n_classes, ls=":", color="grey", label=f"chance (1/{n_classes})")
    left.set_title(f"{n_classes}-class accuracy")
    right.barh(y, [np.nan if per_source[n]["auc_vs_all_human"] is None else per_source[n]["auc_vs_all_human"]
                   for n in names], color="tab:orange")
    right.axvline(0.5, ls=":", color="grey", label="chance (0.5)")
    right.set_title("AUC of its AI images vs all human images")
    left.set_yticks(y, [f"{n} ({per_source[n]['label']}, n={per_source[n]['n']})" for n in names], fontsize=8)
    left.invert_yaxis()
    for ax in (left, right):
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Per source (human sources have no AUC of their own)")
    return _save(fig, path)
