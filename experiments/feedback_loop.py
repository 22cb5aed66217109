"""The reviewers' loop end to end, through a real service and its real store.

    python experiments/feedback_loop.py runs/kfold-share25 --out docs/feedback

Committed result: that command (``runs/kfold-share25`` is ``imageorigin
crossval`` with the default's recipe, grouped 6-fold by family).

For each source below, held out of one fold's training: that fold's model,
which never saw the source's family, stands in for the shipped model.  It is
served (``imageorigin serve --store S --keep-images``, a real process on
127.0.0.1); the team's reference set is 100 validation images per class of the
sources the fold trained on; replay data is the fold's own training sources.
Then, for 10, 25 and 50 reviews: the source's first n images are analysed and
marked (correctly) through ``POST /v1/feedback`` with the file; ``imageorigin
adapt`` (a subprocess, from the served model) makes a candidate and gates it;
an accepted candidate is deployed through ``POST /v1/admin/deploy`` while 16
clients keep sending images; the source's remaining images (never reviewed)
and the reference set are scored through the service before and after; then
``POST /v1/admin/rollback`` restores the original for the next n.  AUC on the
source is its remaining images against the reference images of the other kind.

Writes ``feedback_loop.json`` and ``feedback_loop.md``; prints each row as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import imageorigin  # noqa: E402
from imageorigin.crossval import family  # noqa: E402
from imageorigin.data import ImageDataset, batches, match_manifest, read_manifest, scan_folders, stack_images  # noqa: E402
from imageorigin.engine import check_precision, needs_check  # noqa: E402
from imageorigin.model import save  # noqa: E402
from imageorigin.evaluate import figures  # noqa: E402
from imageorigin.fileio import write_json, write_text  # noqa: E402
from serving import serve_process  # noqa: E402

SOURCES = {  # source -> what kind of unseen source it is
    "csjunxu_PolyU-Real-World-Noisy-Images/cropped_real": "a kind of photograph (noisy low-light camera crops)",
    "eudoxia0_gallery_of_sand/dalle2": "a generator (DALL-E 2)",
    "debian_openclipart/human_clipart_rgba": "a kind of art (vector clip art)",
}
SHOTS = (10, 25, 50)
KEY = "feedback-loop-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kfold_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", action="append", help="only these sources (default: all three)")
    args = p.parse_args()
    result = json.loads((args.kfold_dir / "crossval.json").read_text())
    rows = []
    for source in args.source or SOURCES:
        rows += run_source(source, result, args.kfold_dir, args.out / "work")
        out = {"rows": rows, "kfold_dir": str(args.kfold_dir), "clients": CLIENTS}
        write_json(args.out / "feedback_loop.json", out)
        write_text(args.out / "feedback_loop.md", markdown(out))
    print(markdown(out))


def folders(source: str, result: dict, kfold: Path, work: Path) -> dict:
    """The fold that held ``source`` out: its model, replay and reference folders, and the source's images."""
    fold = next(r["fold"] for r in result["sources"] if r["source"] == source)
    held = set(next(f["held_out"] for f in result["folds"] if f["fold"] == fold))
    manifests = result["manifest"].split(", ")
    rows = read_manifest(manifests, ("path", "source"))
    slug = fold.replace(" ", "_")
    made = {}
    for split, per_class in (("train", 100_000), ("val", 100)):
        found = scan_folders([Path(m).parent / f"native/{split}" for m in manifests])
        by_class: dict[str, list[Path]] = {}
        for (path, y), row in zip(found.samples, match_manifest([p for p, _ in found.samples], rows)):
            if row is not None and family(row) not in held:
                by_class.setdefault(found.classes[y], []).append(path)
        root = work / f"{split}-{slug}"
        for cls, files in by_class.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for f in random.Random(2).sample(sorted(files), min(len(files), per_class)):
                if not (root / cls / f.name).exists():
                    os.symlink(os.path.abspath(f), root / cls / f.name)
        made[split] = root
    scores = [line.split(",") for line in (kfold / slug / "test_scores.csv").read_text().splitlines()[1:]]
    mine = sorted(path for path, src, _, _ in scores if src == source and "/native/" in path)
    random.Random(0).shuffle(mine)
    label = next(lab for _, src, lab, _ in scores if src == source)
    return {"fold": fold, "model": checked_copy(kfold / slug / "model.safetensors", made["train"], work / slug),
            "replay": made["train"],
            "reference": made["val"], "images": mine, "label": label}


