"""Labelled image folders, splits, manifests, and the datasets and decoding
threads that feed a model (the transforms are :mod:`imageorigin.transforms`).
"""

from __future__ import annotations

import csv
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .images import ImageDecodeError, decode_image, find_images
from .runtime import untune_allocator

# The transforms and tiles, named here too, where earlier versions defined them.
from .transforms import (  # noqa: F401,E402
    FLAT_SPREAD,
    Degrade,
    EnlargeTo,
    GridCrops,
    MAX_TILES,
    cover_boxes,
    crop_boxes,
    default_preprocessing,
    describe_preprocessing,
    eval_transform,
    grid_boxes,
    tile_detail,
    train_transform,
)


class DataFolderError(ValueError):
    """A data folder cannot be used for training or evaluation."""


@dataclass(frozen=True)
class LabelledFolder:
    """A folder with one sub-folder per class: ``samples`` are (path, class index)."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    def counts(self) -> dict[str, int]:
        """Number of images per class, in class order."""
        out = {c: 0 for c in self.classes}
        for _, y in self.samples:
            out[self.classes[y]] += 1
        return out


def scan_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> LabelledFolder:
    """List a labelled folder: each immediate sub-folder is a class (sorted by name).

    ``classes`` fixes the class order (a model's labels); sub-folders must then be
    a subset of it.  A folder with fewer than two classes, or a class folder with
    no images, is refused with a message.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFolderError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DataFolderError(
                f"{root}: found {len(classes)} class folder(s) {found}; a classifier needs "
                "at least two, one sub-folder per class (e.g. dalle/ human/ other_ai/)"
            )
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataFolderError(
                f"{root}: class folder(s) {unknown} are not among the model's labels {list(classes)}"
            )
        if not found:
            raise DataFolderError(f"{root}: no class folders (expected some of {list(classes)})")
    samples: list[tuple[Path, int]] = []
    for idx, name in enumerate(classes):
        if name not in found:
            continue
        files = list(find_images([root / name]))
        if not files:
            raise DataFolderError(f"{root / name}: class folder '{name}' has no images")
        samples.extend((f, idx) for f in files)
    return LabelledFolder(root, list(classes), samples)


def merge_folders(folders: Sequence[LabelledFolder]) -> LabelledFolder:
    """One labelled set from several folders with the same classes (e.g. two views)."""
    classes = folders[0].classes
    if any(f.classes != classes for f in folders):
        raise DataFolderError(f"folders disagree on classes: {[f.classes for f in folders]}")
    return LabelledFolder(folders[0].root, classes, [s for f in folders for s in f.samples])


def scan_folders(roots, classes: Sequence[str] | None = None) -> LabelledFolder:
    """:func:`scan_folder` over one folder or several, merged (class order from the first)."""
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    first = scan_folder(roots[0], classes)
    return merge_folders([first] + [scan_folder(r, first.classes) for r in roots[1:]])


def stratified_split(
    folder: LabelledFolder, val_fraction: float, seed: int
) -> tuple[LabelledFolder, LabelledFolder]:
    """Split a folder's samples into two parts, stratified by class, seeded.

    Files with the same name (one image in two views, e.g. ``native/`` and
    ``resized/``) always land on the same side, so no image is on both.
    """
    from sklearn.model_selection import train_test_split

    label_of = {}
    for p, y in folder.samples:
        label_of.setdefault(p.name, y)
    names = sorted(label_of)
    try:
        _, held = train_test_split(names, test_size=val_fraction, random_state=seed,
                                   stratify=[label_of[n] for n in names])
    except ValueError as err:
        raise DataFolderError(f"{folder.root}: cannot split for validation: {err}") from None
    held = set(held)
    return (
        LabelledFolder(folder.root, folder.classes, sorted(s for s in folder.samples if s[0].name not in held)),
        LabelledFolder(folder.root, folder.classes, sorted(s for s in folder.samples if s[0].name in held)),
    )


# ---------------------------------------------------------------- manifests


def read_manifest(path, columns: Sequence[str] = ("path",)) -> list[dict]:
    """The rows of a manifest CSV (e.g. ``dh3-bench/manifest.csv``), or of several
    (a list of paths, rows concatenated), checking their columns."""
    if not isinstance(path, (str, os.PathLike)):
        return [row for p in path for row in read_manifest(p, columns)]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise DataFolderError(f"{path}: manifest has no {sorted(missing)} column(s); "
                                  f"found {reader.fieldnames}")
        return list(reader)


def manifest_name(path) -> str:
    """How reports name a manifest argument: its path, or several joined by ", "."""
    return str(path) if isinstance(path, (str, os.PathLike)) else ", ".join(map(str, path))


def match_manifest(files: Sequence[str | os.PathLike], rows: Sequence[dict]) -> list[dict | None]:
    """The manifest row of each file, or None.

    Manifest paths are relative to a view of the data (``val/dalle/x.jpg`` under
    ``dh3-bench/resized/``); a file matches the one row whose path ends in the
    same last three components, else the same last two (class folder and name),
    else the same file name.
    """
    index: dict[tuple, list] = {}
    for row in rows:
        parts = PurePosixPath(row["path"].replace("\\", "/")).parts
        # A set: a two-part path ("dalle/x.jpg") has the same last 3 and last 2 parts.
        for key in {parts[-n:] for n in (3, 2, 1)}:
            index.setdefault(key, []).append(row)
    out = []
    for file in files:
        parts = Path(file).parts
        hits = next((index[parts[-n:]] for n in (3, 2, 1) if parts[-n:] in index), [])
        out.append(hits[0] if len(hits) == 1 else None)
    return out


# ---------------------------------------------------------------- datasets


_RNG_LOCK = threading.Lock()


class ImageDataset(Dataset):
    """Decodes ``items`` (paths or PIL images) through :func:`decode_image` and ``transform``.

    Each item gives ``(index, tensor or None, label, error or None)``: a file that
    cannot be decoded is reported, not raised, so the rest of a batch goes on.
    ``seeds`` (one per item) makes a
    random transform draw item ``i``'s augmentation from its own seed, the same
    in any worker and any run.
    """

    def __init__(self, items: Sequence, transform, labels: Sequence[int] | None = None,
                 seeds: Sequence[int] | None = None, inspect=None):
        self.items = list(items)
        self.transform = transform
        self.labels = labels
        self.seeds = seeds
        # With inspect (a function of the decoded PIL image): item index -> its
        # result (predict: size and caveats), for the caller to pop, so that it
        # stays as small as the batches in flight.
        self.inspect = inspect
        self.seen: dict[int, object] = {}
        self.epoch = 0  # training: item i's augmentation seed is seeds[i] moved by the epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        label = -1 if self.labels is None else self.labels[i]
        try:
            image = item if hasattr(item, "mode") else decode_image(item)
            if self.inspect is not None:
                self.seen[i] = self.inspect(image)
            if self.seeds is None:
                return i, self.transform(image), label, None
            # torchvision draws from the global RNG: decoding threads
            # (see batches) take turns so each item gets exactly its seed.
            with _RNG_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seeds[i] + 7_919 * self.epoch)
                return i, self.transform(image), label, None
        except ImageDecodeError as err:
            return i, None, label, str(err)
        except Exception as err:  # noqa: BLE001 - one odd file must not end the batch
            return i, None, label, f"{item}: cannot be prepared for the model ({type(err).__name__}: {err})"


