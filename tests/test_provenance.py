"""Provenance evidence from real files' own bytes: C2PA, generator text, XMP, EXIF."""

import csv
import io
import json
import time

import pytest
from PIL import Image, PngImagePlugin

from conftest import SHARED
from imageorigin import provenance
from imageorigin.cli import main

SAMPLES = SHARED / "provenance-samples"


def _read(path):
    return provenance.read(path.read_bytes())


def test_firefly_declares_ai_with_a_valid_but_untrusted_signature():
    ev = _read(SAMPLES / "c2pa/firefly.png")
    c = ev["c2pa"]
    assert c["state"] == "valid" and c["trusted"] is False and c["signer"] == "Adobe Inc."
    assert c["claim_generator"] == "Adobe_Firefly"
    # Firefly puts the digital source type inside the action's parameters
    assert [a["digital_source_type"] for a in c["actions"]] == ["trainedAlgorithmicMedia"]
    assert ev["xmp"]["DigitalSourceType"] == "trainedAlgorithmicMedia"
    assert ev["declared"] == "ai"
    text = " ".join(ev["evidence"])
    assert "signer not on a trust list" in text and "verified" not in text.lower()
    assert provenance.summarise(ev, "likely_ai") == "declares_ai"
    assert provenance.summarise(ev, "likely_human") == "conflict"


def test_photoshop_generative_edit_is_an_ai_assisted_edit():
    ev = _read(SAMPLES / "c2pa/ocsp.jpg")
    assert ev["declared"] == "ai_edit"
    assert any(a["digital_source_type"] == "compositeWithTrainedAlgorithmicMedia"
               and a["software_agent"] == "Adobe Firefly" for a in ev["c2pa"]["actions"])
    assert provenance.summarise(ev, "uncertain") == "ai_assisted_edit"


@pytest.mark.parametrize("name, problem", [("XCA.jpg", "assertion.dataHash.mismatch"),
                                           ("E-sig-CA.jpg", "claimSignature.mismatch")])
def test_invalid_manifests_are_said_to_be_invalid_and_not_relied_on(name, problem):
    ev = _read(SAMPLES / "c2pa" / name)
    assert ev["c2pa"]["state"] == "invalid" and problem in ev["c2pa"]["problems"]
    assert ev["declared"] is None
    assert "INVALID manifest" in ev["evidence"][0] and "cannot be relied on" in ev["evidence"][0]


def test_a_remote_manifest_is_not_fetched():
    started = time.perf_counter()
    ev = _read(SAMPLES / "c2pa/cloud.jpg")
    assert ev["c2pa"]["state"] == "remote"
    assert ev["c2pa"]["remote_url"].startswith("https://cai-manifests.adobe.com/")
    assert "not fetched" in ev["evidence"][0]
    assert time.perf_counter() - started < 5  # no network round trip was attempted


def test_files_without_manifests_and_weak_exif():
    ev = _read(SAMPLES / "c2pa/no_manifest.jpg")
    assert ev["c2pa"] is None and ev["declared"] is None
    assert ev["exif"]["software"].startswith("Adobe Photoshop")
    assert any("weak: trivially written or removed" in e for e in ev["evidence"])
    assert provenance.summarise(ev, "likely_ai") == "none"


def test_comfyui_and_dalle2_files_name_their_generator(raw):
    for name in ("comfyui_hypernetwork_example_output.png", "comfyui_lora.png"):
        ev = _read(SAMPLES / "png-text" / name)
        assert ev["generator"]["tool"] == "ComfyUI" and ev["declared"] == "ai"
        assert ev["generator"]["excerpt"].lstrip().startswith("{")  # the workflow's JSON
    dalle = raw / "dalle/dcsan_imagen__dalle2__statue-liberty-made-gold-reflecting-62248159__dal2-1.jpg"
    ev = _read(dalle)
    assert ev["generator"]["tool"] == "OpenAI (DALL-E)" and "Made with OpenAI Labs" in ev["generator"]["excerpt"]


def _png(**text) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_automatic1111_and_novelai_metadata_built_with_pillow():
    a1111 = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"
    assert provenance.read(_png(parameters=a1111))["generator"]["tool"].startswith("AUTOMATIC1111")
    nai = provenance.read(_png(Software="NovelAI", Comment='{"prompt": "a cat"}'))
    assert nai["generator"]["tool"] == "NovelAI" and nai["declared"] == "ai"
    # A1111 writes JPEG / WebP parameters into EXIF UserComment, UTF-16 after "UNICODE\0"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + a1111.encode("utf-16-be")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG", exif=exif)
    ev = provenance.read(buf.getvalue())
    assert ev["generator"]["where"] == "EXIF UserComment" and "Steps: 20" in ev["generator"]["excerpt"]