def checked_copy(checkpoint: Path, replay: Path, work: Path) -> Path:
    """The fold model as the shipped default is: with its int8 / bf16 check stored (the
    fold models were trained before int8 was tried, so a service would check them on
    its first batch).  Checked on 256 of its own training images; weights untouched."""
    out = work / "served.safetensors"
    if out.is_file():
        return out
    model = imageorigin.load(checkpoint)
    if needs_check(model.info.get("precision_check")):
        files = [p for p, _ in scan_folders([replay], model.labels).samples]
        files = random.Random(0).sample(files, 256)
        images = stack_images([im for _, x, _, _ in batches(ImageDataset(files, model.transform), 32)
                               if x is not None for im in x])
        check = check_precision(model, images)
        model.inference_precision, model.info["precision_check"] = check["precision"], check
    save(model, out)
    return out


def run_source(source: str, result: dict, kfold: Path, work: Path) -> list[dict]:
    f = folders(source, result, kfold, work)
    base = work / _slug(source)
    store = base / "store"
    if base.exists():
        subprocess.run(["rm", "-rf", str(base)], check=True)
    base.mkdir(parents=True)
    is_ai = f["label"] != "human"
    remaining = f["images"][max(SHOTS):]  # never reviewed: the source's test
    ref = scan_folders([f["reference"]], ["dalle", "human", "other_ai"])
    ref_files = [str(p) for p, _ in ref.samples]
    ref_ai = np.array([y != 1 for _, y in ref.samples])
    other_kind = [p for p, a in zip(ref_files, ref_ai) if a != is_ai]
    rows = []
    log = open(base / "server.log", "w")
    with serve_process("--model", str(f["model"]), "--api-key", KEY, "--store", str(store), "--keep-images",
                       "--rate-per-minute", "0", headers=AUTH, output=log, seconds=120) as (url, _, _):
        client = httpx.Client(base_url=url, headers=AUTH, timeout=300)
        original = client.get("/v1/model").json()["id"]
        before = measure(client, remaining, other_kind, is_ai, ref_files, ref_ai)
        reviewed = 0
        for n in SHOTS:
            # The reviewers' work: each image analysed, then marked with the file.
            for path in f["images"][reviewed:n]:
                data = Path(path).read_bytes()
                answer = client.post("/v1/analyze", files={"files": (Path(path).name, data)}).json()
                r = client.post("/v1/feedback", data={"label": "ai" if is_ai else "human", "reviewer": "loop",
                                                      "sha256": answer["results"][0]["sha256"],
                                                      "generator": f["label"] if is_ai else ""},
                                files={"file": (Path(path).name, data)})
                r.raise_for_status()
            reviewed = n
            began = time.perf_counter()
            cand = base / f"candidate-{n}"
            run = subprocess.run([sys.executable, "-m", "imageorigin.cli", "adapt", str(f["model"]),
                                  "--feedback", str(store), "--out", str(cand), "--replay", str(f["replay"]),
                                  "--reference", str(f["reference"]), "--quiet"],
                                 capture_output=True, text=True)
            adapted = time.perf_counter() - began
            gate = json.loads((cand / "gate.json").read_text())
            adapt_rec = json.loads((cand / "adapt.json").read_text())
            row = {"source": source, "kind": SOURCES[source], "fold": f["fold"], "label": f["label"],
                   "reviews": n, "test_images": len(remaining), "accepted": gate["accepted"],
                   "adapt_seconds": adapt_rec["seconds"], "gate_seconds": gate["seconds"],
                   "adapt_and_gate_seconds": round(adapted, 1), "gate": gate["rows"], "before": before,
                   "exit": run.returncode}
            if gate["accepted"]:
                swap, failures, answered = deploy_under_load(client, url, str(cand / "model.safetensors"),
                                                             f["images"][:8])
                row["swap_seconds"] = swap["seconds"]
                row["to_deployed_seconds"] = round(adapted + swap["seconds"], 1)
                row["failed_requests"], row["requests_during_swap"] = failures, answered
                row["after"] = measure(client, remaining, other_kind, is_ai, ref_files, ref_ai)
                row["after"]["model_id"] = swap["id"]
                back = client.post("/v1/admin/rollback").json()
                assert back["id"] == original, back
            print(json.dumps({k: v for k, v in row.items() if k != "gate"}), flush=True)
            rows.append(row)
    log.close()
    return rows