def collate(batch):
    """Stack the decodable items; keep (index, error) for the rest.

    Returns ``(indices (B,), images (B, 3, H, W) or None, labels (B,), failures)``;
    images are (B, K, 3, H, W) for K crops of each, or a list of B (K_i, 3, H, W)
    where a covering model gives images of different sizes different counts.
    """
    good = [b for b in batch if b[1] is not None]
    failures = [(b[0], b[3]) for b in batch if b[1] is None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, torch.empty(0, dtype=torch.long), failures
    idx = torch.tensor([b[0] for b in good])
    images = stack_images([b[1] for b in good])
    labels = torch.tensor([b[2] for b in good])
    return idx, images, labels, failures


def stack_images(images: list[torch.Tensor]):
    """Preprocessed images -> one batch: stacked into (B, ...) where all have one
    shape, else the list itself (a covering model's images of different sizes:
    (K_i, 3, H, W) each; :func:`imageorigin.model.pooled` takes either)."""
    return torch.stack(images) if len({x.shape for x in images}) == 1 else list(images)


def batches(dataset: Dataset, batch_size: int, threads: int | None = None) -> Iterator[tuple]:
    """The dataset's batches in order (see :func:`collate`), decoded by ``threads``
    threads while the caller runs the model on the previous ones.

    Threads, not worker processes: Pillow's decoders and torch's ops release
    the GIL, and on a CPU the engine already keeps every core busy, so worker
    processes only added the cost of passing (B, 3, H, W) tensors between
    processes.  Default model, 2 cores: 256 px bench images 145 img/s with two
    worker processes, 215 with two threads (220 decoding in the caller);
    1536 px images 50, 59 (34).  At most ``threads + 1`` batches are in
    flight, so memory stays flat.
    ``threads=0`` decodes in the caller's thread.
    """
    if threads is None:
        threads = min(os.cpu_count() or 1, 8) if len(dataset) > batch_size else 0
    starts = range(0, len(dataset), batch_size)

    def make(start: int) -> tuple:
        return collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    if threads == 0:
        yield from map(make, starts)
        return
    # Each decoding thread runs torch's ops on one core (the setting is per
    # thread): nested intra-op threads fought the engine's for the cores.
    with ThreadPoolExecutor(threads, thread_name_prefix="imageorigin-decode",
                            initializer=torch.set_num_threads, initargs=(1,)) as pool:
        ahead = deque(pool.submit(make, s) for s in starts[:threads + 1])
        rest = iter(starts[threads + 1:])
        while ahead:
            batch = ahead.popleft().result()
            start = next(rest, None)
            if start is not None:
                ahead.append(pool.submit(make, start))
            yield batch


class ShardedBatches(torch.utils.data.Sampler):
    """Training batches of ``dataset``: each epoch a shuffle seeded by (seed, epoch),
    cut into batches of ``batch_size``; process ``rank`` of ``world`` takes its
    share of every batch, so that N processes together see exactly the batches
    one would.  :meth:`set_epoch` also moves the dataset's augmentation seeds to
    the epoch (worker processes copy the dataset when each epoch's iteration starts).

    ``units`` (lists of item indices, default one item each) are shuffled and
    dealt whole: an image and its pseudo-fake twin stay in one batch and one
    process.  A batch holds a fixed number of units, chosen so that it holds
    ``batch_size`` images on average.

    A batch with fewer units than processes borrows from the start of the
    shuffle: every process must take part in every step."""

    def __init__(self, dataset: "ImageDataset", batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 units: list[list[int]] | None = None):
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.units = units if units is not None else [[i] for i in range(len(dataset))]
        # At least one unit per process: a batch short of that repeats the shuffle's first unit.
        self.per_batch = max(1, world, round(batch_size * len(self.units) / max(1, len(dataset))))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.units) // self.per_batch)

    def __iter__(self):
        n = len(self.units)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist()
        for start in range(0, n, self.per_batch):
            batch = order[start:start + self.per_batch]
            batch += order[:max(0, self.world - len(batch))]
            yield [i for u in batch[self.rank::self.world] for i in self.units[u]]


