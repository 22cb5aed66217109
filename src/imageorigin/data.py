"""Labelled image folders, splits, and the train / eval transform presets.

Transforms are built only from a checkpoint's ``preprocessing`` dict, so the
numbers that normalise an image live in one place: the model.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from .images import ImageDecodeError, decode_image, find_images
from .runtime import untune_allocator


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


# ---------------------------------------------------------------- transforms


# A covering model scores at most this many tiles of an image: 16 x 16 of 96 px
# cover 1536 px, the largest side most generators give (gpt-image-1's 1536x1024
# needs 176); a larger image is scored through that many tiles spread evenly
# over it (with gaps), so the cost of one image is bounded whatever its size.
MAX_TILES = 256
# A tile's 8x8 block whose luma spans at most this many levels (of 255) is
# "flat": sky, a studio backdrop, a painted-over background.  Such blocks carry
# no trace of how the image was made; experiments/tiling.py chose it.
FLAT_SPREAD = 6


def default_preprocessing(mean: Sequence[float], std: Sequence[float], size: int = 224,
                          native: bool = False, grid: int | str = 1) -> dict:
    """A model's preprocessing, stored in its checkpoint.

    The seed's: resize the shorter side to ``size``, centre crop, normalise.
    ``native=True``: no resize (an image is enlarged only where a side is under
    ``size``), so pixel-level traces survive; the model scores ``grid`` x ``grid``
    crops of ``size`` spread evenly over the whole image and pools them by their
    mean logit (``pool``).  ``grid="cover"``: tiles of ``size`` covering the whole
    image (at most :data:`MAX_TILES`), pooled by their mean logit weighted by each
    tile's share of detailed 8x8 blocks (:func:`tile_detail`), so that flat
    background does not vote.
    """
    cover = grid == "cover"
    return {
        "resize": None if native else size,
        "crop": size,
        "crops": grid,
        **({"max_crops": MAX_TILES, "flat_spread": FLAT_SPREAD} if cover else {}),
        "pool": "detail_mean_logit" if cover else "mean_logit",
        "interpolation": "bicubic" if native else "bilinear",
        "mean": list(mean),
        "std": list(std),
    }


def describe_preprocessing(pre: dict) -> str:
    """The preprocessing in words, for model cards and reports."""
    norm = f"ImageNet mean {pre['mean']} / std {pre['std']}"
    if pre.get("resize") is None:
        n = pre.get("crops", 1)
        native = f"native resolution (never resized; enlarged only where a side is under {pre['crop']} px), "
        if n == "cover":
            return (native + f"tiles of {pre['crop']} px covering the whole image (at most {pre['max_crops']}, "
                    f"spread evenly over larger images), pooled by their mean logit weighted by each tile's "
                    f"share of 8x8 blocks with detail (luma spread over {pre['flat_spread']}), {norm}")
        return (native + f"{n}x{n} grid of {pre['crop']} px crops over the whole image, pooled by "
                f"{pre.get('pool', 'mean_logit').replace('_', ' ')}, {norm}")
    return f"resize shorter side to {pre['resize']}, centre crop {pre['crop']}, {norm}"


def _spread(side: int, crop: int, n: int) -> list[int]:
    """``n`` starts of crops of ``crop`` over ``side`` (>= crop), evenly, the first at
    0 and the last at the end; one crop is centred."""
    if n == 1:
        return [int(round((side - crop) / 2.0))]
    return [round(i * (side - crop) / (n - 1)) for i in range(n)]


def grid_boxes(width: int, height: int, crop: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` x ``n`` crops of side ``crop`` spread evenly over a
    ``width`` x ``height`` image (each side at least ``crop``), row by row.

    n == 1 is the centre crop.  Crops overlap where the image is smaller than
    ``n * crop`` and leave gaps where it is larger.
    """
    return [(x, y) for y in _spread(height, crop, n) for x in _spread(width, crop, n)]


