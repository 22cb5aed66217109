"""Hostile bytes for the fuzzing test and benchmarks/fuzz.py: real image files
from ../shared, and mutations of them (bit flips, truncation, splices,
corrupted headers and chunk lengths, huge declared dimensions)."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image


def seeds(shared: Path) -> list[tuple[str, bytes]]:
    """Real files of every kind the readers meet: a bench JPEG, PNGs with alpha and
    with generator text chunks, a JPEG with a C2PA manifest, and the same pixels
    re-encoded by Pillow as WebP, GIF, TIFF and BMP."""
    bench = sorted((shared / "dh3-bench/native/val/human").glob("*.jpg"))[0]
    files = [bench, sorted((shared / "raw-samples/human").glob("*.png"))[0],
             shared / "provenance-samples/png-text/comfyui_lora.png",
             shared / "provenance-samples/c2pa/C.jpg"]
    out = [(f.name, f.read_bytes()) for f in files]
    with Image.open(bench) as im:
        small = im.convert("RGB").resize((96, 64))
    for fmt in ("WEBP", "GIF", "TIFF", "BMP"):
        buf = io.BytesIO()
        small.save(buf, fmt)
        out.append((f"seed.{fmt.lower()}", buf.getvalue()))
    return out


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_dimensions(data: bytes, rng: random.Random) -> bytes:
    """Declare a huge width and height in the header (PNG IHDR with a valid CRC,
    or a JPEG SOF segment); other formats get a large value at a header offset."""
    w, h = rng.choice([(65535, 65535), (100_000, 100_000), (1, 2**31 - 1), (0, 0)])
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        ihdr = struct.pack(">II", w, h) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]
    sof = data.find(b"\xff\xc0")
    if sof > 0:
        return data[:sof + 5] + struct.pack(">HH", min(h, 65535), min(w, 65535)) + data[sof + 9:]
    at = rng.randrange(0, max(1, min(len(data), 64) - 4))
    return data[:at] + struct.pack("<I", w) + data[at + 4:]


def mutate(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """One to four random mutations of ``data``."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "flip", "truncate", "splice", "header", "length", "dims", "repeat"])
        if not b:
            b = bytearray(b"\x00")
        if op == "flip":  # a few random bits anywhere
            for _ in range(rng.randint(1, 16)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            b = b[:rng.randrange(len(b))]
        elif op == "splice" and others:  # the tail of another file after our head
            other = rng.choice(others)
            b = b[:rng.randrange(len(b) + 1)] + other[rng.randrange(len(other)):]
        elif op == "header":  # random bytes over the first 64
            for i in range(min(len(b), 64)):
                if rng.random() < 0.2:
                    b[i] = rng.randrange(256)
        elif op == "length":  # a corrupt chunk / segment length field
            i = rng.randrange(max(1, len(b) - 4))
            b[i:i + 4] = struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2**32)]))
        elif op == "dims":
            b = bytearray(huge_dimensions(bytes(b), rng))
        elif op == "repeat":  # a region repeated many times (long runs, nested structures)
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randint(1, 256))
            b[i:j] = b[i:j] * rng.randint(2, 200)
    return bytes(b)


def xmp_jpeg(packet: bytes) -> bytes:
    """A small real JPEG carrying ``packet`` as its XMP (APP1) segment."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 150)).save(buf, "JPEG")
    body = b"http://ns.adobe.com/xap/1.0/\x00" + packet[:65000]
    data = buf.getvalue()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


ENTITY_BOMB = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
               + b"".join(b'<!ENTITY %c "%s">' % (98 + i, (b"&%c;" % (97 + i)) * 10) for i in range(8))
               + b']><x:xmpmeta xmlns:x="adobe:ns:meta/">&i;</x:xmpmeta>')
DEEP_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b"<a>" * 8_000 + b"</a>" * 8_000 + b"</x:xmpmeta>")
