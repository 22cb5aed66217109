"""Safe decoding of image files: the one place in imageorigin that opens images.

Every caller (training, evaluation, prediction, the API) goes through
:func:`decode_image`, so a file looks the same to the model wherever it is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are composited on white: the DH3 bench was normalised the
# same way, and black would turn clip art with an alpha channel into a silhouette.
BACKGROUND = (255, 255, 255)

# Refuse anything larger than this before decoding it (decompression bombs).
# 120 MP covers large photographs and 8K renders; override with
# IMAGEORIGIN_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 120_000_000

# Suffixes picked up when a folder is scanned.  A file named on the command
# line is decoded whatever its suffix.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)

Source = Union[str, os.PathLike, bytes, BinaryIO]


# Pillow warns about damaged files (corrupt EXIF, truncated tags, malformed
# MPO ...) through the warnings module.  Those belong in the file's own result,
# not as lines on stderr: while a thread decodes, its warnings go to that
# thread's list (a thread-local sink; warnings.catch_warnings is not safe in
# the decoding threads predict and the service run), and every one is kept
# ("always"), not only the first per source line.
_decoding = threading.local()
_show_elsewhere = warnings.showwarning


def _route_warning(message, category, filename, lineno, file=None, line=None):
    sink = getattr(_decoding, "sink", None)
    if sink is None:
        return _show_elsewhere(message, category, filename, lineno, file, line)
    if issubclass(category, Image.DecompressionBombWarning):
        return  # Pillow warns between its limit and twice that; we check the size ourselves
    text = str(message)
    if text not in sink:
        sink.append(text)


warnings.showwarning = _route_warning
warnings.filterwarnings("always", module=r"PIL\.")


class _PillowLog(logging.Handler):
    """Pillow's plugins also log (``logger.error("More samples per pixel ...")``):
    while a thread decodes, those records go to its list; otherwise on to the
    root logger, as if this handler were not here."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(_decoding, "sink", None)
        if sink is None:
            logging.getLogger().handle(record)
        elif record.getMessage() not in sink:
            sink.append(record.getMessage())


_pillow_logger = logging.getLogger("PIL")
_pillow_logger.addHandler(_PillowLog())
_pillow_logger.propagate = False


@contextlib.contextmanager
def pillow_warnings() -> Iterator[list[str]]:
    """Collect the warnings this thread raises inside the block into the list it
    yields, instead of printing them (one per distinct message)."""
    outer = getattr(_decoding, "sink", None)
    _decoding.sink = sink = []
    try:
        yield sink
    finally:
        _decoding.sink = outer


class ImageDecodeError(ValueError):
    """An image could not be decoded.  ``str(err)`` names the file and why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def max_pixels() -> int:
    """The pixel limit in force: ``IMAGEORIGIN_MAX_PIXELS`` or the default."""
    return int(os.environ.get("IMAGEORIGIN_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def decode_image(source: Source, name: str | None = None) -> Image.Image:
    """Decode a file, bytes or binary stream into an 8-bit RGB PIL image.

    EXIF orientation is applied; palette, grayscale, 16-bit, CMYK and alpha
    images are converted to RGB, with transparency composited on white; an
    animated image gives its first frame.  The returned image keeps the file's
    format (``"JPEG"``, ``"PNG"`` ...) in ``.format``, and Pillow's warnings
    about the file (corrupt EXIF ...) in ``.info["warnings"]`` instead of on stderr.

    Always at full size: decoding a JPEG at reduced size in the DCT is cheaper
    but blurs the pixel-level traces detectors read, and gave a fine-tuned
    model a different answer for a .jpg and a lossless .png of the same pixels.

    Raises:
        ImageDecodeError: for empty, truncated, corrupt or non-image data, and
            for images over :func:`max_pixels` pixels.  The message names the file.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with pillow_warnings() as warned:
        try:
            return _decode(source, name, warned)
        except ImageDecodeError as err:
            if not warned:
                raise
            # What Pillow logged on the way says more than its exception's type.
            raise ImageDecodeError(name, f"{err.reason}; the decoder said: {'; '.join(warned)}") from None


def _decode(source, name: str, warned: list[str]) -> Image.Image:
    try:
        if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        with Image.open(source) as im:
            width, height = im.size
            if width * height > max_pixels():
                raise ImageDecodeError(
                    name,
                    f"image is {width}x{height} = {width * height} pixels, over the "
                    f"limit of {max_pixels()} (set IMAGEORIGIN_MAX_PIXELS to raise it)",
                )
            im.seek(0)  # first frame of an animated GIF/WEBP/PNG
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
            rgb.format = im.format  # converted images forget it; callers report it
            rgb.info["warnings"] = warned
            return rgb
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(name, f"decompression bomb refused ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        # Pillow reports truncated and corrupt data with any of these.
        raise ImageDecodeError(name, f"corrupt or truncated image ({err})") from None
    except Exception as err:  # noqa: BLE001
        # Pillow's plugins raise other kinds too: NotImplementedError for a
        # format they recognise but cannot decode, struct.error, IndexError,
        # KeyError ... for damaged data.  Each is this file's error, never the batch's.
        raise ImageDecodeError(name, f"cannot be decoded ({type(err).__name__}: {err})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing alpha on BACKGROUND."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: Pillow's convert("L") clips to 255 instead of scaling.
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def find_images(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted) into image file paths.

    A file given directly is yielded whatever its suffix, so that a bad file is
    reported rather than silently skipped; inside folders only files with an
    image suffix are taken.  A path that does not exist is yielded as it is and
    fails later in :func:`decode_image` with a clear message.
    """
    for p in map(Path, paths):
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield child
        else:
            yield p
