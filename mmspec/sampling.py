"""Sampling specification shared by target and drafter, and the warping that turns logits into `p` / `q`.

The same :class:`SamplingSpec` must produce the target's `p` and the drafter's `q`: a draft token's `q` is the
distribution it was *actually* sampled from (ALGORITHMS.md §3.2). Temperature, top-k and top-p use transformers'
own logits warpers, so a target-only run samples from exactly the distribution `model.generate` samples from.
Repetition penalty is applied per row with that row's own history (for a draft node: the prompt, the committed
tokens and the node's ancestors), which `RepetitionPenaltyLogitsProcessor` cannot express for a tree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checks import check_sampling, check_seed
from .errors import GenerationConfigError, NonFiniteLogitsError


@dataclass(frozen=True)
class SamplingSpec:
    """How a next-token distribution is derived from logits.

    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = off).  top_p: nucleus mass (1.0 = off).
    repetition_penalty: CTRL-style penalty on already-seen tokens (1.0 = off), as in transformers.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)  # one rule everywhere

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0

    def processed_logits(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                         check: bool = True) -> torch.Tensor:
        """Logits after the repetition penalty, the only history-dependent step. logits (..., V), seen (..., V) bool.
        check: raise on NaN / +inf here (a host sync); callers that check later pass False."""
        if check:
            check_finite(logits)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if self.uses_history and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        return logits

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """Distribution to sample from, (..., V). Greedy specs give the one-hot argmax distribution."""
        logits = self.processed_logits(logits, seen, check)
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1])
        if self.greedy:
            out = torch.zeros_like(flat).scatter_(-1, flat.argmax(-1, keepdim=True), 1.0)
            return out.reshape(shape)
        flat = TemperatureLogitsWarper(float(self.temperature))(None, flat)
        if self.top_k > 0:
            flat = TopKLogitsWarper(self.top_k)(None, flat)
        if self.top_p < 1.0:
            flat = TopPLogitsWarper(float(self.top_p))(None, flat)
        return torch.softmax(flat, dim=-1).reshape(shape)


def probs_by_row(specs, logits: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Distributions (P, ..., V) with row i warped by specs[i]: one batched call when every row shares its settings,
    else one per row (requests with their own settings)."""
    if all(s == specs[0] for s in specs):
        return specs[0].probs(logits, check=check)
    return torch.stack([s.probs(logits[i], check=check) for i, s in enumerate(specs)])


def check_finite(logits: torch.Tensor, what: str = "logits") -> None:
    """Raise NonFiniteLogitsError on NaN / +inf (−inf is a legitimate masked logit)."""
    total = float(logits.sum())  # one reduction: NaN or +inf anywhere shows here (and -inf alone does not)
    if total == total and total != float("inf"):
        return
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bool(bad.any()):
        n = int(bad.sum())
        raise NonFiniteLogitsError(
            f"{what} contain {n} NaN/+inf value(s) (shape {tuple(logits.shape)}); the model produced invalid "
            "numbers — check the weights, the dtype (try float32) and the inputs")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor rule, with a per-row `seen` mask instead of ids."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def make_generators(seed: int | None, n: int, device: torch.device | str = "cpu",
                    generator: torch.Generator | list[torch.Generator] | None = None) -> list[torch.Generator]:
    """One generator per request, the same rule in the engine and both pipelines. generator: a list (one per
    request), or one torch.Generator (a single request uses it; a batch gets per-request generators seeded from its
    draws); seed: request b gets seed + b (so row 0 of a batch reproduces a single request); neither: fresh seeds.
    Passing both is an error."""
    if generator is not None and seed is not None:
        raise GenerationConfigError("pass generator= or seed=, not both")
    check_seed(seed)
    dev = torch.device(device)
    dev = dev if dev.type != "meta" else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise GenerationConfigError(f"got {len(generator)} generator(s) for {n} request(s): pass one per request "
                                        "or a single one")
        return list(generator)
    if generator is not None:
        if n == 1:
            return [generator]
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
        return [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    base = int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return [torch.Generator(device=dev).manual_seed(base + b) for b in range(n)]


def sample_from(dist: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a probability vector (V,) with the request's generator."""
    return int(torch.multinomial(dist.float() if dist.dtype != torch.float64 else dist, 1, generator=generator))


def draw_children(spec: "SamplingSpec", logits: torch.Tensor, n: int, generator=None
                  ) -> tuple[list[int], torch.Tensor | None]:
    """Up to n children of one draft node from its logits (V,): the top ranks when `spec` is greedy (q None), else
    draws without replacement from the warped distribution q, returned with them (a node's q in a Draft)."""
    if spec.greedy:
        return logits.topk(n).indices.tolist(), None
    q = spec.probs(logits)
    k = min(n, int((q > 0).sum()))
    return torch.multinomial(q, k, replacement=False, generator=generator).tolist(), q
