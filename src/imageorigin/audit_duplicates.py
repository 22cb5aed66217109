"""Exact and near-duplicate images in an audited folder, above all pairs that
straddle train and val.

Near duplicates: 64-bit pHash (DCT) Hamming distance <= 8 *and* 64-bit dHash
(gradient) distance <= 12.  Requiring both hashes to agree is measured, not
guessed: on the DH3 bench, re-encoding at JPEG quality 70 or resizing to 90%
moves pHash by <= 2 and dHash by <= 4, cutting off the bottom 1/64 moves them
by <= 6 and <= 7, while pHash alone matches unrelated low-contrast images (a
DALL-E "Malevich" render and a magnolia clip art at pHash 4 have dHash 30).
Near-uniform images (grey-level standard deviation < 2) have no usable hash;
they are listed as blank instead of being paired with each other.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Iterable

import numpy as np

PHASH_MAX_DISTANCE = 8
DHASH_MAX_DISTANCE = 12
BLANK_STD = 2.0


MAX_STORED_PAIRS = 5000


# ---------------------------------------------------------------- duplicates


# Bits set in each byte value: a popcount that also works on numpy < 2 (no np.bitwise_count).
_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits in each uint64 of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int64)


def _hamming_pairs(hashes: np.ndarray, max_distance: int) -> Iterable[tuple[int, int, int]]:
    """(i, j, distance) for i < j with Hamming distance <= max_distance, in row blocks (bounded memory)."""
    block = 512
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        dist = _popcount(rows[:, None] ^ hashes[None, :])
        for r, j in zip(*np.nonzero(dist <= max_distance)):
            i = start + int(r)
            if j > i:
                yield i, int(j), int(dist[r, j])


def find_duplicates(records: list[dict]) -> dict:
    """Exact (same SHA-256) and near (pHash and dHash close) duplicate pairs among readable records.

    Each pair names both files, their splits and classes and the distances;
    ``counts`` gives pairs across splits, within each split and across classes.
    """
    exact_groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        exact_groups[r["sha256"]].append(i)
    exact = [(i, j) for idx in exact_groups.values() for i, j in itertools.combinations(idx, 2)]
    exact_set = set(exact)

    hashable = [i for i, r in enumerate(records) if r["grey_std"] >= BLANK_STD]
    phash = np.array([int(records[i]["phash"], 16) for i in hashable], dtype=np.uint64)
    dhash = np.array([int(records[i]["dhash"], 16) for i in hashable], dtype=np.uint64)
    near = []
    for a, b, dp in _hamming_pairs(phash, PHASH_MAX_DISTANCE):
        dd = (int(dhash[a]) ^ int(dhash[b])).bit_count()
        i, j = hashable[a], hashable[b]
        if dd <= DHASH_MAX_DISTANCE and (i, j) not in exact_set:
            near.append((i, j, dp, dd))

    def pair(i, j, **extra) -> dict:
        a, b = records[i], records[j]
        return {"a": a["path"], "b": b["path"], "split_a": a["split"], "split_b": b["split"],
                "class_a": a["class"], "class_b": b["class"], **extra}

    exact_pairs = [pair(i, j) for i, j in exact]
    near_pairs = [pair(i, j, phash_distance=dp, dhash_distance=dd) for i, j, dp, dd in
                  sorted(near, key=lambda t: (t[2] + t[3], t[0], t[1]))]
    blank = [r["path"] for r in records if r["grey_std"] < BLANK_STD]
    return {
        "method": {"exact": "SHA-256 of the file bytes",
                   "near": f"pHash distance <= {PHASH_MAX_DISTANCE} and dHash distance <= "
                           f"{DHASH_MAX_DISTANCE} (64-bit, imagehash), exact duplicates excluded",
                   "blank": f"grey-level std < {BLANK_STD}: no usable hash, not paired"},
        "exact": {"counts": _pair_counts(exact_pairs), "pairs": _cross_first(exact_pairs)},
        "near": {"counts": _pair_counts(near_pairs), "pairs": _cross_first(near_pairs)},
        "blank": blank,
    }


def _pair_counts(pairs: list[dict]) -> dict:
    within = Counter(p["split_a"] or "all" for p in pairs if p["split_a"] == p["split_b"])
    return {
        "pairs": len(pairs),
        "across_splits": sum(p["split_a"] != p["split_b"] for p in pairs),
        "within_split": dict(sorted(within.items())),
        "across_classes": sum(p["class_a"] != p["class_b"] for p in pairs),
    }


def _cross_first(pairs: list[dict]) -> list[dict]:
    """Pairs across splits, then across classes, then the rest; at most MAX_STORED_PAIRS."""
    key = lambda p: (p["split_a"] == p["split_b"], p["class_a"] == p["class_b"])  # noqa: E731
    return sorted(pairs, key=key)[:MAX_STORED_PAIRS]
