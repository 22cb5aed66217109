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

``out=DIR`` keeps the same rows as a folder of Parquet parts instead (for
shared storage, where a Ray cluster's workers write their own parts): each
part is written whole under a temporary name and renamed into place, named by
its content so that a batch Ray runs again replaces its part instead of
adding one.  A re-run skips the files the parts hold; a changed file gets a
newer row beside its old one, and readers keep the newest row per (path, model).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
import uuid
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
    warnings TEXT,                -- what the decoder said about a damaged but readable file
    scanned_at REAL,
    PRIMARY KEY (path, model)
)
"""
COLUMNS = ("path", "model", "size", "mtime_ns", "sha256", "label", "probs", "p_ai", "is_ai", "verdict",
           "caveats", "provenance", "error", "warnings", "scanned_at")


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
    if "warnings" not in {r[1] for r in con.execute("PRAGMA table_info(results)")}:
        con.execute("ALTER TABLE results ADD COLUMN warnings TEXT")  # a database from before it
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


def scan(paths: Iterable[str | os.PathLike], db: str | os.PathLike | None = None, model: str = "default", *,
         out: str | os.PathLike | None = None, evidence: bool = False, batch_size: int = 32,
         commit_every: int = 256, progress: bool = True, num_workers: int | None = None,
         ray_address: str | None = None) -> dict:
    """Classify every image under ``paths`` into the SQLite database ``db``, or
    into a folder ``out`` of Parquet parts.

    Files already stored with the same size, modification time and model are
    skipped.  ``ray_address`` ("auto", or a cluster's address) runs the
    classification on a Ray cluster (see :func:`_ray_rows`): with ``db`` the
    rows stream back to this process, the database's one writer; with ``out``
    the workers write the parts themselves.  Returns the summary: counts per
    verdict and label, errors, the flagged share, and files scanned / skipped
    this run.
    """
    if (db is None) == (out is None):
        raise ValueError("give either a SQLite database (db) or a Parquet folder (out)")
    paths = list(paths)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:  # before the store is made: a mistyped folder leaves no empty database behind
        raise FileNotFoundError(f"no such file or folder to scan: {', '.join(missing)}")
    checkpoint = default_model_path() if str(model) == "default" else Path(model)
    model_id = _sha256(checkpoint)
    store = SqliteStore(db) if out is None else ParquetStore(out, model_id)
    if ray_address:
        classify = _ray_rows(ray_address, str(model), model_id, evidence, batch_size,
                             None if out is None else str(out))
    else:
        clf = load(model)
        classify = lambda todo, stats: (_row(p, model_id, stats) for p in predict(  # noqa: E731
            clf, todo, batch_size=batch_size, num_workers=num_workers, evidence=evidence))
    total = sum(1 for _ in walk_images(paths)) if progress else None  # a listing pass: no memory kept
    done = {"scanned": 0, "skipped": 0}
    bar = tqdm(total=total, unit="file", desc="scan", disable=not progress, smoothing=0.05)
    try:
        for chunk in _chunks(walk_images(paths), commit_every):
            stats = _stats(chunk)
            seen = store.seen(chunk, model_id)
            todo = [p for p in chunk if stats[str(p)][0] is None or (str(p), *stats[str(p)]) not in seen]
            done["skipped"] += len(chunk) - len(todo)
            bar.update(len(chunk) - len(todo))
            rows, missing = {}, todo
            for _ in range(3):  # a lost Ray node can lose the batches it held: ask again for those
                for r in classify(missing, stats) if missing else ():
                    rows[r["path"]] = r
                    bar.update(1)
                missing = [p for p in missing if str(p) not in rows]
                if not missing:
                    break
            if missing:
                raise RuntimeError(f"{len(missing)} files came back from no worker after 3 tries, "
                                   f"e.g. {missing[0]}; re-run the scan to finish them")
            # Rows a Ray worker already wrote to its own part come back as {"path": ...} only.
            store.write([r for r in rows.values() if len(r) > 1])
            done["scanned"] += len(rows)
    finally:
        bar.close()
    result = store.summary(model_id)
    result.update(done)
    store.close()
    return result


def _stats(chunk: list[Path]) -> dict[str, tuple]:
    """Each file's (size, mtime_ns); (None, None) for one that cannot be stat'ed."""
    stats = {}
    for p in chunk:
        try:
            st = p.stat()
            stats[str(p)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[str(p)] = (None, None)
    return stats


def _row(p, model_id: str, stats: dict) -> dict:
    """A prediction as the stores keep it (JSON text for probs and caveats), one value per column."""
    size, mtime = stats[str(p.path)]
    return {"path": str(p.path), "model": model_id, "size": size, "mtime_ns": mtime,
            "sha256": _sha256(Path(p.path)), "label": p.label,
            "probs": json.dumps(p.probs) if p.probs else None, "p_ai": p.p_ai,
            "is_ai": None if p.is_ai is None else int(p.is_ai), "verdict": p.verdict,
            "caveats": json.dumps(p.caveats), "provenance": (p.provenance or {}).get("summary"),
            "error": p.error, "warnings": "; ".join(p.warnings) or None, "scanned_at": time.time()}


class SqliteStore:
    """Rows in one SQLite file (WAL); this process is its one writer, a transaction per chunk."""

    def __init__(self, db: str | os.PathLike):
        self.con = connect(db)

    def seen(self, chunk: list[Path], model_id: str) -> set[tuple]:
        """(path, size, mtime_ns) of the files of ``chunk`` already stored for ``model_id``."""
        marks = ",".join("?" * len(chunk))
        return {tuple(r) for r in self.con.execute(
            f"SELECT path, size, mtime_ns FROM results WHERE model = ? AND path IN ({marks})",
            [model_id, *map(str, chunk)])}

    def write(self, rows: list[dict]) -> None:
        with self.con:  # one transaction: the whole chunk or none of it
            self.con.executemany(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * len(COLUMNS))})",
                                 [tuple(r[c] for c in COLUMNS) for r in rows])

    def summary(self, model_id: str) -> dict:
        return summary(self.con, model_id)

    def close(self) -> None:
        self.con.close()


class ParquetStore:
    """Rows as a folder of Parquet parts (``part-*.parquet``), each written whole by
    :func:`write_part`.  The files already done are read once, at the start."""

    def __init__(self, out: str | os.PathLike, model_id: str):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done = {r["path"]: (r["size"], r["mtime_ns"])
                     for r in _newest(self.dir, ["path", "size", "mtime_ns"], model_id)}

    def seen(self, chunk: list[Path], model_id: str) -> set[tuple]:
        return {(str(p), *self.done[str(p)]) for p in chunk if str(p) in self.done}

    def write(self, rows: list[dict]) -> None:
        if rows:
            write_part(self.dir, rows)

    def summary(self, model_id: str) -> dict:
        con = sqlite3.connect(":memory:")
        con.execute(SCHEMA)
        con.executemany("INSERT INTO results (path, model, verdict, label, error) VALUES (?, ?, ?, ?, ?)",
                        ((r["path"], model_id, r["verdict"], r["label"], r["error"]) for r in
                         _newest(self.dir, ["path", "verdict", "label", "error"], model_id)))
        return summary(con, model_id)

    def close(self) -> None:
        pass


def _arrow_schema():
    import pyarrow as pa

    types = {"size": pa.int64(), "mtime_ns": pa.int64(), "p_ai": pa.float64(), "is_ai": pa.int64(),
             "scanned_at": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def write_part(folder: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` as one Parquet part in ``folder``, atomically (a temporary name,
    then a rename).  The name is a digest of the rows' (path, model, size, mtime),
    so writing the same batch again replaces its part rather than adding a copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = hashlib.sha256("\n".join(f"{r['path']}\0{r['model']}\0{r['size']}\0{r['mtime_ns']}"
                                    for r in rows).encode()).hexdigest()[:24]
    final = Path(folder) / f"part-{key}.parquet"
    tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}.parquet")
    schema = _arrow_schema()
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in COLUMNS}, schema=schema), tmp)
    os.replace(tmp, final)
    return final


def _newest(folder: Path, columns: list[str], model_id: str | None = None) -> list[dict]:
    """The rows of a Parquet folder's parts (for one model, or all), only the newest
    per (path, model): a file scanned again after it changed has two."""
    import pyarrow.dataset as pds

    parts = sorted(str(f) for f in Path(folder).glob("part-*.parquet"))
    if not parts:
        return []
    ds = pds.dataset(parts, format="parquet", schema=_arrow_schema())
    keep = list(dict.fromkeys([*columns, "path", "model", "scanned_at"]))
    table = ds.to_table(columns=keep, filter=None if model_id is None else pds.field("model") == model_id)
    newest: dict[tuple, dict] = {}
    for r in table.sort_by("scanned_at").to_pylist():
        newest[(r["path"], r["model"])] = r
    return [{c: r[c] for c in columns} for r in newest.values()]


class _RayClassifier:
    """A Ray Data actor: loads the model once (the fast engine), classifies batches of
    paths; with ``out`` it writes each batch's part itself and returns the paths only."""

    def __init__(self, model: str, model_id: str, evidence: bool, out: str | None):
        self.model, self.model_id, self.evidence, self.out = load(model), model_id, evidence, out

    def __call__(self, batch: dict) -> dict:
        stats = {p: (None if s < 0 else int(s), None if m < 0 else int(m))
                 for p, s, m in zip(batch["path"], batch["size"], batch["mtime_ns"])}
        rows = [_row(p, self.model_id, stats) for p in predict(self.model, list(batch["path"]),
                                                                evidence=self.evidence)]
        if self.out:
            write_part(self.out, rows)
            return {"path": [r["path"] for r in rows]}
        return {k: [r[k] for r in rows] for k in COLUMNS}


def _ray_rows(address: str, model: str, model_id: str, evidence: bool, batch_size: int, out: str | None):
    """A function classifying a list of paths on the Ray cluster at ``address``:
    a Ray Data dataset of the paths, ``map_batches`` over an actor pool (one
    actor per node's worth of CPUs, each loading the model once); the rows
    stream back to this process, or with ``out`` (a folder every node sees) the
    actors write them there.  Every node must see the same paths (shared
    storage) and have imageorigin installed."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def classify(todo: list[Path], stats: dict) -> Iterator[dict]:
        # -1 for a file that could not be stat'ed: Ray Data's columns want one type.
        ds = ray.data.from_items([{"path": str(p), "size": -1 if stats[str(p)][0] is None else stats[str(p)][0],
                                   "mtime_ns": -1 if stats[str(p)][1] is None else stats[str(p)][1]}
                                  for p in todo])
        # Between 1 and one actor per CPU: the pool shrinks if a node is lost, and
        # Ray Data retries the lost node's batches on the actors that remain.
        rows = ds.map_batches(_RayClassifier, fn_constructor_kwargs={
            "model": model, "model_id": model_id, "evidence": evidence, "out": out},
            batch_size=batch_size, num_cpus=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        yield from rows.iter_rows()

    return classify


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
    ``db`` is a SQLite file, opened read-only, or a scan's Parquet folder (its
    newest row per file, queried in memory).  Returns the row count."""
    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no such results database or Parquet folder "
                                "(imageorigin scan writes one with --db FILE or --out FOLDER)")
    if Path(db).is_dir():
        con = sqlite3.connect(":memory:")
        con.execute(SCHEMA)
        con.executemany(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        (tuple(r[c] for c in COLUMNS) for r in _newest(Path(db), list(COLUMNS))))
    else:
        con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'").fetchone():
            raise ValueError(f"{db}: not a results database of imageorigin scan (it has no results table)")
        cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM results"
                          + (f" WHERE {where}" if where else "") + " ORDER BY path, model")
        rows, n = cur, 0
        if fmt == "parquet":  # written 10,000 rows at a time: memory stays flat
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _arrow_schema()
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
    except sqlite3.DatabaseError as err:  # not SQLite, or a --where that is not SQL
        raise ValueError(f"{db}: {err}") from None
    finally:
        con.close()
