"""The model a service answers with, and swapping it without downtime.

:class:`Models` holds the :class:`Served` model; the service's batcher reads
``Models.current`` once per batch, so a swap is one assignment: a batch in
flight finishes on the model it started with and says so, the next batch runs
on the new one, and no request waits for a load.  :meth:`Models.deploy` loads
and warms the new checkpoint on its own thread while the old one keeps
answering.  A checkpoint is deployed only if its gate accepted it
(:func:`imageorigin.adapt.accepted`), unless it has answered in this service
before (the model it started with, one rolled back from, or one the store's
deployment history names) or the caller forces it.  :meth:`Models.rollback`
goes back to the model before, kept loaded.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .adapt import accepted, sha256_file
from .model import Classifier, checkpoint_file, load
from .predict import predict

KEEP_PREVIOUS = 3  # models kept loaded for a rollback


class Busy(Exception):
    """The service's queue is full: the client should retry later."""


class Refused(Exception):
    """A deployment or rollback that may not happen (the message says why)."""


@dataclass
class Served:
    """A loaded, warmed model and what results say about it."""

    model: Classifier
    id: str  # SHA-256 of the checkpoint file
    path: str
    weak_spots: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.time)


def load_served(model: str | os.PathLike) -> Served:
    """Load ``model`` and warm it up on this thread: the first forward pass compiles
    its engine, which is slow, and no request should wait for it."""
    path = checkpoint_file(model)
    clf = load(path)
    list(predict(clf, [Image.new("RGB", (256, 256), (128, 96, 64))]))
    return Served(clf, sha256_file(path), str(path), weak_spots(path))


def weak_spots(checkpoint: Path) -> list[str]:
    """The known weak spots of a model: the bullets of the Limitations sections of
    its card, the Markdown file beside the checkpoint (``<name>.md``, or the
    ``MODEL_CARD.md`` that ``train`` writes into the run folder)."""
    for card in (checkpoint.with_suffix(".md"), checkpoint.parent / "MODEL_CARD.md"):
        if card.is_file():
            break
    else:
        return []
    spots, inside = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            inside = "imitation" in line
        elif inside and line.startswith("- "):
            spots.append(line[2:].strip())
        elif inside and spots and line.startswith("  ") and line.strip():
            spots[-1] += " " + line.strip()  # a bullet's continuation line
    return [re.sub(r"\*\*|`", "", s) for s in spots]


class Models:
    """The served model, the ones before it (for rollback), and the swaps between them."""

    def __init__(self, served: Served, store=None):
        self.current = served
        self.previous: list[Served] = []
        self.store = store  # a FeedbackStore, where deployments are recorded
        self.lock = asyncio.Lock()  # one swap at a time
        self.known = {served.id}
        if store is not None:
            self.known |= {d["model_id"] for d in store.deployments()}
            store.record_deployment(served.id, served.path, "start")

    async def deploy(self, model: str | os.PathLike, by: str | None = None, force: bool = False) -> dict:
        """Load ``model`` beside the current one, then answer with it.  Raises
        :class:`Refused` when its gate did not accept it, FileNotFoundError, or
        ValueError for a file that is not a checkpoint."""
        async with self.lock:
            began = time.perf_counter()
            path = checkpoint_file(model)
            if not path.is_file():
                raise FileNotFoundError(f"{model}: no such checkpoint")
            model_id = await asyncio.to_thread(sha256_file, path)
            if model_id == self.current.id:
                return self._answer("unchanged", began)
            if not force and model_id not in self.known:
                ok, why = await asyncio.to_thread(accepted, path)
                if not ok:
                    raise Refused(why)
            kept = next((s for s in self.previous if s.id == model_id), None)
            if kept is not None:
                self.previous.remove(kept)
            new = kept or await asyncio.to_thread(load_served, path)
            self._switch(new, "deploy", by)
            return self._answer("deployed", began)

    async def rollback(self, by: str | None = None) -> dict:
        """Answer with the model before the current one again (kept loaded)."""
        async with self.lock:
            began = time.perf_counter()
            if not self.previous:
                raise Refused("no model to roll back to: this service has answered with one model only")
            back = self.previous.pop()
            self._switch(back, "rollback", by, keep=False)
            return self._answer("rolled back", began)

    def _switch(self, new: Served, action: str, by: str | None, keep: bool = True) -> None:
        old, self.current = self.current, new  # the swap: the next batch runs on `new`
        new.since = time.time()
        if keep:
            self.previous = [*self.previous, old][-KEEP_PREVIOUS:]
        self.known.add(new.id)
        if self.store is not None:
            self.store.record_deployment(new.id, new.path, action, by)

    def _answer(self, outcome: str, began: float) -> dict:
        return {"outcome": outcome, "id": self.current.id, "path": self.current.path,
                "previous": [s.id for s in reversed(self.previous)],
                "seconds": round(time.perf_counter() - began, 2)}
