"""What a user reads must not mislead: verdict bands, caveats, own-data training,
ONNX models, reports and the command line (issue 10)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import imageorigin
from conftest import SHARED
from imageorigin.cli import main
from imageorigin.verdict import BANDS, band, fit_bands, image_caveats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import screenshots  # noqa: E402

WIDE = SHARED / "dh3-wide"


@pytest.fixture(scope="module")
def default():
    return imageorigin.load("default")


@pytest.fixture(scope="module")
def val_files(bench):
    return sorted(p for c in ("dalle", "human", "other_ai")
                  for p in sorted((bench / "native/val" / c).iterdir())[:20])


# ---------------------------------------------------------------- the verdict


def test_predict_table_gives_one_readable_verdict_per_row_and_a_summary(val_files, capsys):
    assert main(["predict", *map(str, val_files), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(f"{len(val_files)} images: "))
    header, columns, rows, summary = lines[0], lines[1].split(), lines[2:end], lines[end]
    default = imageorigin.load("default")
    assert f"likely AI: p_ai >= {default.threshold:.4f} (stored in the model)" in header
    assert columns[:4] == ["file", "verdict", "p_ai", "generator"]
    assert len(rows) == len(val_files)
    starts = [i for i, ch in enumerate(lines[1]) if ch != " " and (i == 0 or lines[1][i - 1] == " ")]
    flagged = 0
    for row in rows:
        cells = dict(zip(columns, (row[a:b].strip() for a, b in zip(starts, starts[1:] + [None]))))
        assert cells["verdict"] in BANDS
        # the generator is named for an AI verdict only
        assert bool(cells["generator"]) == (cells["verdict"] == "likely_ai")
        flagged += cells["verdict"] == "likely_ai"
    assert re.fullmatch(rf"{len(val_files)} images: {flagged} flagged as AI \(likely AI\), \d+ uncertain, "
                        r"\d+ likely human, 0 errors", summary)


def test_labels_agree_with_the_verdict_and_threshold_overrides(val_files, default):
    for threshold in (None, 0.3):
        for p in imageorigin.predict(default, val_files, threshold=threshold):
            cut = default.threshold if threshold is None else threshold
            assert (p.label == "human") == (p.p_ai < cut)  # the label sits on p_ai's side of the cut
            assert p.is_ai == (p.verdict == "likely_ai")
            assert p.is_ai <= (p.p_ai >= cut)
    low = list(imageorigin.predict(default, val_files, threshold=0.3))
    high = list(imageorigin.predict(default, val_files))
    assert sum(p.is_ai for p in low) > sum(p.is_ai for p in high)


def test_bands_come_from_calibration_scores():
    rng = np.random.default_rng(0)
    p_ai = np.concatenate([rng.beta(2, 5, 400), rng.beta(5, 2, 600)])
    is_human = np.arange(1000) < 400
    bands = fit_bands(p_ai, is_human, threshold=0.9)
    assert bands["likely_ai"] == 0.9 and bands["likely_human"] < 0.9
    missed = (p_ai[~is_human] <= bands["likely_human"]).mean()
    assert 0.04 <= missed <= 0.05  # at most 5% of AI images land in "likely human"
    assert band(0.95, bands, 0.9, []) == "likely_ai"
    assert band(bands["likely_human"] + 1e-3, bands, 0.9, []) == "uncertain"
    assert band(0.01, bands, 0.9, []) == "likely_human"
    assert band(0.95, bands, 0.9, ["small image: ..."]) == "uncertain"
    assert not bands["widened"]
    # A tiny calibration split whose AI images all lie above the cut: the fitted band would be
    # one point (likely human up to 0.2241, likely AI from 0.2241); it is widened, and says so.
    tiny = fit_bands(np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.8]), np.array([1, 1, 1, 0, 0, 0], bool), 0.2241)
    assert tiny["widened"] and tiny["likely_human"] == pytest.approx(1 / (1 + np.exp(1 - np.log(0.2241 / 0.7759))))
    assert band(0.15, tiny, 0.2241, []) == "uncertain" and band(0.05, tiny, 0.2241, []) == "likely_human"


# ---------------------------------------------------------------- out of scope


def test_screenshots_thumbnails_and_blur_get_caveats_and_never_a_confident_verdict(default, tmp_path):
    # Screenshots of the *testing* kind: the detector was tuned on the other kind.
    shots = []
    for i in range(12):
        data, ext = screenshots.encode(screenshots.make("testing", i, SHARED), i)
        shots.append(tmp_path / f"shot{i}{ext}")
        shots[-1].write_bytes(data)
    photo = sorted((WIDE / "native/val/human").iterdir())[0]
    thumb = imageorigin.decode_image(photo).resize((64, 64))
    blurred = imageorigin.decode_image(photo).filter(ImageFilter.GaussianBlur(3))
    preds = list(imageorigin.predict(default, [*shots, thumb, blurred, photo]))
    for p in preds[:12]:
        assert any(c.startswith("screenshot or flat graphics:") for c in p.caveats), p.path
        assert p.verdict == "uncertain" and p.is_ai is False
    assert preds[12].caveats[0].startswith("small image: 64x64 px is smaller than the model's 96 px crop")
    assert any(c.startswith("blurred or upscaled:") for c in preds[13].caveats)
    assert preds[12].verdict == preds[13].verdict == "uncertain"
    assert preds[14].caveats == [] and preds[14].verdict in BANDS


def test_an_image_under_two_tiles_a_side_is_too_small_for_a_verdict(default):
    """A photo halved to 128 px, or cut to 179 px, is read through a few
    overlapping tiles: uncertain, and said why; from 192 px it gets a verdict."""
    photo = imageorigin.decode_image(sorted((WIDE / "native/val/human").iterdir())[1])
    halved, cut, kept = photo.resize((128, 128)), photo.crop((0, 0, 179, 179)), photo.crop((0, 0, 192, 200))
    small, crop, enough = imageorigin.predict(default, [halved, cut, kept])
    for p, size in ((small, "128x128"), (crop, "179x179")):
        assert p.caveats == [f"small image: {size} px is read through fewer than two of the model's 96 px "
                             "tiles a side, too little of it for a verdict"]
        assert p.verdict == "uncertain" and p.is_ai is False
    assert enough.caveats == [] and enough.verdict in BANDS


def test_caveats_stay_quiet_on_ordinary_photos_and_renders(bench):
    files = [p for c in ("human", "dalle", "other_ai")
             for p in sorted((WIDE / "native/val" / c).iterdir())[:15]]
    images = [imageorigin.decode_image(p) for p in files]
    noisy = [p for p, im in zip(files, images) if image_caveats(im, 96)]
    assert len(noisy) <= 3, noisy


def test_jsonl_rows_carry_the_caveat_sentences(raw, tmp_path):
    out = tmp_path / "p.jsonl"
    shot = tmp_path / "shot.png"
    screenshots.make("testing", 3).save(shot)
    assert main(["predict", str(shot), str(raw / "human/bsds500__real_photo__test_65084.jpg"),
                 "--format", "jsonl", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["verdict"] == "uncertain" and "flat colour" in rows[0]["caveats"][0]
    assert rows[1]["caveats"] == [] and rows[1]["verdict"] in BANDS


# ---------------------------------------------------------------- models the tool reads


def test_an_exported_onnx_file_is_a_model_with_the_same_answers(default, raw, tmp_path, capsys):
    onnx_path = tmp_path / "mine.onnx"
    assert main(["export", "default", str(onnx_path)]) == 0
    files = sorted((raw / "dalle").iterdir()) + sorted((raw / "human").iterdir())[:3]
    ref = list(imageorigin.predict(default, files))
    got = list(imageorigin.predict(imageorigin.load(onnx_path), files))
    for a, b in zip(ref, got):
        assert a.verdict == b.verdict and a.label == b.label
        assert a.p_ai == pytest.approx(b.p_ai, abs=1e-4)
        assert [c["p_ai"] for c in a.patches] == pytest.approx([c["p_ai"] for c in b.patches], abs=1e-4)
    capsys.readouterr()
    assert main(["predict", "--model", str(onnx_path), str(files[0]), "--format", "csv", "--quiet"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split(",")[1] == ref[0].verdict
    assert main(["info", str(onnx_path)]) == 0
    assert "mobilenet_v2" in capsys.readouterr().out


def test_a_file_that_is_not_a_model_is_named_for_what_it_is(raw, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\n")
    image = raw / "human/bsds500__real_photo__test_65084.jpg"
    for path, what in ((text, "a text file"), (image, "a JPEG image")):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {what}, not a model file" in err and "Traceback" not in err
    bogus = tmp_path / "broken.onnx"
    bogus.write_bytes(b"\x00\x01garbage")
    assert main(["predict", "--model", str(bogus), str(image)]) == 2
    assert "broken.onnx" in capsys.readouterr().err


# The preprocessing of each kind of model `train` writes, behind the default's weights.
KINDS = {
    "native tiles covering the image (the default)": None,
    "native 3x3 grid (--crops 3)": {"crops": 3, "pool": "mean_logit"},
    "resizing (train without --native)": {"resize": 110, "crop": 96, "crops": 1, "interpolation": "bilinear",
                                          "pool": "mean_logit"},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_documented_onnx_runtime_snippet_reproduces_the_cli(kind, default, raw, tmp_path):
    page = (REPO / "docs/guide/exported-models.md").read_text()
    snippet = re.search(r"<!-- onnxruntime snippet -->\n```python\n(.*?)```", page, re.S).group(1)
    model, source = default, "default"
    if KINDS[kind]:
        model = imageorigin.load()
        model.preprocessing = {**model.preprocessing, **KINDS[kind]}
        imageorigin.model.save(model, tmp_path / "other.safetensors")
        model = imageorigin.load(tmp_path / "other.safetensors")
        assert all(model.preprocessing[k] == v for k, v in KINDS[kind].items())
        source = str(tmp_path / "other.safetensors")
    # PIL's resize (the snippet's) and torchvision's round a few pixels apart: 0.001 for a resizing model.
    tol = 1e-3 if kind.startswith("resizing") else 1e-4
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", source, str(onnx_path)]) == 0
    # A photo, a painting, and a 1536x1024 gpt-image-1 picture with flat background.
    full = next(WIDE.parent.joinpath("dh3-full/dalle").glob("*gpt-image-1__floorplan-output.png"))
    for image in (raw / "dalle/eudoxia0_gallery_of_sand__dalle2__timon__pollock__6.jpg",
                  raw / "human/bsds500__real_photo__test_65084.jpg", full):
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace('"model.onnx"', repr(str(onnx_path)))
                          .replace('"image.jpg"', repr(str(image))))
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
        [p] = imageorigin.predict(model, [image])
        got = dict(re.findall(r"(\w+) ([0-9.]+)", out))
        for label in model.labels:
            assert float(got[label]) == pytest.approx(p.probs[label], abs=tol), (image.name, label)
        assert float(got["p_ai"]) == pytest.approx(p.p_ai, abs=tol)


# ---------------------------------------------------------------- training on your own data


@pytest.fixture(scope="module")
def own_data(tmp_path_factory, bench):
    """Folders named as a user names them: real/ dalle3/ midjourney/, 30 images each."""
    root = tmp_path_factory.mktemp("own")
    for theirs, ours in (("real", "human"), ("dalle3", "dalle"), ("midjourney", "other_ai")):
        (root / theirs).mkdir()
        for f in sorted((bench / "resized/train" / ours).iterdir())[:30]:
            shutil.copy(f, root / theirs / f.name)
    return root


def _train(data, out, *extra):
    return main(["train", str(data), "--out", str(out), "--backbone", "mobilenet_v2", "--epochs", "4",
                 "--lr", "3e-3", "--quiet", *extra])


def test_own_class_names_with_human_class_and_small_data_warnings(own_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(own_data, run, "--human-class", "real", "--no-samples") == 0
    err = capsys.readouterr().err
    assert "few training images in" in err and "under 50 a class is barely learnt" in err
    assert "the validation set is small" in err
    assert "the threshold is fitted on only" in err
    model = imageorigin.load(run / "model.safetensors")
    assert model.human_label == "real" and model.threshold is not None
    # The uncertain band is a band, at least one logit wide, however few calibration images there are.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert logit(model.threshold) - logit(model.bands["likely_human"]) >= 1 - 1e-9
    if model.bands["widened"]:  # set by the rule, not the data: said on the terminal and the card
        assert "so the data left no uncertain band" in err
    [p] = imageorigin.predict(model, [next((own_data / "real").iterdir())])
    assert p.p_ai is not None and p.verdict in BANDS
    card = (run / "MODEL_CARD.md").read_text()
    assert "**Human class**: `real`" in card
    assert "**Small data**: the validation set is small" in card
    assert ("so the data left no uncertain band" in card) == model.bands["widened"]
    # A frozen backbone with a trained head is not called fine-tuned.
    assert card.splitlines()[card.splitlines().index("---", 1) + 1].startswith(
        "# **Linear-probe (frozen) mobilenet_v2 for Image Classification**")
    # The card's time covers the run a user waited for, its validation report included.
    took = re.search(r"\*\*Wall-clock time\*\*: ([\d.]+) s to train and calibrate, ([\d.]+) s with the "
                     r"validation report", card)
    assert took and float(took[2]) >= float(took[1]) == model.info["training"]["wall_seconds"]
    assert "DH3" not in card  # limitations of this run's own data, not the bench's
    # The kept epoch is the best on validation, and the card says which.
    history = json.loads((run / "history.json").read_text())
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    m = model.info["metrics"]
    assert m["best_epoch"] == best["epoch"] and m["val_accuracy"] == best["val_accuracy"]
    assert f"at epoch {best['epoch']} of 4" in card
    # Wall-clock covers the whole run, not only the last epoch's loop.
    assert model.info["training"]["wall_seconds"] >= history[-1]["seconds"]
    # No sample pictures drawn, and the card links none.
    assert not (run / "collage.png").exists() and not (run / "val/gallery.png").exists()
    _assert_links_exist(run / "MODEL_CARD.md")


def test_no_human_class_is_said_out_loud(own_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(own_data), "--out", str(run), "--backbone", "mobilenet_v2",
                 "--epochs", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no class is named 'human' (classes: dalle3, midjourney, real)" in err
    assert "--human-class NAME" in err
    card = (run / "MODEL_CARD.md").read_text()
    assert "**Human class**: none" in card
    _assert_links_exist(run / "MODEL_CARD.md")  # collage and gallery drawn, and linked
    assert "![Sample Dataset](collage.png)" in card
    assert main(["info", str(run / "model.safetensors")]) == 0
    assert "human      none: no p_ai, threshold or verdict" in capsys.readouterr().out


# ---------------------------------------------------------------- reports and the command line


def _assert_links_exist(md: Path):
    for link in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", md.read_text()):
        if not link.startswith(("http", "#", "mailto")):
            assert (md.parent / link.split("#")[0]).exists(), f"{md} links {link}, which is missing"


def test_every_picture_and_file_a_committed_document_links_exists():
    # safe.directory: a checkout owned by another user (a CI container's bind mount) is still read
    docs = subprocess.run(["git", "-c", f"safe.directory={REPO}", "ls-files", "*.md"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
    assert "README.md" in docs and any(d.startswith("docs/") for d in docs)
    for doc in docs:
        _assert_links_exist(REPO / doc)


def test_predict_gallery_draws_the_verdicts(raw, tmp_path, capsys):
    out = tmp_path / "g.png"
    files = sorted(str(p) for p in (raw / "human").iterdir())[:5]
    assert main(["predict", *files, "--gallery", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 300


def test_command_line_help_version_and_info(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"imageorigin {imageorigin.__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS passes over the training data (default: 15)" in text
    assert "--lr LR learning rate (the peak, with onecycle) (default: 0.0001)" in text
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PATH image files and folders" in text and "--quiet no progress bar" in text
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model      default\n") and "verdict    likely AI at p_ai >= " in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["dalle", "human", "other_ai"]
