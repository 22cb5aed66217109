"""Native-resolution multi-crop scoring, degradations applied to every class,
grouped k-fold over source families, and warm starts (adapting a model)."""

import json
import shutil

import numpy as np
import pytest
import torch

import imageorigin
from imageorigin.cli import main
from imageorigin.crossval import assign_folds, family
from imageorigin.data import Degrade, crop_boxes, default_preprocessing, eval_transform, train_transform
from imageorigin.images import decode_image

NATIVE = default_preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 96, native=True, grid=3)


@pytest.fixture(scope="module")
def native_run(bench, tmp_path_factory):
    """A native multi-crop model fine-tuned for one epoch on real bench images."""
    root = tmp_path_factory.mktemp("native-data")
    for c in ("dalle", "human", "other_ai"):
        (root / c).mkdir()
        for f in sorted((bench / "native/train" / c).iterdir())[:16]:
            shutil.copy(f, root / c / f.name)
    out = tmp_path_factory.mktemp("native-run")
    assert main(["train", str(root), "--out", str(out), "--backbone", "mobilenet_v2", "--finetune",
                 "--native", "--crops", "3", "--image-size", "96", "--epochs", "1", "--lr", "1e-3",
                 "--downscale", "0.5", "--blur", "0.3", "--noise", "0.2", "--jpeg", "0.5",
                 "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    return root, out


def test_crops_cover_the_whole_image_at_native_resolution():
    boxes = crop_boxes(256, 256, NATIVE)
    assert len(boxes) == 9 and all(w == h == 96 for _, _, w, h in boxes)
    covered = np.zeros((256, 256), bool)
    for x, y, w, h in boxes:
        assert 0 <= x <= 256 - w and 0 <= y <= 256 - h
        covered[y:y + h, x:x + w] = True
    assert covered.all()
    # A large image: crops spread corner to corner, never resized.
    big = crop_boxes(1536, 1024, NATIVE)
    assert big[0][:2] == (0, 0) and big[-1][:2] == (1536 - 96, 1024 - 96)
    # Smaller than the crop: enlarged, and the boxes given in the image's own pixels.
    small = crop_boxes(64, 48, NATIVE)
    assert all(x + w <= 65 and y + h <= 49 for x, y, w, h in small)


def test_eval_transform_gives_a_grid_of_native_crops(raw):
    image = decode_image(raw / "dalle/dcsan_imagen__dalle2__huge-octopus-climbing-up-empire-5539864__dal2-1.png")
    x = eval_transform(NATIVE)(image)
    assert x.shape == (9, 3, 96, 96)
    # The first crop is the top-left 96 px of the image, not of a resized copy.
    mean = torch.tensor(NATIVE["mean"]).view(3, 1, 1)
    std = torch.tensor(NATIVE["std"]).view(3, 1, 1)
    corner = torch.from_numpy(np.array(image)[:96, :96]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[0] * std + mean, corner, atol=1e-5)


def test_degradations_are_seeded_and_change_the_pixels(raw):
    image = decode_image(raw / "human/bsds500__real_photo__test_65084.jpg")
    degrade = Degrade(downscale=1.0, blur=1.0, noise=1.0, jpeg=1.0)
    torch.manual_seed(3)
    a = degrade(image)
    torch.manual_seed(3)
    b = degrade(image)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != image.size and a.size[0] >= image.size[0] // 4  # downscaled x0.25-1
    # Training on native crops: a random crop of the crop size, whatever the image size.
    x = train_transform(NATIVE, {"downscale": 1.0, "jpeg": 1.0})(image)
    assert x.shape == (3, 96, 96)


def test_prediction_pools_crops_and_returns_the_patch_map(native_run, raw):
    _, out = native_run
    model = imageorigin.load(out / "model.safetensors")
    assert model.preprocessing["resize"] is None and model.preprocessing["crops"] == 3
    path = raw / "human/bsds500__real_photo__test_65084.jpg"
    # fp32: compared with eager fp32 below, on any CPU (bf16 or not)
    [p] = imageorigin.predict(model, [path], engine="torch", precision="fp32")
    assert len(p.patches) == 9
    image = decode_image(path)
    for patch in p.patches:
        x, y, w, h = patch["box"]
        assert x + w <= image.width and y + h <= image.height and 0 <= patch["p_ai"] <= 1
    # The image's score is the mean logit of its crops (the rule stored in the checkpoint).
    crops = model.transform(image).unsqueeze(0)  # (1, 9, 3, 96, 96)
    with torch.no_grad():
        logits = model.head(model.backbone(crops.flatten(0, 1))).mean(0, keepdim=True)
    probs, _ = model.scores(logits)
    assert p.probs["human"] == pytest.approx(probs[0, 1].item(), abs=1e-4)


def test_calibration_offers_stricter_operating_points(native_run):
    _, out = native_run
    model = imageorigin.load(out / "model.safetensors")
    t = model.info["thresholds_at_fpr"]
    assert list(t) == ["0.01", "0.02", "0.05", "0.1"]
    assert t["0.01"] >= t["0.02"] >= t["0.05"] >= t["0.1"]
    assert t["0.05"] == model.threshold  # the default --target-fpr


def test_same_pixels_same_answer_for_a_native_model(native_run, raw, tmp_path):
    """A large JPEG is decoded at full size for a model that reads pixel-level traces:
    its lossless PNG copy gets the same answer."""
    _, out = native_run
    model = imageorigin.load(out / "model.safetensors")
    jpeg = raw / "dalle/dcsan_imagen__dalle2__statue-liberty-made-gold-reflecting-62248159__dal2-1.jpg"
    png = tmp_path / "same.png"
    decode_image(jpeg).save(png)
    a, b = imageorigin.predict(model, [jpeg, png], engine="torch")
    assert a.label == b.label
    assert a.p_ai == pytest.approx(b.p_ai, abs=1e-5)


def test_warm_start_begins_from_the_checkpoint(native_run, tmp_path):
    data, out = native_run
    start = imageorigin.load(out / "model.safetensors")
    adapted = tmp_path / "adapted"
    # lr ~0: the run must end where it started, which a fresh head never would
    assert main(["train", str(data), "--init", str(out / "model.safetensors"), "--finetune",
                 "--epochs", "1", "--lr", "1e-12", "--batch-size", "8", "--workers", "0",
                 "--out", str(adapted), "--quiet"]) == 0
    model = imageorigin.load(adapted / "model.safetensors")
    assert torch.allclose(model.head.weight, start.head.weight, atol=1e-6)
    assert model.preprocessing == start.preprocessing and model.labels == start.labels
    t = model.info["training"]
    assert t["init"] == str(out / "model.safetensors") and t["native"] and t["crops"] == 3
    assert model.threshold is not None


def test_families_and_folds():
    assert family({"label": "other_ai", "source": "x/flux", "generator": "FLUX.1-dev (artist styles)"}) \
        == "FLUX.1-dev"
    assert family({"label": "human", "source": "debian_naev-data/bkg", "generator": "painting"}) \
        == "debian_naev-data"
    groups = {f"h{i}": (True, 10 + i) for i in range(7)} | {f"a{i}": (False, 5 * i + 1) for i in range(9)}
    folds = assign_folds(groups, 5, seed=0)
    assert folds == assign_folds(groups, 5, seed=0) and set(folds) == set(groups)
    for f in range(5):  # every fold holds out both kinds
        kinds = {groups[g][0] for g, v in folds.items() if v == f}
        assert kinds == {True, False}


def test_grouped_kfold_holds_every_family_out_once(bench, tmp_path, capsys):
    out = tmp_path / "kfold"
    args = ["crossval", str(bench / "native/val"), "--reference", str(bench / "resized/val"),
            "--manifest", str(bench / "manifest.csv"), "--folds", "3", "--group-by", "family",
            "--backbone", "mobilenet_v2", "--epochs", "2", "--lr", "1e-3", "--out", str(out), "--quiet"]
    # One fold first (as when repeating a fold with another seed) ...
    assert main(args + ["--only-folds", "2"]) == 0
    first = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in first["folds"]] == ["fold 2"] and {r["fold"] for r in first["sources"]} == {"fold 2"}
    assert "Only fold 2 of 3 were run" in (out / "crossval.md").read_text()
    fold_2 = (out / "fold_2" / "model.safetensors").stat().st_mtime_ns
    # Another training seed, the same folds.
    assert main(args[:-3] + ["--out", str(tmp_path / "seed1"), "--quiet", "--only-folds", "2", "--seed", "1"]) == 0
    other = json.loads((tmp_path / "seed1" / "crossval.json").read_text())
    assert other["folds"][0]["held_out"] == first["folds"][0]["held_out"] and other["config"]["seed"] == 1
    # ... then the rest: --resume keeps fold 2 as it was and trains folds 1 and 3,
    # also with another number of decoding workers (it changes speed, not results).
    capsys.readouterr()
    assert main(args + ["--resume", "--workers", "1"]) == 0
    assert "fold 2: kept from the earlier run" in capsys.readouterr().err
    assert (out / "fold_2" / "model.safetensors").stat().st_mtime_ns == fold_2
    result = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in result["folds"]] == ["fold 1", "fold 2", "fold 3"]
    assert [r for r in result["sources"] if r["fold"] == "fold 2"] == first["sources"]
    assert "Only" not in (out / "crossval.md").read_text()
    assert result["method"] == "grouped 3-fold by family"
    held = [g for f in result["folds"] for g in f["held_out"]]
    assert len(held) == len(set(held))  # each family in exactly one fold
    assert "DALL-E 2" in held and "bsds500" in held
    # every source of the manifest that has images here got its row, once, with its fold's figures
    rows = result["sources"]
    assert len({r["source"] for r in rows}) == len(rows) >= 12
    for r in rows:
        assert 0 <= r["auc"] <= 1 and 0 <= r["flagged_rate"] <= 1
    assert result["max_human_flagged"] == max(r["flagged_rate"] for r in rows if r["label"] == ["human"])
    md = (out / "crossval.md").read_text()
    assert "grouped 3-fold by family" in md and "- fold 1: " in md

    # Interrupted after fold 3 was trained, before its figures were written: the
    # fold's model comes back from its resume state, without training again.
    interrupted = dict(result, folds=result["folds"][:2],
                       sources=[r for r in result["sources"] if r["fold"] != "fold 3"])
    (out / "crossval.json").write_text(json.dumps(interrupted))
    capsys.readouterr()
    assert main(args + ["--resume", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "fold 1: kept" in err and "fold 2: kept" in err and "resuming" in err and "after epoch 2 of 2" in err
    again = json.loads((out / "crossval.json").read_text())
    assert again["sources"] == result["sources"] and again["mean_auc"] == result["mean_auc"]
    assert main(args + ["--only-folds", "4"]) == 2
    assert "no fold 4" in capsys.readouterr().err

    # Other training data (both views of the images), the same folds: --folds-from
    # takes the folds the finished run recorded rather than dealing them again.
    views = ["crossval", str(bench / "native/val"), str(bench / "resized/val"), "--manifest",
             str(bench / "manifest.csv"), "--folds", "3", "--group-by", "family", "--backbone",
             "mobilenet_v2", "--epochs", "1", "--quiet", "--only-folds", "1"]
    assert main(views + ["--out", str(tmp_path / "views"), "--folds-from", str(out / "crossval.json")]) == 0
    both = json.loads((tmp_path / "views" / "crossval.json").read_text())
    assert both["folds"][0]["held_out"] == result["folds"][0]["held_out"]
    assert both["folds"][0]["trained_on"] > result["folds"][0]["trained_on"]
    # A run that did not finish every fold has not recorded every family's fold.
    capsys.readouterr()
    assert main(views + ["--out", str(tmp_path / "no"), "--folds-from", str(tmp_path / "seed1" / "crossval.json")]) == 2
    assert "its folds do not hold out" in capsys.readouterr().err
    # Without --folds there are no folds to take: refused, not a leave-one-source-out run.
    loso = views[:views.index("--folds")] + ["--backbone", "mobilenet_v2", "--epochs", "1", "--quiet"]
    assert main(loso + ["--out", str(tmp_path / "loso"), "--folds-from", str(out / "crossval.json")]) == 2
    assert "--folds-from" in capsys.readouterr().err and not (tmp_path / "loso").exists()
