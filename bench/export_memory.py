"""Export peak memory and wall time: `sc2deploy export --size S --dtype fp16` (random weights) per size.

Each export runs as its own subprocess (its peak RSS comes from os.wait4 on that process),
into a temporary folder that is deleted before the next one starts (15b fp16 is ~32 GB).
Not a test: run it by hand, e.g.
    python bench/export_memory.py --sizes 3b 7b 15b --dtype fp16 [--dir /big/disk] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export_once(size: str, dtype: str, target: str, workdir: Path) -> dict:
    out = workdir / f"{size}-{target}-{dtype}"
    cmd = [sys.executable, "-m", "sc2deploy.cli", "export", "--size", size, "--dtype", dtype, "--target", target,
           "--out", str(out), "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        if proc.returncode != 0:
            raise SystemExit(f"export {size} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
        summary = json.loads(stdout)
        return {"size": size, "dtype": dtype, "target": target, "bytes": summary["bytes"], "wall_s": round(wall, 1),
                "export_s": summary["seconds"], "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
                "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def machine() -> dict:
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "0")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return {"cpus": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1), "avx2": " avx2" in flags,
            "avx512f": " avx512f" in flags, "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["3b", "7b", "15b"])
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--target", default="ort")
    parser.add_argument("--dir", default=None, help="where the temporary artifacts go (default: the system temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sc2-export-bench-", dir=args.dir) as tmp:
        for size in args.sizes:
            row = export_once(size, args.dtype, args.target, Path(tmp))
            rows.append(row)
            print(f"{size}: {row['bytes'] / 1e9:.1f} GB in {row['wall_s']} s, peak RSS {row['peak_rss_gib']} GiB",
                  file=sys.stderr, flush=True)
    result = {"machine": machine(), "exports": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"machine: {result['machine']}")
        print(f"{'size':<6}{'dtype':<7}{'GB written':>11}{'wall s':>9}{'GB/s':>7}{'peak RSS GiB':>14}")
        for r in rows:
            print(f"{r['size']:<6}{r['dtype']:<7}{r['bytes'] / 1e9:>11.2f}{r['wall_s']:>9.1f}"
                  f"{r['bytes'] / 1e9 / r['wall_s']:>7.2f}{r['peak_rss_gib']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
