"""Exact target-only distributions and goodness-of-fit checks for seeded Monte-Carlo tests."""
from __future__ import annotations

import math
from collections import Counter

import torch

from mmspec.sampling import SamplingSpec


@torch.no_grad()
def exact_joint(model, prompt: list[int], spec: SamplingSpec, length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` tokens) under target-only sampling, by enumerating the (top-k/top-p bounded) support."""
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, pr in joint.items():
            logits = model(torch.tensor([prompt + list(seq)], device=model.device)).logits[0, -1].double().cpu()
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[torch.tensor(prompt + list(seq))] = True
            p = spec.probs(logits, seen)
            for t in p.nonzero().flatten().tolist():
                nxt[seq + (t,)] = pr * float(p[t])
        joint = nxt
    return joint


def chi_square_threshold(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) (Wilson–Hilferty); z = 3.719 is the 1 - 1e-4 normal quantile."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> tuple[float, float, int]:
    """Pearson statistic of samples against `joint`, bins with expected count < 5 merged.

    Returns (statistic, threshold at alpha = 1e-4, count of samples outside the support)."""
    n = len(samples)
    counts = Counter(samples)
    outside = sum(c for s, c in counts.items() if s not in joint)
    bins, merged_obs, merged_exp = [], 0, 0.0
    for s, pr in joint.items():
        exp = n * pr
        if exp < 5:
            merged_obs, merged_exp = merged_obs + counts.get(s, 0), merged_exp + exp
        else:
            bins.append((counts.get(s, 0), exp))
    if merged_exp > 0:
        bins.append((merged_obs, merged_exp))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    return stat, chi_square_threshold(max(len(bins) - 1, 1)), outside


def sampled_runs(dec, prompt: list[int], length: int, total: int, **sampling) -> tuple[list[tuple[int, ...]], int, int]:
    """`total` seeded samples of `length` tokens after `prompt` from a SpeculativeDecoder, in batches of 300:
    (samples, accepted draft tokens, drafted tokens)."""
    samples, accepted, drafted = [], 0, 0
    for start in range(0, total, 300):
        res = dec.generate([prompt] * min(300, total - start), max_new_tokens=length, seed=start, **sampling)
        samples.extend(tuple(s) for s in res.sequences)
        accepted, drafted = accepted + res.stats.accepted_tokens, drafted + res.stats.draft_tokens
    return samples, accepted, drafted
