"""Comparing one case: tolerances, per-position metrics and the verdict.

Metrics, per case over every real position (prompt and decode) of every row, e = eager, r = runtime:
  max abs    max |r - e|
  max rel    max over positions of max|r - e| / max|e|: the error relative to that position's logit
             range (elementwise |r - e| / |e| is unbounded where a logit crosses zero)
  top-1      fraction of positions where argmax r == argmax e
  KL         KL(softmax e || softmax r) in float64, mean and max over positions
  diverges   first decode step (0 = the prediction after the prompt) where argmax r != e's token
  near-tie   whether e's top-2 margin at that step is within twice the logit tolerance, i.e. noise
A case passes when every logit is finite, every position has max|r - e| <= atol + rtol * max|e|, and
KL max <= kl. A top-1 flip that is not a near-tie always fails: it needs a logit out of tolerance.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sc2deploy.errors import UserError
from sc2deploy.quantization import QuantScheme
from sc2deploy.parity.suite import Case

CHUNK = 256  # positions compared at a time (a real vocabulary in float64 is 390 KB per position)


@dataclass(frozen=True)
class Tolerances:
    """A position passes when max|r - e| <= atol + rtol * max|e|; a case when also KL max <= kl."""

    atol: float
    rtol: float
    kl: float

    def allowed(self, scale):
        return self.atol + self.rtol * scale


# Runtime dtype -> tolerances against the float32 eager model. fp32 sides differ only in the order of
# summation (~1e-6 relative); on the tiny preset a weight moved by 1.0 shifts logits by ~7e-4 and a window
# off by one by ~2e-2, so atol 1e-4 fails both. fp16/bf16 are dominated by rounding the weights and
# activations (unit roundoff 4.9e-4 / 3.9e-3): random-weight models show max|r - e| / max|e| of 1e-3-2e-3
# (fp16) and 8e-3-1.5e-2 (bf16); the bounds leave 5-10x headroom. Low-precision runs hide small bugs in
# their noise: check structure with an fp32 export of the same checkpoint.
DEFAULT_TOLERANCES = {
    "fp32": Tolerances(atol=1e-4, rtol=1e-5, kl=1e-6),
    "fp16": Tolerances(atol=1e-2, rtol=1e-2, kl=5e-3),
    "bf16": Tolerances(atol=5e-2, rtol=5e-2, kl=5e-2),
}


# A quantized artifact is compared with the eager model on its own weights dequantized (parity/dequantized.py).
# With accuracy_level 0 MatMulNBits multiplies in the dtype, so the dtype's tolerances hold (measured 4e-7 fp32).
# With accuracy_level 4 it quantizes the activations to int8 per block, and the logits move: measured
# max|r - e| / max|e| of 0.8-2 % and KL max 5e-5 on random tiny and bench models (int8 and int4, fp32 and fp16),
# but up to 24 % and KL max 9e-3 when 4 input channels per layer are scaled by 50 (outliers). The per-position
# bound therefore only catches gross errors, and KL does the work: a broken quantization (blocks out of order, a
# wrong scale) has KL ~0.3 on every case.
DEFAULT_TOLERANCES["int8-activations"] = Tolerances(atol=0.1, rtol=0.3, kl=2e-2)
ACCURACY_LEVEL_COMPUTE = {1: "fp32", 2: "fp16", 3: "bf16", 4: "int8-activations"}  # MatMulNBits' accuracy_level


def quantized_compute(scheme: QuantScheme, dtype: str) -> str:
    """The tolerance key of a quantized artifact of `dtype`: what its MatMulNBits multiply in."""
    return ACCURACY_LEVEL_COMPUTE.get(scheme.accuracy_level, dtype)


@dataclass(frozen=True)
class FidelityBounds:
    """How far a quantized model may be from the unquantized one (fp32 eager), per case: KL(e || r) mean and
    max over positions, and the least fraction of positions with the same top-1 token."""

    kl_mean: float
    kl_max: float
    top1: float | None  # None: not bounded (random int4 models agree on fewer than half their top-1 tokens)


# Calibrated on random-weight checkpoints of the bench preset, where the median top-1/top-2 margin is 0.07, so
# top-1 agreement is low even for a good quantization (int4: 49 %); and on the same weights with 4 input channels
# per layer scaled by 50 (the outliers real models have): KL mean / max int8 2.4e-3 / 1.3e-2, int4 7.8e-2 /
# 1.9e-1. The bounds leave ~4x headroom over the outlier case; the exactness of the quantized graph itself is the
# comparison with the dequantized model, which is far stricter.
FIDELITY = {
    "int8": FidelityBounds(kl_mean=1e-2, kl_max=5e-2, top1=0.5),
    "int4": FidelityBounds(kl_mean=0.3, kl_max=0.8, top1=None),
}


def fidelity_stats(ref: RowLogits, test: RowLogits) -> dict[str, float]:
    """KL(e || r) mean, p99 and max, same-top-1 rate and top-5 overlap over every position of every row."""
    kls, top1, top5 = [], [], []
    for ref_parts, test_parts in zip(ref, test):
        n = sum(p.shape[0] for p in ref_parts)
        for start in range(0, n, CHUNK):
            e = torch.from_numpy(_positions(ref_parts, start, start + CHUNK)).double()
            r = torch.from_numpy(_positions(test_parts, start, start + CHUNK)).double()
            log_p, log_q = e.log_softmax(-1), r.log_softmax(-1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
            top1.append(e.argmax(-1) == r.argmax(-1))
            k = min(5, e.shape[-1])
            e5, r5 = e.topk(k, dim=-1).indices, r.topk(k, dim=-1).indices
            top5.append((e5[:, :, None] == r5[:, None, :]).any(-1).double().mean(-1))
    kl = torch.cat(kls)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
            "top1": float(torch.cat(top1).double().mean()), "top5": float(torch.cat(top5).mean())}


def check_fidelity(stats: dict[str, float], bounds: FidelityBounds) -> list[str]:
    """The failures of `stats` against `bounds`, as report lines."""
    failures = []
    if not stats["kl_mean"] <= bounds.kl_mean:
        failures.append(f"KL mean against the unquantized model {stats['kl_mean']:.2e} > {bounds.kl_mean:.0e}")
    if not stats["kl_max"] <= bounds.kl_max:
        failures.append(f"KL max against the unquantized model {stats['kl_max']:.2e} > {bounds.kl_max:.0e}")
    if bounds.top1 is not None and not stats["top1"] >= bounds.top1:
        failures.append(f"same top-1 as the unquantized model at {100 * stats['top1']:.1f}% of positions < "
                        f"{100 * bounds.top1:.0f}%")
    return failures


def tolerances_for(dtype: str, atol: float | None = None, rtol: float | None = None,
                   kl: float | None = None) -> Tolerances:
    if dtype not in DEFAULT_TOLERANCES:
        raise UserError(f"no parity tolerances for dtype {dtype!r}; expected one of {', '.join(DEFAULT_TOLERANCES)}")
    base = DEFAULT_TOLERANCES[dtype]
    values = {"atol": base.atol if atol is None else atol, "rtol": base.rtol if rtol is None else rtol,
              "kl": base.kl if kl is None else kl}
    for name, value in values.items():
        if not value >= 0:
            raise UserError(f"--{name} must be a number >= 0, got {value}")
    return Tolerances(**values)



@dataclass
class CaseResult:
    name: str
    description: str
    passed: bool
    positions: int = 0
    decode_steps: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    top1: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    first_divergence: int | None = None  # decode step; None when the greedy tokens never differ
    near_tie: bool | None = None
    margin: float | None = None  # eager's top-2 margin at the first divergence
    worst: str | None = None  # where max abs occurs
    failures: list[str] = field(default_factory=list)
    reference_s: float | None = None
    runtime_s: float | None = None
    fidelity: dict[str, float] | None = None  # quantized artifacts: against the unquantized model (fidelity_stats)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}



RowLogits = list  # one list per row of (n_i, V) float32 arrays whose concatenation is the row's logits


def _positions(parts: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Positions [start, stop) of a row held as consecutive (n_i, V) parts (a copy only across a boundary)."""
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
        if lo < hi:
            pieces.append(part[lo:hi])
        offset += part.shape[0]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _position_stats(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-position error, logit range, KL, argmaxes, reference top-2 margin and finiteness of one row's
    logits, each side given as consecutive (n_i, V) parts."""
    out: dict[str, list] = {k: [] for k in ("err", "sum_err", "scale", "kl", "ref_top", "test_top", "margin",
                                            "finite")}
    for start in range(0, sum(p.shape[0] for p in ref), CHUNK):
        e = torch.from_numpy(_positions(ref, start, start + CHUNK)).double()
        r = torch.from_numpy(_positions(test, start, start + CHUNK)).double()
        out["finite"].append(r.isfinite().all(-1))
        diff = (r - e).abs()
        out["err"].append(diff.amax(-1))
        out["sum_err"].append(diff.sum(-1))
        out["scale"].append(e.abs().amax(-1))
        log_p, log_q = e.log_softmax(-1), r.log_softmax(-1)
        out["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1))
        top2 = e.topk(min(2, e.shape[-1]), dim=-1).values
        out["margin"].append(top2[:, 0] - top2[:, -1] if top2.shape[-1] > 1 else torch.full_like(top2[:, 0], math.inf))
        out["ref_top"].append(e.argmax(-1))
        out["test_top"].append(r.argmax(-1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _describe_position(case: Case, row: int, pos: int, pooled: bool = False) -> str:
    if pooled:
        return f"row {row}" if len(case.prompts) > 1 else "the pooled position"
    n = len(case.prompts[row])
    where = f"position {pos}" if pos < n else f"decode step {pos - n + 1}"
    if pos == n - 1 and case.decode_steps:
        where = f"position {pos} (decode step 0)"
    return where if len(case.prompts) == 1 else f"row {row} {where}"


def _as_rows(logits: np.ndarray | RowLogits, case: Case) -> RowLogits:
    """Logits (B, S' + T, V), rows right-padded, or already one list of parts per row: one list per row."""
    if isinstance(logits, np.ndarray):
        return [[logits[row, :len(p) + case.decode_steps]] for row, p in enumerate(case.prompts)]
    return logits


def compare_case(case: Case, ref: np.ndarray | RowLogits, test: np.ndarray | RowLogits,
                 tol: Tolerances, pooled: bool = False, distributions: bool = True) -> CaseResult:
    """Metrics and verdict of one case from the two runners' logits: (B, S' + T, V) arrays, or per row a list
    of consecutive (n_i, V) parts (what the runners return, see `row_logits`).

    The other heads (parity/heads.py), with no decode steps: `pooled`, one position per row (sequence
    classification); not `distributions`, outputs that are not logits (hidden states), judged by the
    per-position bound alone (no KL, top-1 or near-tie)."""
    result = CaseResult(case.name, case.description, passed=False, decode_steps=case.decode_steps)
    ref_rows, test_rows = _as_rows(ref, case), _as_rows(test, case)

    def shapes(rows):
        return [(sum(p.shape[0] for p in parts), parts[0].shape[-1]) for parts in rows]

    def where(row: int, pos: int) -> str:
        return _describe_position(case, row, pos, pooled)

    lengths = [1 if pooled else len(p) + case.decode_steps for p in case.prompts]
    expected = [(n, shapes(ref_rows)[0][1]) for n in lengths]
    if isinstance(ref, np.ndarray) and isinstance(test, np.ndarray) and test.shape != ref.shape:
        result.failures.append(f"the runtime returned logits of shape {test.shape}, the reference {ref.shape}")
        return result
    if shapes(test_rows) != shapes(ref_rows) or shapes(ref_rows) != expected:
        result.failures.append(f"the runtime returned logits of shape {shapes(test_rows)} per row, the reference "
                               f"{shapes(ref_rows)}")
        return result
    index, stats = [], []
    for row, n in enumerate(lengths):
        stats.append(_position_stats(ref_rows[row], test_rows[row]))
        index += [(row, pos) for pos in range(n)]
    s = {k: np.concatenate([st[k] for st in stats]) for k in stats[0]}
    vocab = expected[0][1]
    result.positions = len(index)
    result.max_abs = float(s["err"].max()) if np.isfinite(s["err"]).all() else math.nan
    result.mean_abs = float(s["sum_err"].sum() / (len(index) * vocab))
    with np.errstate(divide="ignore", invalid="ignore"):
        result.max_rel = float(np.max(s["err"] / s["scale"]))
    if distributions:
        result.top1 = float(np.mean(s["ref_top"] == s["test_top"]))
        result.kl_mean, result.kl_max = float(s["kl"].mean()), float(s["kl"].max())
    worst = int(np.nanargmax(s["err"])) if np.isfinite(s["err"]).any() else 0
    result.worst = where(*index[worst])

    allowed = tol.allowed(s["scale"])
    bad = ~(s["err"] <= allowed)  # NaN counts as bad
    finite = bool(s["finite"].all())
    if not finite:
        first = int(np.argmax(~s["finite"]))
        result.failures.append(f"non-finite logits from the runtime (first at {where(*index[first])})")
    elif bad.any():
        first = int(np.argmax(bad))
        result.failures.append(
            f"logits off by up to {result.max_abs:.2e} at {result.worst}; {int(bad.sum())} of {len(index)} positions "
            f"exceed atol + rtol * max|e| (first: {where(*index[first])}, "
            f"off by {s['err'][first]:.2e} > {allowed[first]:.2e})")
    if result.kl_max is None:  # not distributions: no KL, top-1 or greedy divergence
        result.passed = not result.failures
        return result
    if not result.kl_max <= tol.kl and finite:
        at = where(*index[int(np.nanargmax(s["kl"]))])
        result.failures.append(f"KL up to {result.kl_max:.2e} at {at} > {tol.kl:.0e}")

    # Greedy divergence: decode step k of row b is position len_b - 1 + k.
    for row, prompt in enumerate(case.prompts):
        offset = sum(len(p) + case.decode_steps for p in case.prompts[:row]) + len(prompt) - 1
        steps = range(case.decode_steps + 1) if case.decode_steps else range(0)
        for k in steps:
            i = offset + k
            if s["ref_top"][i] != s["test_top"][i]:
                if result.first_divergence is None or k < result.first_divergence:
                    result.first_divergence, result.margin = k, float(s["margin"][i])
                    result.near_tie = bool(s["margin"][i] <= 2 * allowed[i])
                break
    flips = (s["ref_top"] != s["test_top"]) & ~(s["margin"] <= 2 * allowed)
    if flips.any():
        result.failures.append(f"top-1 differs at {int(flips.sum())} position(s) that are not near-ties "
                               f"(first: {where(*index[int(np.argmax(flips))])})")
    result.passed = not result.failures
    return result

