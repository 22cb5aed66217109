"""What a user sees from `imageorigin audit`: per-class spreads, shortcut warnings, duplicates, bias probes."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imageorigin.audit import IJG_LUMINANCE, audit, estimate_jpeg_quality, ijg_table, to_markdown
from imageorigin.cli import main
from imageorigin.probes import luma, median3x3

DCSAN_JPEG = "dalle/dcsan_imagen__dalle2__statue-liberty-made-gold-reflecting-62248159__dal2-1.jpg"


def _warnings(result, rule=None, attribute=None, origin="files"):
    return [w for w in result["warnings"]
            if (rule is None or w["rule"] == rule) and (attribute is None or w["attribute"] == attribute)
            and w["origin"] == origin]


@pytest.fixture(scope="module")
def raw_audit(raw):
    return audit(raw)


def test_raw_samples_spread_per_class(raw_audit):
    r = raw_audit
    assert r["layout"] == "classes" and r["files"] == 15 and r["unreadable"] == []
    pc = r["per_class"]
    assert pc["dalle"]["format"] == {"JPEG": 3, "PNG": 2}
    assert pc["other_ai"]["format"] == {"PNG": 3}
    assert pc["dalle"]["common_sizes"] == [["1024x1024", 5]]
    assert (pc["dalle"]["alpha"], pc["human"]["alpha"], pc["other_ai"]["alpha"]) == (0, 4, 0)
    assert pc["human"]["mode"] == {"RGB": 3, "P": 2, "RGBA": 2}
    assert pc["human"]["exif_software"] == {"Adobe Photoshop CS5 Macintosh": 1}
    assert pc["human"]["png_text_keys"] == {"Author": 3, "Software": 3, "Title": 3}
    assert pc["dalle"]["jpeg_quality"] == {"n/a": 2, "85": 2, "92": 1}


def test_raw_samples_openai_exif_on_the_dcsan_dalle_jpeg(raw_audit):
    rec = next(f for f in raw_audit["file_records"] if f["path"] == DCSAN_JPEG)
    assert rec["format"] == "JPEG" and rec["exif"]
    assert "EXIF UserComment: Made with OpenAI Labs" in rec["ai_metadata"]
    flagged = {m["path"]: m["class"] for m in raw_audit["ai_metadata"]}
    assert flagged[DCSAN_JPEG] == "dalle" and set(flagged.values()) == {"dalle"} and len(flagged) == 2


def test_raw_samples_warn_about_size_alpha_mode_and_metadata(raw_audit):
    r = raw_audit
    sep = _warnings(r, "separates", "pixel_size")
    assert [(w["value"], w["classes"], w["in_class"], w["class_size"], w["in_rest"]) for w in sep] == [
        ("1024x1024", ["dalle"], 5, 5, 1)]
    assert "1024x1024 nearly separates dalle: 5/5 dalle files (100%) vs 1/10" in sep[0]["message"]
    alpha = _warnings(r, "marks", "alpha")
    assert [(w["value"], w["classes"], w["in_class"], w["in_rest"]) for w in alpha] == [("yes", ["human"], 4, 0)]
    assert {w["value"] for w in _warnings(r, "marks", "mode")} == {"P", "RGBA"}
    assert _warnings(r, "marks", "ai_metadata")[0]["classes"] == ["dalle"]
    assert _warnings(r, "marks", "png_text")[0]["value"] == "Author,Software,Title"
    # PNG vs JPEG alone does not tell these 15 files apart: other_ai is all PNG, but so are 6 of the 12 others.
    assert _warnings(r, attribute="format") == []
    assert r["separation"]["format"]["accuracy"] < r["separation"]["format"]["baseline"]


def test_normalised_bench_has_no_format_warnings_but_its_originals_do(bench):
    r = audit(bench / "resized", manifest=bench / "manifest.csv")
    assert r["layout"] == "splits" and r["splits"] == ["train", "val"] and r["files"] == 1652
    for c in r["classes"]:
        pc = r["per_class"][c]
        assert pc["format"] == {"JPEG": pc["files"]} and pc["jpeg_quality"] == {"90": pc["files"]}
        assert pc["common_sizes"][0][0] == "256x256" and pc["exif"] == pc["alpha"] == pc["icc"] == 0
    assert _warnings(r) == []  # nothing about the files themselves
    man = r["manifest"]
    assert man["matched_files"] == 1652 and man["groups_across_splits"]["count"] == 0
    assert man["originals"]["other_ai"]["format"] == {"PNG": 468}
    orig = _warnings(r, "separates", "orig_size", origin="manifest originals")
    assert [(w["value"], w["classes"], w["in_class"], w["class_size"]) for w in orig] == [
        ("1024x1024", ["dalle"], 501, 501)]
    fmt = _warnings(r, "predicts", "orig_format", origin="manifest originals")
    assert fmt[0]["classes"] == ["dalle", "other_ai"] and fmt[0]["accuracy"] >= 0.9
    assert r["duplicates"]["exact"]["counts"]["across_splits"] == 0


def test_manifest_matches_a_single_split_by_file_name(bench):
    r = audit(bench / "resized" / "val", manifest=bench / "manifest.csv")
    assert r["layout"] == "classes" and r["manifest"]["matched_files"] == 282
    assert set(r["manifest"]["sources"]["bsds500/real_photo"]) == {"human"}


@pytest.fixture
def planted(small_folder, tmp_path):
    """train/ and val/ from real bench images, with an exact and two near duplicates across them."""
    root = tmp_path / "planted"
    root.mkdir()
    shutil.move(small_folder(3, view="resized/train"), root / "train")
    shutil.move(small_folder(4, view="resized/val"), root / "val")
    pick = {c: sorted((root / "train" / c).iterdir())[0] for c in ("dalle", "human", "other_ai")}
    shutil.copy(pick["dalle"], root / "val" / "dalle" / "copy.jpg")
    Image.open(pick["human"]).save(root / "val" / "human" / "q70.jpg", quality=70)
    Image.open(pick["other_ai"]).resize((230, 230), Image.Resampling.LANCZOS).save(
        root / "val" / "other_ai" / "smaller.png")
    (root / "val" / "human" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root, {c: f"train/{c}/{p.name}" for c, p in pick.items()}


def test_planted_exact_and_near_duplicates_across_train_and_val(planted):
    root, picks = planted
    r = audit(root)
    assert r["layout"] == "splits" and r["files"] == 3 * 3 + 4 * 3 + 4
    assert [u["path"] for u in r["unreadable"]] == ["val/human/broken.jpg"]
    exact, near = r["duplicates"]["exact"], r["duplicates"]["near"]
    assert exact["counts"]["across_splits"] == 1
    assert {(p["a"], p["b"]) for p in exact["pairs"]} == {(picks["dalle"], "val/dalle/copy.jpg")}
    cross = {(p["a"], p["b"]): p for p in near["pairs"] if p["split_a"] != p["split_b"]}
    assert set(cross) == {(picks["human"], "val/human/q70.jpg"), (picks["other_ai"], "val/other_ai/smaller.png")}
    assert all(p["phash_distance"] <= 8 and p["dhash_distance"] <= 12 for p in cross.values())
    assert near["counts"]["across_classes"] == 0
    messages = [w["message"] for w in r["warnings"]]
    assert "1 exact-duplicate pair(s) straddle splits" in messages
    assert "2 near-duplicate pair(s) straddle splits" in messages
    assert "1 file(s) could not be read" in messages


def test_jpeg_quality_is_estimated_from_the_quantisation_tables(raw):
    assert ijg_table(50) == list(IJG_LUMINANCE)
    image = Image.open(raw / "human/bsds500__real_photo__test_65084.jpg")
    for quality in range(1, 101):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        assert estimate_jpeg_quality(Image.open(buf).quantization) == (quality, True), quality
    # Photoshop writes its own tables: the nearest IJG quality, marked as not exact.
    q, exact = estimate_jpeg_quality(
        Image.open(raw / "human/pypi_sample_images__real_photo__skimage__hubble_deep_field.jpg").quantization)
    assert not exact and 85 <= q <= 100
    assert estimate_jpeg_quality(None) is None


def test_cli_writes_json_and_markdown_and_prints_warnings(raw, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(raw), "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("audited 15 files (0 unreadable) in 3 classes:")
    assert "0 exact and 0 near-duplicate pairs in all" in lines[0] and str(out / "audit.md") in lines[0]
    assert "warning: alpha channel = yes marks human: 4/7 human files (57%) have it, 0/8 of the rest" in lines
    saved = json.loads((out / "audit.json").read_text())
    assert saved["files"] == 15 and len(lines) == 1 + len(saved["warnings"])
    md = (out / "audit.md").read_text()
    assert md.startswith(f"# Dataset audit: {raw}")
    assert md.index("## Warnings") < md.index("## Per class") < md.index("## Duplicates")
    assert "| alpha channel | 0 | 4 | 0 |" in md
    assert "EXIF UserComment: Made with OpenAI Labs" in md


def test_cli_prints_markdown_without_out_and_refuses_a_folder_without_classes(raw, tmp_path, capsys):
    assert main(["audit", str(raw / "other_ai"), "--quiet"]) == 2
    assert "class folder" in capsys.readouterr().err
    assert main(["audit", str(raw), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"# Dataset audit: {raw}")


# ---------------------------------------------------------------- bias probes


def _spread_subset(src, dest, n):
    """Copy n files spread evenly over the sorted folder ``src`` (many sources and prompt groups) to ``dest``."""
    files = sorted(src.iterdir())
    dest.mkdir(parents=True)
    for f in files[:: len(files) // n][:n]:
        shutil.copy(f, dest / f.name)


def test_probes_on_real_bench_images_give_an_auc_per_feature_group(bench, tmp_path):
    for c in ("dalle", "human", "other_ai"):
        _spread_subset(bench / "native/train" / c, tmp_path / c, 20)
    r = audit(tmp_path, manifest=bench / "manifest.csv")
    bias = r["bias_probes"]
    assert bias["skipped"] is None and (bias["images"], bias["ai"], bias["human"]) == (60, 40, 20)
    assert bias["grouped_by"].startswith("prompt group") and bias["groups"] < 60  # prompt variations share one
    assert list(bias["probes"]) == ["dct", "noise", "original", "all"]
    for p in bias["probes"].values():
        assert 0 <= p["auc"] <= 1 and len(p["folds"]) == 5 and p["warning"] == (p["auc"] > 0.75)
    assert bias["probes"]["dct"]["features"] == 121 and bias["probes"]["noise"]["features"] == 8
    assert {w["attribute"] for w in r["warnings"] if w["rule"] == "probe"} == \
        {k for k, p in bias["probes"].items() if p["warning"]}
    assert "## Bias probes" in to_markdown(r)


def test_probe_median_filter_is_scipys(raw):
    from scipy import ndimage

    y = luma(Image.open(raw / "human/bsds500__real_photo__test_65084.jpg"))
    assert np.array_equal(median3x3(y), ndimage.median_filter(y, size=3))
    assert np.array_equal(median3x3(y[:8, :24]), ndimage.median_filter(y[:8, :24], size=3))


def _made_up_classes(bench, root, human, other_ai, n=80):
    """n BSDS photographs (one source, one kind of content) split in turn into human/ and other_ai/,
    each class processed by its own function of a PIL image, saved as JPEG q90 like the bench."""
    photos = sorted((bench / "resized/train/human").glob("bsds500__*"))[:n]
    for i, f in enumerate(photos):
        cls, process = ("human", human) if i % 2 == 0 else ("other_ai", other_ai)
        (root / cls).mkdir(parents=True, exist_ok=True)
        process(Image.open(f).convert("RGB")).save(root / cls / f.name, quality=90)
    return root


def _blur(image):
    return image.filter(ImageFilter.GaussianBlur(1.5))


def test_a_class_made_blurry_is_caught_by_the_probes(bench, tmp_path, capsys):
    data = _made_up_classes(bench, tmp_path / "data", human=lambda im: im, other_ai=_blur)
    out = tmp_path / "audit"
    assert main(["audit", str(data), "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bias = json.loads((out / "audit.json").read_text())["bias_probes"]
    assert list(bias["probes"]) == ["dct", "noise", "all"]  # no manifest: no original probe
    assert all(p["auc"] > 0.75 and p["warning"] for p in bias["probes"].values())
    printed = [line for line in lines if line.startswith("bias probe, ")]
    assert len(printed) == 3 and all(line.endswith(" WARNING") for line in printed)
    assert any(line.startswith("warning: bias probe (8x8 DCT histograms): AI vs human ROC AUC") for line in lines)
    md = (out / "audit.md").read_text()
    assert md.index("## Warnings") < md.index("## Bias probes") < md.index("## Duplicates")
    assert "| 8x8 DCT histograms |" in md and "**WARNING**" in md


def test_both_classes_processed_alike_raise_no_probe_warning(bench, tmp_path):
    data = _made_up_classes(bench, tmp_path / "data", human=_blur, other_ai=_blur)
    r = audit(data)
    bias = r["bias_probes"]
    assert bias["skipped"] is None and bias["images"] == 80
    assert all(p["auc"] < 0.75 and not p["warning"] for p in bias["probes"].values()), bias["probes"]
    assert [w for w in r["warnings"] if w["rule"] == "probe"] == []
