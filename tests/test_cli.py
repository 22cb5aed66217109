"""What a user sees from `imageorigin predict`, `info` and `export`."""

import csv
import json
import shutil

import pytest

import imageorigin
from imageorigin.cli import main
from imageorigin.data import crop_boxes

COLUMNS = ["path", "verdict", "generator", "p_dalle", "p_human", "p_other_ai", "p_ai", "is_ai", "caveats",
           "provenance", "error", "warnings"]


def _table(lines):
    """Rows of an aligned table as dicts, cut at the header's column starts."""
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    cut = lambda line: [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]  # noqa: E731
    return [dict(zip(names, cut(line))) for line in lines[1:]]


def test_predict_table_on_the_raw_samples(raw, capsys):
    assert main(["predict", str(raw), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# likely AI: p_ai >= ")
    # A table to read in a 120-column terminal: paths under the folder given, no column empty in every row.
    assert lines[1].split() == ["file", "verdict", "p_ai", "generator", "caveats", "provenance"]
    assert all(len(line) <= 120 for line in lines)
    rows = _table(lines[1:-2])
    assert len(rows) == 15  # 15 images, folders searched recursively
    assert all(r["file"].split("/")[0] in ("dalle", "human", "other_ai") for r in rows)
    assert lines[-2].startswith("15 images: ") and lines[-2].endswith(" 0 errors")
    # the files' own metadata, counted beside the pixel verdicts (the DALL-E 2 files say "Made with OpenAI")
    declares = sum(r["provenance"] == "declares_ai" for r in rows)
    assert declares and f"by their own metadata: {declares} declares_ai" in lines[-1]
    assert main(["predict", str(raw), "--quiet", "--format", "csv"]) == 0
    full = list(csv.DictReader(capsys.readouterr().out.splitlines()))  # the same files, in the same order
    for r, whole in zip(rows, full, strict=True):
        assert r["verdict"] in ("likely_ai", "uncertain", "likely_human")
        # the generator is named only for an AI verdict: never "human", never a guess below the cut
        assert bool(r["generator"]) == (r["verdict"] == "likely_ai")
        assert r["generator"] in ("", "dalle", "other_ai")
        head, _, tail = r["file"].partition("…")  # a long path keeps its folder and its end
        assert whole["path"].startswith(str(raw / head)) and whole["path"].endswith(tail)
        probs = [float(whole[f"p_{c}"]) for c in ("dalle", "human", "other_ai")]
        assert sum(probs) == pytest.approx(1, abs=2e-4)
        assert float(r["p_ai"]) == pytest.approx(1 - probs[1], abs=2e-4) == float(whole["p_ai"])
        assert whole["provenance"] == r["provenance"]
    # clip art is flat graphics: said, and never a confident verdict
    clipart = [(r, whole) for r, whole in zip(rows, full) if "openclipart" in whole["path"]]
    # (one is also under 192 px: two caveats, the table's narrow cell shortens them)
    assert clipart and all(whole["caveats"].count("screenshot or flat graphics:") == 1
                           and r["caveats"].startswith(("screenshot or flat graphics", "small image;"))
                           and r["verdict"] == "uncertain" for r, whole in clipart)


def test_bad_file_gets_an_error_row_and_the_batch_goes_on(raw, tmp_path, capsys):
    shutil.copytree(raw / "other_ai", tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "pred.csv"
    code = main(["predict", str(tmp_path / "imgs"), "--format", "csv", "--out", str(out), "--quiet"])
    assert code == 1
    assert "1 of 4 files could not be read" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    bad = [r for r in rows if r["path"].endswith("broken.png")][0]
    assert "broken.png" in bad["error"] and bad["generator"] == "" and bad["p_ai"] == ""
    good = [r for r in rows if r is not bad]
    assert all(r["error"] == "" and r["p_ai"] for r in good)
    assert all(bool(r["generator"]) == (r["verdict"] == "likely_ai") for r in good)


def test_jsonl_matches_the_python_api(raw, capsys):
    files = sorted((raw / "dalle").iterdir())
    assert main(["predict", *map(str, files), "--format", "jsonl", "--quiet"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    api = list(imageorigin.predict(imageorigin.load(), files))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for r, p in zip(rows, api):
        assert r["generator"] == (p.label if p.verdict == "likely_ai" else None) and r["p_ai"] == pytest.approx(p.p_ai, abs=1e-6)
        assert r["error"] is None
        # the default scores tiles covering the image: the patch map comes with each row
        size = imageorigin.decode_image(p.path).size
        assert len(r["patches"]) == len(crop_boxes(*size, imageorigin.load().preprocessing)) >= 9
        assert [c["p_ai"] for c in r["patches"]] == pytest.approx([c["p_ai"] for c in p.patches], abs=1e-6)
        assert [c["weight"] for c in r["patches"]] == [c["weight"] for c in p.patches]


def test_predict_accepts_pil_images(raw):
    img = imageorigin.decode_image(raw / "human/bsds500__real_photo__test_65084.jpg")
    by_path, by_image = imageorigin.predict(
        imageorigin.load(), [raw / "human/bsds500__real_photo__test_65084.jpg", img]
    )
    assert by_image.path == "<image 1>"
    assert by_image.probs == pytest.approx(by_path.probs, abs=1e-6)


def test_missing_model_is_a_message_not_a_traceback(raw, tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope.safetensors"), str(raw)]) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors: no such model file" in err and "Traceback" not in err


def test_info_and_export(capsys, tmp_path):
    assert main(["info", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["labels"] == ["dalle", "human", "other_ai"]
    # the default is a MobileNetV2: it has no seed (.pth DenseNet121) layout
    assert main(["export", "default", str(tmp_path / "x.pth")]) == 2
    assert "densenet121" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_predict_into_a_closed_pipe_stops_quietly(raw):
    """`imageorigin predict DIR | head -1`: the header line, then silence, not a BrokenPipeError."""
    import subprocess
    import sys

    run = subprocess.run(f'"{sys.executable}" -m imageorigin.cli predict "{raw}" --format csv | head -1',
                         shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert run.stdout.startswith("path,verdict,")
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_the_table_never_rounds_p_ai_onto_the_cut(raw, capsys):
    """A cut a hair above an image's p_ai: the table shows both with enough decimals to read the side."""
    image = sorted((raw / "dalle").iterdir())[0]
    p = next(imageorigin.predict(imageorigin.load(), [image])).p_ai
    cut = p + 3e-6
    assert main(["predict", str(image), "--threshold", f"{cut:.8f}", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown_cut = lines[0].split("p_ai >= ")[1].split()[0]
    [row] = _table([line for line in lines[1:] if not line.startswith(("1 images:", "by their own"))])
    assert row["verdict"] != "likely_ai" and row["p_ai"] != shown_cut
    assert float(row["p_ai"]) < float(shown_cut) and len(shown_cut.split(".")[1]) == len(row["p_ai"].split(".")[1])