def loader(dataset: "ImageDataset", batch_size: int, num_workers: int | None = None, seed: int = 0,
           rank: int = 0, world: int = 1, twin_of: Sequence[int | None] | None = None) -> torch.utils.data.DataLoader:
    """Shuffled training batches (:class:`ShardedBatches`), decoded and augmented in
    worker processes (on a GPU the CPU is free for them).  Call
    ``loader.batch_sampler.set_epoch(epoch)`` before each epoch: the shuffle and
    every image's augmentation follow (seed, epoch, image), not the worker or
    process that happens to decode it.

    ``twin_of[i]``: the index of the real image item ``i`` is the pseudo-fake
    twin of (None for real images).  A twin draws its real image's seed, so
    both get the same crop, flip and degradation (same size, same random
    draws), and the two are dealt into the same batch."""
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1) if len(dataset) > batch_size else 0
    seeds = [seed * 1_000_003 + i for i in range(len(dataset))]
    units = None
    if twin_of is not None:
        units = {i: [i] for i, real in enumerate(twin_of) if real is None}
        for i, real in enumerate(twin_of):
            if real is not None:
                seeds[i] = seeds[real]
                units[real].append(i)
        units = list(units.values())
    dataset.seeds = seeds
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShardedBatches(dataset, batch_size, seed, rank, world, units),
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        worker_init_fn=untune_allocator,
    )
