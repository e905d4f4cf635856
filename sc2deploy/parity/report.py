"""The report of a parity check, and its terminal table."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sc2deploy.parity.compare import CaseResult, Tolerances


@dataclass
class Report:
    backend: str
    dtype: str
    tolerances: Tolerances
    cases: list[CaseResult]
    reference: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {"passed": self.passed, "backend": self.backend, "dtype": self.dtype,
                "reference": self.reference, "tolerances": asdict(self.tolerances),
                "cases": [c.to_dict() for c in self.cases], "notes": self.notes}


def format_table(report: Report) -> str:
    t = report.tolerances
    lines = [f"parity: {report.backend} {report.dtype} against {report.reference} "
             f"(atol {t.atol:.0e}, rtol {t.rtol:.0e}, kl {t.kl:.0e})"]
    header = f"{'case':<12}{'pos':>6}{'max abs':>10}{'max rel':>10}{'top-1':>8}{'KL mean':>10}{'KL max':>10}" \
             f"{'diverges':>10}{'near-tie':>10}  result"
    lines.append(header)

    def num(x):
        return "-" if x is None else ("nan" if not math.isfinite(x) else f"{x:.1e}")

    for c in report.cases:
        top1 = "-" if c.top1 is None else f"{100 * c.top1:.1f}%"
        diverges = "-" if c.first_divergence is None else str(c.first_divergence)
        tie = "-" if c.near_tie is None else ("yes" if c.near_tie else "no")
        lines.append(f"{c.name[:11]:<12}{c.positions:>6}{num(c.max_abs):>10}{num(c.max_rel):>10}{top1:>8}"
                     f"{num(c.kl_mean):>10}{num(c.kl_max):>10}{diverges:>10}{tie:>10}  {'PASS' if c.passed else 'FAIL'}")
    for c in report.cases:
        if c.fidelity:
            f = c.fidelity
            lines.append(f"fidelity {c.name}: against the unquantized model KL mean {num(f['kl_mean'])} p99 "
                         f"{num(f['kl_p99'])} max {num(f['kl_max'])}, same top-1 {100 * f['top1']:.1f}%, top-5 "
                         f"overlap {100 * f['top5']:.1f}%")
    for c in report.cases:
        for failure in c.failures:
            lines.append(f"FAIL {c.name}: {failure}")
    lines += [f"note: {n}" for n in report.notes]
    failed = sum(not c.passed for c in report.cases)
    lines.append("PASSED" if report.passed else f"FAILED: {failed} of {len(report.cases)} cases")
    return "\n".join(lines)
