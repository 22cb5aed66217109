"""The service's store of reviewers' corrections: one SQLite file (WAL) and, only
when asked, the reviewed images' bytes.

A reviewer marks a result as made by a person or by AI (optionally naming the
generator) with a note; each mark is one row of ``feedback``: who (the name the
reviewer gave and which API key sent it, as a short fingerprint), when, the
model that answered, its label, p_ai and verdict, and the reviewer's label.

**Retention.**  The service keeps no image it was not asked to keep.  Image
bytes are stored only for results a reviewer labelled, and only when the store
was opened with ``keep_images=True`` (``imageorigin serve --keep-images``):
content-addressed, ``images/<first 2 hex>/<sha256>``, written under a temporary
name and renamed into place.  :meth:`FeedbackStore.delete` (``DELETE
/v1/feedback/{sha256}``) removes an image's rows and its bytes at once.  A
second mark of the same image by the same reviewer replaces the first.

The store also keeps the service's deployments (which model answered from when,
who put it there), so that a rollback knows where to go back to.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from .fileio import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    sha256 TEXT NOT NULL,          -- of the image's bytes
    reviewer TEXT NOT NULL,        -- the name the reviewer gave
    key_id TEXT,                   -- the first 8 hex of the SHA-256 of the API key that sent it
    created_at REAL NOT NULL,      -- Unix time
    label TEXT NOT NULL,           -- the reviewer's: 'human' or 'ai'
    generator TEXT,                -- the reviewer's, optional (e.g. 'DALL-E 3')
    note TEXT,
    model_id TEXT,                 -- SHA-256 of the checkpoint that answered
    model_label TEXT,
    model_p_ai REAL,
    model_verdict TEXT,
    image_kept INTEGER NOT NULL,   -- 1: its bytes are in images/
    PRIMARY KEY (sha256, reviewer)
);
CREATE TABLE IF NOT EXISTS deployments (
    at REAL NOT NULL,
    model_id TEXT NOT NULL,
    path TEXT NOT NULL,
    action TEXT NOT NULL,          -- start, deploy, rollback
    by TEXT
);
"""
FEEDBACK_COLUMNS = ("sha256", "reviewer", "key_id", "created_at", "label", "generator", "note", "model_id",
                    "model_label", "model_p_ai", "model_verdict", "image_kept")
LABELS = ("human", "ai")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FeedbackStore:
    """The feedback database ``folder/feedback.sqlite`` and image folder ``folder/images``.

    Safe to share between the service's threads: one connection, used under a lock,
    a transaction per change."""

    def __init__(self, folder: str | os.PathLike, keep_images: bool = False):
        self.folder, self.keep_images = Path(folder), keep_images
        self.folder.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(str(self.folder / "feedback.sqlite"), check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")  # with WAL: a committed row survives a process kill
        self.con.executescript(SCHEMA)
        self.con.row_factory = sqlite3.Row
        self.lock = threading.Lock()

    def image_path(self, sha256: str) -> Path:
        """Where the bytes of the image ``sha256`` are kept (whether or not they are)."""
        return self.folder / "images" / sha256[:2] / sha256

    def add(self, row: dict, data: bytes | None = None) -> dict:
        """Store one mark (the keys of FEEDBACK_COLUMNS but image_kept and created_at);
        keep ``data`` too when the store keeps images.  Returns the stored row."""
        if row["label"] not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, not {row['label']!r}")
        if not SHA256.match(row["sha256"] or ""):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if data is not None and hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise ValueError("the file's SHA-256 is not the sha256 given")
        kept = self.image_path(row["sha256"]).is_file()
        if data is not None and self.keep_images and not kept:
            with atomic_path(self.image_path(row["sha256"])) as tmp:
                Path(tmp).write_bytes(data)
            kept = True
        row = {**row, "created_at": time.time(), "image_kept": int(kept)}
        with self.lock, self.con:
            self.con.execute(f"INSERT OR REPLACE INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(FEEDBACK_COLUMNS))})",
                             [row.get(c) for c in FEEDBACK_COLUMNS])
        return row

    def rows(self, sha256: str | None = None) -> list[dict]:
        """Every mark (of one image, with ``sha256``), oldest first."""
        where, args = ("WHERE sha256 = ?", [sha256]) if sha256 else ("", [])
        with self.lock:
            return [dict(r) for r in self.con.execute(
                f"SELECT * FROM feedback {where} ORDER BY created_at, rowid", args)]

    def reviewed(self) -> list[dict]:
        """One row per image whose bytes are kept: its newest mark, with ``path`` to the bytes."""
        newest = {}
        for r in self.rows():
            if self.image_path(r["sha256"]).is_file():
                newest[r["sha256"]] = {**r, "path": str(self.image_path(r["sha256"]))}
        return list(newest.values())

    def delete(self, sha256: str) -> dict:
        """Remove every mark of image ``sha256`` and its kept bytes.  Returns what was removed."""
        if not SHA256.match(sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        with self.lock, self.con:
            n = self.con.execute("DELETE FROM feedback WHERE sha256 = ?", [sha256]).rowcount
        path = self.image_path(sha256)
        had_image = path.is_file()
        path.unlink(missing_ok=True)
        return {"sha256": sha256, "feedback_deleted": n, "image_deleted": had_image}

    def record_deployment(self, model_id: str, path: str, action: str, by: str | None = None) -> None:
        """Note that ``model_id`` (from ``path``) answers from now on."""
        with self.lock, self.con:
            self.con.execute("INSERT INTO deployments VALUES (?, ?, ?, ?, ?)",
                             [time.time(), model_id, path, action, by])

    def deployments(self) -> list[dict]:
        """The service's deployments, oldest first."""
        with self.lock:
            return [dict(r) for r in self.con.execute("SELECT * FROM deployments ORDER BY at, rowid")]

    def close(self) -> None:
        self.con.close()
