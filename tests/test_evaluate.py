"""`imageorigin evaluate` on the bench with the shipped default model."""

import json

import numpy as np
import pytest

import imageorigin
from imageorigin.cli import main


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["evaluate", "default", str(bench / "resized/val"), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


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


def test_default_model_figures_match_its_card(result):
    _, m = result
    stored = imageorigin.load().info["metrics"]["val_accuracy"]
    assert m["accuracy"] == pytest.approx(stored, abs=1e-6)


def test_plots_and_predictions(result):
    out, m = result
    for name in ("confusion_matrix.png", "gallery.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("true_label,path,label,p_dalle")
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
