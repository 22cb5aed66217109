"""Plots and the model card: what a run shows a person."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path, write_text  # noqa: E402
from .images import ImageDecodeError, decode_image  # noqa: E402


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


def gallery(model, paths, y_true: np.ndarray, probs: np.ndarray, path, per_class: int = 4,
            seed: int = 0) -> Path:
    """Sample predictions: image, true and predicted label, probability (the card's
    "Model Output Samples").  Per true class, mistakes are shown first, then hits."""
    rng = np.random.default_rng(seed)
    y_pred = probs.argmax(1)
    chosen = []
    for c in range(len(model.labels)):
        idx = np.flatnonzero(y_true == c)
        rng.shuffle(idx)
        wrong = [i for i in idx if y_pred[i] != c][: per_class // 2]
        right = [i for i in idx if y_pred[i] == c][: per_class - len(wrong)]
        chosen.extend(wrong + right)
    cols = per_class
    rows = max(1, int(np.ceil(len(chosen) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        thumb = _thumb(paths[i])
        if thumb is not None:
            ax.imshow(thumb)
        hit = y_pred[i] == y_true[i]
        ax.set_title(
            f"true: {model.labels[y_true[i]]}\npred: {model.labels[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})",
            fontsize=8, color="green" if hit else "red",
        )
    fig.suptitle("Sample predictions (red = wrong)")
    return _save(fig, path)


def write_model_card(model, path: str | os.PathLike, evaluation: dict | None = None) -> Path:
    """A MODEL_CARD.md in the seed card's structure, filled with this run's own figures."""
    info = model.info
    t = info.get("training", {})
    m = info.get("metrics", {})
    names = [model.display_names[l] for l in model.labels]
    counts = lambda c: ", ".join(f"{k} {v}" for k, v in (c or {}).items())  # noqa: E731
    per_class = ""
    if evaluation:
        per_class = "\n".join(
            f"| {model.display_names[l]} | {v['precision']:.3f} | {v['recall']:.3f} | "
            f"{v['f1']:.3f} | {v['support']} |"
            for l, v in evaluation["per_class"].items()
        )
        per_class = ("\n| class | precision | recall | f1 | images |\n|---|---|---|---|---|\n"
                     + per_class + "\n")
        auc = evaluation.get("ai_vs_human_auc")
        if auc is not None:
            per_class += f"\n- **AI-vs-human ROC AUC** (p_ai = 1 - p_human): **{auc:.3f}**\n"
    lines = [
        "---",
        "language: en",
        "license: mit",
        "tags:\n- image-classification\n- " + model.backbone.name + "\n- ai-generated-content\n"
        "- human-created-content\n- model-card",
        "---",
        f"# **Fine-tuned {model.backbone.name} for Image Classification**",
        "## **Model Overview**",
        f"This fine-tuned **{model.backbone.name}** model classifies images into the following "
        "categories:",
        *[f"{i + 1}. **{n}**" for i, n in enumerate(names)],
        "",
        "Produced by `imageorigin train`; every figure below was measured by that run.",
        "---",
        "## **Use Cases**",
        "- **AI Art Detection**: whether an image was generated by AI or created by a human.",
        "- **Content Moderation**: triage of images at scale (read the limitations first).",
        "- **Educational Purposes**: exploring how AI and human images differ.",
        "---",
        "## **Model Performance**",
        f"- **Accuracy**: **{m.get('val_accuracy', float('nan')):.1%}** on the validation data "
        f"({counts(t.get('val_counts'))}).",
        f"- **Loss**: **{m.get('val_loss', float('nan')):.4f}** validation, "
        f"{m.get('train_loss', float('nan')):.4f} training, after {m.get('epochs')} epochs.",
        per_class,
        "---",
        "## **Training Details**",
        f"- **Base Model**: {model.backbone.name}, pretrained on ImageNet "
        f"(weights: {model.describe()['backbone']['source'] if t.get('weights') == 'imagenet' else t.get('weights')}).",
        f"- **Optimizer**: Adam with a learning rate of {t.get('lr')}.",
        "- **Loss Function**: Cross-Entropy Loss.",
        f"- **Batch Size**: {t.get('batch_size')}",
        f"- **Epochs**: {t.get('epochs')}",
        f"- **Augmentation**: horizontal flip {'on' if t.get('flip') else 'off'}, rotation "
        f"±{t.get('rotation')}°, colour jitter {t.get('color_jitter')}.",
        f"- **Preprocessing**: resize shorter side to {model.preprocessing['resize']}, centre crop "
        f"{model.preprocessing['crop']}, ImageNet mean {model.preprocessing['mean']} / std "
        f"{model.preprocessing['std']}.",
        f"- **Training data**: `{t.get('data_dir')}` ({counts(t.get('train_counts'))}).",
        f"- **Validation data**: `{t.get('val_dir')}` ({counts(t.get('val_counts'))})." if t.get("val_dir")
        else f"- **Validation data**: {t.get('val_split')} of the training folder.",
        f"- **Wall-clock training time**: {t.get('wall_seconds')} s on {t.get('machine')}.",
        "---",
        "## **Training Metrics**",
        "### **1. Loss Over Epochs**",
        "![Loss Over Epochs](loss.png)",
        "### **2. Accuracy Over Epochs**",
        "![Accuracy Over Epochs](accuracy.png)",
        "---",
        "## **Sample Dataset**",
        "![Sample Dataset](collage.png)",
        "One row per class, drawn from the training data.",
        "---",
        "## **Model Output Samples**",
        "![Model Output Samples](val/gallery.png)",
        "Predictions on validation images; red titles are mistakes.",
        "",
        "![Confusion matrix](val/confusion_matrix.png)",
        "---",
        "## **Model Architecture**",
        f"- **Feature Extractor**: {model.backbone.name} with frozen layers (kept in eval mode, so "
        f"BatchNorm statistics do not drift), {model.backbone.dim} pooled features.",
        f"- **Classifier**: a fully connected layer with {len(model.labels)} output nodes, one per "
        f"class ({', '.join(names)}).",
        "---",
        "## **Limitations**",
        "- **Validation is not the world**: accuracy on data from the same sources as training "
        "says little about images from generators or sources the model never saw.",
        "- **Content and style bias**: in the DH3 bench most human images are photographs, clip "
        "art or game paintings and most AI images are art-style renders; a frozen ImageNet "
        "backbone reads content and style, so the model may learn those instead of traces of "
        "generation.",
        "- **No threshold tuning, no calibration**: the label is the arg-max class; probabilities "
        "are not calibrated.",
        "---",
        "## **Model Download**",
        "`model.safetensors` in this folder: an imageorigin checkpoint (safetensors + JSON "
        "metadata: labels, preprocessing, settings, metrics). Load it with "
        "`imageorigin.load(path)` or `imageorigin predict --model model.safetensors`.",
        "---",
        "## **References**",
        "- [Densely Connected Convolutional Networks (DenseNet)](https://arxiv.org/abs/1608.06993)",
        "- [MobileNetV2: Inverted Residuals and Linear Bottlenecks](https://arxiv.org/abs/1801.04381)",
        "",
    ]
    # Blank lines around the rules after the front matter (its first 5 lines): a
    # "---" right under text would turn that text into a heading.
    body = ["\n---\n" if line == "---" else line for line in lines[5:]]
    return write_text(path, "\n".join(lines[:5] + body))