def cover_boxes(width: int, height: int, crop: int, max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """Top-left corners of tiles of side ``crop`` covering a ``width`` x ``height``
    image (each side at least ``crop``), row by row: ceil(width / crop) across and
    ceil(height / crop) down, spread evenly (so neighbours overlap by less than a
    tile), every pixel in at least one.  Over ``max_tiles`` both counts shrink by
    the same factor, and the tiles spread with gaps.  A 256 px image gets the
    3x3 grid of 96 px crops; 1536x1024, 16x11; 3680x2456, 19x13 (with gaps)."""
    nx, ny = -(-width // crop), -(-height // crop)
    if nx * ny > max_tiles:
        f = (max_tiles / (nx * ny)) ** 0.5
        nx, ny = max(1, int(nx * f)), max(1, int(ny * f))
    return [(x, y) for y in _spread(height, crop, ny) for x in _spread(width, crop, nx)]


def _boxes(width: int, height: int, pre: dict) -> list[tuple[int, int]]:
    """Top-left corners of the model's crops in an image already enlarged to the crop."""
    if pre.get("crops", 1) == "cover":
        return cover_boxes(width, height, pre["crop"], pre["max_crops"])
    return grid_boxes(width, height, pre["crop"], pre.get("crops", 1))


def crop_boxes(width: int, height: int, pre: dict) -> list[tuple[int, int, int, int]]:
    """Where a native-crop model's crops lie in a ``width`` x ``height`` image:
    ``(left, top, width, height)`` in the image's own pixels, in the order of
    :class:`GridCrops`.  (A resized model's crops are given in resized pixels.)"""
    crop = pre["crop"]
    scale = max(1.0, crop / min(width, height)) if pre.get("resize") is None else 1.0
    if scale > 1:  # torchvision's rule for resizing the shorter side to `crop`
        w, h = (crop, int(crop * height / width)) if width <= height else (int(crop * width / height), crop)
    else:
        w, h = width, height
    return [(round(x / scale), round(y / scale), round(crop / scale), round(crop / scale))
            for x, y in _boxes(w, h, pre)]


def tile_detail(tiles: torch.Tensor, pre: dict) -> torch.Tensor:
    """Each tile's vote in the ``detail_mean_logit`` pool: (N, 3, c, c) normalised
    tiles -> (N,) the share of their 8x8 blocks whose luma (0.299 R + 0.587 G +
    0.114 B, 8-bit) spans more than ``flat_spread`` levels.  0 for a tile of flat
    colour; about 1 for a photo's texture, a face, a drawing's strokes."""
    mean = torch.tensor(pre["mean"], device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], device=tiles.device).view(1, 3, 1, 1)
    rgb = ((tiles.float() * std + mean) * 255).round()  # (N, 3, c, c): the 8-bit values again
    # Luma x 1000 in whole numbers, so that no rounding decides a block (and an
    # ONNX user's numpy gives the same votes).
    luma = 299 * rgb[:, 0] + 587 * rgb[:, 1] + 114 * rgb[:, 2]  # (N, c, c)
    n, c = luma.shape[0], luma.shape[-1] // 8 * 8
    blocks = luma[:, :c, :c].reshape(n, c // 8, 8, c // 8, 8)
    spread = blocks.amax(dim=(2, 4)) - blocks.amin(dim=(2, 4))  # (N, c/8, c/8)
    return (spread > 1000 * pre.get("flat_spread", FLAT_SPREAD)).float().mean(dim=(1, 2))


class EnlargeTo:
    """Enlarge an image whose shorter side is under ``size`` to exactly ``size``
    (aspect kept); larger images pass unchanged (native resolution)."""

    def __init__(self, size: int, interpolation: str):
        self.size, self.interpolation = size, InterpolationMode(interpolation)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if min(h, w) >= self.size:
            return image
        return T.functional.resize(image, self.size, self.interpolation, antialias=True)


class GridCrops:
    """(3, H, W) -> (N, 3, crop, crop): the crops of :func:`crop_boxes` (N = n*n
    for a grid; for a cover, however many tiles the image needs)."""

    def __init__(self, pre: dict):
        self.pre = pre

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        c = self.pre["crop"]
        return torch.stack([image[..., y:y + c, x:x + c] for x, y in _boxes(w, h, self.pre)])


class Degrade:
    """What happens to an image on its way to the web, applied to every class alike
    so that none of it marks a class: a random downscale (x0.25 to x1, one of
    four resamplers), Gaussian blur (sigma 0.2-2), Gaussian noise (sigma 1-8 in
    8-bit units) and a JPEG or WebP re-encode (quality 40-95), each with its own
    probability.  PIL image in, PIL image out; draws from torch's RNG, so a
    seeded dataset item gets the same degradation in any thread and run.
    """

    RESAMPLERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                  Image.Resampling.LANCZOS, Image.Resampling.BOX)

    def __init__(self, downscale: float = 0.0, blur: float = 0.0, noise: float = 0.0,
                 jpeg: float = 0.0):
        self.p = {"downscale": downscale, "blur": blur, "noise": noise, "jpeg": jpeg}

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(()).item()

    def _happens(self, what: str) -> bool:
        return self.p[what] > 0 and torch.rand(()).item() < self.p[what]

    def __call__(self, im: Image.Image) -> Image.Image:
        if self._happens("downscale"):
            f = self._uniform(0.25, 1.0)
            size = (max(16, round(im.width * f)), max(16, round(im.height * f)))
            im = im.resize(size, self.RESAMPLERS[torch.randint(len(self.RESAMPLERS), ()).item()])
        if self._happens("blur"):
            im = im.filter(ImageFilter.GaussianBlur(self._uniform(0.2, 2.0)))
        if self._happens("noise"):
            a = np.asarray(im, dtype=np.float32)
            a = a + torch.randn(a.shape).numpy() * self._uniform(1.0, 8.0)
            im = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))
        if self._happens("jpeg"):
            buf = io.BytesIO()
            fmt = "JPEG" if torch.rand(()).item() < 0.5 else "WEBP"
            im.save(buf, fmt, quality=int(self._uniform(40, 95)))
            buf.seek(0)
            with Image.open(buf) as re_encoded:
                im = re_encoded.convert("RGB")
        return im