def measure(client: httpx.Client, remaining: list[str], other_kind: list[str], is_ai: bool,
            ref_files: list[str], ref_ai: np.ndarray) -> dict:
    """Through the service: AUC and flagged share on the source's remaining images
    (against the reference's other kind), and the reference set's AUC and humans flagged."""
    scored = score(client, sorted(set(remaining + ref_files)))
    p_src = np.array([scored[p]["p_ai"] for p in remaining])
    p_other = np.array([scored[p]["p_ai"] for p in other_kind])
    flagged = np.array([scored[p]["is_ai"] for p in remaining], dtype=bool)
    truth = np.array([is_ai] * len(p_src) + [not is_ai] * len(p_other))
    p_ref = np.array([scored[p]["p_ai"] for p in ref_files])
    ref_flag = np.array([scored[p]["is_ai"] for p in ref_files], dtype=bool)
    src = figures(np.ones(len(truth), bool), truth, np.concatenate([p_src, p_other]), None)
    ref = figures(np.ones(len(p_ref), bool), ref_ai, p_ref, None)
    return {"source_auc": src["ai_vs_human_auc"], "source_flagged": float(flagged.mean()),
            "reference_auc": ref["ai_vs_human_auc"], "reference_humans_flagged": float(ref_flag[~ref_ai].mean()),
            "models": sorted({scored[p]["model"] for p in scored})}


def score(client: httpx.Client, files: list[str], batch: int = 16) -> dict:
    out = {}
    for i in range(0, len(files), batch):
        part = files[i:i + batch]
        body = client.post("/v1/analyze", files=[("files", (Path(p).name, Path(p).read_bytes())) for p in part])
        for p, r in zip(part, body.json()["results"]):
            out[p] = {"p_ai": r["p_ai"], "is_ai": r["is_ai"], "model": r["model"]["id"]}
    return out


def deploy_under_load(client: httpx.Client, url: str, candidate: str, images: list[str]):
    """Deploy ``candidate`` while CLIENTS threads keep analysing images; returns
    (the deploy answer, failed requests, requests answered while it ran)."""
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in images]
    stop = threading.Event()
    failures, answered = [], []

    def load(i: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=300) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/analyze", files={"files": payloads[i % len(payloads)]})
                    (answered if r.status_code == 200 else failures).append(r.status_code)
                except httpx.HTTPError as err:
                    failures.append(repr(err))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(2)
    began = len(answered)
    swap = client.post("/v1/admin/deploy", json={"path": candidate}).json()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    return swap, len(failures), len(answered) - began


def _slug(s: str) -> str:
    return s.replace("/", "__")


def markdown(out: dict) -> str:
    def f3(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["# The reviewers' loop, end to end", "",
             "Each source held out of one fold of `" + out["kfold_dir"] + "`: that fold's model (it never saw the "
             "source's family) served by `imageorigin serve --store --keep-images`; n of the source's images "
             "reviewed through `POST /v1/feedback`; `imageorigin adapt` + gate; an accepted candidate deployed "
             f"through `POST /v1/admin/deploy` under {out['clients']} clients; scored through the service. "
             "Source AUC: its remaining (never reviewed) images against the reference images of the other kind.",
             "", "| source | kind | reviews | gate | adapt + gate (s) | to deployed (s) | failed requests / answered "
             "during swap | source AUC before -> after | source flagged before -> after | reference AUC before "
             "-> after | reference humans flagged before -> after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        b, a = r["before"], r.get("after") or {}
        lines.append(
            f"| {r['source']} | {r['kind']} | {r['reviews']} | {'accepted' if r['accepted'] else 'refused'} | "
            f"{r['adapt_and_gate_seconds']} | {r.get('to_deployed_seconds', '-')} | "
            f"{r.get('failed_requests', '-')} / {r.get('requests_during_swap', '-')} | "
            f"{f3(b['source_auc'])} -> {f3(a.get('source_auc'))} | {f3(b['source_flagged'])} -> "
            f"{f3(a.get('source_flagged'))} | {f3(b['reference_auc'])} -> {f3(a.get('reference_auc'))} | "
            f"{f3(b['reference_humans_flagged'])} -> {f3(a.get('reference_humans_flagged'))} |")
    refused = [r for r in out["rows"] if not r["accepted"]]
    if refused:
        lines += ["", "Refused candidates (the gate's rows that failed):", ""]
        for r in refused:
            why = "; ".join(f"{g['measure']}: {f3(g['current'])} -> {f3(g['candidate'])} ({g['rule']})"
                            for g in r["gate"] if g["ok"] is False)
            lines.append(f"- {r['source']}, {r['reviews']} reviews: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