def _xmp_png(packet: bytes) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG", pnginfo=_info_xmp(packet))
    return buf.getvalue()


def _info_xmp(packet: bytes):
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet.decode())
    return info


XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
       'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/{kind}"/>'
       '</rdf:RDF></x:xmpmeta>')


def test_xmp_digital_source_type_and_hostile_packets():
    ev = provenance.read(_xmp_png(XMP.format(kind="digitalCapture").encode()))
    assert ev["xmp"]["DigitalSourceType"] == "digitalCapture" and ev["declared"] == "capture"
    assert provenance.summarise(ev, "likely_ai") == "conflict"
    bomb = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY {chr(98 + i)} "&{chr(97 + i)};&{chr(97 + i)};&{chr(97 + i)};">' for i in range(8))
            + ']><x:xmpmeta xmlns:x="adobe:ns:meta/">&i;</x:xmpmeta>')
    started = time.perf_counter()
    ev = provenance.read(_xmp_png(bomb.encode()))
    assert ev["xmp"] == {} and any(n.startswith("XMP not parsed") for n in ev["notes"])
    deep = '<x:xmpmeta xmlns:x="adobe:ns:meta/">' + "<a>" * 50000 + "</a>" * 50000 + "</x:xmpmeta>"
    ev = provenance.read(_xmp_png(deep.encode()))
    assert ev["xmp"] == {}
    assert time.perf_counter() - started < 5


def test_garbage_bytes_give_notes_not_exceptions():
    for data in (b"", b"\x89PNG\r\n\x1a\n truncated", b"not an image at all" * 100):
        ev = provenance.read(data)
        assert ev["declared"] is None and ev["c2pa"] is None


def test_predict_evidence_column_and_details(raw, tmp_path, capsys):
    files = [SAMPLES / "c2pa/firefly.png", SAMPLES / "png-text/comfyui_lora.png",
             raw / "human/bsds500__real_photo__test_65084.jpg"]
    out = tmp_path / "p.csv"
    assert main(["predict", *map(str, files), "--evidence", "--format", "csv", "--out", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["provenance"] for r in rows][0] in ("declares_ai", "conflict")
    assert rows[2]["provenance"] == "none"
    assert main(["predict", str(files[0]), "--evidence", "--format", "jsonl", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["provenance"]["c2pa"]["signer"] == "Adobe Inc."
    assert any("trainedAlgorithmicMedia" in e for e in row["provenance"]["evidence"])
    # without --evidence: the one-word summary still (a column, and counted), not the details
    assert main(["predict", str(files[0]), "--format", "jsonl", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["provenance"] in ("declares_ai", "conflict")


def test_the_table_names_invalid_and_remote_manifests_and_counts_what_files_declare(capsys):
    """An invalid or remote manifest is not "none"; the summary counts what the files say."""
    assert main(["predict", str(SAMPLES), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 120 for line in lines)
    starts = [i for i, ch in enumerate(lines[1]) if ch != " " and (i == 0 or lines[1][i - 1] == " ")]
    end = next(i for i, line in enumerate(lines) if " images: " in line)
    rows = {}
    for line in lines[2:end]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(lines[1].split(), cells))
    assert rows["c2pa/XCA.jpg"]["provenance"] == "invalid_manifest"  # pixels changed after signing
    assert rows["c2pa/E-sig-CA.jpg"]["provenance"] == "invalid_manifest"
    assert rows["c2pa/cloud.jpg"]["provenance"] == "remote_manifest"  # named, never fetched
    assert rows["c2pa/CA.jpg"]["provenance"] == "manifest_no_claim"
    assert rows["c2pa/no_manifest.jpg"]["provenance"] == "none"
    counts = {k: sum(r["provenance"] == k for r in rows.values()) for k in provenance.SUMMARIES}
    assert " ".join(line.strip() for line in lines[end + 1:]) == "by their own metadata: " + ", ".join(
        f"{n} {k}" for k, n in counts.items() if n and k != "none")  # wrapped at 120 columns
    assert counts["declares_ai"] >= 3 and lines[end].startswith(f"{len(rows)} images: ")
