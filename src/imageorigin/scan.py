"""Scan a whole archive into SQLite, resumably: ``imageorigin scan`` and ``results``.

One row per (file, model) in a SQLite database in WAL mode: path, size, mtime,
the SHA-256 of the bytes, the model id (its checkpoint's SHA-256), label,
class probabilities, p_ai, is_ai, verdict, caveats, provenance summary, error
and the time of the scan.

- **Resumable.**  Rows are committed a batch at a time, in one transaction
  each: killed at any moment (SIGKILL included), the database holds every
  batch committed before, and a re-run of the same command skips those files
  and redoes the rest.  The key (path, model) makes a file appear once per
  model whatever happens.  A file whose size or modification time changed, or a
  different model, is scanned again.
- **Streaming.**  Folders are walked lazily, one directory listing at a time,
  and files go through ``predict`` a batch at a time, so memory stays flat
  however many files there are.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from .images import IMAGE_SUFFIXES
from .model import default_model_path, load
from .predict import predict

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    path TEXT NOT NULL,
    model TEXT NOT NULL,          -- SHA-256 of the checkpoint file
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,                  -- of the file's bytes
    label TEXT,
    probs TEXT,                   -- JSON {label: probability}
    p_ai REAL,
    is_ai INTEGER,
    verdict TEXT,
    caveats TEXT,                 -- JSON list of sentences
    provenance TEXT,              -- summary, with --evidence
    error TEXT,
    scanned_at REAL,
    PRIMARY KEY (path, model)
)
"""
COLUMNS = ("path", "model", "size", "mtime_ns", "sha256", "label", "probs", "p_ai", "is_ai", "verdict",
           "caveats", "provenance", "error", "scanned_at")


