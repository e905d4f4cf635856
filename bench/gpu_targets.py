"""Merge the GPU check's parts into one JSON and judge the GPU targets (used by scripts/gpu-check.sh).

    python bench/gpu_targets.py WORK_DIR [--size 15b]

WORK_DIR holds what gpu-check.sh's parts wrote: kernels.json (bench/gpu_check.py: kernel_check),
decode.json (bench/gpu_decode.py --json), serve_load.json (bench/serve_load.py --json),
pytest_gpu.log and, per part, NAME.rc (exit status) and NAME.err (stderr). A part that did not
run or failed is reported with its status and the tail of its stderr; a target whose figure is
missing is "not measured", never met.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PARTS = ("kernels", "pytest_gpu", "decode", "serve_load", "tensorrt")


def _case(kernels: dict, kind: str, **match: Any) -> dict:
    return next((c for c in kernels.get("cases", []) if c.get("kind") == kind and c.get("dtype") == "bfloat16"
                 and all(c.get(k) == v for k, v in match.items())), {})


def targets(report: dict, size: str = "15b") -> list[dict]:
    """Each target of the GPU work: its figure (None when not measured), the bound, and whether it is met."""
    sized = report.get("decode", {}).get("sizes", {}).get(size, {})
    ratios = sized.get("ratios", {})
    kernels = report.get("kernels", {})
    rows = [
        (f"{size} bf16 decode at batch 1, fraction of the HBM bound", ">=", 0.85,
         sized.get("runtimes", {}).get("cuda", {}).get("1", {}).get("fraction_of_bound")),
        (f"{size} bf16 decode at batch 1, cuda over transformers generate", ">=", 5.0,
         ratios.get("cuda_over_transformers", {}).get("1")),
        (f"{size} decode tokens/s at batch 8 over batch 1", ">=", 6.0, ratios.get("cuda_batch8_over_batch1")),
        ("decode attention B=1, past 8192, 15b shapes: flash-decoding time over SDPA", "<=", 0.5,
         _case(kernels, "decode", batch=1).get("flash_decode_over_sdpa")),
        ("prefill attention S=16384, 15b shapes: Triton (two-kernel) time over SDPA with a window mask", "<=", 0.3,
         _case(kernels, "prefill", seq_len=16384).get("two_kernel_over_sdpa")),
        ("serve --backend cuda: tokens/s at 16 clients over 1 client", ">=", 10.0,
         report.get("serve_load", {}).get("throughput_16_over_1")),
    ]
    out = []
    for name, op, bound, value in rows:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "want": f"{op} {bound}", "value": value, "met": met})
    return out


def merge(work: Path, size: str = "15b") -> dict:
    report: dict[str, Any] = {"parts": {}}
    for part in PARTS:
        rc_file = work / f"{part}.rc"
        if not rc_file.exists():
            report["parts"][part] = {"status": "not run"}
            continue
        rc = int(rc_file.read_text().strip() or 1)
        status = {0: "passed", 124: "timed out", 137: "killed (time or memory)"}.get(rc, f"failed (exit {rc})")
        entry: dict[str, Any] = {"status": status, "exit": rc}
        err = work / f"{part}.err"
        if rc and err.exists():
            entry["stderr_tail"] = err.read_text(errors="replace")[-2000:]
        result = work / f"{part}.json"
        if result.exists():
            try:
                report[part] = json.loads(result.read_text())
            except json.JSONDecodeError as e:
                entry["json_error"] = str(e)
        log = work / f"{part}.log"
        if log.exists():
            entry["log_tail"] = log.read_text(errors="replace")[-2000:]
        report["parts"][part] = entry
    report["targets"] = targets(report, size)
    ran = [p for p in report["parts"].values() if p["status"] != "not run"]
    report["ok"] = bool(ran) and all(p["status"] == "passed" for p in ran)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="the folder gpu-check.sh's parts wrote into")
    p.add_argument("--size", default="15b", help="model size whose decode figures the targets use (default 15b)")
    args = p.parse_args(argv)
    if not args.work.is_dir():
        print(f"gpu_targets: error: {args.work} is not a folder; give the folder gpu-check.sh's parts wrote into",
              file=sys.stderr)
        return 2
    report = merge(args.work, args.size)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
