"""Plots and the model card: what a run shows a person."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import describe_preprocessing  # noqa: E402
from .fileio import atomic_path, write_text  # noqa: E402
from .images import ImageDecodeError, decode_image  # noqa: E402
from .verdict import BANDS, WORDS  # noqa: E402


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


# ---------------------------------------------------------------- evaluation report


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


def _resave_words(info: dict) -> str:
    """How the card says the threshold was set against re-saved photos, naming the re-save that set it."""
    cuts = info.get("resave_cuts") or {}
    if len(cuts) < 2:
        return ""
    top = max(cuts, key=cuts.get)
    return (f", as they are and after each of {len(cuts) - 1} everyday re-saves (JPEG, shrinking, "
            f"sharpening, WebP, a crop); the highest of those cuts, set by {top!r}, is the threshold")


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _table(header: Sequence[str], rows: list[Sequence]) -> list[str]:
    """Markdown table lines; a column that is n/a in every row is left out."""
    keep = [j for j in range(len(header)) if any(str(r[j]) != "n/a" for r in rows)]
    return (["| " + " | ".join(header[j] for j in keep) + " |", "|" + "---|" * len(keep)]
            + ["| " + " | ".join(str(r[j]) for j in keep) + " |" for r in rows])


def headline(result: dict) -> list[tuple[str, str]]:
    """The evaluation's headline figures as (measure, value) rows: the report's
    table, and what ``imageorigin evaluate`` prints on the terminal."""
    tpr = result.get("tpr_at_fpr") or {}
    thr = result.get("threshold")
    head = [
        (f"{len(result['labels'])}-class accuracy (arg-max class)", _num(result["accuracy"])),
        ("AI-vs-human ROC AUC of p_ai", _num(result["ai_vs_human_auc"])),
        ("AI-vs-human average precision (AP)", _num(result.get("ai_vs_human_ap"))),
        ("TPR on AI images at 1% FPR on human images", _num(tpr.get("0.01"))),
        ("TPR on AI images at 5% FPR on human images", _num(tpr.get("0.05"))),
    ]
    if thr is None:
        head.append(("human images flagged at the stored threshold", "no stored threshold"))
    else:
        head += [
            (f"human images flagged as AI at the stored threshold (p_ai ≥ {thr:.4g}): FPR",
             _num(result["human_flagged_rate"])),
            ("AI images flagged at the stored threshold: TPR", _num(result["ai_detected_rate"])),
        ]
    head.append(("expected calibration error (top label, 15 bins)", _num(result["ece"])))
    head.append(("expected calibration error of p_ai", _num(result.get("ece_ai"))))
    if result.get("per_source") is not None:
        head.append(("mean over AI sources of AUC vs all human images",
                     _num(result.get("mean_auc_vs_human"))))
    return head


def write_evaluation_report(result: dict, out_dir: str | os.PathLike,
                            display_names: dict | None = None) -> Path:
    """Write the evaluation plots that apply and ``report.md``, which reads top to
    bottom: headline figures, per class, per source, robustness, calibration,
    curves, sample predictions, unreadable files.  Returns the report's path."""
    out = Path(out_dir)
    names = display_names or {}
    has_curves = result.get("curves") is not None
    if has_curves:
        roc_plot(result, out / "roc.png")
        pr_plot(result, out / "pr.png")
    reliability_plot(result, out / "reliability.png")
    if result.get("robustness"):
        robustness_plot(result["robustness"], out / "robustness.png", len(result["labels"]))
    if result.get("per_source"):
        per_source_plot(result["per_source"], out / "per_source.png", len(result["labels"]))

    counts = ", ".join(f"{l} {result['per_class'][l]['support']}" for l in result["labels"])
    lines = [
        "# Evaluation report",
        "",
        f"Data: `{result['data_dir']}`: {result['n_images']} images ({counts}), "
        f"{len(result['errors'])} unreadable. Model: {result['model']['backbone']}, "
        f"temperature {result['model']['temperature']:g}.",
        "",
        "## Headline",
        "",
    ]
    thr = result.get("threshold")
    lines += _table(["measure", "value"], headline(result))
    verdicts = result.get("verdicts")
    if verdicts:
        lines += ["", "What a user reads, caveats included (share of the images in each verdict band):", ""]
        lines += _table(["images", *[WORDS[b] for b in BANDS]],
                        [[kind, *[f"{v[b]:.1%}" for b in BANDS]] for kind, v in verdicts.items()])
    lines += [
        "",
        "AUC, AP and TPR at a fixed FPR are threshold-free ranking figures: the TPR at 1% / 5% "
        "FPR uses the p_ai cut read off this data's own ROC curve, so it says how well p_ai "
        "ranks AI images above human ones, not what a deployed threshold would do.",
        "The stored threshold travels with the model: it was chosen when the model was trained, "
        "on data held out for calibration, not on this data, so its rates above are the "
        "operating point to act on."
        if thr is not None else
        "The model stores no decision threshold: its label is the arg-max class.",
        "",
        "## Per class",
        "",
    ]
    lines += _table(
        ["class", "precision", "recall", "f1", "images"],
        [[names.get(l, l), _num(v["precision"]), _num(v["recall"]), _num(v["f1"]), v["support"]]
         for l, v in result["per_class"].items()])
    lines += ["", "![Confusion matrix](confusion_matrix.png)", ""]

    if result.get("per_source") is not None:
        lines += ["## Per source", "",
                  f"Sources from `{result['manifest']}`; images it does not list are "
                  "\"unknown\". AUC vs human: the source's AI images ranked by p_ai against all "
                  "human images in the evaluated set (the per-generator figure; AUC within a "
                  "source is defined only where it holds both kinds). Sources with a handful "
                  "of images give noisy figures.", ""]
        lines += _table(
            ["source", "class", "images", "accuracy", "AUC vs human", "AUC within", "mean p_ai",
             "flagged at threshold"],
            [[s, v["label"], v["n"], _num(v["accuracy"]), _num(v["auc_vs_all_human"]),
              _num(v["ai_vs_human_auc"]), _num(v["mean_p_ai"]), _num(v["flagged_rate"])]
             for s, v in result["per_source"].items()])
        lines += ["", "![Per source](per_source.png)", ""]

    if result.get("by_size"):
        lines += ["## By image size", "",
                  "Images grouped by their longer side, as decoded (the model scores them at "
                  "native resolution: a larger image is read through more tiles).", ""]
        lines += _table(
            ["longer side", "images (AI / human)", "accuracy", "AI-vs-human AUC", "humans flagged",
             "AI detected"],
            [[name, f"{v['n']} ({v['n_ai']} / {v['n_human']})" if v["n_ai"] is not None else v["n"],
              _num(v["accuracy"]), _num(v["ai_vs_human_auc"]), _num(v["human_flagged_rate"]),
              _num(v["ai_detected_rate"])] for name, v in result["by_size"].items()])
        lines += [""]

    if result.get("robustness"):
        rows = result["robustness"]
        clean = rows[0]
        lines += ["## Robustness", "",
                  "The same images re-encoded as JPEG, downscaled (Lanczos), blurred "
                  "(Gaussian) or sharpened (unsharp mask, radius 2 px, as a phone or an editor "
                  "does), each classified again; Δ against the clean figures.", ""]
        table = []
        for r in rows:
            d_acc = r["accuracy"] - clean["accuracy"]
            d_auc = (None if r["ai_vs_human_auc"] is None or clean["ai_vs_human_auc"] is None
                     else r["ai_vs_human_auc"] - clean["ai_vs_human_auc"])
            table.append([setting_name(r), _num(r["accuracy"]), _num(d_acc, "+.3f"),
                          _num(r["ai_vs_human_auc"]), _num(d_auc, "+.3f"),
                          _num(r["human_flagged_rate"]), _num(r["label_changed"])])
        lines += _table(["setting", "accuracy", "Δ accuracy", "AUC", "Δ AUC",
                         "human flagged at threshold", "labels changed"], table)
        lines += ["", "![Robustness](robustness.png)", ""]

    lines += ["## Calibration", "",
              f"Expected calibration error: {_num(result['ece'])} for the top label, "
              f"{_num(result.get('ece_ai'))} for p_ai as the probability of \"AI-generated\" "
              f"(probabilities after temperature {result['model']['temperature']:g}).", "",
              "![Reliability diagram](reliability.png)", ""]
    if has_curves:
        lines += ["## ROC and precision-recall curves", "",
                  "![ROC curve](roc.png)", "", "![Precision-recall curve](pr.png)", ""]
    if (out / "gallery.png").is_file():
        lines += ["## Sample predictions", "", "![Sample predictions](gallery.png)", ""]
    lines += ["## Unreadable files", ""]
    lines += [f"- {e}" for e in result["errors"]] or ["None."]
    lines += ["", "Every figure: `metrics.json`; every image's prediction: `predictions.csv`.", ""]
    return write_text(out / "report.md", "\n".join(lines))


