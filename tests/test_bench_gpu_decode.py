"""bench/gpu_decode.py on CPU: the tiny preset, the cuda runtime under the Triton interpreter, as a subprocess."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_decode.py"


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke() -> dict:
    # --transformers-steps 6: its decode time is a difference of two generate() calls, which a loaded CPU
    # can swamp at 2 steps; the other runtimes time exactly --steps 2.
    done = run_script("--device", "cpu", "--sizes", "tiny", "--batches", "1,2,8", "--steps", "2",
                      "--transformers-steps", "6", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout), "stderr": done.stderr}


def test_cpu_smoke_json_has_every_runtime_and_batch(smoke):
    report = smoke
    assert report["machine"]["torch"] and report["machine"]["triton"] and report["machine"]["transformers"]
    assert report["copy_bandwidth_gb_s"] > 0
    assert report["settings"]["steps"] == 2
    size = report["sizes"]["tiny"]
    assert size["weight_bytes"] > 0
    for batch in ("1", "2"):
        bound = size["bound"][batch]
        assert bound["tok_s"] > 0
        assert bound["bytes_per_step"] == bound["weight_bytes_per_step"] + bound["kv_bytes_per_step"]
        for runtime in ("eager", "transformers", "cuda"):
            got = size["runtimes"][runtime][batch]
            assert "error" not in got, (runtime, batch, got)
            assert got["tok_s"] > 0 and got["ms_per_step"] > 0, (runtime, batch, got)
            assert 0 < got["fraction_of_bound"] and math.isfinite(got["fraction_of_bound"]), (runtime, batch, got)
            assert math.isclose(got["fraction_of_bound"], got["tok_s"] / bound["tok_s"])
    assert set(size["ratios"]["cuda_over_eager"]) == {"1", "2", "8"}
    assert set(size["ratios"]["cuda_over_transformers"]) == {"1", "2", "8"}
    # The same weights in all three: the prefill logits agree up to bf16 rounding.
    assert set(size["max_abs_logit_diff_vs_eager"]) == {"transformers", "cuda"}
    assert all(d < 0.05 for d in size["max_abs_logit_diff_vs_eager"].values()), size["max_abs_logit_diff_vs_eager"]
    assert "[tiny] cuda batch 2" in report["stderr"]  # progress on stderr, not a terminal


def test_unknown_size_is_one_line_and_exit_2():
    done = run_script("--sizes", "nope", "--device", "cpu", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bad_batch_is_one_line_and_exit_2():
    done = run_script("--batches", "1,0", "--device", "cpu", timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_gpu_targets_read_the_figures_the_parts_write(smoke, tmp_path):
    """gpu-check.sh's merge finds each target's figure in real part outputs (CPU-sized, so none is met here)."""
    from bench.gpu_check import kernel_check

    spec = importlib.util.spec_from_file_location("gpu_targets", REPO / "bench" / "gpu_targets.py")
    gpu_targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_targets)
    kernels = kernel_check("cpu", num_heads=4, kv_heads=2, head_dim=16, window=8, seq_lens=(24,),
                           dtypes=("bfloat16",), decode_batches=(1,), decode_past=19, chunk=8, warmup=0, iters=1)
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "decode.json").write_text(json.dumps(smoke))
    (tmp_path / "serve_load.json").write_text(json.dumps({"throughput_16_over_1": 3.5}))
    for part, rc in (("kernels", 0), ("decode", 0), ("serve_load", 0), ("pytest_gpu", 1)):
        (tmp_path / f"{part}.rc").write_text(f"{rc}\n")
    (tmp_path / "pytest_gpu.err").write_text("1 failed")
    report = gpu_targets.merge(tmp_path, size="tiny")
    assert report["ok"] is False and report["parts"]["pytest_gpu"]["status"] == "failed (exit 1)"
    assert report["parts"]["tensorrt"] == {"status": "not run"}
    assert len(report["targets"]) == 6
    measured = [t for t in report["targets"] if t["value"] is not None]
    # Every figure is found but the 16,384-token prefill, which a CPU run does not reach.
    assert len(measured) == 5 and all(isinstance(t["met"], bool) for t in measured)
    assert [t["met"] for t in report["targets"] if t["value"] is None] == [None]
    serve = next(t for t in report["targets"] if "16 clients" in t["target"])
    assert serve["value"] == 3.5 and serve["met"] is False
