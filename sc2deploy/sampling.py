"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sc2deploy.errors import UserError

MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / temperature would overflow float32
            raise UserError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One per sequence: its own generator keeps a seeded request reproducible whatever else runs."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator: torch.Generator | None = None  # made on the device of the first logits sampled

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        return self.generator

    def __call__(self, logits: Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        scores = logits.float() / p.temperature
        if p.top_k and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the first token always
            drop[0] = False  # (even when a tiny top_p rounds to 0 in float32)
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(probs.device)))


def top_logprobs(logits: Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` and the `n` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, n) if n > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), pairs
