"""imageorigin scan: a real SQLite file, re-runs that skip, and SIGKILL at random moments."""

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import imageorigin
from imageorigin import provenance
from imageorigin.cli import main
from imageorigin.scan import scan, walk_images


@pytest.fixture
def archive(tmp_path, bench):
    """A folder tree of real bench images (copied), with one broken file."""
    root = tmp_path / "archive"
    for i, c in enumerate(("dalle", "human", "other_ai")):
        (root / c / "sub").mkdir(parents=True)
        for j, f in enumerate(sorted((bench / "native/val" / c).iterdir())[:12]):
            shutil.copy(f, root / c / ("sub" if j % 2 else "") / f.name)
    (root / "human" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def _rows(db):
    with sqlite3.connect(db) as con:
        return con.execute("SELECT path, model, verdict, error FROM results ORDER BY path").fetchall()


def test_scan_stores_every_file_once_and_reruns_skip(archive, tmp_path):
    db = tmp_path / "r.sqlite"
    files = list(walk_images([archive]))
    assert len(files) == 37
    first = scan([archive], db, progress=False, commit_every=10)
    assert first["scanned"] == 37 and first["skipped"] == 0 and first["errors"] == 1
    assert first["files"] == 37 and sum(first["verdicts"].values()) == 36
    rows = _rows(db)
    assert len(rows) == len({r[0] for r in rows}) == 37
    bad = [r for r in rows if r[0].endswith("broken.jpg")][0]
    assert "broken.jpg" in bad[3] and bad[2] is None
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = scan([archive], db, progress=False)
    assert again["scanned"] == 0 and again["skipped"] == 37 and _rows(db) == rows
    # a changed file is scanned again; the rest are skipped
    victim = files[3]
    shutil.copy(files[20], victim)
    changed = scan([archive], db, progress=False)
    assert changed["scanned"] == 1 and changed["skipped"] == 36
    # another model scans everything again, beside the first model's rows
    other = imageorigin.load()
    other.info["note"] = "a second model"
    imageorigin.save(other, tmp_path / "other.safetensors")
    second = scan([archive], db, tmp_path / "other.safetensors", progress=False)
    assert second["scanned"] == 37 and len(_rows(db)) == 74


def _stored(store):
    """(path, verdict, error) of every row, from a SQLite file or a Parquet folder."""
    if store.is_dir():
        table = pq.read_table(sorted(store.glob("part-*.parquet")))
        return sorted(zip(*(table.column(c).to_pylist() for c in ("path", "verdict", "error"))))
    with sqlite3.connect(store) as con:
        return con.execute("SELECT path, verdict, error FROM results ORDER BY path").fetchall()


def _count(store):
    if store.is_dir():
        return len(_stored(store)) if any(store.glob("part-*.parquet")) else 0
    if not store.exists():
        return 0
    with sqlite3.connect(store) as con:
        has = con.execute("SELECT name FROM sqlite_master WHERE name='results'").fetchone()
        return con.execute("SELECT COUNT(*) FROM results").fetchone()[0] if has else 0


@pytest.mark.parametrize("mode", ["--db", "--out"])
def test_scan_survives_sigkill_at_random_moments(archive, tmp_path, mode):
    store = tmp_path / ("k.sqlite" if mode == "--db" else "parts")
    cmd = [sys.executable, "-m", "imageorigin.cli", "scan", str(archive), mode, str(store),
           "--commit-every", "4", "--batch-size", "4", "--quiet"]
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        # wait until the scan is under way, then kill it without warning
        while time.time() < deadline and proc.poll() is None and _count(store) == 0:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    assert main(["scan", str(archive), mode, str(store), "--quiet"]) == 0
    rows = _stored(store)
    paths = sorted(str(p) for p in walk_images([archive]))
    assert [r[0] for r in rows] == paths  # every file exactly once, none lost
    assert all(r[1] is not None or r[2] for r in rows)


def test_parquet_folder_holds_the_same_rows_as_sqlite_and_results_reads_it(archive, tmp_path, capsys):
    db, parts = tmp_path / "r.sqlite", tmp_path / "parts"
    a = scan([archive], db, progress=False, commit_every=10)
    b = scan([archive], out=parts, progress=False, commit_every=10)
    assert {k: a[k] for k in ("files", "errors", "verdicts", "labels")} == \
        {k: b[k] for k in ("files", "errors", "verdicts", "labels")}
    assert len(list(parts.glob("part-*.parquet"))) == 4 and not list(parts.glob(".tmp-*"))
    columns = "path, model, size, mtime_ns, sha256, label, probs, p_ai, is_ai, verdict, caveats, error"
    with sqlite3.connect(db) as con:
        expected = con.execute(f"SELECT {columns} FROM results ORDER BY path").fetchall()
    table = pq.read_table(sorted(parts.glob("part-*.parquet"))).sort_by("path")
    got = list(zip(*(table.column(c.strip()).to_pylist() for c in columns.split(","))))
    assert got == expected
    assert scan([archive], out=parts, progress=False)["skipped"] == 37
    # a changed file gets a newer row; readers see only the newest
    victim = sorted(walk_images([archive]))[3]
    shutil.copy(sorted(walk_images([archive]))[30], victim)
    assert scan([archive], out=parts, progress=False)["scanned"] == 1
    assert main(["results", str(parts), "--format", "jsonl", "--where", f"path = '{victim}'"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["size"] == victim.stat().st_size
    assert main(["results", str(parts), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 38


def test_results_export_csv_jsonl_parquet_with_a_condition(archive, tmp_path, capsys):
    db = tmp_path / "e.sqlite"
    assert main(["scan", str(archive), "--db", str(db), "--evidence", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("37 files in") and "1 errors" in out
    assert main(["results", str(db), "--format", "jsonl", "--where", "error IS NOT NULL"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["path"].endswith("broken.jpg") and row["p_ai"] is None
    assert main(["results", str(db), "--format", "csv", "--where", "verdict = 'likely_ai'",
                 "--out", str(tmp_path / "ai.csv")]) == 0
    lines = (tmp_path / "ai.csv").read_text().splitlines()
    assert lines[0].startswith("path,model,size") and all(",likely_ai," in line for line in lines[1:])
    assert main(["results", str(db), "--format", "parquet", "--out", str(tmp_path / "r.parquet")]) == 0
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 37 and "provenance" in table.column_names
    assert set(table.column("provenance").to_pylist()) <= {*provenance.SUMMARIES, None}
    assert main(["results", str(db), "--where", "no_such_column = 1"]) == 2
    assert "no such column" in capsys.readouterr().err


def test_ray_scan_on_a_two_node_cluster_matches_the_local_scan_and_survives_losing_a_node(archive, tmp_path,
                                                                                          bench):
    import threading

    import ray
    from ray.cluster_utils import Cluster

    local = tmp_path / "local.sqlite"
    scan([archive], local, progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    try:
        remote = tmp_path / "ray.sqlite"
        s = scan([archive], remote, progress=False, ray_address=cluster.address)
        assert s["scanned"] == 37
        columns = "path, model, size, sha256, label, is_ai, verdict, caveats, error"
        with sqlite3.connect(local) as a, sqlite3.connect(remote) as b:
            rows_a = a.execute(f"SELECT {columns}, probs FROM results ORDER BY path").fetchall()
            rows_b = b.execute(f"SELECT {columns}, probs FROM results ORDER BY path").fetchall()
        assert [r[:-1] for r in rows_a] == [r[:-1] for r in rows_b]  # the same rows...
        for x, y in zip(rows_a, rows_b):  # ...and probabilities to float noise (other batch compositions)
            assert (x[-1] is None) == (y[-1] is None)
            if x[-1]:
                px, py = json.loads(x[-1]), json.loads(y[-1])
                assert all(abs(px[k] - py[k]) < 1e-5 for k in px)

        # The workers writing Parquet parts themselves: the same rows again.
        parts = tmp_path / "ray-parts"
        s = scan([archive], out=parts, progress=False, ray_address=cluster.address, commit_every=16)
        assert s["scanned"] == 37 and s["errors"] == 1
        table = pq.read_table(sorted(parts.glob("part-*.parquet"))).sort_by("path")
        rows_c = list(zip(*(table.column(c.strip()).to_pylist() for c in columns.split(","))))
        assert rows_c == [r[:-1] for r in rows_a]

        # Lose the worker node once the scan is committing: every file still ends up exactly once.
        more = tmp_path / "more"
        more.mkdir()
        for f in sorted((bench / "native/val/other_ai").iterdir())[:80]:
            (more / f.name).symlink_to(f)
        db = tmp_path / "kill.sqlite"
        removed = []

        def remove_worker():
            deadline = time.time() + 120
            while time.time() < deadline:
                if db.exists():
                    with sqlite3.connect(db) as con:
                        if con.execute("SELECT name FROM sqlite_master WHERE name='results'").fetchone() \
                                and con.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 0:
                            break
                time.sleep(0.1)
            cluster.remove_node(worker, allow_graceful=False)
            removed.append(time.time())

        killer = threading.Thread(target=remove_worker)
        killer.start()
        s = scan([more], db, progress=False, ray_address=cluster.address, commit_every=16)
        finished = time.time()
        killer.join()
        assert removed and removed[0] < finished  # the node was lost while the scan ran
        with sqlite3.connect(db) as con:
            n, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM results").fetchone()
        assert n == distinct == 80 and s["errors"] == 0
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_results_and_scan_name_a_wrong_path_without_a_traceback(tmp_path, capsys):
    assert main(["results", str(tmp_path / "nope.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "nope.sqlite: no such results database" in err and "Traceback" not in err
    (tmp_path / "notes.sqlite").write_text("not a database\n")
    assert main(["results", str(tmp_path / "notes.sqlite")]) == 2
    assert "notes.sqlite: file is not a database" in capsys.readouterr().err
    # A mistyped folder: the same status as any user error, and no empty database left behind.
    assert main(["scan", str(tmp_path / "nosuchdir"), "--db", str(tmp_path / "x.sqlite"), "--quiet"]) == 2
    assert "no such file or folder to scan: " in capsys.readouterr().err
    assert not (tmp_path / "x.sqlite").exists()
