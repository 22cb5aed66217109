"""scan against predict on the same files in the same run, and the memory of
walking a very large tree.

    python benchmarks/scan.py [--images 2000] [--listed 1000000] [--out FILE]

1. `predict` on N bench images (a synthetic tree of links to them), then
   `scan` of the same tree into a fresh SQLite file: images/s of each, and
   their ratio (target: 90%).
2. With --ray, the same files through a 2-node Ray cluster started on this
   machine: Ray's overhead against the local scan.
3. A tree of `--listed` links: the peak RSS of walking and checking it against
   the database (`scan`'s listing and resume path, without inference), read
   from /proc at 10%, 50% and 100% of the walk.
4. With --kills K: `imageorigin scan` of a tree of 400 images (SQLite, then a
   Parquet folder) SIGKILLed K times at random moments, then run to the end:
   files lost and files stored twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageorigin
from imageorigin.scan import scan, walk_images

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, sources: list[Path], n: int, per_dir: int = 1000) -> None:
    for i in range(n):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        os.symlink(sources[i % len(sources)], d / f"{i:07d}{sources[i % len(sources)].suffix}")


def kill_runs(tree: Path, store: Path, mode: str, kills: int, seed: int = 0) -> dict:
    """SIGKILL `imageorigin scan` ``kills`` times at random moments, re-run it to the end,
    and count the files lost and stored twice."""
    import random
    import signal

    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "imageorigin.cli", "scan", str(tree), mode, str(store), "--quiet",
           "--commit-every", "32"]
    killed = []
    for _ in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait = rng.uniform(1.0, 8.0)  # model loading takes ~2 s: some kills land before any commit
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed.append({"after_s": round(wait, 2), "rows_stored": len(_paths(store))})
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    paths = _paths(store)
    expected = {str(p) for p in walk_images([tree])}
    return {"mode": mode, "kills": len(killed), "killed": killed, "files": len(expected),
            "lost": len(expected - set(paths)), "stored_twice": len(paths) - len(set(paths))}


def _paths(store: Path) -> list[str]:
    """Every stored row's path, duplicates kept: from a SQLite file or a Parquet folder."""
    import sqlite3

    import pyarrow.parquet as pq

    if store.is_dir():
        parts = sorted(store.glob("part-*.parquet"))
        return pq.read_table(parts, columns=["path"]).column("path").to_pylist() if parts else []
    if not store.exists():
        return []
    with sqlite3.connect(store) as con:
        if not con.execute("SELECT name FROM sqlite_master WHERE name='results'").fetchone():
            return []
        return [r[0] for r in con.execute("SELECT path FROM results")]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--listed", type=int, default=1_000_000)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--ray", action="store_true", help="also scan through a local 2-node Ray cluster")
    ap.add_argument("--kills", type=int, default=0, help="SIGKILL scans this many times (item 4)")
    ap.add_argument("--only-kills", action="store_true", help="run item 4 alone")
    ap.add_argument("--out")
    args = ap.parse_args()
    sources = sorted((Path(args.shared) / "dh3-bench/native/val").rglob("*.jpg"))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.kills:
            _tree(Path(tmp) / "small", sources, 400)
            result["kills"] = [kill_runs(Path(tmp) / "small", Path(tmp) / name, mode, args.kills)
                               for mode, name in (("--db", "k.sqlite"), ("--out", "k-parts"))]
            print(result["kills"], flush=True)
        if args.only_kills:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n") if args.out else None
            return
        tree = Path(tmp) / "tree"
        _tree(tree, sources, args.images)
        files = list(walk_images([tree]))
        model = imageorigin.load()
        list(imageorigin.predict(model, files[:64]))  # warm
        t = time.perf_counter()
        list(imageorigin.predict(model, files))
        predict_ips = len(files) / (time.perf_counter() - t)
        t = time.perf_counter()
        scan([tree], Path(tmp) / "s.sqlite", progress=False)
        scan_ips = len(files) / (time.perf_counter() - t)
        result["throughput"] = {"images": len(files), "predict_images_per_s": round(predict_ips, 1),
                                "scan_images_per_s": round(scan_ips, 1), "ratio": round(scan_ips / predict_ips, 3)}
        print(result["throughput"], flush=True)
        if args.ray:  # the same files through a local 2-node Ray cluster
            import ray
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            cluster.add_node(num_cpus=1)
            try:
                t = time.perf_counter()
                scan([tree], Path(tmp) / "r.sqlite", progress=False, ray_address=cluster.address,
                     commit_every=512)
                ray_ips = len(files) / (time.perf_counter() - t)
            finally:
                ray.shutdown()
                cluster.shutdown()
            result["ray"] = {"images": len(files), "local_scan_images_per_s": round(scan_ips, 1),
                             "ray_scan_images_per_s": round(ray_ips, 1),
                             "ray_vs_local": round(ray_ips / scan_ips, 3)}
            print(result["ray"], flush=True)

        big = Path(tmp) / "big"
        _tree(big, sources, args.listed)
        # A fresh process, as `imageorigin scan` would be: the model loaded and
        # warm, then scan's listing and resume check over every file.
        code = (
            "import json, sys; from pathlib import Path; import imageorigin\n"
            "from imageorigin.scan import SqliteStore, _chunks, _stats, walk_images\n"
            "sys.path.insert(0, sys.argv[3]); from scan import _rss_mb\n"
            "m = imageorigin.load(); list(imageorigin.predict(m, [sys.argv[4]]))\n"
            "store = SqliteStore(Path(sys.argv[2])); n = int(sys.argv[5]); rss = {'model loaded': round(_rss_mb())}; seen = 0\n"
            "for chunk in _chunks(walk_images([sys.argv[1]]), 256):\n"
            "    _stats(chunk); store.seen(chunk, 'model'); seen += len(chunk)\n"
            "    for mark in (0.1, 0.5):\n"
            "        if seen - len(chunk) < mark * n <= seen: rss[f'{mark:.0%}'] = round(_rss_mb())\n"
            "rss['100%'] = round(_rss_mb()); print(json.dumps({'files': seen, 'rss_mb': rss}))\n")
        out = subprocess.run([sys.executable, "-c", code, str(big), str(Path(tmp) / "m.sqlite"),
                              str(Path(__file__).parent), str(sources[0]), str(args.listed)],
                             capture_output=True, text=True, check=True).stdout
        result["listing"] = json.loads(out.strip().splitlines()[-1])
        print(result["listing"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
