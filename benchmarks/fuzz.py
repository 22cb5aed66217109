"""The long fuzzing run: mutated real files through the service's upload path.

    python benchmarks/fuzz.py [--inputs 100000] [--seed 0] [--out docs/fuzz/fuzz.json]

Each input is a real file from ../shared (tests/fuzz_inputs.py: JPEG, PNG with
alpha and with generator text chunks, a C2PA JPEG, WebP, GIF, TIFF, BMP) with
one to four random mutations (bit flips, truncation, splices, corrupted
headers and chunk lengths, huge declared dimensions, repeated regions), fed to
`imageorigin.service._read_upload`: SHA-256, the provenance reader (C2PA, PNG
text chunks, XMP, EXIF) and `decode_image`.  Counts: inputs, decoded, error
rows, crashes (any exception escaping, which the documented errors never
are), hangs (over 5 s, cut by SIGALRM), the slowest input, and the peak RSS at
every tenth of the run.  Every crashing input is saved under --crashes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_inputs import DEEP_XMP, ENTITY_BOMB, mutate, seeds, xmp_jpeg  # noqa: E402

from imageorigin.service import _read_upload  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--crashes", default="fuzz-crashes")
    ap.add_argument("--out")
    args = ap.parse_args()
    pool = seeds(Path(args.shared))
    pool += [("bomb.jpg", xmp_jpeg(ENTITY_BOMB)), ("deep.jpg", xmp_jpeg(DEEP_XMP))]
    others = [d for _, d in pool]
    signal.signal(signal.SIGALRM, _alarm)
    counts, errors, crashes = Counter(), Counter(), []
    slowest, rss = (0.0, None), {}
    started = time.perf_counter()
    for i in range(args.inputs):
        name, data = pool[i % len(pool)]
        bad = mutate(data, random.Random(args.seed * 10**9 + i), others)
        t = time.perf_counter()
        signal.alarm(5)
        try:
            result, image = _read_upload(name, bad)
            counts["decoded" if image is not None else "error rows"] += 1
            if image is None:  # the reason's kind, without the detail
                errors[result["error"].split(": ", 1)[1].split(" (")[0][:60]] += 1
        except Hang:
            counts["hangs"] += 1
            crashes.append((i, name, "hang over 5 s", bad))
        except Exception:  # noqa: BLE001 - what the harness is here to find
            counts["crashes"] += 1
            crashes.append((i, name, traceback.format_exc(limit=3), bad))
        finally:
            signal.alarm(0)
        took = time.perf_counter() - t
        if took > slowest[0]:
            slowest = (took, f"input {i} ({name})")
        if (i + 1) % max(1, args.inputs // 10) == 0:
            rss[i + 1] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            print(f"{i + 1} inputs, {dict(counts)}, peak RSS {rss[i + 1]} MB", flush=True)
    for i, name, why, bad in crashes:
        folder = Path(args.crashes)
        folder.mkdir(exist_ok=True)
        (folder / f"{i}-{name}").write_bytes(bad)
        print(f"input {i} ({name}): {why}", file=sys.stderr)
    result = {"inputs": args.inputs, "seed": args.seed, "seconds": round(time.perf_counter() - started, 1),
              "decoded": counts["decoded"], "error_rows": counts["error rows"],
              "crashes": counts["crashes"], "hangs_over_5s": counts["hangs"],
              "slowest_s": round(slowest[0], 3), "slowest_input": slowest[1],
              "peak_rss_mb_at": rss, "error_kinds": dict(errors.most_common(12))}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