def _limitations(model, evaluation: dict | None) -> list[str]:
    """The card's limitations, from this run's own data and measured figures."""
    info, t = model.info, model.info.get("training", {})
    sources = info.get("sources") or {}
    lines = [f"- **Small data**: {w}." for w in info.get("warnings", [])]
    if sources:
        per_class: dict[str, list[str]] = {}
        for name, v in sorted(sources.items(), key=lambda kv: -kv[1]["n"]):
            per_class.setdefault(v["label"], []).append(f"{name} ({v['n']})")
        lines.append("- **What it has seen**: " + "; ".join(
            f"{label}: {len(names)} source{'s' * (len(names) != 1)} ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''})" for label, names in per_class.items())
            + ". Sources, generators and kinds of image not listed here are unseen: expect less.")
    else:
        lines.append("- **What it has seen**: unknown (no manifest was given): the training folders "
                     f"`{t.get('data_dir')}` only. Images unlike them are unseen: expect less.")
    counts = t.get("train_counts") or {}
    if counts and max(counts.values()) > 2 * max(1, min(counts.values())):
        lines.append("- **Class balance**: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + " training images; the smaller classes are learnt less well.")
    if evaluation and evaluation.get("ai_detected_rate") is not None:
        lines.append(
            f"- **Misses and false flags, measured**: on the validation data, at the stored "
            f"threshold, {1 - evaluation['ai_detected_rate']:.1%} of AI images were not flagged and "
            f"{evaluation['human_flagged_rate']:.1%} of human images were.")
    lines += [
        "- **Validation is not the world**: accuracy on data from the same sources as training "
        "says little about images from generators or sources the model never saw; "
        "leave-one-source-out (`imageorigin crossval`) is the honest estimate.",
        "- **Threshold transfer**: the stored threshold holds its false-flag rate only on images "
        "like the calibration data; on new sources rankings (AUC) transfer better than any "
        "fixed threshold.",
    ]
    return lines


def _samples(folder: Path) -> list[str]:
    """The card's sample pictures, where the run drew them (``train --no-samples`` does not)."""
    lines = []
    if (folder / "collage.png").is_file():
        lines += ["## **Sample Dataset**", "![Sample Dataset](collage.png)",
                  "One row per class, drawn from the training data.", "---"]
    lines.append("## **Model Output Samples**")
    if (folder / "val" / "gallery.png").is_file():
        lines += ["![Model Output Samples](val/gallery.png)",
                  "Random validation images, the same number per true class; green right, red wrong.", ""]
    else:
        lines += ["(Sample pictures were not drawn for this card: `--no-samples`.)", ""]
    return lines


def _pseudo_fake_lines(pf: dict | None) -> list[str]:
    """The card's account of the aligned pseudo-fakes a run trained on (none: no lines)."""
    if not pf:
        return []
    pairs = pf.get("val_pairs") or {}
    told = (f"; on {pairs['pairs']} validation human images the twin scored above its real image "
            f"{pairs['twin_scored_higher']:.1%} of the time (0.5 is chance)") if pairs.get("pairs") else ""
    return [f"- **Pseudo-fakes**: {pf['twins']} twins of human training images, each through the "
            f"{pf['autoencoder']} autoencoder (`{pf['folder']}`, licence: {pf['licence']}), trained as "
            f"`{pf['label']}` beside its real image (same batch, crop and degradation), "
            + ("coded as the real image was" if pf["aligned_coding"] else "saved losslessly")
            + f"; {pf['share_of_ai_examples']:.0%} of the AI training examples ({pf['real_ai_images']} real "
            f"AI images){told}"
            + (f"; {len(pf['errors'])} human images got no twin (listed in the checkpoint's "
               "`info.pseudo_fakes.errors`)" if pf.get("errors") else "") + "."]


def write_model_card(model, path: str | os.PathLike, evaluation: dict | None = None,
                     run_seconds: float | None = None) -> Path:
    """A MODEL_CARD.md in the seed card's structure, filled with this run's own figures.

    ``run_seconds``: the whole ``train`` call, the validation report included (the
    stored ``wall_seconds`` ends when the model is saved, before that report)."""
    info = model.info
    t = info.get("training", {})
    m = info.get("metrics", {})
    names = [model.display_names[l] for l in model.labels]
    # A frozen backbone is not fine-tuned: only the linear head on its features was trained.
    how = "linear-probe (frozen)" if model.frozen else "fine-tuned"
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
        if evaluation.get("human_flagged_rate") is not None:
            per_class += (
                f"- **At the stored threshold** (p_ai >= {model.threshold:.4f}): "
                f"{evaluation['human_flagged_rate']:.1%} of human images flagged as AI, "
                f"{evaluation['ai_detected_rate']:.1%} of AI images detected.\n")
        if evaluation.get("ece") is not None:
            per_class += f"- **Expected calibration error** (top label, 15 bins): {evaluation['ece']:.3f}\n"
    cal = info.get("calibration")
    calibration = (
        f"- **Calibration**: temperature {cal['temperature']:.3f} and AI threshold "
        f"{cal['threshold'] if cal['threshold'] is None else round(cal['threshold'], 4)} (for at most "
        f"{cal['target_fpr']:.0%} of human images flagged{_resave_words(info)}) fitted on a calibration "
        f"split held out of the training data ({counts(cal['counts'])}), never on the validation data above."
        if cal else "- **Calibration**: none; the label is the arg-max class."
    )
    sources = info.get("sources") or {}
    source_lines = [
        "| source | class | training images | licence |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {v['label']} | {v['n']} | {v['licence']} |" for k, v in sorted(sources.items())],
    ] if sources else ["(no manifest was given to `imageorigin train`: sources and licences unknown)"]
    lines = [
        "---",
        "language: en",
        "license: mit",
        "tags:\n- image-classification\n- " + model.backbone.name + "\n- ai-generated-content\n"
        "- human-created-content\n- model-card",
        "---",
        f"# **{how.capitalize()} {model.backbone.name} for Image Classification**",
        "## **Model Overview**",
        f"This {how} **{model.backbone.name}** model classifies images into the following "
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
        f"{m.get('train_loss', float('nan')):.4f} training"
        + (f", at epoch {m['best_epoch']} of {m.get('epochs')}: the epoch with the best validation "
           "accuracy is the one kept." if m.get("best_epoch") else f", after {m.get('epochs')} epochs."),
        f"- **Human class**: `{model.human_label}` (p_ai = 1 - p({model.human_label}))."
        if model.human_label else
        "- **Human class**: none (no class is named as made by people: no p_ai, threshold or "
        "verdict; train with `--human-class NAME`).",
        per_class,
        "---",
        "## **Training Details**",
        f"- **Recipe**: {t.get('recipe')}.",
        f"- **Base Model**: {model.backbone.name}, pretrained on ImageNet "
        f"(weights: {model.describe()['backbone']['source'] if t.get('weights') == 'imagenet' else t.get('weights')}).",
        f"- **Optimizer**: {'AdamW' if t.get('weight_decay') else 'Adam'} with a learning rate of {t.get('lr')}.",
        "- **Loss Function**: Cross-Entropy Loss.",
        f"- **Batch Size**: {t.get('batch_size')}",
        f"- **Epochs**: {t.get('epochs')}",
        f"- **Augmentation** (every class alike): horizontal flip {'on' if t.get('flip') else 'off'}, "
        f"rotation ±{t.get('rotation')}°, colour jitter {t.get('color_jitter')}, downscale x0.25-1 p="
        f"{t.get('downscale', 0)}, Gaussian blur p={t.get('blur')}, noise p={t.get('noise', 0)}, "
        f"JPEG/WebP re-encode p={t.get('jpeg')}"
        + (f", random {t.get('train_crop')}px crops" if t.get("train_crop") else "") + ".",
        f"- **Schedule**: {t.get('schedule')}, weight decay {t.get('weight_decay')}, label "
        f"smoothing {t.get('label_smoothing')}.",
        calibration,
        f"- **Preprocessing**: {describe_preprocessing(model.preprocessing)}.",
        f"- **Training data**: `{t.get('data_dir')}` ({counts(t.get('train_counts'))}).",
        *_pseudo_fake_lines(info.get("pseudo_fakes")),
        f"- **Validation data**: `{t.get('val_dir')}` ({counts(t.get('val_counts'))})." if t.get("val_dir")
        else f"- **Validation data**: {t.get('val_split')} of the training folder.",
        f"- **Wall-clock time**: {t.get('wall_seconds')} s to train and calibrate"
        + (f", {run_seconds:.1f} s with the validation report and this card" if run_seconds else "")
        + f" (Python's start-up not included), on {t.get('machine')}.",
        "---",
        "## **Training Data Sources**",
        *source_lines,
        "",
        "---",
        "## **Training Metrics**",
        "### **1. Loss Over Epochs**",
        "![Loss Over Epochs](loss.png)",
        "### **2. Accuracy Over Epochs**",
        "![Accuracy Over Epochs](accuracy.png)",
        "---",
        *_samples(Path(path).parent),
        "![Confusion matrix](val/confusion_matrix.png)",
        "---",
        "## **Model Architecture**",
        (f"- **Feature Extractor**: {model.backbone.name}, every layer fine-tuned, "
         f"{model.backbone.dim} pooled features." if t.get("finetune") else
         f"- **Feature Extractor**: {model.backbone.name} with frozen layers (kept in eval mode, so "
         f"BatchNorm statistics do not drift), {model.backbone.dim} pooled features."),
        f"- **Classifier**: a fully connected layer with {len(model.labels)} output nodes, one per "
        f"class ({', '.join(names)}).",
        "---",
        "## **Limitations**",
        *_limitations(model, evaluation),
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