def _base(pre: dict) -> list:
    if pre.get("resize") is None:  # native resolution
        return [T.ToImage(), EnlargeTo(pre["crop"], pre["interpolation"]), T.CenterCrop(pre["crop"])]
    return [
        T.ToImage(),
        T.Resize(pre["resize"], interpolation=InterpolationMode(pre["interpolation"]), antialias=True),
        T.CenterCrop(pre["crop"]),
    ]


def _normalise(pre: dict) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(pre["mean"], pre["std"])]


def eval_transform(pre: dict) -> T.Compose:
    """PIL RGB image -> the model's input: (3, crop, crop), or (K, 3, crop, crop)
    for a model that scores K crops of the image: ``crops``**2, or a cover's
    tiles, K depending on the image's size (pooled by
    :meth:`imageorigin.model.Classifier.pool`)."""
    base = _base(pre)
    if pre.get("crops", 1) != 1:
        base[-1] = GridCrops(pre)
    return T.Compose(base + _normalise(pre))


def train_transform(pre: dict, augment: dict) -> T.Compose:
    """The eval transform with training augmentation added.

    ``augment`` keys: ``flip`` (bool), ``rotation`` (degrees), ``color_jitter``
    (brightness/contrast/saturation strength), the seed card's three;
    ``downscale`` / ``blur`` / ``noise`` / ``jpeg``: probabilities of each of
    :class:`Degrade`'s steps, applied first, as to a re-shared file; and
    ``random_crop`` (train on random crops of this size instead of the centre
    crop; a native-crop model always trains on random crops of its crop size).
    0 or False turns each off.
    """
    degrade = Degrade(**{k: augment.get(k, 0.0) for k in ("downscale", "blur", "noise", "jpeg")})
    base = _base(pre)
    size = augment.get("random_crop") or (pre["crop"] if pre.get("resize") is None else 0)
    if size:
        base[-1] = T.RandomCrop(size)
    aug = []
    if augment.get("flip"):
        aug.append(T.RandomHorizontalFlip())
    if augment.get("rotation"):
        aug.append(T.RandomRotation(augment["rotation"]))
    if augment.get("color_jitter"):
        s = augment["color_jitter"]
        aug.append(T.ColorJitter(brightness=s, contrast=s, saturation=s))
    return T.Compose([degrade] + base + aug + _normalise(pre))


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
