"""Parity of quantized artifacts: exact against the dequantized model, faithful to the unquantized one, and a
broken quantization (a wrong scale, blocks out of order, off by one block) fails."""
from __future__ import annotations

import json

import pytest
import torch

import sc2deploy.export.quantize as quantize
from sc2deploy.checkpoint import CheckpointSource, RandomSource, TensorSource, write_checkpoint
from sc2deploy.cli import main
from sc2deploy.config import preset
from sc2deploy.export import export_artifact
from sc2deploy.parity.compare import FIDELITY, check_fidelity, fidelity_stats
from sc2deploy.quantization import SCHEMES, QuantScheme

TINY = preset("tiny")


def parity_json(folder, capsys, *extra) -> tuple[int, dict]:
    code = main(["parity", str(folder), "--decode-steps", "24", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("scheme", [SCHEMES["int4"], SCHEMES["int8"], QuantScheme(4, 16, 0, True)],
                         ids=["int4", "int8", "int4-level0-symmetric"])
def test_a_quantized_export_passes_and_reports_its_fidelity(tmp_path, capsys, scheme):
    artifact = export_artifact(RandomSource(TINY, 0), tmp_path / "art", "fp32", quant=scheme)
    code, report = parity_json(artifact, capsys)
    assert code == 0, report
    assert f"{scheme.name} blocks of {scheme.block_size} dequantized" in report["reference"]
    for case in report["cases"]:
        fidelity = case["fidelity"]
        assert 0 < fidelity["kl_mean"] <= fidelity["kl_p99"] <= fidelity["kl_max"]
        assert 0 <= fidelity["top1"] <= 1 and 0 < fidelity["top5"] <= 1
    assert report["tolerances"]["atol"] == (1e-4 if scheme.accuracy_level == 0 else 0.1)


def _wrong_scale(q):
    return quantize.QuantizedMatMul(q.packed, q.scales * 1.25, q.zero_points, q.scheme)


def _blocks_reversed(q):
    return quantize.QuantizedMatMul(q.packed.flip(1), q.scales, q.zero_points, q.scheme)


def _blocks_shifted(q):
    return quantize.QuantizedMatMul(q.packed.roll(1, dims=1), q.scales, q.zero_points, q.scheme)


@pytest.mark.parametrize("break_it", [_wrong_scale, _blocks_reversed, _blocks_shifted])
def test_a_broken_quantization_fails(tmp_path, capsys, monkeypatch, break_it):
    right = quantize.quantize_matmul
    monkeypatch.setattr(quantize, "quantize_matmul", lambda *a, **k: break_it(right(*a, **k)))
    artifact = export_artifact(RandomSource(TINY, 0), tmp_path / "art", "fp32", quant=SCHEMES["int4"])
    monkeypatch.undo()  # parity's reference quantizes correctly
    code, report = parity_json(artifact, capsys)
    assert code == 1
    assert all(not c["passed"] and ("logits off by" in c["failures"][0] or "KL up to" in c["failures"][0])
               for c in report["cases"])


def test_fidelity_bounds_catch_a_model_far_from_the_unquantized_one():
    generator = torch.Generator().manual_seed(0)
    base = [[torch.randn(40, 100, generator=generator).numpy()]]
    close = [[base[0][0] + 0.01 * torch.randn(40, 100, generator=generator).numpy()]]
    unrelated = [[3 * torch.randn(40, 100, generator=generator).numpy()]]
    assert check_fidelity(fidelity_stats(base, close), FIDELITY["int8"]) == []
    failures = check_fidelity(fidelity_stats(base, unrelated), FIDELITY["int4"])
    assert any("KL mean" in f for f in failures)
    same = fidelity_stats(base, base)
    assert same["kl_max"] < 1e-12 and same["top1"] == 1 and same["top5"] == 1


class _Outliers(TensorSource):
    """A few input channels of every layer's weights scaled by 50, as real LLM weights have."""

    def __init__(self, source: TensorSource):
        self.source, self.config, self.description = source, source.config, f"{source.description} with outliers"

    def names(self):
        return self.source.names()

    def get(self, name, dtype):
        tensor = self.source.get(name, dtype)
        if tensor.dim() == 2 and ".layers." in name:
            tensor = tensor.clone()
            tensor[:, torch.arange(0, tensor.shape[1], tensor.shape[1] // 4)[:4]] *= 50
        return tensor


def test_outlier_channels_stay_within_the_fidelity_bounds(tmp_path, capsys):
    checkpoint = write_checkpoint(_Outliers(RandomSource(TINY, 0)), tmp_path / "ckpt", "fp32")
    for name in ("int8", "int4"):
        artifact = export_artifact(CheckpointSource(checkpoint), tmp_path / name, "fp32", quant=SCHEMES[name])
        code, report = parity_json(artifact, capsys)
        assert code == 0, [c["failures"] for c in report["cases"]]