def walk_images(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Image files under ``paths``, lazily: one directory listing in memory at a
    time, each sorted (files first, then sub-folders).  A file named directly is
    yielded whatever its suffix."""
    for root in map(Path, paths):
        if not root.is_dir():
            yield root
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as err:
                print(f"imageorigin: skipping {folder}: {err.strerror}", file=sys.stderr)
                continue
            dirs = []
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    dirs.append(Path(e.path))
                elif Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield Path(e.path)
            stack.extend(reversed(dirs))


def connect(db: str | os.PathLike) -> sqlite3.Connection:
    """The results database, created if missing, in WAL mode (readers never block the scan)."""
    con = sqlite3.connect(str(db))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")  # with WAL: a committed batch survives a process kill
    con.execute(SCHEMA)
    return con


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def scan(paths: Iterable[str | os.PathLike], db: str | os.PathLike, model: str = "default", *,
         evidence: bool = False, batch_size: int = 32, commit_every: int = 256,
         progress: bool = True, num_workers: int | None = None, ray_address: str | None = None) -> dict:
    """Classify every image under ``paths`` into the SQLite database ``db``.

    Files already in the database with the same size, modification time and
    model are skipped.  ``ray_address`` ("auto", or a cluster's address) runs
    the classification on a Ray cluster (see :func:`_ray_rows`); this process
    stays the one writer of the database.  Returns the summary: counts per
    verdict and label, errors, the flagged share, and files scanned / skipped
    this run.
    """
    checkpoint = default_model_path() if str(model) == "default" else Path(model)
    model_id = _sha256(checkpoint)
    clf = None if ray_address else load(model)
    classify = _ray_rows(ray_address, str(model), evidence, batch_size) if ray_address else \
        lambda todo: (_row(p) for p in predict(clf, todo, batch_size=batch_size, num_workers=num_workers,
                                                  evidence=evidence))
    con = connect(db)
    paths = list(paths)
    total = sum(1 for _ in walk_images(paths)) if progress else None  # a listing pass: no memory kept
    done = {"scanned": 0, "skipped": 0}
    bar = tqdm(total=total, unit="file", desc="scan", disable=not progress, smoothing=0.05)
    try:
        for chunk in _chunks(walk_images(paths), commit_every):
            todo, stats = _todo(con, chunk, model_id)
            done["skipped"] += len(chunk) - len(todo)
            bar.update(len(chunk) - len(todo))
            rows, missing = [], todo
            for _ in range(3):  # a lost Ray node can lose the batches it held: ask again for those
                got = {}
                for r in classify(missing) if missing else ():
                    got[r["path"]] = r
                    bar.update(1)
                for r in got.values():
                    size, mtime = stats[r["path"]]
                    rows.append((r["path"], model_id, size, mtime, _sha256(Path(r["path"])), r["label"],
                                 r["probs"], r["p_ai"], r["is_ai"], r["verdict"], r["caveats"], r["provenance"],
                                 r["error"], time.time()))
                missing = [p for p in missing if str(p) not in got]
                if not missing:
                    break
            if missing:
                raise RuntimeError(f"{len(missing)} files came back from no worker after 3 tries, "
                                   f"e.g. {missing[0]}; re-run the scan to finish them")
            with con:  # one transaction: the whole chunk or none of it
                con.executemany(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(COLUMNS))})", rows)
            done["scanned"] += len(rows)
    finally:
        bar.close()
    out = summary(con, model_id)
    out.update(done)
    con.close()
    return out


def _row(p) -> dict:
    """A prediction as the database stores it (JSON text for probs and caveats)."""
    return {"path": str(p.path), "label": p.label, "probs": json.dumps(p.probs) if p.probs else None,
            "p_ai": p.p_ai, "is_ai": None if p.is_ai is None else int(p.is_ai), "verdict": p.verdict,
            "caveats": json.dumps(p.caveats), "provenance": (p.provenance or {}).get("summary"),
            "error": p.error}


class _RayClassifier:
    """A Ray Data actor: loads the model once (the fast engine), classifies batches of paths."""

    def __init__(self, model: str, evidence: bool):
        self.model, self.evidence = load(model), evidence

    def __call__(self, batch: dict) -> dict:
        rows = [_row(p) for p in predict(self.model, list(batch["path"]), evidence=self.evidence)]
        return {k: [r[k] for r in rows] for k in rows[0]}


def _ray_rows(address: str, model: str, evidence: bool, batch_size: int):
    """A function classifying a list of paths on the Ray cluster at ``address``:
    a Ray Data dataset of the paths, ``map_batches`` over an actor pool (one
    actor per node's worth of CPUs, each loading the model once); the rows
    stream back to this process.  Every node must see the same paths (shared
    storage) and have imageorigin installed."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def classify(todo: list[Path]) -> Iterator[dict]:
        ds = ray.data.from_items([{"path": str(p)} for p in todo])
        # Between 1 and one actor per CPU: the pool shrinks if a node is lost, and
        # Ray Data retries the lost node's batches on the actors that remain.
        out = ds.map_batches(_RayClassifier, fn_constructor_kwargs={"model": model, "evidence": evidence},
                             batch_size=batch_size, num_cpus=1,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        yield from out.iter_rows()

    return classify


def _todo(con: sqlite3.Connection, chunk: list[Path], model_id: str) -> tuple[list[Path], dict]:
    """The files of ``chunk`` not yet scanned as they are now, and each file's (size, mtime_ns)."""
    stats = {}
    for p in chunk:
        try:
            st = p.stat()
            stats[str(p)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[str(p)] = (None, None)
    marks = ",".join("?" * len(chunk))
    seen = {(r[0], r[1], r[2]) for r in con.execute(
        f"SELECT path, size, mtime_ns FROM results WHERE model = ? AND path IN ({marks})",
        [model_id, *map(str, chunk)])}
    todo = [p for p in chunk if (str(p), *stats[str(p)]) not in seen or stats[str(p)][0] is None]
    return todo, stats


def summary(con: sqlite3.Connection, model_id: str) -> dict:
    """Counts for one model's rows: per verdict, per label, errors, and the flagged share."""
    q = lambda sql: con.execute(sql, (model_id,)).fetchall()  # noqa: E731
    n = q("SELECT COUNT(*) FROM results WHERE model = ?")[0][0]
    errors = q("SELECT COUNT(*) FROM results WHERE model = ? AND error IS NOT NULL")[0][0]
    verdicts = dict(q("SELECT verdict, COUNT(*) FROM results WHERE model = ? AND error IS NULL GROUP BY verdict"))
    labels = dict(q("SELECT label, COUNT(*) FROM results WHERE model = ? AND error IS NULL GROUP BY label"))
    flagged = verdicts.get("likely_ai", 0)
    return {"files": n, "errors": errors, "verdicts": verdicts, "labels": labels,
            "flagged": flagged, "flagged_share": flagged / max(n - errors, 1), "model": model_id}


def export(db: str | os.PathLike, out, fmt: str = "csv", where: str | None = None) -> int:
    """Write the rows of ``db`` (those matching the SQL condition ``where``) as
    csv, jsonl or parquet to ``out`` (a path; csv / jsonl may be a text stream).
    The database is opened read-only.  Returns the row count."""
    con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM results"
                          + (f" WHERE {where}" if where else "") + " ORDER BY path, model")
        rows, n = cur, 0
        if fmt == "parquet":  # written 10,000 rows at a time: memory stays flat
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"size": pa.int64(), "mtime_ns": pa.int64(), "p_ai": pa.float64(), "is_ai": pa.int64(),
                     "scanned_at": pa.float64()}
            schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
            with pq.ParquetWriter(out, schema) as writer:
                while batch := cur.fetchmany(10000):
                    writer.write_table(pa.table({c: [r[i] for r in batch] for i, c in enumerate(COLUMNS)},
                                                schema=schema))
                    n += len(batch)
            return n
        stream = open(out, "w", newline="", encoding="utf-8") if isinstance(out, (str, Path)) else out
        try:
            if fmt == "csv":
                import csv

                writer = csv.writer(stream)
                writer.writerow(COLUMNS)
                for r in rows:
                    writer.writerow(r)
                    n += 1
            elif fmt == "jsonl":
                for r in rows:
                    row = dict(zip(COLUMNS, r))
                    for k in ("probs", "caveats"):
                        row[k] = json.loads(row[k]) if row[k] else row[k]
                    stream.write(json.dumps(row) + "\n")
                    n += 1
            else:
                raise ValueError(f"unknown format {fmt!r}: csv, jsonl or parquet")
        finally:
            if stream is not out:
                stream.close()
        return n
    except sqlite3.OperationalError as err:
        raise ValueError(f"{db}: {err}") from None
    finally:
        con.close()
