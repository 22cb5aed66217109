"""The reviewers' loop on real images and real components: feedback through the
service into a real SQLite store, `adapt` on it, the gate refusing poisoned
feedback, and a hot swap (admin endpoint and SIGHUP) on a real server under load."""

import hashlib
import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import SHARED
from serving import serve_process
from imageorigin.adapt import accepted, adapt, class_of, gate, split_reviewed
from imageorigin.cli import main
from imageorigin.feedback import FeedbackStore
from imageorigin.model import default_model_path, load
from imageorigin.service import Limits, create_app

KEY = "review-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
WIDE = SHARED / "dh3-wide"


def _files(folder: Path, prefix: str, n: int, seed: int = 0) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.name.startswith(prefix))
    return random.Random(seed).sample(files, n)


def _link_folder(root: Path, picks: dict[str, list[Path]]) -> Path:
    for cls, files in picks.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            (root / cls / f.name).symlink_to(f)
    return root


def test_feedback_is_stored_with_the_answer_and_deleted_on_request(tmp_path, raw):
    image = sorted((raw / "human").iterdir())[0]
    data = image.read_bytes()
    store = tmp_path / "store"
    with TestClient(create_app("default", Limits(), [KEY], store=store, keep_images=True)) as c:
        result = c.post("/v1/analyze", files=[("files", (image.name, data))], headers=AUTH).json()["results"][0]
        assert c.get("/v1/model", headers=AUTH).json()["feedback"] == {"store": True, "keep_images": True}
        # behind the key, like everything else
        assert c.post("/v1/feedback", data={"sha256": result["sha256"], "label": "ai", "reviewer": "x"}).status_code == 401
        # by hash alone: the label is kept, the image cannot be (it was not sent)
        r = c.post("/v1/feedback", headers=AUTH, data={"sha256": result["sha256"], "label": "human",
                                                       "reviewer": "ana", "note": "my own photo"})
        assert r.status_code == 201, r.text
        row = r.json()
        assert row["image_kept"] == 0 and row["model_id"] == result["model"]["id"]
        assert row["model_verdict"] == result["verdict"] and row["model_p_ai"] == result["p_ai"]
        assert row["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8]  # never the key
        # with the file (as the page sends it): its bytes are kept, by content
        r = c.post("/v1/feedback", headers=AUTH, data={"label": "ai", "reviewer": "ben", "generator": "DALL-E 3"},
                   files={"file": (image.name, data)})
        assert r.status_code == 201 and r.json()["image_kept"] == 1
        kept = store / "images" / result["sha256"][:2] / result["sha256"]
        assert kept.read_bytes() == data
        listed = c.get("/v1/feedback", params={"sha256": result["sha256"]}, headers=AUTH).json()
        assert [(f["reviewer"], f["label"], f["generator"]) for f in listed["feedback"]] == [
            ("ana", "human", None), ("ben", "ai", "DALL-E 3")]
        # bad input: a clear 4xx, never a 5xx
        for form, files, status, words in [
                ({"sha256": result["sha256"], "label": "robot", "reviewer": "x"}, None, 422, "label must be"),
                ({"sha256": "0" * 64, "label": "ai", "reviewer": "x"}, None, 404, "send the file"),
                ({"sha256": "0" * 64, "label": "ai", "reviewer": "x"}, {"file": ("a.png", data)}, 422, "SHA-256"),
                ({"sha256": "zz", "label": "ai", "reviewer": "x"}, None, 422, "64 lower-case hex"),
                ({"label": "ai", "reviewer": "x"}, {"file": ("junk.png", b"not an image")}, 422, "junk.png"),
                ({"sha256": result["sha256"], "label": "ai"}, None, 422, "reviewer")]:
            r = c.post("/v1/feedback", headers=AUTH, data=form, files=files)
            assert r.status_code == status and words in r.json()["error"], (form, r.text)
        gone = c.delete(f"/v1/feedback/{result['sha256']}", headers=AUTH).json()
        assert gone == {"sha256": result["sha256"], "feedback_deleted": 2, "image_deleted": True}
        assert not kept.exists() and c.get("/v1/feedback", headers=AUTH).json()["total"] == 0
    # the rows are in a real SQLite file, and survive the service
    assert FeedbackStore(store).rows() == []
    # without --keep-images no image is kept, even one sent; without --store nothing is
    with TestClient(create_app("default", Limits(), [KEY], store=tmp_path / "s2")) as c:
        r = c.post("/v1/feedback", headers=AUTH, data={"label": "human", "reviewer": "ana"},
                   files={"file": (image.name, data)})
        assert r.status_code == 201 and r.json()["image_kept"] == 0 and not (tmp_path / "s2/images").exists()
    with TestClient(create_app("default", Limits(), [KEY])) as c:
        r = c.post("/v1/feedback", headers=AUTH, data={"sha256": "0" * 64, "label": "ai", "reviewer": "x"})
        assert r.status_code == 404 and "--store" in r.json()["error"]


def test_reviewers_answers_map_to_the_models_classes():
    model = load("default")
    assert class_of(model, "human") == "human"
    assert class_of(model, "ai", "DALL-E 3") == "dalle"
    assert class_of(model, "ai", "FLUX.1-dev") == "other_ai" and class_of(model, "ai") == "other_ai"
    rows = [{"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "label": "ai" if i % 2 else "human"}
            for i in range(300)]
    train, held = split_reviewed(rows)
    assert 0.1 < len(held) / len(rows) < 0.3 and not set(r["sha256"] for r in train) & set(r["sha256"] for r in held)
    # an image keeps its side whatever is added later
    assert split_reviewed(rows[:100])[1] == [r for r in held if r in rows[:100]]
    # and each answer keeps at least one image to learn from
    assert sorted(r["label"] for r in split_reviewed(rows[:2], hold_out=1.0)[0]) == ["ai", "human"]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A careless or hostile reviewer's work: 50 human photographs marked AI, through
    the real store, adapted into a candidate, then gated on a reference set."""
    root = tmp_path_factory.mktemp("poison")
    bsds = _files(SHARED / "dh3-bench/native/val/human", "bsds500", 72)
    photos, kept_back = bsds[:50], bsds[50:]
    store = FeedbackStore(root / "store", keep_images=True)
    for p in photos:
        data = p.read_bytes()
        store.add({"sha256": hashlib.sha256(data).hexdigest(), "reviewer": "mallory",
                   "label": "ai", "model_id": "?"}, data)
    human = WIDE / "native/val/human"
    reference = _link_folder(root / "reference", {
        "human": kept_back + _files(human, "csjunxu_PolyU", 20) + _files(human, "Li-Chongyi", 10) +
        _files(human, "majedelhelou", 12) + _files(human, "debian", 30),
        "dalle": _files(WIDE / "native/val/dalle", "jamez", 28),
        "other_ai": _files(WIDE / "native/val/other_ai", "andygock_FLUX", 30) +
        _files(WIDE / "native/val/other_ai", "SupaGruen", 20)})
    replay = [SHARED / "dh3-bench/native/train", WIDE / "native/train"]
    record = adapt("default", root / "store", root / "candidate", replay=replay, replay_per_class=60,
                   calibration_humans=120, progress=False)
    return record, gate(record["candidate"], default_model_path(), [reference]), root


def test_the_gate_refuses_poisoned_feedback(poisoned):
    record, result, root = poisoned
    assert len(record["trained_on"]) + len(record["held_out"]) == 50 and record["held_out"]
    # the default runs fp32 (int8 changed its answers): its mix does too, without a check of its own
    check = load(record["candidate"]).info["precision_check"]
    assert check["precision"] == "fp32" and check["inherited_from"] == record["current_id"]
    card = (root / "candidate/MODEL_CARD.md").read_text()
    assert "## Feedback it learned from" in card and "marked by mallory" in card
    assert result["accepted"] is False
    failed = [r["measure"] for r in result["rows"] if r["ok"] is False]
    # it flags more of the reference's people, ranks worse, or could only learn the poison by forgetting
    assert any(m.startswith(("reference AI-vs-human AUC", "reference humans flagged", "AUC on adapt's held-out"))
               for m in failed), result["rows"]
    table = (root / "candidate/gate.md").read_text()
    assert table.startswith("# Gate: REFUSED") and "**FAIL**" in table
    ok, why = accepted(record["candidate"])
    assert not ok and "the gate refused it" in why


def test_the_gate_command_prints_its_table_and_exits_1_when_refused(poisoned, capsys):
    record, result, root = poisoned
    code = main(["gate", record["candidate"], "--current", "default", "--reference", str(root / "reference")])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("# Gate: REFUSED") and "| reference humans flagged |" in out
    again = json.loads((root / "candidate/gate.json").read_text())  # rewritten by the command: the same decision
    assert [(r["measure"], r["ok"]) for r in again["rows"]] == [(r["measure"], r["ok"]) for r in result["rows"]]


def test_hot_swap_under_load_with_rollback_and_sighup(poisoned, raw, tmp_path):
    record, _, _ = poisoned
    candidate = record["candidate"]
    link = tmp_path / "current.safetensors"
    link.symlink_to(default_model_path())
    images = [(p.name, p.read_bytes()) for p in sorted((raw / "human").iterdir())[:2] + sorted((raw / "dalle").iterdir())[:2]]
    log = open(tmp_path / "server.log", "w")
    with serve_process("--model", str(link), "--api-key", KEY, "--store", str(tmp_path / "store"),
                       "--rate-per-minute", "0", headers=AUTH, output=log) as (url, _, server):
        def call(method, path, body=None):
            req = urllib.request.Request(url + path, method=method, headers={**AUTH, "Content-Type": "application/json"},
                                         data=json.dumps(body).encode() if body is not None else None)
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        first = call("GET", "/v1/model")[1]["id"]
        stop = threading.Event()
        seen, failures = [], []

        def client(i):
            with httpx.Client() as s:  # a real HTTP client per thread, as 16 separate users would be
                while not stop.is_set():
                    name, data = images[i % len(images)]
                    r = s.post(url + "/v1/analyze", files={"files": (name, data)}, headers=AUTH, timeout=120)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    else:
                        seen.append((time.monotonic(), r.json()["results"][0]["model"]["id"]))

        pool = ThreadPoolExecutor(16)
        futures = [pool.submit(client, i) for i in range(16)]
        try:
            time.sleep(3)
            # refused without a gate that accepted it: a 409 that says why, and nothing changes
            status, body = call("POST", "/v1/admin/deploy", {"path": candidate})
            assert status == 409 and "the gate refused it" in body["error"], body
            assert call("POST", "/v1/admin/deploy", {"path": str(tmp_path / "none.safetensors")})[0] == 404
            status, body = call("POST", "/v1/admin/deploy", {"path": candidate, "force": True})
            assert status == 200 and body["outcome"] == "deployed" and body["previous"] == [first], body
            swapped = time.monotonic()
            second = body["id"]
            time.sleep(3)
            status, body = call("POST", "/v1/admin/rollback")
            assert status == 200 and body["id"] == first, body
            rolled = time.monotonic()
            time.sleep(3)
        finally:
            stop.set()
            pool.shutdown(wait=True)
        for f in futures:
            f.result()
        assert failures == [] and len(seen) > 50
        ids = [i for _, i in seen]
        assert second in ids and ids[-1] == first  # both answered, each result naming its model
        assert all(i == second for t, i in seen if swapped + 1 < t < rolled - 0.5)
        assert call("POST", "/v1/admin/rollback")[0] == 409  # no further back than the start

        # SIGHUP: the service reloads the checkpoint its --model link points to
        def hup_to(target, want):
            link.unlink()
            link.symlink_to(target)
            server.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and call("GET", "/v1/model")[1]["id"] != want:
                time.sleep(0.2)
            return call("GET", "/v1/model")[1]["id"]

        assert hup_to(candidate, second) == second  # it has answered here before: no gate needed again
        assert hup_to(default_model_path(), first) == first  # and back (kept loaded)
        history = call("GET", "/v1/admin/deployments")[1]["deployments"]
        assert [d["action"] for d in history] == ["start", "deploy", "rollback", "deploy", "deploy"]
    log.close()
    assert "SIGHUP: deployed" in (tmp_path / "server.log").read_text()


def test_a_reviewer_corrects_a_result_on_the_page(raw, tmp_path):
    from playwright.sync_api import sync_playwright

    from conftest import served
    from serving import CHROMIUM

    photo = raw / "human/bsds500__real_photo__test_65084.jpg"
    app = create_app("default", Limits(), store=tmp_path / "store", keep_images=True)
    with served(app) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#model p")
        assert "Images a reviewer labels are kept" in page.inner_text("footer")
        page.set_input_files("#picker", [str(photo)])
        page.wait_for_selector("text=Done: 1 image analysed.", timeout=60000)
        form = page.locator("form.review")
        form.get_by_label("AI", exact=True).check()
        form.get_by_label("generator, if AI and known").fill("Midjourney v6")
        form.get_by_label("note").fill("seen on a prompt site")
        form.get_by_label("your name").fill("Chen")
        form.get_by_role("button", name="Send review").click()
        page.wait_for_selector(".review-status.saved", timeout=30000)
        said = form.locator(".review-status").inner_text()
        assert said.startswith("Saved: you said AI; the model (") and "The image is kept for retraining." in said
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        # the name is remembered for the next review
        page.reload()
        page.wait_for_selector("#model p")
        page.set_input_files("#picker", [str(photo)])
        page.wait_for_selector("text=Done: 1 image analysed.", timeout=60000)
        assert page.locator("form.review").get_by_label("your name").input_value() == "Chen"
        browser.close()
    row, = FeedbackStore(tmp_path / "store").rows()
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    assert (row["sha256"], row["label"], row["generator"], row["note"], row["reviewer"]) == (
        digest, "ai", "Midjourney v6", "seen on a prompt site", "Chen")
    assert row["model_verdict"] == "likely_human" and row["image_kept"] == 1
    assert FeedbackStore(tmp_path / "store").image_path(digest).read_bytes() == photo.read_bytes()
