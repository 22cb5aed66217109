"""Leave-one-source-out through the CLI, and the fine-tuning path it can run."""

import json

import torch

import imageorigin
from imageorigin.cli import main


def test_leave_one_source_out_table(small_folder, bench, tmp_path, capsys):
    data = small_folder(12)  # the first 12 files per class: a few sources each
    out = tmp_path / "cv"
    code = main([
        "crossval", str(data), "--manifest", str(bench / "manifest.csv"),
        "--source", "bsds500/real_photo", "--source", "dcsan_imagen/dalle2",
        "--backbone", "mobilenet_v2", "--finetune", "--epochs", "1", "--lr", "1e-3",
        "--batch-size", "8", "--workers", "0", "--out", str(out), "--quiet",
    ])
    assert code == 0
    result = json.loads((out / "crossval.json").read_text())
    rows = {r["source"]: r for r in result["sources"]}
    assert set(rows) == {"bsds500/real_photo", "dcsan_imagen/dalle2"}
    assert rows["bsds500/real_photo"]["label"] == ["human"]
    # the held-out source's images never reached training
    for r in rows.values():
        assert r["n_held_out"] > 0 and r["trained_on"] + r["n_held_out"] <= 36
        assert 0 <= r["auc"] <= 1
    assert result["mean_auc"] == sum(r["auc"] for r in rows.values()) / 2
    md = (out / "crossval.md").read_text()
    assert "| bsds500/real_photo | human |" in md
    assert "Mean AUC on the held-out source" in capsys.readouterr().out

    # each fold is a fine-tuned model: its backbone moved away from ImageNet and is stored
    fold = imageorigin.load(out / "dcsan_imagen__dalle2" / "model.safetensors")
    assert fold.describe()["backbone"]["weights"] == "checkpoint"
    fresh = imageorigin.backbones.build_backbone("mobilenet_v2", "imagenet")
    assert not torch.equal(fold.backbone.features[0][0].weight, fresh.features[0][0].weight)
