"""sc2deploy selftest: what this machine can run; with --gpu, the GPU check that prints one JSON summary.

`selftest --gpu` on a GPU host, under 10 minutes on one H200 (the Triton kernels themselves are checked
against the reference by `pytest -m gpu` and timed by bench/gpu_check.py, both run by scripts/gpu-check.sh):
  1. eager:   bf16 decode tokens/s of the eager reference model with random 15b weights,
              generated on the GPU (no CPU randn: 32 GB of weights in about a second);
  2. tensorrt (when `tensorrt` imports): a tiny random model exported with --target trt, built
              into an engine (aot plugin, fp16 and bf16; jit plugin, fp16), each checked with
              `parity` against the eager model; the aot engine also run by trtexec if present.
Each part runs in its own try block: a failure is recorded in the JSON and the others still run.
Exit status: 0 every part that ran passed, 1 something failed, 2 no GPU (nothing ran).
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sc2deploy.commands.common import notice


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "selftest", help="report what this machine can run; --gpu: the GPU check (15b decode, TensorRT)",
        description="Without --gpu: a quick report of the environment (torch, CUDA, triton, TensorRT) and a tiny "
                    "eager generation. With --gpu: the GPU check - eager bf16 decode tokens/s of a random 15b and, where "
                    "TensorRT is installed, a tiny engine built and checked with `parity` against the eager model. "
                    "Prints one JSON summary on stdout; progress goes to stderr.",
        epilog="exit status: 0 passed, 1 a check failed, 2 the check cannot run here (no GPU). "
               "example: sc2deploy selftest --gpu > gpu-check.json")
    p.add_argument("--gpu", action="store_true", help="run the GPU check (needs a CUDA GPU)")
    p.add_argument("--skip", action="append", default=[], choices=("eager", "tensorrt"),
                   help="leave out a part of the GPU check (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="smaller GPU check: sequences up to 4,096, fewer timing iterations, fp16 engine only")
    p.add_argument("--work-dir", metavar="DIR", help="where the tiny artifact and engines go (default: a temp dir)")
    p.add_argument("--json", action="store_true",
                   help="the summary is always one JSON object on stdout; accepted as in every other command")
    p.set_defaults(func=run)


def run(args) -> int:
    summary = gpu_check(skip=set(args.skip), quick=args.quick, work_dir=args.work_dir) if args.gpu else env_check()
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------- without --gpu
def environment() -> dict[str, Any]:
    import torch

    from sc2deploy import __version__
    from sc2deploy.plugins.trt_env import tensorrt_available

    env: dict[str, Any] = {"sc2deploy": __version__, "python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        from sc2deploy.plugins.trt_env import gpu_identity

        env["gpu"] = gpu_identity()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        env["triton"] = f"unavailable ({type(e).__name__})"
    if tensorrt_available():
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    else:
        env["tensorrt"] = None
    return env


def env_check() -> dict[str, Any]:
    summary: dict[str, Any] = {"mode": "environment", "environment": environment(), "errors": []}
    summary["eager_tiny"] = _part(summary, "eager_tiny", _tiny_generation)
    summary["ok"] = not summary["errors"]
    summary["note"] = ("run `sc2deploy selftest --gpu` on a GPU host for the 15b decode and TensorRT checks"
                       if not summary["environment"]["cuda_available"] else "GPU found: `selftest --gpu` runs the GPU check")
    return summary


def _tiny_generation() -> dict[str, Any]:
    from sc2deploy.checkpoint import RandomSource
    from sc2deploy.config import preset
    from sc2deploy.runtime.eager import EagerRuntime

    runtime = EagerRuntime(RandomSource(preset("tiny")), max_batch=1)
    logits = runtime.prefill(0, [1, 2, 3, 4])
    tokens = []
    for _ in range(4):
        token = int(logits.argmax())
        tokens.append(token)
        logits = runtime.decode([0], [token])[0]
    return {"ok": True, "tokens": tokens}


# ---------------------------------------------------------------- --gpu
def gpu_check(skip: frozenset[str] | set[str] = frozenset(), quick: bool = False,
              work_dir: str | None = None) -> dict[str, Any]:
    from sc2deploy.plugins.trt_env import require_cuda, tensorrt_available

    require_cuda("sc2deploy selftest --gpu")  # UserError -> exit 2
    start = time.time()
    summary: dict[str, Any] = {"mode": "gpu", "environment": environment(), "errors": []}
    if "eager" not in skip:
        summary["eager_15b_decode"] = _part(summary, "eager_15b_decode", lambda: eager_decode_part(quick))
    if "tensorrt" not in skip:
        if tensorrt_available():
            summary["tensorrt"] = _part(summary, "tensorrt", lambda: tensorrt_part(quick, work_dir))
        else:
            summary["tensorrt"] = {"skipped": "tensorrt is not importable here; run in the GPU image "
                                              "(docker/Dockerfile.gpu) for the engine build and parity"}
    summary["seconds"] = round(time.time() - start, 1)
    parts = [summary[k] for k in ("eager_15b_decode", "tensorrt") if isinstance(summary.get(k), dict)]
    summary["ok"] = not summary["errors"] and all(p.get("ok", True) for p in parts)
    return summary


def _part(summary: dict, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    notice(f"selftest: {name} ...")
    t0 = time.time()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the other parts still run
        summary["errors"].append({"part": name, "error": f"{type(e).__name__}: {e}"[:1000],
                                  "traceback": traceback.format_exc()[-3000:]})
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
    result["seconds"] = round(time.time() - t0, 1)
    notice(f"selftest: {name} {'ok' if result.get('ok', True) else 'FAILED'} ({result['seconds']} s)")
    return result


def eager_decode_part(quick: bool, size: str = "15b", batch_sizes: tuple[int, ...] = (1, 8), prompt_len: int = 128,
                      steps: int = 32) -> dict[str, Any]:
    """Decode tokens/s of the eager reference model in bf16 with random weights made on the GPU."""
    import torch

    from sc2deploy.checkpoint import random_model
    from sc2deploy.config import preset

    config = preset(size)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    model = random_model(config, "bf16", device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    capacity = config.cache_positions()
    results = []
    for batch in batch_sizes[:1] if quick else batch_sizes:
        cache = model.empty_cache(batch, capacity)
        ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device, generator=gen)
        with torch.inference_mode():
            logits, cache = model(ids, torch.ones_like(ids), cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            length = prompt_len
            times = []
            for step in range(steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                mask = torch.ones((batch, length + 1), dtype=torch.int64, device=device)
                logits, cache = model(token, mask, cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                length += 1
        steady = sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up
        results.append({"batch": batch, "prompt_tokens": prompt_len, "decode_steps": steps,
                        "median_step_ms": round(steady * 1e3, 2), "tokens_per_s": round(batch / steady, 1),
                        "weights_gb_per_s": round(weight_bytes / steady / 1e9, 1),
                        "finite": bool(torch.isfinite(logits).all())})
        del cache
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return {"ok": all(r["finite"] for r in results), "size": size, "dtype": "bf16", "weights": "random (on GPU)",
            "weight_bytes": weight_bytes, "peak_gib": round(peak, 1), "runs": results}


def tensorrt_part(quick: bool, work_dir: str | None) -> dict[str, Any]:
    """Tiny random model: export --target trt, build (aot fp16/bf16, jit fp16), parity against eager, trtexec."""
    import tensorrt

    folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="sc2deploy-selftest-"))
    folder.mkdir(parents=True, exist_ok=True)
    builds = [("aot", "fp16")] if quick else [("aot", "fp16"), ("aot", "bf16"), ("jit", "fp16")]
    out: dict[str, Any] = {"tensorrt": tensorrt.__version__, "work_dir": str(folder), "engines": []}
    for plugin, dtype in builds:
        out["engines"].append(_engine_case(folder, plugin, dtype))
    out["ok"] = all(e.get("ok") for e in out["engines"])
    if not work_dir:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _engine_case(folder: Path, plugin: str, dtype: str) -> dict[str, Any]:
    from sc2deploy.build import build_engine
    from sc2deploy.checkpoint import RandomSource
    from sc2deploy.config import preset
    from sc2deploy.export.exporter import export_artifact
    from sc2deploy.parity import check

    case: dict[str, Any] = {"plugin": plugin, "dtype": dtype}
    try:
        artifact = folder / f"tiny-trt-{dtype}"
        if not artifact.is_dir():
            t0 = time.time()
            export_artifact(RandomSource(preset("tiny"), seed=7), artifact, dtype=dtype, target="trt", force=True)
            case["export_s"] = round(time.time() - t0, 1)
        engine = folder / f"tiny-engine-{plugin}-{dtype}"
        t0 = time.time()
        build_engine(artifact, engine, force=True, log=notice, plugin=plugin)
        case["build_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        report = check(engine, backend="trt")
        case["parity_s"] = round(time.time() - t0, 1)
        case["parity"] = _parity_summary(report)
        case["ok"] = bool(report.passed)
        if plugin == "aot":
            case["trtexec"] = trtexec_run(engine)
    except Exception as e:  # noqa: BLE001 - recorded (UserError included)
        case["ok"] = False
        case["error"] = f"{type(e).__name__}: {e}"[:1000]
        case["traceback"] = traceback.format_exc()[-3000:]
    return case


def _parity_summary(report: Any) -> dict[str, Any]:
    return json.loads(json.dumps(report.to_dict(), default=str))


def trtexec_run(engine: Path) -> dict[str, Any]:
    """Run the engine under trtexec (no Python plugin code): proof that the AOT kernel is inside it."""
    import numpy as np

    from sc2deploy.contract import ATTENTION_MASK, ENGINE, INPUT_IDS, read_manifest

    exe = shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",) if Path(p).is_file()), None)
    if exe is None:
        return {"skipped": "trtexec not found"}
    manifest = read_manifest(engine, ENGINE)
    profile = manifest.details["profiles"][0]["shapes"]
    data = engine / "trtexec-inputs"
    data.mkdir(exist_ok=True)
    shapes, loads = [], []
    for name, (lo, _opt, _hi) in profile.items():
        shape = list(lo)
        if name in (INPUT_IDS, ATTENTION_MASK):
            shape = [1, 8]
            array = np.ones(shape, dtype=np.int64) if name == ATTENTION_MASK else np.arange(8, dtype=np.int64)[None]
        else:
            array = np.zeros(shape, dtype=np.float32 if manifest.dtype == "fp32" else np.float16)  # bf16 zeros: same bits
        path = data / f"{name}.bin"
        array.tofile(path)
        shapes.append(f"{name}:{'x'.join(map(str, shape))}")
        loads.append(f"{name}:{path}")
    cmd = [exe, f"--loadEngine={engine / 'model.plan'}", f"--shapes={','.join(shapes)}",
           f"--loadInputs={','.join(loads)}", "--iterations=5", "--warmUp=0", "--duration=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}


if __name__ == "__main__":  # python -m sc2deploy.commands.selftest: the GPU check alone
    print(json.dumps(gpu_check(), indent=2, default=str))
    sys.exit(0)
