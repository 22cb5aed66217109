"""Feature cache: a frozen backbone's features of each image, computed once, kept on disk.

With a frozen backbone the features of an augmented image do not depend on the
head being trained, so the seed's recipe (15 epochs, a fresh augmentation of
every image each epoch) can draw each epoch's view from ``K`` augmented views
per image computed once, and train only the linear head on them.

Each cached vector is one ``.npy`` file (D float32 values), named by

- the *context*: the backbone's weights, the preprocessing and the engine that
  computed it (a folder under ``cache_dir()/features``);
- the *file*: the SHA-256 of the image file's bytes (so a renamed file hits
  the cache and an edited one misses it);
- the *view*: ``eval`` (the model's own preprocessing) or augmented view ``k``
  under the given augmentation settings and seed.  View ``k``'s random draws
  are seeded from (seed, file hash, k), so a cached view is exactly the view
  that would be computed again.

Files are written atomically: an interrupted run keeps every vector it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data import ImageDataset, batches
from .engine import Engine, module_digest
from .fileio import atomic_path
from .model import pooled
from .runtime import cache_dir


@dataclass
class Views:
    """Features (V, N, D) of V views of N files; ``ok`` (N,) marks the files that decoded."""

    features: torch.Tensor
    ok: torch.Tensor
    errors: list[str] = field(default_factory=list)
    cached: int = 0  # vectors read from the cache
    computed: int = 0  # vectors computed (and written to the cache)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def context_dir(backbone: torch.nn.Module, preprocessing: dict, engine: Engine,
                root: str | os.PathLike | None = None) -> Path:
    """The cache folder for features of ``backbone`` under ``preprocessing``, run on ``engine``."""
    key = _digest({"backbone": module_digest(backbone), "preprocessing": preprocessing,
                   "engine": str(engine)})
    return Path(root or cache_dir() / "features") / key


def view_names(views: int, augment: dict, seed: int) -> list[str]:
    """``["eval"]`` for ``views == 0``, else the names of ``views`` augmented views."""
    if views == 0:
        return ["eval"]
    settings = _digest({"augment": augment, "seed": seed})[:12]
    return [f"aug{k}-{settings}" for k in range(views)]


def extract(files: Sequence[str | os.PathLike], engine: Engine, transform, names: list[str],
            context: Path | None, *, seed: int = 0, preprocessing: dict | None = None,
            batch_size: int = 32, num_workers: int | None = None, progress: bool = False,
            desc: str = "features") -> Views:
    """Features of every file under every view in ``names`` (see :func:`view_names`).

    ``transform`` makes a view from a decoded image (the eval transform for
    ``["eval"]``, the training transform otherwise); ``engine`` runs the backbone;
    an image's crops are pooled by ``preprocessing``'s rule (:func:`imageorigin.model.pooled`).
    Vectors already under ``context`` are read; the rest are computed in
    batches and written there (``context=None``: no cache).  Unreadable files
    are marked in ``ok`` and listed in ``errors``; their rows are zeros.
    """
    digests = [file_digest(f) if context is not None else str(i) for i, f in enumerate(files)]
    feats: dict[tuple[int, int], torch.Tensor] = {}
    todo: list[tuple[int, int]] = []  # (file index, view index)
    for i, d in enumerate(digests):
        for v, name in enumerate(names):
            path = _entry(context, d, name)
            if path is not None and path.is_file():
                feats[i, v] = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                todo.append((i, v))
    cached = len(feats)
    bad: dict[int, str] = {}
    if todo:
        # View k of a file is drawn with its own seed, so it is the same view
        # whichever batch, worker or run computes it.
        seeds = [_view_seed(seed, digests[i], names[v]) for i, v in todo]
        dataset = ImageDataset([files[i] for i, _ in todo], transform, seeds=seeds)
        with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for idx, images, _, failures in batches(dataset, batch_size, threads=num_workers):
                for j, err in failures:
                    bad[todo[j][0]] = err
                if images is not None:
                    # (B, D).  Crops are pooled by the model's rule: with a linear
                    # head the logit of the crops' (weighted) mean feature is their
                    # (weighted) mean logit.
                    out, _ = pooled(engine, images, preprocessing or {})
                    for j, vec in zip(idx.tolist(), out):
                        i, v = todo[j]
                        feats[i, v] = vec
                        path = _entry(context, digests[i], names[v])
                        if path is not None:
                            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                                np.save(f, vec.numpy(), allow_pickle=False)
                bar.update(len(idx) + len(failures))
    dim = next(iter(feats.values())).shape[0] if feats else 0
    out = torch.zeros(len(names), len(files), dim)
    for (i, v), vec in feats.items():
        out[v, i] = vec
    ok = torch.tensor([i not in bad for i in range(len(files))])
    return Views(out, ok, sorted(bad.values()), cached, len(todo) - len(bad) * len(names))


def _entry(context: Path | None, file_digest: str, view: str) -> Path | None:
    return None if context is None else context / file_digest[:2] / f"{file_digest}.{view}.npy"


def _view_seed(seed: int, file_digest: str, view: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{file_digest}:{view}".encode()).digest()[:8], "little")
