"""The train / eval transform presets, the crops and tiles an image is read
through, and each tile's detail vote.

Transforms are built only from a checkpoint's ``preprocessing`` dict, so the
numbers that normalise an image live in one place: the model.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

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
