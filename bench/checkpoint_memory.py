"""Peak RSS and wall time of `sc2deploy checkpoint --size SIZE --dtype DTYPE` (random weights, streamed).

Usage: python bench/checkpoint_memory.py [--size 15b] [--dtype fp16] [--keep DIR]
The checkpoint is written to a temporary folder on the same disk and deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="15b")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder under the repo's parent)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sc2-ckpt-bench-", dir=args.dir or Path(__file__).resolve().parents[2]))
    out = base / args.size
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sc2deploy.cli", "checkpoint", "--size", args.size, "--dtype", args.dtype,
                        "--out", str(out)], check=True)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        written = sum(p.stat().st_size for p in out.iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {"size": args.size, "dtype": args.dtype, "peak_rss_mib": round(peak_kib / 1024, 1),
              "wall_s": round(wall, 1), "bytes_written": written, "write_gb_per_s": round(written / wall / 1e9, 3),
              "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
