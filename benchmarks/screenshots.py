"""Synthetic screenshots drawn with PIL, for the out-of-scope caveat.

Two unrelated generators, so that the detector is tuned on one kind of
screenshot and measured on another (never tested on what it was tuned with):

- ``tuning``: chat apps and settings panels (bubbles, avatars, toggles, sidebars).
- ``testing``: documents, terminals / code editors and web pages with cards,
  tables and, now and then, a photograph pasted in (as real pages have).

Run ``python benchmarks/screenshots.py OUT_DIR --kind testing -n 300`` to write
PNG / JPEG / WebP files; ``make(kind, i)`` gives the i-th image (seeded by i).
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS = ("the image model upload review account settings message photo team archive report "
         "generated human artist policy flagged queue status open closed pending today yesterday "
         "share download export privacy notifications profile search results page next back "
         "def return import class for while print value error none true false self data").split()


def _font(rng: random.Random, lo: int, hi: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=rng.randint(lo, hi))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _colour(rng: random.Random, dark: bool) -> tuple[int, int, int]:
    base = (15, 60) if dark else (200, 255)
    return tuple(rng.randint(*base) for _ in range(3))


def _accent(rng: random.Random) -> tuple[int, int, int]:
    return rng.choice([(0, 122, 255), (52, 199, 89), (255, 59, 48), (88, 86, 214), (255, 149, 0),
                       (29, 161, 242), (37, 211, 102), (114, 137, 218)])


# ------------------------------------------------------------------ tuning set


def _chat(rng: random.Random, w: int, h: int) -> Image.Image:
    dark = rng.random() < 0.4
    im = Image.new("RGB", (w, h), _colour(rng, dark))
    d = ImageDraw.Draw(im)
    accent = _accent(rng)
    d.rectangle([0, 0, w, 56], fill=_colour(rng, dark))
    d.ellipse([12, 10, 48, 46], fill=accent)
    d.text((60, 18), _sentence(rng, 2), fill=(240, 240, 240) if dark else (20, 20, 20), font=_font(rng, 16, 20))
    y = 70
    while y < h - 80:
        mine = rng.random() < 0.5
        font = _font(rng, 13, 18)
        text = _sentence(rng, rng.randint(3, 9))
        tw = min(int(d.textlength(text, font=font)) + 24, w - 80)
        x = w - tw - 16 if mine else 56
        bh = font.size + 18
        d.rounded_rectangle([x, y, x + tw, y + bh], radius=12,
                            fill=accent if mine else _colour(rng, not dark))
        d.text((x + 12, y + 8), text, fill=(255, 255, 255) if mine else (30, 30, 30), font=font)
        if not mine:
            d.ellipse([12, y, 44, y + 32], fill=_accent(rng))
        y += bh + rng.randint(8, 20)
    d.rounded_rectangle([10, h - 56, w - 10, h - 12], radius=20, outline=(128, 128, 128), width=2)
    d.text((28, h - 44), "Type a message", fill=(140, 140, 140), font=_font(rng, 14, 16))
    return im


def _settings(rng: random.Random, w: int, h: int) -> Image.Image:
    dark = rng.random() < 0.3
    im = Image.new("RGB", (w, h), _colour(rng, dark))
    d = ImageDraw.Draw(im)
    side = rng.randint(140, 240)
    d.rectangle([0, 0, side, h], fill=_colour(rng, dark))
    fg = (230, 230, 230) if dark else (25, 25, 25)
    for i, y in enumerate(range(24, h - 30, 38)):
        d.text((20, y), _sentence(rng, 1), fill=fg, font=_font(rng, 13, 16))
    for y in range(30, h - 50, rng.randint(50, 70)):
        d.text((side + 24, y), _sentence(rng, rng.randint(2, 5)), fill=fg, font=_font(rng, 14, 18))
        on = rng.random() < 0.5
        x = w - 80
        d.rounded_rectangle([x, y, x + 44, y + 24], radius=12, fill=_accent(rng) if on else (170, 170, 170))
        d.ellipse([x + (22 if on else 2), y + 2, x + (42 if on else 22), y + 22], fill=(255, 255, 255))
        d.line([side + 16, y + 40, w - 16, y + 40], fill=(128, 128, 128), width=1)
    return im


# ----------------------------------------------------------------- testing set


def _document(rng: random.Random, w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (255, 255, 255) if rng.random() < 0.7 else (246, 244, 238))
    d = ImageDraw.Draw(im)
    margin = rng.randint(30, 90)
    y = margin
    d.text((margin, y), _sentence(rng, rng.randint(3, 6)), fill=(0, 0, 0), font=_font(rng, 24, 34))
    y += 60
    while y < h - margin:
        if rng.random() < 0.15:  # a table
            cols, rows = rng.randint(3, 5), rng.randint(3, 6)
            cw = (w - 2 * margin) // cols
            for r in range(rows):
                for c in range(cols):
                    box = [margin + c * cw, y, margin + (c + 1) * cw, y + 26]
                    d.rectangle(box, outline=(90, 90, 90), fill=(235, 235, 235) if r == 0 else None)
                    d.text((box[0] + 6, y + 6), rng.choice(WORDS), fill=(20, 20, 20), font=_font(rng, 11, 14))
                y += 26
            y += 20
            continue
        font = _font(rng, 11, 16)
        for _ in range(rng.randint(2, 7)):
            d.text((margin, y), _sentence(rng, rng.randint(6, 14))[: (w - 2 * margin) // 7],
                   fill=(30, 30, 30), font=font)
            y += font.size + 6
        y += 14
    return im


def _terminal(rng: random.Random, w: int, h: int) -> Image.Image:
    bg = rng.choice([(30, 30, 30), (40, 44, 52), (0, 43, 54), (12, 12, 12), (253, 246, 227)])
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    light = sum(bg) > 300
    d.rectangle([0, 0, w, 28], fill=(60, 60, 60) if not light else (220, 220, 220))
    for i, c in enumerate([(255, 95, 86), (255, 189, 46), (39, 201, 63)]):
        d.ellipse([10 + 20 * i, 8, 22 + 20 * i, 20], fill=c)
    font = _font(rng, 12, 15)
    y, indent = 40, 0
    palette = [(86, 156, 214), (206, 145, 120), (181, 206, 168), (220, 220, 170), (197, 134, 192),
               (212, 212, 212) if not light else (40, 40, 40)]
    while y < h - 20:
        d.text((8, y), f"{(y - 40) // (font.size + 4) + 1:>3}", fill=(110, 110, 110), font=font)
        x = 48 + indent * 16
        for _ in range(rng.randint(1, 6)):
            word = rng.choice(WORDS) + rng.choice(["(", ")", ":", " =", ".", ","])
            d.text((x, y), word, fill=rng.choice(palette), font=font)
            x += int(d.textlength(word + " ", font=font))
        indent = max(0, min(4, indent + rng.choice([-1, 0, 0, 1])))
        y += font.size + 4
    return im


def _web(rng: random.Random, w: int, h: int, photo: Image.Image | None) -> Image.Image:
    im = Image.new("RGB", (w, h), _colour(rng, False))
    d = ImageDraw.Draw(im)
    accent = _accent(rng)
    d.rectangle([0, 0, w, 64], fill=accent)
    d.text((20, 20), _sentence(rng, 2), fill=(255, 255, 255), font=_font(rng, 20, 26))
    x = w - 20
    for _ in range(4):
        word = rng.choice(WORDS)
        font = _font(rng, 13, 16)
        x -= int(d.textlength(word, font=font)) + 24
        d.text((x, 24), word, fill=(255, 255, 255), font=font)
    cols = rng.randint(1, 3)
    cw = (w - 40) // cols
    y0 = 84
    for c in range(cols):
        x0 = 20 + c * cw
        box = [x0, y0, x0 + cw - 16, min(h - 20, y0 + 320)]
        d.rounded_rectangle(box, radius=8, fill=(255, 255, 255), outline=(210, 210, 210))
        ph = [box[0] + 10, box[1] + 10, box[2] - 10, box[1] + 150]
        if photo is not None and c == 0:
            im.paste(photo.resize((ph[2] - ph[0], ph[3] - ph[1])), (ph[0], ph[1]))
        else:  # a gradient banner
            for yy in range(ph[1], ph[3]):
                t = (yy - ph[1]) / max(1, ph[3] - ph[1])
                d.line([ph[0], yy, ph[2], yy], fill=tuple(int(a * (1 - t) + 255 * t) for a in accent))
        ty = ph[3] + 12
        for _ in range(rng.randint(2, 5)):
            d.text((box[0] + 12, ty), _sentence(rng, rng.randint(3, 6)), fill=(40, 40, 40),
                   font=_font(rng, 12, 15))
            ty += 20
    return im


def _photos(shared: Path) -> list[Path]:
    return sorted((shared / "dh3-wide" / "native" / "val" / "human").glob("*"))[:50]


def make(kind: str, i: int, shared: Path | None = None) -> Image.Image:
    """The i-th synthetic screenshot of ``kind`` ("tuning" or "testing"), seeded by i."""
    rng = random.Random(f"{kind}-{i}")
    w, h = rng.randint(360, 1400), rng.randint(360, 1000)
    if kind == "tuning":
        return (_chat if rng.random() < 0.5 else _settings)(rng, w, h)
    if kind != "testing":
        raise ValueError(f"unknown screenshot kind {kind!r}")
    pick = rng.random()
    if pick < 0.35:
        return _document(rng, w, h)
    if pick < 0.65:
        return _terminal(rng, w, h)
    photo = None
    if shared is not None and rng.random() < 0.5:
        files = _photos(shared)
        if files:
            with Image.open(rng.choice(files)) as f:
                photo = f.convert("RGB")
    return _web(rng, w, h, photo)


def encode(image: Image.Image, i: int) -> tuple[bytes, str]:
    """Save as screenshots travel: mostly PNG, some JPEG or WebP (the i-th choice is seeded)."""
    rng = random.Random(f"encode-{i}")
    fmt = rng.choices(["PNG", "JPEG", "WEBP"], weights=[0.6, 0.25, 0.15])[0]
    buf = io.BytesIO()
    image.save(buf, fmt, **({} if fmt == "PNG" else {"quality": rng.randint(70, 95)}))
    return buf.getvalue(), {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--kind", choices=("tuning", "testing"), default="testing")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        data, ext = encode(make(args.kind, i, Path(args.shared)), i)
        (out / f"{args.kind}-{i:04d}{ext}").write_bytes(data)


if __name__ == "__main__":
    main()
