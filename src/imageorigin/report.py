"""The evaluation report and the model card: what a run shows a person in words
and tables (the plots are :mod:`imageorigin.plots`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .data import describe_preprocessing
from .fileio import write_text
from .plots import per_source_plot, pr_plot, reliability_plot, robustness_plot, roc_plot, setting_name
from .verdict import BANDS, WORDS

# The plots, named here too, where earlier versions defined them.
from .plots import (  # noqa: F401,E402
    collage, confusion_plot, gallery, overlay, prediction_gallery, training_plots,
)


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
