"""`imageorigin evaluate` on the bench with the shipped default model."""

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest

import imageorigin
import imageorigin.report
from imageorigin.cli import main
from imageorigin.evaluate import PERTURBATIONS

PLOTS = ("confusion_matrix.png", "gallery.png", "roc.png", "pr.png", "reliability.png")
SWEEP = [("clean", None), ("jpeg", 90), ("jpeg", 70), ("jpeg", 50), ("jpeg", 30),
         ("downscale", 0.5), ("downscale", 0.25), ("blur", 1), ("blur", 2),
         ("sharpen", 1), ("sharpen", 2)]


@pytest.fixture(scope="module")
def cli_run(bench, tmp_path_factory):
    """The full val folder with the bench manifest, once per module (no robustness sweep:
    it runs on a small folder below)."""
    out = tmp_path_factory.mktemp("eval")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["evaluate", "default", str(bench / "resized/val"), "--out", str(out),
                     "--manifest", str(bench / "manifest.csv"), "--no-robustness", "--quiet"])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def result(cli_run):
    return cli_run[:2]


def _predictions(out):
    return list(csv.DictReader((out / "predictions.csv").open()))


def test_metrics_json(result):
    _, m = result
    assert m["labels"] == ["dalle", "human", "other_ai"]
    assert m["n_images"] == 282 and m["errors"] == []
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 282
    assert cm.sum(1).tolist() == [81, 113, 88]  # rows are the true classes
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 282)
    for j, label in enumerate(m["labels"]):
        pc = m["per_class"][label]
        assert pc["support"] == cm[j].sum()
        assert pc["recall"] == pytest.approx(cm[j, j] / cm[j].sum())
    assert 0.5 < m["ai_vs_human_auc"] <= 1
    assert m["loss"] > 0


def test_default_model_figures_match_its_card(bench):
    # The default was validated on both views' val folders of both data sets; its
    # card's figure is what `evaluate` measures on them, and the stored threshold
    # (the 1% calibration cut) holds on val.
    model = imageorigin.load()
    folders = [bench.parent / s / v / "val" for v in ("native", "resized") for s in ("dh3-bench", "dh3-wide")]
    m = imageorigin.evaluate(model, folders, robustness=False)
    assert m["n_images"] == 1440
    # the card's figure was measured on another CPU: its kernels may flip one borderline image
    assert m["accuracy"] == pytest.approx(model.info["metrics"]["val_accuracy"], abs=1.5 / m["n_images"])
    assert m["threshold"] == model.threshold
    assert m["human_flagged_rate"] <= 0.05
    assert m["ai_vs_human_auc"] >= 0.93


