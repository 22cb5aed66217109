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
         progress: bool = True, num_workers: int | None = None) -> dict:
    """Classify every image under ``paths`` into the SQLite database ``db``.

    Files already in the database with the same size, modification time and
    model are skipped.  Returns the summary: counts per verdict and label,
    errors, the flagged share, and files scanned / skipped this run.
    """
    checkpoint = default_model_path() if str(model) == "default" else Path(model)
    model_id = _sha256(checkpoint)
    clf = load(model)
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
            rows = []
            for p in predict(clf, todo, batch_size=batch_size, num_workers=num_workers, evidence=evidence):
                size, mtime = stats[str(p.path)]
                rows.append((str(p.path), model_id, size, mtime, _sha256(Path(p.path)), p.label,
                             json.dumps(p.probs) if p.probs else None, p.p_ai,
                             None if p.is_ai is None else int(p.is_ai), p.verdict,
                             json.dumps(p.caveats), (p.provenance or {}).get("summary"), p.error, time.time()))
                bar.update(1)
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
