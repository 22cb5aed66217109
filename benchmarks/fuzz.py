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

With --http N, also N requests to a real `imageorigin serve` on 127.0.0.1, each
with four mutated files and one good one: the status of each (never 5xx),
and whether every file got its result (the good one a verdict).
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
from serving import serve_process  # noqa: E402

from imageorigin.service import _read_upload  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def http_run(pool: list[tuple[str, bytes]], n: int, seed: int) -> dict:
    """N multipart requests of 4 mutated files + 1 good one to a real server."""
    import http.client

    others = [d for _, d in pool]
    statuses, missing, good_without_verdict = Counter(), 0, 0
    with serve_process("--rate-per-minute", "0", "--max-files", "8") as (_, port, _server):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        good = pool[0]
        for i in range(n):
            rng = random.Random(seed * 10**9 + 10**8 + i)
            files = [(f"m{j}-{pool[(i + j) % len(pool)][0]}", mutate(pool[(i + j) % len(pool)][1], rng, others))
                     for j in range(4)] + [good]
            body = b"".join(b'--b\r\nContent-Disposition: form-data; name="files"; filename="%s"\r\n'
                            b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (name.encode(), data)
                            for name, data in files) + b"--b--\r\n"
            try:
                conn.request("POST", "/v1/analyze", body, {"Content-Type": "multipart/form-data; boundary=b"})
                r = conn.getresponse()
                answer = json.loads(r.read())
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                statuses["connection lost"] += 1
                continue
            statuses[r.status] += 1
            if r.status == 200:
                results = answer["results"]
                missing += len(files) - len(results)
                good_without_verdict += not results[-1].get("verdict")
    return {"requests": n, "files": 5 * n, "status": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "server_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "files_without_a_result": missing, "good_files_without_a_verdict": good_without_verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--crashes", default="fuzz-crashes")
    ap.add_argument("--http", type=int, default=0, help="also this many requests to a real server")
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
    if args.http:
        result["http"] = http_run(pool, args.http, args.seed)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