def test_plots_and_predictions(result):
    out, m = result
    for name in ("confusion_matrix.png", "gallery.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("true_label,path,verdict,generator,p_dalle")
    assert len(lines) == 283


def test_unreadable_files_are_listed_not_fatal(small_folder, tmp_path):
    data = small_folder(2)
    (data / "human" / "zero.jpg").write_bytes(b"")
    m = imageorigin.evaluate(imageorigin.load(), data)
    assert m["n_images"] == 6
    assert len(m["errors"]) == 1 and "zero.jpg: empty file" in m["errors"][0]


def test_folder_with_unknown_class_is_refused(small_folder):
    data = small_folder(1, classes=("dalle", "human"))
    (data / "human").rename(data / "cats")
    with pytest.raises(imageorigin.DataFolderError, match=r"\['cats'\] are not among"):
        imageorigin.evaluate(imageorigin.load(), data)


def test_the_terminal_shows_the_reports_headline(cli_run):
    out, m, stdout = cli_run
    lines = stdout.splitlines()
    assert lines[0] == f"{m['n_images']} images, 0 unreadable"
    report = (out / "report.md").read_text()
    for measure, value in imageorigin.report.headline(m):
        assert any(l.startswith(measure) and l.endswith(f"  {value}") for l in lines), measure
        assert f"| {measure} | {value} |" in report  # the same figures as the report's table
    assert lines[1].startswith("3-class accuracy (arg-max class)")  # the model's own class count


def test_per_source_figures(result, bench):
    out, m = result
    val = [r for r in csv.DictReader((bench / "manifest.csv").open()) if r["split"] == "val"]
    per = m["per_source"]
    assert set(per) == {r["source"] for r in val}  # every val file found in the manifest
    assert sum(s["n"] for s in per.values()) == m["n_images"]
    rows = _predictions(out)
    for name, s in per.items():
        mine = [r for r in rows if r["source"] == name]
        assert s["n"] == len(mine) == sum(r["source"] == name for r in val)
        assert s["label"] == "+".join(sorted({r["true_label"] for r in mine}))
        # 3-class accuracy is the arg-max class's (a row's label sits on p_ai's side of the threshold)
        argmax = [max(m["labels"], key=lambda l: float(r[f"p_{l}"])) for r in mine]
        assert s["accuracy"] == pytest.approx(np.mean([a == r["true_label"] for a, r in zip(argmax, mine)]))
        assert s["mean_p_ai"] == pytest.approx(np.mean([float(r["p_ai"]) for r in mine]))
        assert s["ai_vs_human_auc"] is None  # every bench source holds one class
        # the default model stores a threshold: flagged = share of the source's images at or above it
        # (p_ai's, before caveats: a row's is_ai is its verdict, which a caveat holds back)
        cut = m["threshold"]
        assert s["flagged_rate"] == pytest.approx(np.mean([float(r["p_ai"]) >= cut for r in mine]))
        if s["label"] == "human":
            assert s["auc_vs_all_human"] is None
        else:
            assert 0.5 < s["auc_vs_all_human"] <= 1
    aucs = [s["auc_vs_all_human"] for s in per.values() if s["auc_vs_all_human"] is not None]
    assert m["mean_auc_vs_human"] == pytest.approx(np.mean(aucs))


def test_tpr_at_fixed_fpr_and_ap(result):
    out, m = result
    rows = _predictions(out)
    human = np.sort([float(r["p_ai"]) for r in rows if r["true_label"] == "human"])[::-1]
    ai = np.array([float(r["p_ai"]) for r in rows if r["true_label"] != "human"])
    assert set(m["tpr_at_fpr"]) == {"0.01", "0.05"}
    for f, tpr in m["tpr_at_fpr"].items():
        # The best cut flags at most k human images: everything above the (k+1)-th highest.
        k = int(np.floor(float(f) * len(human) + 1e-9))
        assert tpr == pytest.approx(np.mean(ai > human[k]))
    assert m["tpr_at_fpr"]["0.01"] <= m["tpr_at_fpr"]["0.05"]
    assert 0.6 < m["ai_vs_human_ap"] <= 1
    roc = m["curves"]["roc"]
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1
    # the stored threshold's operating point, beside the threshold-free figures
    assert m["threshold"] == imageorigin.load().threshold
    assert m["human_flagged_rate"] == pytest.approx(np.mean(human >= m["threshold"]))
    assert m["ai_detected_rate"] == pytest.approx(np.mean(ai >= m["threshold"]))


def test_calibration_matches_its_bins(result):
    _, m = result
    for ece, bins in ((m["ece"], m["reliability"]), (m["ece_ai"], m["reliability_ai"])):
        assert len(bins) == 15 and sum(b["count"] for b in bins) == m["n_images"]
        assert 0 <= ece <= 1
        recomputed = sum(b["count"] / m["n_images"] * abs(b["accuracy"] - b["confidence"])
                         for b in bins if b["count"])
        assert ece == pytest.approx(recomputed)
        for b in bins:
            if b["count"]:
                assert b["lo"] <= b["confidence"] <= b["hi"]
    # Top-label confidence of 3 classes is never under 1/3, and bin accuracy over
    # all bins is the overall accuracy.
    assert all(b["count"] == 0 for b in m["reliability"][:5])
    hits = sum(b["count"] * b["accuracy"] for b in m["reliability"] if b["count"])
    assert hits / m["n_images"] == pytest.approx(m["accuracy"])


def test_report_links_every_plot_and_states_the_headline(result):
    out, m = result
    report = (out / "report.md").read_text()
    for name in PLOTS + ("per_source.png",):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report, name
    for value in (m["accuracy"], m["ai_vs_human_auc"], m["ai_vs_human_ap"], m["tpr_at_fpr"]["0.01"],
                  m["tpr_at_fpr"]["0.05"], m["ece"], m["ece_ai"], m["mean_auc_vs_human"]):
        assert f"| {value:.3f} |" in report
    assert "threshold-free" in report
    assert f"human images flagged as AI at the stored threshold (p_ai ≥ {m['threshold']:.4g})" in report
    assert f"| {m['human_flagged_rate']:.3f} |" in report
    assert report.index("## Headline") < report.index("## Per class") < report.index("## Per source")
    assert "eudoxia0_gallery_of_sand/dalle2" in report
    assert not (out / "robustness.png").exists() and "robustness.png" not in report
    assert "## Unreadable files\n\nNone." in report


def test_perturbations_change_the_pixels(bench):
    image = imageorigin.decode_image(next((bench / "resized/val/human").iterdir()))
    pixels = np.asarray(image, dtype=np.int16)
    for name, param in SWEEP[1:]:
        changed = PERTURBATIONS[name](image, param)
        assert changed.mode == "RGB"
        if name == "downscale":
            assert changed.size == (round(image.width * param), round(image.height * param))
        else:
            assert changed.size == image.size
            assert (np.asarray(changed, dtype=np.int16) != pixels).any(), (name, param)


def test_robustness_sweep_and_unlisted_files(small_folder, bench, tmp_path):
    data = small_folder(10)
    extra = data / "dalle" / "not_in_the_manifest.jpg"
    shutil.copy(next((bench / "resized/val/dalle").iterdir()), extra)
    m = imageorigin.evaluate(imageorigin.load(), data, tmp_path / "out",
                             manifest=bench / "manifest.csv", robustness=True)
    rows = m["robustness"]
    assert [(r["perturbation"], r["param"]) for r in rows] == SWEEP
    clean = rows[0]
    assert clean["accuracy"] == m["accuracy"] and clean["ai_vs_human_auc"] == m["ai_vs_human_auc"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ai_vs_human_auc"] <= 1
        assert 0 <= r["label_changed"] <= 1
    by_setting = {(r["perturbation"], r["param"]): r for r in rows}
    for setting in (("jpeg", 30), ("blur", 2), ("downscale", 0.25)):
        assert by_setting[setting]["mean_abs_delta_p_ai"] > 0.005, setting
    # Copies of train images in a folder of another name still match the manifest
    # (class folder + file name); the renamed file does not.
    assert m["per_source"]["unknown"]["n"] == 1
    assert sum(s["n"] for s in m["per_source"].values()) == m["n_images"] == 31
    report = (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert "](robustness.png)" in report and "| JPEG q30 |" in report and "| blur σ=2 |" in report \
        and "| sharpen 200% |" in report


def test_stored_threshold_rates_match_the_predictions(small_folder, tmp_path):
    model = imageorigin.load()
    model.threshold = 0.45
    m = imageorigin.evaluate(model, small_folder(5), tmp_path, robustness=False)
    rows = _predictions(tmp_path)
    flagged = {"human": [], "ai": []}
    for r in rows:
        # The figures are p_ai's at the threshold; a row's is_ai is its verdict,
        # which a caveat can hold back from "likely AI".
        assert r["is_ai"] == str(r["verdict"] == "likely_ai")
        assert r["is_ai"] == "False" or float(r["p_ai"]) >= 0.45
        flagged["human" if r["true_label"] == "human" else "ai"].append(float(r["p_ai"]) >= 0.45)
    assert m["threshold"] == 0.45
    assert m["human_flagged_rate"] == pytest.approx(np.mean(flagged["human"]))
    assert m["ai_detected_rate"] == pytest.approx(np.mean(flagged["ai"]))
    assert "robustness" not in m and "per_source" not in m
    report = (tmp_path / "report.md").read_text()
    assert f"p_ai ≥ 0.45): FPR | {m['human_flagged_rate']:.3f} |" in report


def test_full_size_originals_are_reported_by_image_size(shared, bench, tmp_path):
    """Real uploads come in every size: the report says how the model does at each."""
    for c in ("dalle", "human", "other_ai"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for f in sorted((shared / "dh3-full" / c).iterdir())[:3] + sorted((bench / "native/val" / c).iterdir())[:3]:
            shutil.copy(f, tmp_path / "data" / c / f.name)
    assert main(["evaluate", "default", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--no-robustness", "--no-samples", "--quiet"]) == 0
    sizes = json.loads((tmp_path / "out/metrics.json").read_text())["by_size"]
    assert sizes["up to 256 px"]["n"] == 9 and sum(v["n"] for v in sizes.values()) == 18
    assert all(v["n_ai"] + v["n_human"] == v["n"] for v in sizes.values())
    report = (tmp_path / "out/report.md").read_text()
    assert "## By image size" in report and "| up to 256 px | 9 (6 / 3) |" in report
